// libna._C: two generic entry points for every op. call(op, inputs, ...)
// views DLPack arrays, plans the op in the C++ core (which validates it, once),
// allocates the outputs through a Python callable so that every framework gets
// its own array type back, and runs the plan. plan(op, specs, ...) validates
// the same call on shapes and dtypes alone and returns the output shapes: the
// one rule the torch fake kernels and JAX's abstract evaluation use.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <vector>

#include "common.h"
#include "libna/libna.h"

namespace nb = nanobind;

namespace {

using libna::DType;
using libna::NaParams;
using libna::TensorView;
using InArray = nb::ndarray<nb::ro>;
using OutArray = nb::ndarray<>;
// Input arrays arrive as plain objects and are imported by Call::input, so
// that one nanobind cannot read is reported by name (rather than as a
// mismatch of the whole signature).
using InObject = nb::handle;

// Python-side calling context of one op call.
struct Call {
  std::string op;
  bool uint16_is_bfloat16;  // NumPy has no bfloat16: ml_dtypes arrays arrive as uint16 views
  std::uintptr_t stream;
  mutable std::vector<InArray> imported = {};  // keeps the inputs' DLPack tensors alive

  [[noreturn]] void fail(const std::string& message) const {
    throw std::invalid_argument("[" + op + "] " + message);
  }

  TensorView input(InObject object, const std::string& name) const {
    InArray array;
    if (!nb::try_cast(object, array, /*convert=*/false)) unreadable(object, name);
    imported.push_back(array);
    return view(imported.back(), name.c_str());
  }

  // nanobind does not say why an import failed; the object's own DLPack
  // export does (a sparse or quantized torch tensor, say).
  [[noreturn]] void unreadable(InObject object, const std::string& name) const {
    std::string reason = "it supports neither DLPack nor the buffer protocol";
    if (nb::hasattr(object, "__dlpack__")) {
      reason = "its DLPack tensor could not be imported";
      try {
        object.attr("__dlpack__")();
      } catch (const nb::python_error& error) {
        reason = nb::str(error.value()).c_str();
      }
    }
    const nb::handle type = object.type();
    throw nb::type_error(("[" + op + "] " + name + " (" +
                          nb::cast<std::string>(type.attr("__module__")) + "." +
                          nb::cast<std::string>(type.attr("__qualname__")) +
                          ") could not be read as an array: " + reason)
                             .c_str());
  }

  DType dtype(nb::dlpack::dtype dt, const char* name) const {
    using Code = nb::dlpack::dtype_code;
    const auto code = static_cast<Code>(dt.code);
    if (dt.lanes == 1) {
      if (code == Code::Float && dt.bits == 16) return DType::float16;
      if (code == Code::Float && dt.bits == 32) return DType::float32;
      if (code == Code::Float && dt.bits == 64) return DType::float64;
      if (code == Code::Bfloat && dt.bits == 16) return DType::bfloat16;
      if (code == Code::UInt && dt.bits == 16 && uint16_is_bfloat16) return DType::bfloat16;
    }
    const char* kind = code == Code::Int ? "int" : code == Code::UInt ? "uint"
                     : code == Code::Bool ? "bool" : code == Code::Complex ? "complex"
                     : code == Code::Float ? "float" : "other";
    throw libna::dtype_error("[" + op + "] " + name + " has dtype " + kind +
                             std::to_string(dt.bits) +
                             (dt.lanes == 1 ? std::string() : "x" + std::to_string(dt.lanes)) +
                             "; expected " + libna::dtype_names());
  }

  template <typename Array>
  TensorView view(const Array& a, const char* name) const {
    TensorView t;
    t.data = const_cast<void*>(static_cast<const void*>(a.data()));
    t.dtype = dtype(a.dtype(), name);
    if (a.ndim() > static_cast<std::size_t>(libna::kMaxDims)) {
      fail(std::string(name) + " has " + std::to_string(a.ndim()) +
           " dimensions; at most " + std::to_string(libna::kMaxDims) + " are supported");
    }
    t.ndim = static_cast<int>(a.ndim());
    for (int i = 0; i < t.ndim; ++i) {
      t.shape[i] = static_cast<std::int64_t>(a.shape(i));
      t.strides[i] = static_cast<std::int64_t>(a.stride(i));
    }
    const int device = a.device_type();
    if (device == nb::device::cpu::value) {
      t.device = {libna::DeviceType::cpu, 0};
    } else if (device == nb::device::cuda::value) {
      t.device = {libna::DeviceType::cuda, a.device_id()};
    } else {
      fail(std::string(name) + " lives on DLPack device type " + std::to_string(device) +
           "; libna supports CPU and CUDA arrays");
    }
    return t;
  }

