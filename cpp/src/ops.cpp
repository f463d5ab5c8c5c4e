// The op layer: validate once, with the op name and the offending values in
// every message, then route by device.
#include <algorithm>
#include <array>
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
// `feature` names what the entry serves when it is a part of the op
// ("additional keys").
template <typename Args>
void check_backend(const std::string& op, Entry<Args> detail::Backend::*entry,
                   const TensorView& q, std::int64_t dim = 0, std::int64_t dim_v = 0,
                   const char* feature = nullptr) {
  const detail::Backend& backend = backend_for(q.device, op);
  if (backend.*entry == nullptr) {
    throw std::runtime_error("[" + op + "] " +
                             (feature ? std::string(feature) + " are" : std::string("is")) +
                             " not implemented on the " + backend.name +
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

using Last = Plan::Output::Last;

// A plan's inputs in the op's documented order, each with its name (for
// Plan::run's messages); an absent optional one is nullopt.
struct Inputs {
  std::vector<std::string> names;
  std::vector<std::optional<TensorView>> views;

  Inputs& add(std::string name, const TensorView* t) {
    names.push_back(std::move(name));
    views.push_back(t ? std::optional<TensorView>(*t) : std::nullopt);
    return *this;
  }
  Inputs& add(std::string name, const TensorView& t) { return add(std::move(name), &t); }
  bool has(int i) const { return views[i].has_value(); }
};

// Output `name`: input `like`'s shape with its last dimension changed by
// `last` (see Plan::Output), of `dtype`, on the inputs' device.
Plan::Output output(std::string name, const Inputs& inputs, int like, DType dtype,
                    Last last = Last::same, std::int64_t last_value = 0, bool wanted = true) {
  TensorView spec = inputs.has(like) ? *inputs.views[like] : TensorView{};
  if (last == Last::drop) spec = spec.with_last_dim(-1);
  if (last == Last::input) {
    const TensorView& from = *inputs.views[last_value];
    spec = spec.with_last_dim(from.shape[from.ndim - 1]);
  }
  if (last == Last::constant) spec = spec.with_last_dim(last_value);
  spec.data = nullptr;
  spec.dtype = dtype;
  for (int i = 0; i < spec.ndim; ++i) spec.strides[i] = 0;
  Plan::Output o{std::move(name), spec, wanted};
  o.like = like;
  o.last = last;
  o.last_value = last_value;
  return o;
}

// The gradient of optional input `like`: produced exactly when it is given.
Plan::Output optional_output(std::string name, const Inputs& inputs, int like, DType dtype) {
  return output(std::move(name), inputs, like, dtype, Last::same, 0, inputs.has(like));
}

// A backend call's arguments as planned (run fills in the outputs and the
// stream), with copies of the optional inputs that its pointers refer to, so
// that they stay valid for as long as the plan.
template <typename Args>
struct Planned {
  Args args;
  std::array<TensorView, 2> held{};

  // A pointer to a copy of *t that lives as long as the plan; nullptr for none.
  const TensorView* hold(const TensorView* t, std::size_t slot) {
    if (t == nullptr) return nullptr;
    held[slot] = *t;
    return &held[slot];
  }
};

// Output i when the plan produces it, else nullptr.
const TensorView* produced(const Plan& plan, const std::vector<TensorView>& outputs, int i) {
  return plan.outputs()[i].wanted ? &outputs[i] : nullptr;
}

template <typename Args>
using Fill = void (*)(Args& args, const Plan& plan, const std::vector<TensorView>& outputs);

// The runner of a plan that is one backend call: the planned arguments with
// the outputs (by `fill`) and the stream, on the device of the first input.
template <typename Args, Entry<Args> detail::Backend::*entry, Fill<Args> fill>
void run_planned(const Plan& plan, const std::vector<TensorView>& outputs, void* stream) {
  Args args = plan.state<Planned<Args>>().args;
  fill(args, plan, outputs);
  args.stream = stream;
  run(entry, plan.inputs()[0]->device, args);
}

template <typename Args>
std::shared_ptr<Planned<Args>> planned(Args args) {
  return std::make_shared<Planned<Args>>(Planned<Args>{std::move(args)});
}

}  // namespace

Plan::Plan(std::string op, std::vector<std::optional<TensorView>> inputs,
           std::vector<std::string> input_names, std::vector<Output> outputs, Runner runner,
           std::shared_ptr<const void> state)
    : op_(std::move(op)), inputs_(std::move(inputs)), input_names_(std::move(input_names)),
      outputs_(std::move(outputs)), runner_(runner), state_(std::move(state)) {}

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
    if (t.data == nullptr) {
      fail("output " + o.name + " has no data" +
           (o.workspace ? " (a workspace: allocate it, its contents are not a result)" : ""));
    }
  }
  for (std::size_t i = 0; i < inputs_.size(); ++i) {
    if (inputs_[i] && inputs_[i]->data == nullptr) fail("input " + input_names_[i] + " has no data");
  }
  runner_(*this, outputs, stream);
}

