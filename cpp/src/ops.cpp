// The op layer: validate once, with the op name and the offending values in
// every message, then route by device.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "backend.h"
#include "libna/na.h"

namespace libna {

std::string op_name(const NaParams& params, const char* suffix) {
  return "na" + std::to_string(params.rank) + "d" + suffix;
}

namespace {

std::atomic<int> emulated_arch{0};
std::atomic<bool> emulator_checks{false};

// The name of the op that `args` belong to, for "not implemented" errors.
std::string op_of(const detail::ForwardArgs& a) { return op_name(a.params); }
std::string op_of(const detail::QkArgs& a) { return op_name(a.params, "_qk"); }
std::string op_of(const detail::AvArgs& a) { return op_name(a.params, "_av"); }
std::string op_of(const detail::BackwardArgs& a) { return op_name(a.params, "_backward"); }
std::string op_of(const detail::QkBackwardArgs& a) { return op_name(a.params, "_qk_backward"); }
std::string op_of(const detail::AvBackwardArgs& a) { return op_name(a.params, "_av_backward"); }
std::string op_of(const detail::AdditionalArgs& a) {
  return "na" + std::to_string(a.rank) + "d (additional_keys)";
}
std::string op_of(const detail::AdditionalBackwardArgs& a) {
  return "na" + std::to_string(a.rank) + "d_backward (additional_keys)";
}
std::string op_of(const detail::MergeArgs&) { return "merge_attentions"; }
std::string op_of(const detail::MergeBackwardArgs&) { return "merge_attentions_backward"; }

// The backend that runs tensors on `device`.
const detail::Backend& backend_for(const Device& device, const std::string& op) {
  if (device.type == DeviceType::cuda) {
    if (const detail::Backend* cuda = cuda::backend()) return *cuda;
    throw std::runtime_error("[" + op + "] got CUDA tensors, but libna was built without CUDA "
                             "(rebuild with a CUDA compiler and LIBNA_CUDA=ON)");
  }
  if (emulated_arch.load(std::memory_order_relaxed) != 0) {
    if (const detail::Backend* emulator = cuda_emulator::backend()) return *emulator;
  }
  return cpu::backend();
}

template <typename Args>
using Entry = void (*)(const Args&);

// Runs `entry` of the backend of `device` on validated `args`.
template <typename Args>
void run(Entry<Args> detail::Backend::*entry, const Device& device, const Args& args) {
  const detail::Backend& backend = backend_for(device, op_of(args));
  const Entry<Args> f = backend.*entry;
  if (f == nullptr) {
    throw std::runtime_error("[" + op_of(args) + "] is not implemented on the " + backend.name +
                             " backend yet; run it on CPU arrays");
  }
  f(args);
}

}  // namespace

void set_cuda_emulator(int arch, bool checks) {
  if (arch != 0 && cuda_emulator::backend() == nullptr) {
    throw std::runtime_error(
        "libna was built without the CUDA emulator; rebuild with "
        "-C cmake.define.LIBNA_CUDA_EMULATOR=ON (pip) or -DLIBNA_CUDA_EMULATOR=ON (CMake)");
  }
  if (arch != 0 && arch != 75 && arch != 80 && arch != 86 && arch != 89 && arch != 90) {
    throw std::invalid_argument("[cuda_emulator] arch=" + std::to_string(arch) +
                                " is not supported; expected one of 75, 80, 86, 89, 90 "
                                "(75 runs the SIMT kernels only, 80 and up also the tensor-core "
                                "kernels), or 0 to turn the emulator off");
  }
  emulated_arch.store(arch, std::memory_order_relaxed);
  emulator_checks.store(arch != 0 && checks, std::memory_order_relaxed);
}

int cuda_emulator_arch() { return emulated_arch.load(std::memory_order_relaxed); }
std::vector<std::string> cuda_emulator_launches() { return cuda_emulator::take_launch_log(); }
std::vector<float> cuda_emulator_self_test(const std::string& kernel) {
  if (cuda_emulator::backend() == nullptr) {
    throw std::runtime_error("[cuda_emulator_self_test] libna was built without the CUDA emulator");
  }
  return cuda_emulator::self_test(kernel);
}
bool cuda_emulator_checks() { return emulator_checks.load(std::memory_order_relaxed); }

namespace {

using detail::AvArgs;
using detail::ForwardArgs;
using detail::QkArgs;

std::string shape_str(const TensorView& t) {
  std::ostringstream s;
  s << "(";
  for (int i = 0; i < t.ndim; ++i) s << (i ? ", " : "") << t.shape[i];
  s << (t.ndim == 1 ? ",)" : ")");
  return s.str();
}

template <typename T>
std::string tuple_str(const T* values, int n) {
  std::ostringstream s;
  s << "(";
  for (int i = 0; i < n; ++i) s << (i ? ", " : "") << values[i];
  s << (n == 1 ? ",)" : ")");
  return s.str();
}

std::string layout(int rank, const char* last) {
  return std::string("[batch, *spatial(") + std::to_string(rank) + "), " + last + "]";
}

class Checker {
 public:
  Checker(const NaParams& params, const char* suffix)
      : params_(params), op_(op_name(params, suffix)) {}

  [[noreturn]] void fail(const std::string& message) const {
    throw std::invalid_argument("[" + op_ + "] " + message);
  }
  const std::string& op() const { return op_; }
  const NaParams& params() const { return params_; }
  int rank() const { return params_.rank; }

  void rank_is_valid() const {
    if (params_.rank < 1 || params_.rank > kMaxSpatialRank) {
      fail("spatial rank must be 1, 2 or 3, got " + std::to_string(params_.rank));
    }
  }