  // Calls the Python allocator and views what it returns as a writable array.
  // The allocator returns the array, or (array, a DLPack capsule of it),
  // which is cheaper to import than calling the array's __dlpack__.
  std::pair<nb::object, TensorView> allocate(const nb::callable& alloc, const TensorView& shape_of,
                                             DType dtype, const char* name) const {
    nb::list shape;
    for (int i = 0; i < shape_of.ndim; ++i) shape.append(shape_of.shape[i]);
    nb::object array = alloc(nb::tuple(shape), libna::dtype_name(dtype));
    nb::object exported = array;
    if (nb::isinstance<nb::tuple>(array) && nb::len(array) == 2) {
      exported = array[1];
      array = array[0];
    }
    OutArray out;
    if (!nb::try_cast<OutArray>(exported, out, /*convert=*/false)) {
      throw std::runtime_error("[" + op + "] the allocator returned an object that is not a "
                               "writable DLPack array for output " + name);
    }
    return {array, view(out, name)};
  }
};

// An output libna allocates on the host and hands over as a DLPack capsule
// (the DLManagedTensor layout: the tensor, a context, the deleter first),
// for frameworks whose CPU allocation costs more than importing a capsule
// (torch.empty: ~2 us a call; importing: ~0.5 us). The consumer renames the
// capsule and calls the deleter when its array dies; a capsule never
// consumed frees the memory itself. The memory comes from libna::host_allocate,
// whose cache of freed blocks spares repeated calls the page faults of fresh
// memory.
struct HostOutput {
  nb::dlpack::dltensor tensor;
  void* manager_ctx = nullptr;
  void (*deleter)(HostOutput*) = nullptr;
  std::int64_t shape[libna::kMaxDims] = {}, strides[libna::kMaxDims] = {};
  std::size_t bytes = 0;  // at tensor.data, from libna::host_allocate
};

void free_host_output(HostOutput* t) {
  libna::host_free(t->tensor.data, t->bytes);
  delete t;
}

nb::dlpack::dtype dlpack_dtype(DType dtype) {
  using Code = nb::dlpack::dtype_code;
  nb::dlpack::dtype dt;
  dt.code = static_cast<std::uint8_t>(dtype == DType::bfloat16 ? Code::Bfloat : Code::Float);
  dt.bits = static_cast<std::uint8_t>(8 * libna::dtype_size(dtype));
  dt.lanes = 1;
  return dt;
}

// A contiguous host array of `spec`'s shape and `dtype` as (capsule, view).
std::pair<nb::object, TensorView> host_output(const TensorView& spec, DType dtype) {
  auto t = std::make_unique<HostOutput>();
  TensorView view;
  view.ndim = spec.ndim;
  view.dtype = dtype;
  view.device = {libna::DeviceType::cpu, 0};
  std::int64_t count = 1;
  for (int i = spec.ndim - 1; i >= 0; --i) {
    t->shape[i] = view.shape[i] = spec.shape[i];
    t->strides[i] = view.strides[i] = count;
    count *= spec.shape[i];
  }
  t->bytes = static_cast<std::size_t>(count) * libna::dtype_size(dtype);
  t->tensor.data = view.data = libna::host_allocate(t->bytes);
  t->tensor.device = {nb::device::cpu::value, 0};
  t->tensor.ndim = spec.ndim;
  t->tensor.dtype = dlpack_dtype(dtype);
  t->tensor.shape = t->shape;
  t->tensor.strides = t->strides;
  t->deleter = free_host_output;
  PyObject* capsule = PyCapsule_New(t.get(), "dltensor", [](PyObject* c) {
    // Still named "dltensor": never consumed (a consumer renames it).
    if (PyCapsule_IsValid(c, "dltensor") != 0) {
      auto* owned = static_cast<HostOutput*>(PyCapsule_GetPointer(c, "dltensor"));
      owned->deleter(owned);
    }
  });
  if (capsule == nullptr) {
    free_host_output(t.release());
    throw nb::python_error();
  }
  t.release();
  return {nb::steal(capsule), view};
}

// The inputs of each op, in the order Python passes them; optional ones may
// be None. merge_attentions takes outs then lses (any number of parts);
// merge_attentions_backward also out, lse, dout and dlse (optional).
struct OpInputs {
  const char* op;      // the name the Python layer calls it by
  const char* suffix;  // of na{rank}d in error messages
  std::vector<const char*> names;
  std::vector<const char*> optional;
};

const std::vector<OpInputs>& op_table() {
  static const std::vector<OpInputs> table = {
      {"na", "", {"q", "k", "v", "rpb", "additional_keys", "additional_values"},
       {"rpb", "additional_keys", "additional_values"}},
      {"na_qk", "_qk", {"q", "k", "rpb"}, {"rpb"}},
      {"na_av", "_av", {"attn", "v"}, {}},
      {"na_backward", "_backward",
       {"q", "k", "v", "rpb", "out", "dout", "lse", "dlse", "additional_keys",
        "additional_values"},
       {"rpb", "dlse", "additional_keys", "additional_values"}},
      {"na_qk_backward", "_qk_backward", {"dattn", "q", "k", "rpb"}, {"rpb"}},
      {"na_av_backward", "_av_backward", {"dout", "attn", "v"}, {}},
      {"na_additional", "", {"q", "additional_keys", "additional_values"}, {}},
      {"na_additional_backward", "_backward",
       {"q", "additional_keys", "additional_values", "out", "dout", "lse", "dlse"}, {"dlse"}},
      {"merge_attentions", nullptr, {}, {}},
      {"merge_attentions_backward", nullptr, {"out", "lse", "dout", "dlse"}, {"dlse"}},
  };
  return table;
}

const OpInputs& op_inputs(const std::string& op) {
  for (const OpInputs& entry : op_table()) {
    if (op == entry.op) return entry;
  }
  throw std::invalid_argument("[libna._C] unknown op '" + op + "'");
}

// The parameters the additional-key ops use: the spatial rank (for names and
// shapes) and the scale.
NaParams rank_and_scale(int rank, std::optional<double> scale) {
  NaParams p;
  p.rank = rank;
  p.scale = scale;
  return p;
}

// The per-axis parameters of an NA op, as the Python layer normalised them.
struct Params {
  int rank;
  std::vector<std::int64_t> kernel_size, stride, dilation;
  std::vector<bool> is_causal;
  std::optional<double> scale;
};

NaParams make_params(const Call& call, const Params& in, bool unit_stride) {
  NaParams p;
  p.rank = in.rank;
  if (in.rank < 1 || in.rank > libna::kMaxSpatialRank) {
    call.fail("spatial rank must be 1, 2 or 3, got " + std::to_string(in.rank));
  }
  auto copy = [&](const char* name, const auto& values, auto& into) {
    if (values.size() != static_cast<std::size_t>(in.rank)) {
      call.fail(std::string(name) + " has " + std::to_string(values.size()) +
                " values; expected " + std::to_string(in.rank) + " (one per spatial axis)");
    }
    for (int a = 0; a < in.rank; ++a) into[a] = values[a];
  };
  copy("kernel_size", in.kernel_size, p.kernel_size);
  if (!unit_stride) copy("stride", in.stride, p.stride);
  copy("dilation", in.dilation, p.dilation);
  copy("is_causal", in.is_causal, p.is_causal);
  p.scale = in.scale;
  return p;
}

// Plans `op` on the given input views (absent optional ones are nullopt).
libna::Plan make_plan(const Call& call, const std::string& op,
                      const std::vector<std::optional<TensorView>>& in, const Params& params,
                      bool want_lse) {
  auto opt = [&](std::size_t i) { return in[i] ? &*in[i] : nullptr; };
  const bool unfused = op == "na_qk" || op == "na_av" || op == "na_qk_backward" ||
                       op == "na_av_backward";
  if (op.rfind("merge_attentions", 0) == 0) {
    const bool backward = op == "merge_attentions_backward";
    const std::size_t parts = (in.size() - (backward ? 4 : 0)) / 2;
    std::vector<TensorView> outs, lses;
    for (std::size_t i = 0; i < parts; ++i) {
      outs.push_back(*in[i]);
      lses.push_back(*in[parts + i]);
    }
    if (!backward) return libna::plan_merge_attentions(outs, lses);
    const std::size_t rest = 2 * parts;
    return libna::plan_merge_attentions_backward(outs, lses, *in[rest], *in[rest + 1],
                                                 *in[rest + 2], opt(rest + 3));
  }
  if (op == "na_additional" || op == "na_additional_backward") {
    const NaParams p = rank_and_scale(params.rank, params.scale);
    if (op == "na_additional") {
      return libna::plan_na_additional_forward(*in[0], *in[1], *in[2], p, want_lse);
    }
    return libna::plan_na_additional_backward(*in[0], *in[1], *in[2], *in[3], *in[4], *in[5], p,
                                              opt(6));
  }
  const NaParams p = make_params(call, params, unfused);
  if (op == "na") {
    return libna::plan_na_forward(*in[0], *in[1], *in[2], opt(3), p, want_lse, opt(4), opt(5));
  }
  if (op == "na_qk") return libna::plan_na_qk(*in[0], *in[1], opt(2), p);
  if (op == "na_av") return libna::plan_na_av(*in[0], *in[1], p);
  if (op == "na_backward") {
    return libna::plan_na_backward(*in[0], *in[1], *in[2], opt(3), *in[4], *in[5], *in[6], p,
                                   opt(7), opt(8), opt(9));
  }
  if (op == "na_qk_backward") return libna::plan_na_qk_backward(*in[0], *in[1], *in[2], opt(3), p);
  return libna::plan_na_av_backward(*in[0], *in[1], *in[2], p);
}

// The name of every input of a call of `op` with `count` inputs.
std::vector<std::string> input_names(const OpInputs& entry, std::size_t count) {
  std::vector<std::string> names;
  names.reserve(count);
  if (entry.suffix == nullptr) {  // merge_attentions(_backward): outs, lses, then the named
    const std::size_t parts = (count - entry.names.size()) / 2;
    for (std::size_t i = 0; i < parts; ++i) names.push_back("outs[" + std::to_string(i) + "]");
    for (std::size_t i = 0; i < parts; ++i) names.push_back("lses[" + std::to_string(i) + "]");
  }
  for (const char* name : entry.names) names.emplace_back(name);
  return names;
}

bool is_optional(const OpInputs& entry, const std::string& name) {
  for (const char* o : entry.optional) {
    if (name == o) return true;
  }
  return false;
}

std::string call_name(const OpInputs& entry, int rank) {
  if (entry.suffix == nullptr) return entry.op;
  return "na" + std::to_string(rank) + "d" + entry.suffix;
}

std::vector<std::optional<TensorView>> read_inputs(
    const Call& call, const OpInputs& entry, const std::vector<InObject>& objects,
    const std::function<TensorView(InObject, const std::string&)>& read) {
  const bool merge = entry.suffix == nullptr;
  // Trailing optional inputs may be left out.
  std::size_t required = entry.names.size();
  while (!merge && required > 0 && is_optional(entry, entry.names[required - 1])) --required;
  if (merge ? objects.size() < entry.names.size() + 2 ||
                  (objects.size() - entry.names.size()) % 2 != 0
            : objects.size() < required || objects.size() > entry.names.size()) {
    call.fail("got " + std::to_string(objects.size()) + " inputs; expected " +
              (merge ? "outs, lses" : std::string()) + std::to_string(entry.names.size()));
  }
  const std::vector<std::string> names = input_names(entry, objects.size());
  std::vector<std::optional<TensorView>> views(merge ? objects.size() : entry.names.size());
  for (std::size_t i = 0; i < objects.size(); ++i) {
    if (objects[i].is_none()) {
      if (!is_optional(entry, names[i])) call.fail(names[i] + " must be an array, got None");
      continue;
    }
    views[i] = read(objects[i], names[i]);
  }
  return views;
}

// Runs `op` on DLPack arrays: plan (validates), allocate the wanted outputs
// (workspaces included) through `alloc` (shape, dtype name) -> array, run
// without the GIL. Returns the outputs in plan order, None for an unwanted
// one or a workspace.
nb::tuple call_op(const std::string& op, const std::vector<InObject>& inputs, const Params& params,
                  bool want_lse, const nb::object& alloc, bool uint16_is_bfloat16,
                  std::uintptr_t stream, const nb::object& wrap_host) {
  const OpInputs& entry = op_inputs(op);
  const Call call{call_name(entry, params.rank), uint16_is_bfloat16, stream};
  call.imported.reserve(inputs.size());
  const auto views = read_inputs(call, entry, inputs, [&](InObject o, const std::string& name) {
    return call.input(o, name);
  });
  const libna::Plan plan = make_plan(call, op, views, params, want_lse);
  std::vector<TensorView> outputs(plan.outputs().size());
  nb::list result, workspaces;
  const bool on_host = !wrap_host.is_none();
  for (std::size_t i = 0; i < outputs.size(); ++i) {
    const libna::Plan::Output& o = plan.outputs()[i];
    if (!o.wanted) {
      result.append(nb::none());
      continue;
    }
    if (on_host && o.spec.device.type != libna::DeviceType::cpu) {
      call.fail("outputs on the host were asked for (wrap_host), but " + o.name + " is on " +
                libna::device_name(o.spec.device));
    }
    auto [array, view] = on_host ? host_output(o.spec, o.spec.dtype)
                                 : call.allocate(nb::borrow<nb::callable>(alloc), o.spec,
                                                 o.spec.dtype, o.name.c_str());
    // Workspaces, and the host outputs' capsules (which own the memory until
    // a consumer takes it, whatever wrap_host does), live until run returns.
    if (o.workspace || on_host) workspaces.append(array);
    if (o.workspace) {
      result.append(nb::none());
    } else {
      result.append(on_host ? wrap_host(array) : array);
    }
    outputs[i] = view;
  }
  {
    nb::gil_scoped_release release;
    plan.run(outputs, reinterpret_cast<void*>(stream));
  }
  return nb::tuple(result);
}

// A data-less view from (shape, dtype name, device type name, device index):
// what the torch fake kernels and JAX's abstract evaluation know of an array.
TensorView spec_view(const Call& call, InObject object, const std::string& name) {
  auto [shape, dtype, device, index] =
      nb::cast<std::tuple<std::vector<std::int64_t>, std::string, std::string, int>>(object);
  TensorView t;
  bool known = false;
  for (DType d : libna::kDTypes) {
    if (dtype == libna::dtype_name(d)) {
      t.dtype = d;
      known = true;
    }
  }
  if (!known) {
    throw libna::dtype_error("[" + call.op + "] " + name + " has dtype " + dtype + "; expected " +
                             libna::dtype_names());
  }
  if (shape.size() > static_cast<std::size_t>(libna::kMaxDims)) {
    call.fail(name + " has " + std::to_string(shape.size()) + " dimensions; at most " +
              std::to_string(libna::kMaxDims) + " are supported");
  }
  t.ndim = static_cast<int>(shape.size());
  std::int64_t stride = 1;
  for (int i = t.ndim - 1; i >= 0; --i) {
    t.shape[i] = shape[i];
    t.strides[i] = stride;
    stride *= std::max<std::int64_t>(shape[i], 1);
  }
  if (device == "cpu") {
    t.device = {libna::DeviceType::cpu, 0};
  } else if (device == "cuda") {
    t.device = {libna::DeviceType::cuda, index};
  } else {
    call.fail(name + " is on device '" + device + "'; libna supports CPU and CUDA arrays");
  }
  return t;
}

// Plans `op` on input specs (see spec_view; None for an absent optional
// input) and returns, for each output, (shape, dtype name, like, last,
// last_value) (see libna::Plan::Output), None when unwanted or a workspace:
// the one output-shape rule, for every front end.
nb::list plan_op(const std::string& op, const std::vector<InObject>& inputs, const Params& params,
                 bool want_lse) {
  const OpInputs& entry = op_inputs(op);
  const Call call{call_name(entry, params.rank), false, 0};
  const auto views = read_inputs(call, entry, inputs, [&](InObject o, const std::string& name) {
    return spec_view(call, o, name);
  });
  const libna::Plan plan = make_plan(call, op, views, params, want_lse);
  nb::list result;
  for (const libna::Plan::Output& o : plan.outputs()) {
    if (!o.wanted || o.workspace) {
      result.append(nb::none());
      continue;
    }
    nb::list shape;
    for (int i = 0; i < o.spec.ndim; ++i) shape.append(o.spec.shape[i]);
    static const char* const kLast[] = {"same", "drop", "input", "constant"};
    result.append(nb::make_tuple(nb::tuple(shape), libna::dtype_name(o.spec.dtype), o.like,
                                 kLast[static_cast<int>(o.last)], o.last_value));
  }
  return result;
}

nb::dict build_info() {
  const libna::BuildInfo info = libna::build_info();
  nb::dict d;
  d["version"] = info.version;
  d["dtypes"] = info.dtypes;
  d["backends"] = info.backends;
  d["cuda_architectures"] = info.cuda_architectures;
  d["cpu_kernels"] = info.cpu_kernels;
  d["simd"] = info.simd;
  d["cpu_amx"] = info.cpu_amx;
  d["compiler"] = info.compiler;
  return d;
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "libna's compiled core (use the functions of the libna package instead)";

  register_dtype_error_as_type_error();

  m.def(
      "call",
      [](const std::string& op, const std::vector<InObject>& inputs, int rank,
         std::vector<std::int64_t> kernel_size, std::vector<std::int64_t> stride,
         std::vector<std::int64_t> dilation, std::vector<bool> is_causal,
         std::optional<double> scale, bool want_lse, const nb::object& alloc,
         bool uint16_is_bfloat16, std::uintptr_t stream, const nb::object& wrap_host) {
        if (wrap_host.is_none() ? !PyCallable_Check(alloc.ptr())
                                : !PyCallable_Check(wrap_host.ptr())) {
          throw nb::type_error("[libna._C] call needs alloc (a callable) or wrap_host (a "
                               "callable)");
        }
        return call_op(op, inputs,
                       Params{rank, std::move(kernel_size), std::move(stride), std::move(dilation),
                              std::move(is_causal), scale},
                       want_lse, alloc, uint16_is_bfloat16, stream, wrap_host);
      },
      nb::arg("op"), nb::arg("inputs"), nb::arg("rank") = 0,
      nb::arg("kernel_size") = std::vector<std::int64_t>(),
      nb::arg("stride") = std::vector<std::int64_t>(),
      nb::arg("dilation") = std::vector<std::int64_t>(),
      nb::arg("is_causal") = std::vector<bool>(), nb::arg("scale").none() = nb::none(),
      nb::arg("want_lse") = false, nb::arg("alloc").none(), nb::arg("uint16_is_bfloat16") = false,
      nb::arg("stream") = 0, nb::arg("wrap_host").none() = nb::none(),
      "Runs op on DLPack arrays (validated once, outputs allocated by alloc(shape, dtype), or "
      "with wrap_host on the host by libna and each handed to wrap_host(DLPack capsule)); "
      "returns its outputs, None for an unwanted one.");
  m.def(
      "plan",
      [](const std::string& op, const std::vector<InObject>& inputs, int rank,
         std::vector<std::int64_t> kernel_size, std::vector<std::int64_t> stride,
         std::vector<std::int64_t> dilation, std::vector<bool> is_causal,
         std::optional<double> scale, bool want_lse) {
        return plan_op(op, inputs,
                       Params{rank, std::move(kernel_size), std::move(stride), std::move(dilation),
                              std::move(is_causal), scale},
                       want_lse);
      },
      nb::arg("op"), nb::arg("inputs"), nb::arg("rank") = 0,
      nb::arg("kernel_size") = std::vector<std::int64_t>(),
      nb::arg("stride") = std::vector<std::int64_t>(),
      nb::arg("dilation") = std::vector<std::int64_t>(),
      nb::arg("is_causal") = std::vector<bool>(), nb::arg("scale").none() = nb::none(),
      nb::arg("want_lse") = false,
      "Validates op on input specs (shape, dtype name, device type, device index) and returns "
      "each output's (shape, dtype name, like, last, last_value), None for an unwanted one.");
  m.def("build_info", &build_info);
  m.def("set_num_threads", &libna::set_num_threads, nb::arg("num_threads"));
  m.def("get_num_threads", &libna::get_num_threads);
  m.attr("max_num_threads") = libna::kMaxNumThreads;
  m.def("environment_warnings", &libna::environment_warnings);
  m.def("host_cache_info", [] {
    const libna::HostCacheInfo info = libna::host_cache_info();
    nb::dict d;
    d["blocks"] = info.blocks;
    d["bytes"] = info.bytes;
    d["limit"] = info.limit;
    d["reused"] = info.reused;
    return d;
  }, "The freed host outputs libna keeps for reuse: blocks, bytes, limit "
     "(LIBNA_HOST_CACHE_BYTES) and reused (allocations served from them so far).");
  m.def("empty_host_cache", &libna::empty_host_cache,
        "Frees the host outputs libna keeps for reuse.");
  m.def("set_cuda_emulator", &libna::set_cuda_emulator, nb::arg("arch"), nb::arg("checks") = false);
  m.def("cuda_emulator_arch", &libna::cuda_emulator_arch);
  m.def("cuda_emulator_checks", &libna::cuda_emulator_checks);
  m.def("cuda_emulator_launches", &libna::cuda_emulator_launches);
  m.def("cuda_emulator_self_test", &libna::cuda_emulator_self_test, nb::arg("kernel"));
}