// ---- fused attention --------------------------------------------------------------

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

// Additional keys of the fused op `c` names (both or neither), whose
// attention merges with the neighbourhood's: additional_values has v's D_v.
void check_additional_pair(const Checker& c, const TensorView& q, const TensorView& v,
                           const TensorView* keys, const TensorView* values) {
  if ((keys == nullptr) != (values == nullptr)) {
    c.fail(std::string(keys ? "additional_keys was given without additional_values"
                            : "additional_values was given without additional_keys") +
           "; pass both or neither");
  }
  if (keys == nullptr) return;
  check_additional(c, q, *keys, *values);
  const int n = c.rank();
  if (values->shape[3] != v.shape[n + 2]) {
    c.fail("additional_values head_dim_v " + std::to_string(values->shape[3]) + " (shape " +
           shape_str(*values) + ") does not match v head_dim_v " +
           std::to_string(v.shape[n + 2]) + " (shape " + shape_str(v) + ")");
  }
  check_backend(c.op(), &detail::Backend::na_additional_forward, q, 0, 0, "additional keys");
}

// A fused op with an optional second part: the neighbourhood's backend call,
// then, when additional keys are planned, theirs on the same outputs (the
// forward merges into the neighbourhood's out and lse, which is then needed:
// a workspace when the caller does not want it; the backward adds its dq).
template <typename Args, typename Extra>
struct Composed {
  Planned<Args> na;
  std::optional<Extra> additional;
};

template <typename Args, Entry<Args> detail::Backend::*entry, Fill<Args> fill, typename Extra,
          Entry<Extra> detail::Backend::*extra_entry, Fill<Extra> extra_fill>
void run_composed(const Plan& plan, const std::vector<TensorView>& outputs, void* stream) {
  const auto& state = plan.state<Composed<Args, Extra>>();
  Args args = state.na.args;
  fill(args, plan, outputs);
  args.stream = stream;
  run(entry, args.q.device, args);
  if (state.additional) {
    Extra extra = *state.additional;
    extra_fill(extra, plan, outputs);
    extra.stream = stream;
    run(extra_entry, extra.q.device, extra);
  }
}

// Outputs: out, lse (for the fused forward and the additional keys alone).
template <typename Args>
void fill_out_and_lse(Args& args, const Plan& plan, const std::vector<TensorView>& outputs) {
  args.out = outputs[0];
  args.lse = produced(plan, outputs, 1);
}
void fill_merged_additional(detail::AdditionalArgs& args, const Plan&,
                            const std::vector<TensorView>& outputs) {
  args.out = outputs[0];
  args.lse = &outputs[1];
}
using ForwardState = Composed<detail::ForwardArgs, detail::AdditionalArgs>;
constexpr Plan::Runner run_forward =
    run_composed<detail::ForwardArgs, &detail::Backend::na_forward, fill_out_and_lse,
                 detail::AdditionalArgs, &detail::Backend::na_additional_forward,
                 fill_merged_additional>;