  // t has rank + 3 dimensions, none of them empty.
  void attention_tensor(const char* name, const TensorView& t, const char* last) const {
    if (t.ndim != params_.rank + 3) {
      fail(std::string(name) + " must have " + std::to_string(params_.rank + 3) +
           " dimensions " + layout(params_.rank, last) + ", got " + std::to_string(t.ndim) +
           " with shape " + shape_str(t));
    }
    nonempty(name, t);
  }

  void nonempty(const char* name, const TensorView& t) const {
    for (int i = 0; i < t.ndim; ++i) {
      if (t.shape[i] <= 0) {
        fail(std::string(name) + " has a zero-size dimension: shape " + shape_str(t) +
             "; every dimension must be at least 1");
      }
    }
  }

  void same_dtype_and_device(const char* ref_name, const TensorView& ref, const char* name,
                             const TensorView& t) const {
    if (t.dtype != ref.dtype) {
      throw dtype_error("[" + op_ + "] " + name + " has dtype " + dtype_name(t.dtype) +
                        " but " + ref_name + " has dtype " + dtype_name(ref.dtype) +
                        "; all inputs must share one dtype");
    }
    if (t.device != ref.device) {
      fail(std::string(name) + " is on " + device_name(t.device) + " but " + ref_name +
           " is on " + device_name(ref.device) + "; all inputs must be on one device");
    }
  }

  // Dimensions [first, last) of a and b agree.
  void same_dims(const char* a_name, const TensorView& a, const char* b_name,
                 const TensorView& b, int first, int last, const char* what) const {
    for (int i = first; i < last; ++i) {
      if (a.shape[i] != b.shape[i]) {
        fail(std::string(b_name) + " shape " + shape_str(b) + " does not match " + a_name +
             " shape " + shape_str(a) + " in the " + what + " dimensions");
      }
    }
  }

  // kernel, stride, dilation against the spatial extents of `t`.
  void window_params(const TensorView& t) const {
    const int n = params_.rank;
    std::int64_t spatial[kMaxSpatialRank] = {};
    for (int a = 0; a < n; ++a) spatial[a] = t.shape[1 + a];
    const auto& ks = params_.kernel_size;
    const auto& st = params_.stride;
    const auto& dl = params_.dilation;
    for (int a = 0; a < n; ++a) {
      if (ks[a] < 2) {
        fail("kernel_size=" + tuple_str(ks.data(), n) + " must be at least 2 along every axis");
      }
      if (dl[a] < 1) {
        fail("dilation=" + tuple_str(dl.data(), n) + " must be at least 1 along every axis");
      }
      if (ks[a] > spatial[a]) {
        fail("kernel_size=" + tuple_str(ks.data(), n) + " must not exceed the spatial extent " +
             tuple_str(spatial, n) + " along any axis");
      }
      if (dl[a] > spatial[a] / ks[a]) {  // kernel * dilation > extent, without overflow
        fail("kernel_size * dilation = " + tuple_str(ks.data(), n) + " * " +
             tuple_str(dl.data(), n) + " must not exceed the spatial extent " +
             tuple_str(spatial, n) + " along any axis");
      }
      if (st[a] < 1 || st[a] > ks[a]) {
        fail("stride=" + tuple_str(st.data(), n) +
             " must be between 1 and the kernel size " + tuple_str(ks.data(), n) +
             " along every axis");
      }
    }
  }

  void stride_is_one() const {
    for (int a = 0; a < params_.rank; ++a) {
      if (params_.stride[a] != 1) {
        fail("stride=" + tuple_str(params_.stride.data(), params_.rank) +
             " is not supported here; only stride 1");
      }
    }
  }

  void rpb(const TensorView& rpb, const TensorView& q) const {
    const int n = params_.rank;
    for (int a = 0; a < n; ++a) {
      if (params_.is_causal[a]) {
        fail("rpb (relative positional bias) is only defined for non-causal attention, got "
             "is_causal=" + causal_str());
      }
      if (params_.stride[a] != 1) {
        fail("rpb (relative positional bias) is only defined for stride 1, got stride=" +
             tuple_str(params_.stride.data(), n));
      }
    }
    same_dtype_and_device("q", q, "rpb", rpb);
    bool ok = rpb.ndim == n + 1 && rpb.shape[0] == q.shape[n + 1];
    for (int a = 0; ok && a < n; ++a) ok = rpb.shape[1 + a] == 2 * params_.kernel_size[a] - 1;
    if (!ok) {
      std::int64_t expected[kMaxSpatialRank + 1] = {q.shape[n + 1]};
      for (int a = 0; a < n; ++a) expected[1 + a] = 2 * params_.kernel_size[a] - 1;
      fail("rpb must have shape [heads, 2*kernel_size-1 per axis] = " +
           tuple_str(expected, n + 1) + ", got " + shape_str(rpb));
    }
  }

  void scale(const std::optional<double>& scale) const {
    if (scale && !std::isfinite(*scale)) {
      fail("scale=" + std::to_string(*scale) + " must be a finite number");
    }
  }

  std::string causal_str() const {
    std::ostringstream s;
    s << "(";
    for (int a = 0; a < params_.rank; ++a) {
      s << (a ? ", " : "") << (params_.is_causal[a] ? "True" : "False");
    }
    s << (params_.rank == 1 ? ",)" : ")");
    return s.str();
  }

 private:
  const NaParams& params_;
  std::string op_;
};

// `t` (an output, or an input such as dout whose shape follows from the
// others) has exactly the expected shape, dtype and device.
void check_like(const Checker& c, const char* role, const char* name, const TensorView& t,
                const TensorView& expected_shape, DType dtype, const TensorView& like) {
  const std::string what = std::string(role) + name;
  bool ok = t.ndim == expected_shape.ndim;
  for (int i = 0; ok && i < t.ndim; ++i) ok = t.shape[i] == expected_shape.shape[i];
  if (!ok) {
    c.fail(what + " must have shape " + shape_str(expected_shape) + ", got " + shape_str(t));
  }
  if (t.dtype != dtype) {
    throw dtype_error("[" + c.op() + "] " + what + " must have dtype " + dtype_name(dtype) +
                      ", got " + dtype_name(t.dtype));
  }
  if (t.device != like.device) {
    c.fail(what + " is on " + device_name(t.device) + " but the inputs are on " +
           device_name(like.device));
  }
}

void check_input_like(const Checker& c, const char* name, const TensorView& t,
                      const TensorView& expected_shape, DType dtype, const TensorView& like) {
  check_like(c, "", name, t, expected_shape, dtype, like);
}

// q/k (and v) agree in batch, spatial extents and head dims; heads divide.
void check_qkv(const Checker& c, const TensorView& q, const TensorView& k, const TensorView* v) {
  const int n = c.rank();
  c.attention_tensor("q", q, "heads, head_dim");
  c.attention_tensor("k", k, "heads_kv, head_dim");
  c.same_dtype_and_device("q", q, "k", k);
  c.same_dims("q", q, "k", k, 0, n + 1, "batch and spatial");
  if (k.shape[n + 2] != q.shape[n + 2]) {
    c.fail("k head_dim " + std::to_string(k.shape[n + 2]) + " (shape " + shape_str(k) +
           ") does not match q head_dim " + std::to_string(q.shape[n + 2]) + " (shape " +
           shape_str(q) + ")");
  }
  const std::int64_t heads = q.shape[n + 1], heads_kv = k.shape[n + 1];
  if (heads % heads_kv != 0) {
    c.fail("q has " + std::to_string(heads) + " heads, which is not a multiple of the " +
           std::to_string(heads_kv) + " heads of k and v (grouped-query attention needs heads "
           "divisible by heads_kv)");
  }
  if (v != nullptr) {
    c.attention_tensor("v", *v, "heads_kv, head_dim_v");
    c.same_dtype_and_device("q", q, "v", *v);
    c.same_dims("k", k, "v", *v, 0, n + 2, "batch, spatial and heads");
  }
  c.window_params(q);
}

// That the backend which will run `entry` on tensors like q can: it has
// the op, runs q's dtype and, for a fused op (head dims dim, dim_v), those
// head dims. Checked with the arguments, before any output is allocated.
template <typename Args>
void check_backend(const std::string& op, Entry<Args> detail::Backend::*entry,
                   const TensorView& q, std::int64_t dim = 0, std::int64_t dim_v = 0) {
  const detail::Backend& backend = backend_for(q.device, op);
  if (backend.*entry == nullptr) {
    throw std::runtime_error("[" + op + "] is not implemented on the " + backend.name +
                             " backend yet; run it on CPU arrays");
  }
  const detail::BackendLimits& limits = backend.limits;
  if (q.dtype == DType::float64 && !limits.float64) {
    throw dtype_error("[" + op + "] float64 is not supported by the " + backend.family +
                      " backend; use float32, float16 or bfloat16 (float64 runs on the CPU "
                      "backend)");
  }
  if (limits.max_fused_head_dim > 0 && std::max(dim, dim_v) > limits.max_fused_head_dim) {
    throw std::invalid_argument("[" + op + "] head dims up to " +
                                std::to_string(limits.max_fused_head_dim) +
                                " are supported by the " + backend.family +
                                " backend, got head_dim=" + std::to_string(dim) +
                                ", head_dim_v=" + std::to_string(dim_v));
  }
}

// The fused forward's inputs, for the op `c` names (the forward or its
// backward).
void check_forward_inputs(const Checker& c, const TensorView& q, const TensorView& k,
                          const TensorView& v, const TensorView* rpb,
                          const std::optional<double>& scale) {
  c.rank_is_valid();
  check_qkv(c, q, k, &v);
  if (rpb != nullptr) c.rpb(*rpb, q);
  c.scale(scale);
}

// ---- plans ----------------------------------------------------------------------

double resolve_scale(const NaParams& params, const TensorView& q) {
  return params.scale ? *params.scale : 1.0 / std::sqrt(static_cast<double>(q.shape[q.ndim - 1]));
}

using Inputs = std::vector<std::optional<TensorView>>;
using Last = Plan::Output::Last;

// Output `name`: input `like`'s shape with its last dimension changed by
// `last` (see Plan::Output), of `dtype`, on the inputs' device.
Plan::Output output(std::string name, const Inputs& inputs, int like, DType dtype,
                    Last last = Last::same, std::int64_t last_value = 0, bool wanted = true) {
  TensorView spec = inputs[like] ? *inputs[like] : TensorView{};
  if (last == Last::drop) spec = spec.with_last_dim(-1);
  if (last == Last::input) spec = spec.with_last_dim(inputs[last_value]->shape[inputs[last_value]->ndim - 1]);
  if (last == Last::constant) spec = spec.with_last_dim(last_value);
  spec.data = nullptr;
  spec.dtype = dtype;
  for (int i = 0; i < spec.ndim; ++i) spec.strides[i] = 0;
  return Plan::Output{std::move(name), spec, wanted, like, last, last_value};
}

Plan::Output optional_output(std::string name, const Inputs& inputs, int like, DType dtype) {
  return output(std::move(name), inputs, like, dtype, Last::same, 0, inputs[like].has_value());
}

// A backend call's arguments as planned: the outputs are filled in by run.
// Optional inputs (rpb, dlse) live here, so that the arguments' pointers to
// them stay valid for as long as the plan.
template <typename Args>
struct Planned {
  Args args;
  TensorView optional;
  TensorView dlse;  // the backward's optional lse gradient
};

template <typename Args>
std::shared_ptr<Planned<Args>> planned(Args args, const TensorView* optional,
                                       const TensorView* Args::*pointer) {
  auto p = std::make_shared<Planned<Args>>(Planned<Args>{std::move(args), {}, {}});
  if (optional != nullptr) {
    p->optional = *optional;
    p->args.*pointer = &p->optional;
  } else {
    p->args.*pointer = nullptr;
  }
  return p;
}

std::optional<TensorView> maybe(const TensorView* t) {
  return t ? std::optional<TensorView>(*t) : std::nullopt;
}

}  // namespace

Plan::Plan(std::string op, std::vector<std::optional<TensorView>> inputs,
           std::vector<Output> outputs, Runner runner, std::shared_ptr<const void> state)
    : op_(std::move(op)), inputs_(std::move(inputs)), outputs_(std::move(outputs)),
      runner_(runner), state_(std::move(state)) {}

void Plan::run(const std::vector<TensorView>& outputs, void* stream) const {
  auto fail = [&](const std::string& message) {
    throw std::invalid_argument("[" + op_ + "] " + message);
  };
  if (outputs.size() != outputs_.size()) {
    fail("expected " + std::to_string(outputs_.size()) + " outputs, got " +
         std::to_string(outputs.size()));
  }
  for (std::size_t i = 0; i < outputs.size(); ++i) {
    const Output& o = outputs_[i];
    if (!o.wanted) continue;
    const TensorView& t = outputs[i];
    bool ok = t.ndim == o.spec.ndim;
    for (int d = 0; ok && d < t.ndim; ++d) ok = t.shape[d] == o.spec.shape[d];
    if (!ok) fail("output " + o.name + " must have shape " + shape_str(o.spec) + ", got " +
                  shape_str(t));
    if (t.dtype != o.spec.dtype) {
      throw dtype_error("[" + op_ + "] output " + o.name + " must have dtype " +
                        dtype_name(o.spec.dtype) + ", got " + dtype_name(t.dtype));
    }
    if (t.device != o.spec.device) {
      fail("output " + o.name + " is on " + device_name(t.device) + " but the inputs are on " +
           device_name(o.spec.device));
    }
    if (t.data == nullptr) fail("output " + o.name + " has no data");
  }
  for (std::size_t i = 0; i < inputs_.size(); ++i) {
    if (inputs_[i] && inputs_[i]->data == nullptr) {
      fail("input " + std::to_string(i) + " has no data");
    }
  }
  runner_(*this, outputs, stream);
}

Plan plan_na_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                     const TensorView* rpb, const NaParams& params, bool with_lse) {
  Checker c(params, "");
  check_forward_inputs(c, q, k, v, rpb, params.scale);
  const int n = params.rank;
  check_backend(c.op(), &detail::Backend::na_forward, q, q.shape[n + 2], v.shape[n + 2]);
  auto state = planned(detail::ForwardArgs{q, k, v, nullptr, {}, nullptr, params,
                                           resolve_scale(params, q), nullptr},
                       rpb, &detail::ForwardArgs::rpb);
  const Inputs inputs{q, k, v, maybe(rpb)};
  return Plan(c.op(), inputs,
              {output("out", inputs, 0, q.dtype, Last::input, 2),
               output("lse", inputs, 0, lse_dtype(q.dtype), Last::drop, 0, with_lse)},
              [](const Plan& plan, const std::vector<TensorView>& outputs, void* stream) {
                detail::ForwardArgs args = plan.state<Planned<detail::ForwardArgs>>().args;
                args.out = outputs[0];
                args.lse = plan.outputs()[1].wanted ? &outputs[1] : nullptr;
                args.stream = stream;
                run(&detail::Backend::na_forward, args.q.device, args);
              },
              state);
}