// Outputs: dq, dk, dv, drpb, d(additional_keys), d(additional_values).
void fill_backward(detail::BackwardArgs& args, const Plan& plan,
                   const std::vector<TensorView>& outputs) {
  args.dq = outputs[0];
  args.dk = outputs[1];
  args.dv = outputs[2];
  args.drpb = produced(plan, outputs, 3);
}
void fill_accumulated_additional(detail::AdditionalBackwardArgs& args, const Plan&,
                                 const std::vector<TensorView>& outputs) {
  args.dq = outputs[0];
  args.dk = outputs[4];
  args.dv = outputs[5];
}
using BackwardState = Composed<detail::BackwardArgs, detail::AdditionalBackwardArgs>;
constexpr Plan::Runner run_backward =
    run_composed<detail::BackwardArgs, &detail::Backend::na_backward, fill_backward,
                 detail::AdditionalBackwardArgs, &detail::Backend::na_additional_backward,
                 fill_accumulated_additional>;

}  // namespace

Plan plan_na_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                     const TensorView* rpb, const NaParams& params, bool with_lse,
                     const TensorView* additional_keys, const TensorView* additional_values) {
  Checker c(params, "");
  check_forward_inputs(c, q, k, v, rpb, params.scale);
  const int n = params.rank;
  check_backend(c.op(), &detail::Backend::na_forward, q, q.shape[n + 2], v.shape[n + 2]);
  check_additional_pair(c, q, v, additional_keys, additional_values);
  const double scale = resolve_scale(params, q);
  auto state = std::make_shared<ForwardState>();
  state->na.args = detail::ForwardArgs{q, k, v, state->na.hold(rpb, 0), {}, nullptr, params,
                                       scale, nullptr};
  const bool additional = additional_keys != nullptr;
  if (additional) {
    state->additional = detail::AdditionalArgs{
        q, *additional_keys, *additional_values, {}, nullptr, n, scale, nullptr, true};
  }
  Inputs inputs;
  inputs.add("q", q).add("k", k).add("v", v).add("rpb", rpb);
  inputs.add("additional_keys", additional_keys).add("additional_values", additional_values);
  std::vector<Plan::Output> outputs{
      output("out", inputs, 0, q.dtype, Last::input, 2),
      output("lse", inputs, 0, lse_dtype(q.dtype), Last::drop, 0, with_lse || additional)};
  outputs[1].workspace = !with_lse && additional;
  return Plan(c.op(), inputs.views, inputs.names, std::move(outputs), run_forward, state);
}

void check_na_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView* rpb, const NaParams& params) {
  plan_na_forward(q, k, v, rpb, params, false);
}

namespace {

// Runs `plan`, allocating on the host each workspace output the caller left
// without data (CPU tensors only: elsewhere the caller must allocate it).
void run_with_workspace(const Plan& plan, std::vector<TensorView> outputs, void* stream) {
  std::vector<std::vector<double>> workspaces;
  for (std::size_t i = 0; i < outputs.size(); ++i) {
    const Plan::Output& o = plan.outputs()[i];
    if (!o.workspace || outputs[i].data != nullptr) continue;
    if (o.spec.device.type != DeviceType::cpu) {
      throw std::invalid_argument("[" + plan.op() + "] output " + o.name +
                                  " is needed as a workspace on " + device_name(o.spec.device) +
                                  "; pass it (or use the plan to allocate it)");
    }
    TensorView t = o.spec;
    std::int64_t count = 1;
    for (int d = t.ndim - 1; d >= 0; --d) {
      t.strides[d] = count;
      count *= t.shape[d];
    }
    workspaces.emplace_back(static_cast<std::size_t>(count * dtype_size(t.dtype) / sizeof(double) + 1));
    t.data = workspaces.back().data();
    outputs[i] = t;
  }
  plan.run(outputs, stream);
}

}  // namespace