void check_na_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView* rpb, const NaParams& params) {
  plan_na_forward(q, k, v, rpb, params, false);
}

void na_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                const TensorView* rpb, const TensorView& out, const TensorView* lse,
                const NaParams& params, void* stream) {
  plan_na_forward(q, k, v, rpb, params, lse != nullptr).run({out, lse ? *lse : TensorView{}}, stream);
}

Plan plan_na_qk(const TensorView& q, const TensorView& k, const TensorView* rpb,
                const NaParams& params) {
  Checker c(params, "_qk");
  c.rank_is_valid();
  c.stride_is_one();
  check_qkv(c, q, k, nullptr);
  if (rpb != nullptr) c.rpb(*rpb, q);
  check_backend(c.op(), &detail::Backend::na_qk, q);
  auto state = planned(detail::QkArgs{q, k, nullptr, {}, params, nullptr}, rpb,
                       &detail::QkArgs::rpb);
  const Inputs inputs{q, k, maybe(rpb)};
  return Plan(c.op(), inputs,
              {output("attn", inputs, 0, q.dtype, Last::constant, params.window_size())},
              [](const Plan& plan, const std::vector<TensorView>& outputs, void* stream) {
                detail::QkArgs args = plan.state<Planned<detail::QkArgs>>().args;
                args.attn = outputs[0];
                args.stream = stream;
                run(&detail::Backend::na_qk, args.q.device, args);
              },
              state);
}

void check_na_qk(const TensorView& q, const TensorView& k, const TensorView* rpb,
                 const NaParams& params) {
  plan_na_qk(q, k, rpb, params);
}

void na_qk(const TensorView& q, const TensorView& k, const TensorView* rpb,
           const TensorView& attn, const NaParams& params, void* stream) {
  plan_na_qk(q, k, rpb, params).run({attn}, stream);
}

namespace {

void check_av_inputs(const Checker& c, const TensorView& attn, const TensorView& v) {
  const NaParams& params = c.params();
  c.rank_is_valid();
  c.stride_is_one();
  const int n = params.rank;
  c.attention_tensor("attn", attn, "heads, prod(kernel_size)");
  c.attention_tensor("v", v, "heads_kv, head_dim_v");
  c.same_dtype_and_device("attn", attn, "v", v);
  c.same_dims("attn", attn, "v", v, 0, n + 1, "batch and spatial");
  const std::int64_t heads = attn.shape[n + 1], heads_kv = v.shape[n + 1];
  if (heads % heads_kv != 0) {
    c.fail("attn has " + std::to_string(heads) + " heads, which is not a multiple of the " +
           std::to_string(heads_kv) + " heads of v");
  }
  c.window_params(v);
  if (attn.shape[n + 2] != params.window_size()) {
    c.fail("attn last dimension must be prod(kernel_size) = " +
           std::to_string(params.window_size()) + ", got shape " + shape_str(attn));
  }
}

}  // namespace

Plan plan_na_av(const TensorView& attn, const TensorView& v, const NaParams& params) {
  Checker c(params, "_av");
  check_av_inputs(c, attn, v);
  check_backend(c.op(), &detail::Backend::na_av, attn);
  auto state = std::make_shared<detail::AvArgs>(detail::AvArgs{attn, v, {}, params, nullptr});
  const Inputs inputs{attn, v};
  return Plan(c.op(), inputs, {output("out", inputs, 0, attn.dtype, Last::input, 1)},
              [](const Plan& plan, const std::vector<TensorView>& outputs, void* stream) {
                detail::AvArgs args = plan.state<detail::AvArgs>();
                args.out = outputs[0];
                args.stream = stream;
                run(&detail::Backend::na_av, args.attn.device, args);
              },
              state);
}

void check_na_av(const TensorView& attn, const TensorView& v, const NaParams& params) {
  plan_na_av(attn, v, params);
}

void na_av(const TensorView& attn, const TensorView& v, const TensorView& out,
           const NaParams& params, void* stream) {
  plan_na_av(attn, v, params).run({out}, stream);
}

Plan plan_na_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView* rpb, const TensorView& out, const TensorView& dout,
                      const TensorView& lse, const NaParams& params, const TensorView* dlse) {
  Checker c(params, "_backward");
  check_forward_inputs(c, q, k, v, rpb, params.scale);
  const int n = params.rank;
  const TensorView out_shape = q.with_last_dim(v.shape[n + 2]);
  check_input_like(c, "out", out, out_shape, q.dtype, q);
  check_input_like(c, "dout", dout, out_shape, q.dtype, q);
  check_input_like(c, "lse", lse, q.with_last_dim(-1), lse_dtype(q.dtype), q);
  if (dlse != nullptr) check_input_like(c, "dlse", *dlse, q.with_last_dim(-1), lse_dtype(q.dtype), q);
  check_backend(c.op(), &detail::Backend::na_backward, q, q.shape[n + 2], v.shape[n + 2]);
  auto state = planned(detail::BackwardArgs{q, k, v, nullptr, out, dout, lse, nullptr, {}, {},
                                            {}, nullptr, params, resolve_scale(params, q),
                                            nullptr},
                       rpb, &detail::BackwardArgs::rpb);
  if (dlse != nullptr) {
    state->dlse = *dlse;
    state->args.dlse = &state->dlse;
  }
  const Inputs inputs{q, k, v, maybe(rpb), out, dout, lse, maybe(dlse)};
  return Plan(c.op(), inputs,
              {output("dq", inputs, 0, q.dtype), output("dk", inputs, 1, q.dtype),
               output("dv", inputs, 2, q.dtype), optional_output("drpb", inputs, 3, q.dtype)},
              [](const Plan& plan, const std::vector<TensorView>& outputs, void* stream) {
                detail::BackwardArgs args = plan.state<Planned<detail::BackwardArgs>>().args;
                args.dq = outputs[0];
                args.dk = outputs[1];
                args.dv = outputs[2];
                args.drpb = plan.outputs()[3].wanted ? &outputs[3] : nullptr;
                args.stream = stream;
                run(&detail::Backend::na_backward, args.q.device, args);
              },
              state);
}

void check_na_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                       const TensorView* rpb, const TensorView& out, const TensorView& dout,
                       const TensorView& lse, const NaParams& params) {
  plan_na_backward(q, k, v, rpb, out, dout, lse, params);
}

void na_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                 const TensorView* rpb, const TensorView& out, const TensorView& dout,
                 const TensorView& lse, const TensorView& dq, const TensorView& dk,
                 const TensorView& dv, const TensorView* drpb, const NaParams& params,
                 void* stream) {
  Plan plan = plan_na_backward(q, k, v, rpb, out, dout, lse, params);
  if ((rpb == nullptr) != (drpb == nullptr)) {
    Checker(params, "_backward").fail("drpb must be given exactly when rpb is");
  }
  plan.run({dq, dk, dv, drpb ? *drpb : TensorView{}}, stream);
}