void na_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                const TensorView* rpb, const TensorView& out, const TensorView* lse,
                const NaParams& params, void* stream, const TensorView* additional_keys,
                const TensorView* additional_values) {
  const Plan plan = plan_na_forward(q, k, v, rpb, params, lse != nullptr, additional_keys,
                                    additional_values);
  run_with_workspace(plan, {out, lse ? *lse : TensorView{}}, stream);
}

Plan plan_na_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView* rpb, const TensorView& out, const TensorView& dout,
                      const TensorView& lse, const NaParams& params, const TensorView* dlse,
                      const TensorView* additional_keys, const TensorView* additional_values) {
  Checker c(params, "_backward");
  check_forward_inputs(c, q, k, v, rpb, params.scale);
  const int n = params.rank;
  const TensorView out_shape = q.with_last_dim(v.shape[n + 2]);
  check_input_like(c, "out", out, out_shape, q.dtype, q);
  check_input_like(c, "dout", dout, out_shape, q.dtype, q);
  check_input_like(c, "lse", lse, q.with_last_dim(-1), lse_dtype(q.dtype), q);
  if (dlse != nullptr) check_input_like(c, "dlse", *dlse, q.with_last_dim(-1), lse_dtype(q.dtype), q);
  check_backend(c.op(), &detail::Backend::na_backward, q, q.shape[n + 2], v.shape[n + 2]);
  check_additional_pair(c, q, v, additional_keys, additional_values);
  if (additional_keys != nullptr) {
    check_backend(c.op(), &detail::Backend::na_additional_backward, q, 0, 0, "additional keys");
  }
  const double scale = resolve_scale(params, q);
  auto state = std::make_shared<BackwardState>();
  const TensorView* held_dlse = state->na.hold(dlse, 1);
  state->na.args = detail::BackwardArgs{q,  k,  v,  state->na.hold(rpb, 0), out, dout, lse,
                                        held_dlse, {}, {}, {}, nullptr, params, scale, nullptr};
  if (additional_keys != nullptr) {
    state->additional = detail::AdditionalBackwardArgs{
        q, *additional_keys, *additional_values, out, dout, lse, held_dlse, {}, {}, {}, n,
        scale, nullptr, true};
  }
  Inputs inputs;
  inputs.add("q", q).add("k", k).add("v", v).add("rpb", rpb).add("out", out).add("dout", dout);
  inputs.add("lse", lse).add("dlse", dlse);
  inputs.add("additional_keys", additional_keys).add("additional_values", additional_values);
  return Plan(c.op(), inputs.views, inputs.names,
              {output("dq", inputs, 0, q.dtype), output("dk", inputs, 1, q.dtype),
               output("dv", inputs, 2, q.dtype), optional_output("drpb", inputs, 3, q.dtype),
               optional_output("d(additional_keys)", inputs, 8, q.dtype),
               optional_output("d(additional_values)", inputs, 9, q.dtype)},
              run_backward, state);
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
                 void* stream, const TensorView* dlse, const TensorView* additional_keys,
                 const TensorView* additional_values, const TensorView* d_additional_keys,
                 const TensorView* d_additional_values) {
  Plan plan = plan_na_backward(q, k, v, rpb, out, dout, lse, params, dlse, additional_keys,
                               additional_values);
  Checker c(params, "_backward");
  if ((rpb == nullptr) != (drpb == nullptr)) c.fail("drpb must be given exactly when rpb is");
  if ((additional_keys == nullptr) != (d_additional_keys == nullptr) ||
      (additional_values == nullptr) != (d_additional_values == nullptr)) {
    c.fail("d_additional_keys and d_additional_values must be given exactly when "
           "additional_keys and additional_values are");
  }
  auto or_none = [](const TensorView* t) { return t ? *t : TensorView{}; };
  plan.run({dq, dk, dv, or_none(drpb), or_none(d_additional_keys), or_none(d_additional_values)},
           stream);
}

// ---- unfused attention --------------------------------------------------------------