Plan plan_na_qk_backward(const TensorView& dattn, const TensorView& q, const TensorView& k,
                         const TensorView* rpb, const NaParams& params) {
  Checker c(params, "_qk_backward");
  c.rank_is_valid();
  c.stride_is_one();
  check_qkv(c, q, k, nullptr);
  check_input_like(c, "dattn", dattn, q.with_last_dim(params.window_size()), q.dtype, q);
  if (rpb != nullptr) c.rpb(*rpb, q);
  check_backend(c.op(), &detail::Backend::na_qk_backward, q);
  auto state = std::make_shared<detail::QkBackwardArgs>(
      detail::QkBackwardArgs{dattn, q, k, {}, {}, nullptr, params, nullptr});
  const Inputs inputs{dattn, q, k, maybe(rpb)};
  return Plan(c.op(), inputs,
              {output("dq", inputs, 1, q.dtype), output("dk", inputs, 2, q.dtype),
               optional_output("drpb", inputs, 3, q.dtype)},
              [](const Plan& plan, const std::vector<TensorView>& outputs, void* stream) {
                detail::QkBackwardArgs args = plan.state<detail::QkBackwardArgs>();
                args.dq = outputs[0];
                args.dk = outputs[1];
                args.drpb = plan.outputs()[2].wanted ? &outputs[2] : nullptr;
                args.stream = stream;
                run(&detail::Backend::na_qk_backward, args.q.device, args);
              },
              state);
}

void check_na_qk_backward(const TensorView& dattn, const TensorView& q, const TensorView& k,
                          const TensorView* drpb, const NaParams& params) {
  plan_na_qk_backward(dattn, q, k, drpb, params);
}

void na_qk_backward(const TensorView& dattn, const TensorView& q, const TensorView& k,
                    const TensorView& dq, const TensorView& dk, const TensorView* drpb,
                    const NaParams& params, void* stream) {
  plan_na_qk_backward(dattn, q, k, drpb, params)
      .run({dq, dk, drpb ? *drpb : TensorView{}}, stream);
}

Plan plan_na_av_backward(const TensorView& dout, const TensorView& attn, const TensorView& v,
                         const NaParams& params) {
  Checker c(params, "_av_backward");
  check_av_inputs(c, attn, v);
  const int n = params.rank;
  check_input_like(c, "dout", dout, attn.with_last_dim(v.shape[n + 2]), attn.dtype, attn);
  check_backend(c.op(), &detail::Backend::na_av_backward, attn);
  auto state = std::make_shared<detail::AvBackwardArgs>(
      detail::AvBackwardArgs{dout, attn, v, {}, {}, params, nullptr});
  const Inputs inputs{dout, attn, v};
  return Plan(c.op(), inputs,
              {output("dattn", inputs, 1, attn.dtype), output("dv", inputs, 2, attn.dtype)},
              [](const Plan& plan, const std::vector<TensorView>& outputs, void* stream) {
                detail::AvBackwardArgs args = plan.state<detail::AvBackwardArgs>();
                args.dattn = outputs[0];
                args.dv = outputs[1];
                args.stream = stream;
                run(&detail::Backend::na_av_backward, args.attn.device, args);
              },
              state);
}

void check_na_av_backward(const TensorView& dout, const TensorView& attn, const TensorView& v,
                          const NaParams& params) {
  plan_na_av_backward(dout, attn, v, params);
}

void na_av_backward(const TensorView& dout, const TensorView& attn, const TensorView& v,
                    const TensorView& dattn, const TensorView& dv, const NaParams& params,
                    void* stream) {
  plan_na_av_backward(dout, attn, v, params).run({dattn, dv}, stream);
}

// ---- composition: additional keys and merging ---------------------------------

namespace {

// q [B, *spatial, heads, D]; additional_keys [B, N, heads_kv, D];
// additional_values [B, N, heads_kv, D_v].
void check_additional(const Checker& c, const TensorView& q, const TensorView& keys,
                      const TensorView& values) {
  c.attention_tensor("q", q, "heads, head_dim");
  const int n = c.rank();
  auto check_one = [&](const char* name, const TensorView& t, const char* last) {
    if (t.ndim != 4) {
      c.fail(std::string(name) + " must have 4 dimensions [batch, num_additional, heads_kv, " +
             last + "], got " + std::to_string(t.ndim) + " with shape " + shape_str(t));
    }
    c.nonempty(name, t);
    c.same_dtype_and_device("q", q, name, t);
    if (t.shape[0] != q.shape[0]) {
      c.fail(std::string(name) + " has batch " + std::to_string(t.shape[0]) + " (shape " +
             shape_str(t) + ") but q has batch " + std::to_string(q.shape[0]) + " (shape " +
             shape_str(q) + ")");
    }
  };
  check_one("additional_keys", keys, "head_dim");
  check_one("additional_values", values, "head_dim_v");
  c.same_dims("additional_keys", keys, "additional_values", values, 0, 3,
              "batch, num_additional and heads_kv");
  if (keys.shape[3] != q.shape[n + 2]) {
    c.fail("additional_keys head_dim " + std::to_string(keys.shape[3]) + " (shape " +
           shape_str(keys) + ") does not match q head_dim " + std::to_string(q.shape[n + 2]) +
           " (shape " + shape_str(q) + ")");
  }
  const std::int64_t heads = q.shape[n + 1], heads_kv = keys.shape[2];
  if (heads % heads_kv != 0) {
    c.fail("q has " + std::to_string(heads) + " heads, which is not a multiple of the " +
           std::to_string(heads_kv) + " heads of additional_keys and additional_values");
  }
}

}  // namespace