namespace {

void fill_qk(detail::QkArgs& args, const Plan&, const std::vector<TensorView>& outputs) {
  args.attn = outputs[0];
}

void fill_av(detail::AvArgs& args, const Plan&, const std::vector<TensorView>& outputs) {
  args.out = outputs[0];
}

void fill_qk_backward(detail::QkBackwardArgs& args, const Plan& plan,
                      const std::vector<TensorView>& outputs) {
  args.dq = outputs[0];
  args.dk = outputs[1];
  args.drpb = produced(plan, outputs, 2);
}

void fill_av_backward(detail::AvBackwardArgs& args, const Plan&,
                      const std::vector<TensorView>& outputs) {
  args.dattn = outputs[0];
  args.dv = outputs[1];
}

}  // namespace

Plan plan_na_qk(const TensorView& q, const TensorView& k, const TensorView* rpb,
                const NaParams& params) {
  Checker c(params, "_qk");
  c.rank_is_valid();
  c.stride_is_one();
  check_qkv(c, q, k, nullptr);
  if (rpb != nullptr) c.rpb(*rpb, q);
  check_backend(c.op(), &detail::Backend::na_qk, q);
  auto state = std::make_shared<Planned<detail::QkArgs>>();
  state->args = detail::QkArgs{q, k, state->hold(rpb, 0), {}, params, nullptr};
  Inputs inputs;
  inputs.add("q", q).add("k", k).add("rpb", rpb);
  return Plan(c.op(), inputs.views, inputs.names,
              {output("attn", inputs, 0, q.dtype, Last::constant, params.window_size())},
              run_planned<detail::QkArgs, &detail::Backend::na_qk, fill_qk>, state);
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
  Inputs inputs;
  inputs.add("attn", attn).add("v", v);
  return Plan(c.op(), inputs.views, inputs.names,
              {output("out", inputs, 0, attn.dtype, Last::input, 1)},
              run_planned<detail::AvArgs, &detail::Backend::na_av, fill_av>,
              planned(detail::AvArgs{attn, v, {}, params, nullptr}));
}

void check_na_av(const TensorView& attn, const TensorView& v, const NaParams& params) {
  plan_na_av(attn, v, params);
}