Plan plan_na_additional_forward(const TensorView& q, const TensorView& additional_keys,
                                const TensorView& additional_values, const NaParams& params,
                                bool with_lse) {
  Checker c(params, "");
  c.rank_is_valid();
  check_additional(c, q, additional_keys, additional_values);
  c.scale(params.scale);
  check_backend(c.op(), &detail::Backend::na_additional_forward, q);
  auto state = std::make_shared<detail::AdditionalArgs>(detail::AdditionalArgs{
      q, additional_keys, additional_values, {}, nullptr, params.rank, resolve_scale(params, q),
      nullptr});
  const Inputs inputs{q, additional_keys, additional_values};
  return Plan(c.op(), inputs,
              {output("out", inputs, 0, q.dtype, Last::input, 2),
               output("lse", inputs, 0, lse_dtype(q.dtype), Last::drop, 0, with_lse)},
              [](const Plan& plan, const std::vector<TensorView>& outputs, void* stream) {
                detail::AdditionalArgs args = plan.state<detail::AdditionalArgs>();
                args.out = outputs[0];
                args.lse = plan.outputs()[1].wanted ? &outputs[1] : nullptr;
                args.stream = stream;
                run(&detail::Backend::na_additional_forward, args.q.device, args);
              },
              state);
}

void check_na_additional_forward(const TensorView& q, const TensorView& additional_keys,
                                 const TensorView& additional_values, const NaParams& params) {
  plan_na_additional_forward(q, additional_keys, additional_values, params, false);
}

void na_additional_forward(const TensorView& q, const TensorView& additional_keys,
                           const TensorView& additional_values, const TensorView& out,
                           const TensorView* lse, const NaParams& params, void* stream) {
  plan_na_additional_forward(q, additional_keys, additional_values, params, lse != nullptr)
      .run({out, lse ? *lse : TensorView{}}, stream);
}

Plan plan_na_additional_backward(const TensorView& q, const TensorView& additional_keys,
                                 const TensorView& additional_values, const TensorView& out,
                                 const TensorView& dout, const TensorView& lse,
                                 const NaParams& params, const TensorView* dlse) {
  Checker c(params, "_backward");
  c.rank_is_valid();
  check_additional(c, q, additional_keys, additional_values);
  c.scale(params.scale);
  const TensorView out_shape = q.with_last_dim(additional_values.shape[3]);
  check_input_like(c, "out", out, out_shape, q.dtype, q);
  check_input_like(c, "dout", dout, out_shape, q.dtype, q);
  check_input_like(c, "lse", lse, q.with_last_dim(-1), lse_dtype(q.dtype), q);
  if (dlse != nullptr) check_input_like(c, "dlse", *dlse, q.with_last_dim(-1), lse_dtype(q.dtype), q);
  check_backend(c.op(), &detail::Backend::na_additional_backward, q);
  auto state = planned(detail::AdditionalBackwardArgs{q, additional_keys, additional_values, out,
                                                      dout, lse, nullptr, {}, {}, {}, params.rank,
                                                      resolve_scale(params, q), nullptr},
                       dlse, &detail::AdditionalBackwardArgs::dlse);
  const Inputs inputs{q, additional_keys, additional_values, out, dout, lse, maybe(dlse)};
  return Plan(c.op(), inputs,
              {output("dq", inputs, 0, q.dtype),
               output("d(additional_keys)", inputs, 1, q.dtype),
               output("d(additional_values)", inputs, 2, q.dtype)},
              [](const Plan& plan, const std::vector<TensorView>& outputs, void* stream) {
                detail::AdditionalBackwardArgs args =
                    plan.state<Planned<detail::AdditionalBackwardArgs>>().args;
                args.dq = outputs[0];
                args.dk = outputs[1];
                args.dv = outputs[2];
                args.stream = stream;
                run(&detail::Backend::na_additional_backward, args.q.device, args);
              },
              state);
}

void check_na_additional_backward(const TensorView& q, const TensorView& additional_keys,
                                  const TensorView& additional_values, const TensorView& out,
                                  const TensorView& dout, const TensorView& lse,
                                  const NaParams& params) {
  plan_na_additional_backward(q, additional_keys, additional_values, out, dout, lse, params);
}

void na_additional_backward(const TensorView& q, const TensorView& additional_keys,
                            const TensorView& additional_values, const TensorView& out,
                            const TensorView& dout, const TensorView& lse, const TensorView& dq,
                            const TensorView& dk, const TensorView& dv, const NaParams& params,
                            void* stream) {
  plan_na_additional_backward(q, additional_keys, additional_values, out, dout, lse, params)
      .run({dq, dk, dv}, stream);
}

namespace {

[[noreturn]] void merge_fail(const char* op, const std::string& message) {
  throw std::invalid_argument(std::string("[") + op + "] " + message);
}

// `t` has exactly the shape, dtype and device of `like` (dtype `dtype`).
void merge_like(const char* op, const std::string& name, const TensorView& t,
                const TensorView& shape_of, DType dtype, const TensorView& like) {
  bool ok = t.ndim == shape_of.ndim;
  for (int i = 0; ok && i < t.ndim; ++i) ok = t.shape[i] == shape_of.shape[i];
  if (!ok) {
    merge_fail(op, name + " must have shape " + shape_str(shape_of) + ", got " + shape_str(t));
  }
  if (t.dtype != dtype) {
    throw dtype_error(std::string("[") + op + "] " + name + " has dtype " +
                      dtype_name(t.dtype) + "; expected " + dtype_name(dtype));
  }
  if (t.device != like.device) {
    merge_fail(op, name + " is on " + device_name(t.device) + " but outs[0] is on " +
                       device_name(like.device));
  }
}

void check_merge_inputs(const char* op, const std::vector<TensorView>& outs,
                        const std::vector<TensorView>& lses) {
  if (outs.empty()) merge_fail(op, "outs is empty; expected at least one partial attention");
  if (outs.size() != lses.size()) {
    merge_fail(op, "got " + std::to_string(outs.size()) + " outs but " +
                       std::to_string(lses.size()) + " lses; expected one lse per out");
  }
  const TensorView& first = outs[0];
  if (first.ndim < 2) {
    merge_fail(op, "outs[0] must have at least 2 dimensions [..., head_dim_v], got shape " +
                       shape_str(first));
  }
  for (int i = 0; i < first.ndim; ++i) {
    if (first.shape[i] <= 0) {
      merge_fail(op, "outs[0] has a zero-size dimension: shape " + shape_str(first));
    }
  }
  for (std::size_t i = 0; i < outs.size(); ++i) {
    const std::string idx = "[" + std::to_string(i) + "]";
    merge_like(op, "outs" + idx, outs[i], first, first.dtype, first);
    merge_like(op, "lses" + idx, lses[i], first.with_last_dim(-1), lse_dtype(first.dtype), first);
  }
}

}  // namespace

Plan plan_merge_attentions(const std::vector<TensorView>& outs,
                           const std::vector<TensorView>& lses) {
  const char* op = "merge_attentions";
  check_merge_inputs(op, outs, lses);
  check_backend(op, &detail::Backend::merge_attentions, outs[0]);
  const TensorView& first = outs[0];
  Inputs inputs(outs.begin(), outs.end());
  inputs.insert(inputs.end(), lses.begin(), lses.end());
  auto state = std::make_shared<detail::MergeArgs>(detail::MergeArgs{outs, lses, {}, {}, nullptr});
  std::vector<Plan::Output> outputs{output("out", inputs, 0, first.dtype),
                                    output("lse", inputs, 0, lse_dtype(first.dtype), Last::drop)};
  return Plan(op, std::move(inputs), std::move(outputs),
              [](const Plan& plan, const std::vector<TensorView>& outputs, void* stream) {
                detail::MergeArgs args = plan.state<detail::MergeArgs>();
                args.out = outputs[0];
                args.lse = outputs[1];
                args.stream = stream;
                run(&detail::Backend::merge_attentions, args.out.device, args);
              },
              state);
}

void check_merge_attentions(const std::vector<TensorView>& outs,
                            const std::vector<TensorView>& lses) {
  plan_merge_attentions(outs, lses);
}

void merge_attentions(const std::vector<TensorView>& outs, const std::vector<TensorView>& lses,
                      const TensorView& out, const TensorView& lse, void* stream) {
  plan_merge_attentions(outs, lses).run({out, lse}, stream);
}

Plan plan_merge_attentions_backward(const std::vector<TensorView>& outs,
                                    const std::vector<TensorView>& lses, const TensorView& out,
                                    const TensorView& lse, const TensorView& dout,
                                    const TensorView* dlse) {
  const char* op = "merge_attentions_backward";
  check_merge_inputs(op, outs, lses);
  const TensorView& first = outs[0];
  const TensorView lse_shape = first.with_last_dim(-1);
  merge_like(op, "out", out, first, first.dtype, first);
  merge_like(op, "lse", lse, lse_shape, lse_dtype(first.dtype), first);
  merge_like(op, "dout", dout, first, first.dtype, first);
  if (dlse != nullptr) merge_like(op, "dlse", *dlse, lse_shape, lse_dtype(first.dtype), first);
  check_backend(op, &detail::Backend::merge_attentions_backward, first);
  Inputs inputs(outs.begin(), outs.end());
  inputs.insert(inputs.end(), lses.begin(), lses.end());
  inputs.insert(inputs.end(), {out, lse, dout, maybe(dlse)});
  const int parts = static_cast<int>(outs.size());
  std::vector<Plan::Output> outputs;
  for (int i = 0; i < parts; ++i) {
    outputs.push_back(output("douts[" + std::to_string(i) + "]", inputs, i, first.dtype));
  }
  for (int i = 0; i < parts; ++i) {
    outputs.push_back(
        output("dlses[" + std::to_string(i) + "]", inputs, parts + i, lse_dtype(first.dtype)));
  }
  auto state = planned(detail::MergeBackwardArgs{outs, lses, out, lse, dout, nullptr, {}, {},
                                                 nullptr},
                       dlse, &detail::MergeBackwardArgs::dlse);
  return Plan(op, std::move(inputs), std::move(outputs),
              [](const Plan& plan, const std::vector<TensorView>& outputs, void* stream) {
                detail::MergeBackwardArgs args =
                    plan.state<Planned<detail::MergeBackwardArgs>>().args;
                const std::size_t n = args.outs.size();
                args.douts.assign(outputs.begin(), outputs.begin() + n);
                args.dlses.assign(outputs.begin() + n, outputs.end());
                args.stream = stream;
                run(&detail::Backend::merge_attentions_backward, args.out.device, args);
              },
              state);
}

void check_merge_attentions_backward(const std::vector<TensorView>& outs,
                                     const std::vector<TensorView>& lses, const TensorView& out,
                                     const TensorView& lse, const TensorView& dout,
                                     const TensorView* dlse) {
  plan_merge_attentions_backward(outs, lses, out, lse, dout, dlse);
}

void merge_attentions_backward(const std::vector<TensorView>& outs,
                               const std::vector<TensorView>& lses, const TensorView& out,
                               const TensorView& lse, const TensorView& dout,
                               const TensorView* dlse, const std::vector<TensorView>& douts,
                               const std::vector<TensorView>& dlses, void* stream) {
  Plan plan = plan_merge_attentions_backward(outs, lses, out, lse, dout, dlse);
  if (douts.size() != outs.size() || dlses.size() != outs.size()) {
    merge_fail("merge_attentions_backward",
               "expected " + std::to_string(outs.size()) + " douts and dlses, got " +
                   std::to_string(douts.size()) + " and " + std::to_string(dlses.size()));
  }
  std::vector<TensorView> outputs(douts);
  outputs.insert(outputs.end(), dlses.begin(), dlses.end());
  plan.run(outputs, stream);
}

}  // namespace libna