void na_av(const TensorView& attn, const TensorView& v, const TensorView& out,
           const NaParams& params, void* stream) {
  plan_na_av(attn, v, params).run({out}, stream);
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
  Inputs inputs;
  inputs.add("dattn", dattn).add("q", q).add("k", k).add("rpb", rpb);
  return Plan(c.op(), inputs.views, inputs.names,
              {output("dq", inputs, 1, q.dtype), output("dk", inputs, 2, q.dtype),
               optional_output("drpb", inputs, 3, q.dtype)},
              run_planned<detail::QkBackwardArgs, &detail::Backend::na_qk_backward,
                          fill_qk_backward>,
              planned(detail::QkBackwardArgs{dattn, q, k, {}, {}, nullptr, params, nullptr}));
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
  Inputs inputs;
  inputs.add("dout", dout).add("attn", attn).add("v", v);
  return Plan(c.op(), inputs.views, inputs.names,
              {output("dattn", inputs, 1, attn.dtype), output("dv", inputs, 2, attn.dtype)},
              run_planned<detail::AvBackwardArgs, &detail::Backend::na_av_backward,
                          fill_av_backward>,
              planned(detail::AvBackwardArgs{dout, attn, v, {}, {}, params, nullptr}));
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

void fill_additional_backward(detail::AdditionalBackwardArgs& args, const Plan&,
                              const std::vector<TensorView>& outputs) {
  args.dq = outputs[0];
  args.dk = outputs[1];
  args.dv = outputs[2];
}

void fill_merge(detail::MergeArgs& args, const Plan&, const std::vector<TensorView>& outputs) {
  args.out = outputs[0];
  args.lse = outputs[1];
}

void fill_merge_backward(detail::MergeBackwardArgs& args, const Plan&,
                         const std::vector<TensorView>& outputs) {
  const std::size_t n = args.outs.size();
  args.douts.assign(outputs.begin(), outputs.begin() + n);
  args.dlses.assign(outputs.begin() + n, outputs.end());
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
  Inputs inputs;
  inputs.add("q", q).add("additional_keys", additional_keys);
  inputs.add("additional_values", additional_values);
  return Plan(c.op(), inputs.views, inputs.names,
              {output("out", inputs, 0, q.dtype, Last::input, 2),
               output("lse", inputs, 0, lse_dtype(q.dtype), Last::drop, 0, with_lse)},
              run_planned<detail::AdditionalArgs, &detail::Backend::na_additional_forward,
                          fill_out_and_lse>,
              planned(detail::AdditionalArgs{q, additional_keys, additional_values, {}, nullptr,
                                             params.rank, resolve_scale(params, q), nullptr}));
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
  auto state = std::make_shared<Planned<detail::AdditionalBackwardArgs>>();
  state->args = detail::AdditionalBackwardArgs{
      q,  additional_keys, additional_values, out, dout, lse, state->hold(dlse, 0), {}, {}, {},
      params.rank, resolve_scale(params, q), nullptr};
  Inputs inputs;
  inputs.add("q", q).add("additional_keys", additional_keys);
  inputs.add("additional_values", additional_values).add("out", out).add("dout", dout);
  inputs.add("lse", lse).add("dlse", dlse);
  return Plan(c.op(), inputs.views, inputs.names,
              {output("dq", inputs, 0, q.dtype),
               output("d(additional_keys)", inputs, 1, q.dtype),
               output("d(additional_values)", inputs, 2, q.dtype)},
              run_planned<detail::AdditionalBackwardArgs,
                          &detail::Backend::na_additional_backward, fill_additional_backward>,
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

namespace {

// The inputs of a merge: outs[0..n), lses[0..n).
Inputs merge_inputs(const std::vector<TensorView>& outs, const std::vector<TensorView>& lses) {
  Inputs inputs;
  for (std::size_t i = 0; i < outs.size(); ++i) inputs.add("outs[" + std::to_string(i) + "]", outs[i]);
  for (std::size_t i = 0; i < lses.size(); ++i) inputs.add("lses[" + std::to_string(i) + "]", lses[i]);
  return inputs;
}

}  // namespace

Plan plan_merge_attentions(const std::vector<TensorView>& outs,
                           const std::vector<TensorView>& lses) {
  const char* op = "merge_attentions";
  check_merge_inputs(op, outs, lses);
  check_backend(op, &detail::Backend::merge_attentions, outs[0]);
  const TensorView& first = outs[0];
  const Inputs inputs = merge_inputs(outs, lses);
  return Plan(op, inputs.views, inputs.names,
              {output("out", inputs, 0, first.dtype),
               output("lse", inputs, 0, lse_dtype(first.dtype), Last::drop)},
              run_planned<detail::MergeArgs, &detail::Backend::merge_attentions, fill_merge>,
              planned(detail::MergeArgs{outs, lses, {}, {}, nullptr}));
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
  Inputs inputs = merge_inputs(outs, lses);
  inputs.add("out", out).add("lse", lse).add("dout", dout).add("dlse", dlse);
  const int parts = static_cast<int>(outs.size());
  std::vector<Plan::Output> outputs;
  for (int i = 0; i < parts; ++i) {
    outputs.push_back(output("douts[" + std::to_string(i) + "]", inputs, i, first.dtype));
  }
  for (int i = 0; i < parts; ++i) {
    outputs.push_back(
        output("dlses[" + std::to_string(i) + "]", inputs, parts + i, lse_dtype(first.dtype)));
  }
  auto state = std::make_shared<Planned<detail::MergeBackwardArgs>>();
  state->args = detail::MergeBackwardArgs{outs, lses, out, lse, dout, state->hold(dlse, 0),
                                          {},   {},   nullptr};
  return Plan(op, inputs.views, inputs.names, std::move(outputs),
              run_planned<detail::MergeBackwardArgs, &detail::Backend::merge_attentions_backward,
                          fill_merge_backward>,
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
