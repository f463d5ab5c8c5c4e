// libna._C: DLPack arrays in, validated tensor views to the C++ core, and
// outputs allocated by a Python callable so that every framework gets its own
// array type back. Validation happens in C++ before anything is allocated.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
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
  std::pair<nb::object, TensorView> allocate(const nb::callable& alloc, const TensorView& shape_of,
                                             DType dtype, const char* name) const {
    nb::list shape;
    for (int i = 0; i < shape_of.ndim; ++i) shape.append(shape_of.shape[i]);
    nb::object array = alloc(nb::tuple(shape), libna::dtype_name(dtype));
    OutArray out;
    if (!nb::try_cast<OutArray>(array, out, /*convert=*/false)) {
      throw std::runtime_error("[" + op + "] the allocator returned an object that is not a "
                               "writable DLPack array for output " + name);
    }
    return {array, view(out, name)};
  }

  // An optional output: (None, nullopt) when not wanted.
  std::pair<nb::object, std::optional<TensorView>> allocate_if(
      bool wanted, const nb::callable& alloc, const TensorView& shape_of, DType dtype,
      const char* name) const {
    if (!wanted) return {nb::none(), std::nullopt};
    auto [array, view] = allocate(alloc, shape_of, dtype, name);
    return {array, view};
  }
};

NaParams make_params(const Call& call, int rank, const std::vector<std::int64_t>& kernel_size,
                     const std::vector<std::int64_t>& stride,
                     const std::vector<std::int64_t>& dilation,
                     const std::vector<bool>& is_causal, std::optional<double> scale) {
  NaParams p;
  p.rank = rank;
  if (rank < 1 || rank > libna::kMaxSpatialRank) {
    call.fail("spatial rank must be 1, 2 or 3, got " + std::to_string(rank));
  }
  auto copy = [&](const char* name, const auto& values, auto& into) {
    if (values.size() != static_cast<std::size_t>(rank)) {
      call.fail(std::string(name) + " has " + std::to_string(values.size()) +
                " values; expected " + std::to_string(rank) + " (one per spatial axis)");
    }
    for (int a = 0; a < rank; ++a) into[a] = values[a];
  };
  copy("kernel_size", kernel_size, p.kernel_size);
  copy("stride", stride, p.stride);
  copy("dilation", dilation, p.dilation);
  copy("is_causal", is_causal, p.is_causal);
  p.scale = scale;
  return p;
}

nb::tuple na_forward(int rank, InObject q_in, InObject k_in, InObject v_in,
                     InObject rpb_in, const std::vector<std::int64_t>& kernel_size,
                     const std::vector<std::int64_t>& stride,
                     const std::vector<std::int64_t>& dilation,
                     const std::vector<bool>& is_causal, std::optional<double> scale,
                     bool return_lse, const nb::callable& alloc, bool uint16_is_bfloat16,
                     std::uintptr_t stream) {
  const Call call{"na" + std::to_string(rank) + "d", uint16_is_bfloat16, stream};
  const NaParams p = make_params(call, rank, kernel_size, stride, dilation, is_causal, scale);
  const TensorView q = call.input(q_in, "q"), k = call.input(k_in, "k"), v = call.input(v_in, "v");
  std::optional<TensorView> rpb;
  if (!rpb_in.is_none()) rpb = call.input(rpb_in, "rpb");
  libna::check_na_forward(q, k, v, rpb ? &*rpb : nullptr, p);

  auto [out_obj, out] = call.allocate(alloc, q.with_last_dim(v.shape[rank + 2]), q.dtype, "out");
  auto [lse_obj, lse] =
      call.allocate_if(return_lse, alloc, q.with_last_dim(-1), libna::lse_dtype(q.dtype), "lse");
  {
    nb::gil_scoped_release release;
    libna::na_forward(q, k, v, rpb ? &*rpb : nullptr, out, lse ? &*lse : nullptr, p,
                      reinterpret_cast<void*>(stream));
  }
  return nb::make_tuple(out_obj, lse_obj);
}

nb::object na_qk(int rank, InObject q_in, InObject k_in, InObject rpb_in,
                 const std::vector<std::int64_t>& kernel_size,
                 const std::vector<std::int64_t>& dilation, const std::vector<bool>& is_causal,
                 const nb::callable& alloc, bool uint16_is_bfloat16, std::uintptr_t stream) {
  const Call call{"na" + std::to_string(rank) + "d_qk", uint16_is_bfloat16, stream};
  const std::vector<std::int64_t> ones(kernel_size.size(), 1);
  const NaParams p = make_params(call, rank, kernel_size, ones, dilation, is_causal, std::nullopt);
  const TensorView q = call.input(q_in, "q"), k = call.input(k_in, "k");
  std::optional<TensorView> rpb;
  if (!rpb_in.is_none()) rpb = call.input(rpb_in, "rpb");
  libna::check_na_qk(q, k, rpb ? &*rpb : nullptr, p);
  auto [attn_obj, attn] = call.allocate(alloc, q.with_last_dim(p.window_size()), q.dtype, "attn");
  {
    nb::gil_scoped_release release;
    libna::na_qk(q, k, rpb ? &*rpb : nullptr, attn, p, reinterpret_cast<void*>(stream));
  }
  return attn_obj;
}

nb::object na_av(int rank, InObject attn_in, InObject v_in,
                 const std::vector<std::int64_t>& kernel_size,
                 const std::vector<std::int64_t>& dilation, const std::vector<bool>& is_causal,
                 const nb::callable& alloc, bool uint16_is_bfloat16, std::uintptr_t stream) {
  const Call call{"na" + std::to_string(rank) + "d_av", uint16_is_bfloat16, stream};
  const std::vector<std::int64_t> ones(kernel_size.size(), 1);
  const NaParams p = make_params(call, rank, kernel_size, ones, dilation, is_causal, std::nullopt);
  const TensorView attn = call.input(attn_in, "attn"), v = call.input(v_in, "v");
  libna::check_na_av(attn, v, p);
  auto [out_obj, out] = call.allocate(alloc, attn.with_last_dim(v.shape[rank + 2]), attn.dtype, "out");
  {
    nb::gil_scoped_release release;
    libna::na_av(attn, v, out, p, reinterpret_cast<void*>(stream));
  }
  return out_obj;
}

nb::tuple na_backward(int rank, InObject q_in, InObject k_in, InObject v_in,
                      InObject rpb_in, InObject out_in, InObject dout_in,
                      InObject lse_in, const std::vector<std::int64_t>& kernel_size,
                      const std::vector<std::int64_t>& stride,
                      const std::vector<std::int64_t>& dilation,
                      const std::vector<bool>& is_causal, std::optional<double> scale,
                      const nb::callable& alloc, bool uint16_is_bfloat16, std::uintptr_t stream) {
  const Call call{"na" + std::to_string(rank) + "d_backward", uint16_is_bfloat16, stream};
  const NaParams p = make_params(call, rank, kernel_size, stride, dilation, is_causal, scale);
  const TensorView q = call.input(q_in, "q"), k = call.input(k_in, "k"), v = call.input(v_in, "v");
  const TensorView out = call.input(out_in, "out"), dout = call.input(dout_in, "dout"),
                   lse = call.input(lse_in, "lse");
  std::optional<TensorView> rpb;
  if (!rpb_in.is_none()) rpb = call.input(rpb_in, "rpb");
  libna::check_na_backward(q, k, v, rpb ? &*rpb : nullptr, out, dout, lse, p);
  auto [dq_obj, dq] = call.allocate(alloc, q, q.dtype, "dq");
  auto [dk_obj, dk] = call.allocate(alloc, k, q.dtype, "dk");
  auto [dv_obj, dv] = call.allocate(alloc, v, q.dtype, "dv");
  auto [drpb_obj, drpb] = call.allocate_if(rpb.has_value(), alloc, rpb ? *rpb : q, q.dtype, "drpb");
  {
    nb::gil_scoped_release release;
    libna::na_backward(q, k, v, rpb ? &*rpb : nullptr, out, dout, lse, dq, dk, dv,
                       drpb ? &*drpb : nullptr, p, reinterpret_cast<void*>(stream));
  }
  return nb::make_tuple(dq_obj, dk_obj, dv_obj, drpb_obj);
}

nb::tuple na_qk_backward(int rank, InObject dattn_in, InObject q_in,
                         InObject k_in, InObject rpb_in,
                         const std::vector<std::int64_t>& kernel_size,
                         const std::vector<std::int64_t>& dilation,
                         const std::vector<bool>& is_causal, const nb::callable& alloc,
                         bool uint16_is_bfloat16, std::uintptr_t stream) {
  const Call call{"na" + std::to_string(rank) + "d_qk_backward", uint16_is_bfloat16, stream};
  const std::vector<std::int64_t> ones(kernel_size.size(), 1);
  const NaParams p = make_params(call, rank, kernel_size, ones, dilation, is_causal, std::nullopt);
  const TensorView dattn = call.input(dattn_in, "dattn"), q = call.input(q_in, "q"),
                   k = call.input(k_in, "k");
  std::optional<TensorView> rpb;  // only its shape matters: drpb takes it
  if (!rpb_in.is_none()) rpb = call.input(rpb_in, "rpb");
  libna::check_na_qk_backward(dattn, q, k, rpb ? &*rpb : nullptr, p);
  auto [dq_obj, dq] = call.allocate(alloc, q, q.dtype, "dq");
  auto [dk_obj, dk] = call.allocate(alloc, k, q.dtype, "dk");
  auto [drpb_obj, drpb] = call.allocate_if(rpb.has_value(), alloc, rpb ? *rpb : q, q.dtype, "drpb");
  {
    nb::gil_scoped_release release;
    libna::na_qk_backward(dattn, q, k, dq, dk, drpb ? &*drpb : nullptr, p,
                          reinterpret_cast<void*>(stream));
  }
  return nb::make_tuple(dq_obj, dk_obj, drpb_obj);
}

nb::tuple na_av_backward(int rank, InObject dout_in, InObject attn_in,
                         InObject v_in, const std::vector<std::int64_t>& kernel_size,
                         const std::vector<std::int64_t>& dilation,
                         const std::vector<bool>& is_causal, const nb::callable& alloc,
                         bool uint16_is_bfloat16, std::uintptr_t stream) {
  const Call call{"na" + std::to_string(rank) + "d_av_backward", uint16_is_bfloat16, stream};
  const std::vector<std::int64_t> ones(kernel_size.size(), 1);
  const NaParams p = make_params(call, rank, kernel_size, ones, dilation, is_causal, std::nullopt);
  const TensorView dout = call.input(dout_in, "dout"), attn = call.input(attn_in, "attn"),
                   v = call.input(v_in, "v");
  libna::check_na_av_backward(dout, attn, v, p);
  auto [dattn_obj, dattn] = call.allocate(alloc, attn, attn.dtype, "dattn");
  auto [dv_obj, dv] = call.allocate(alloc, v, attn.dtype, "dv");
  {
    nb::gil_scoped_release release;
    libna::na_av_backward(dout, attn, v, dattn, dv, p, reinterpret_cast<void*>(stream));
  }
  return nb::make_tuple(dattn_obj, dv_obj);
}

nb::tuple na_additional_forward(int rank, InObject q_in, InObject keys_in,
                                InObject values_in, std::optional<double> scale,
                                bool return_lse, const nb::callable& alloc,
                                bool uint16_is_bfloat16, std::uintptr_t stream) {
  const Call call{"na" + std::to_string(rank) + "d", uint16_is_bfloat16, stream};
  const NaParams p = rank_and_scale(rank, scale);
  const TensorView q = call.input(q_in, "q"), keys = call.input(keys_in, "additional_keys"),
                   values = call.input(values_in, "additional_values");
  libna::check_na_additional_forward(q, keys, values, p);
  auto [out_obj, out] = call.allocate(alloc, q.with_last_dim(values.shape[3]), q.dtype, "out");
  auto [lse_obj, lse] =
      call.allocate_if(return_lse, alloc, q.with_last_dim(-1), libna::lse_dtype(q.dtype), "lse");
  {
    nb::gil_scoped_release release;
    libna::na_additional_forward(q, keys, values, out, lse ? &*lse : nullptr, p,
                                 reinterpret_cast<void*>(stream));
  }
  return nb::make_tuple(out_obj, lse_obj);
}

nb::tuple na_additional_backward(int rank, InObject q_in, InObject keys_in,
                                 InObject values_in, InObject out_in,
                                 InObject dout_in, InObject lse_in,
                                 std::optional<double> scale, const nb::callable& alloc,
                                 bool uint16_is_bfloat16, std::uintptr_t stream) {
  const Call call{"na" + std::to_string(rank) + "d_backward", uint16_is_bfloat16, stream};
  const NaParams p = rank_and_scale(rank, scale);
  const TensorView q = call.input(q_in, "q"), keys = call.input(keys_in, "additional_keys"),
                   values = call.input(values_in, "additional_values");
  const TensorView out = call.input(out_in, "out"), dout = call.input(dout_in, "dout"),
                   lse = call.input(lse_in, "lse");
  libna::check_na_additional_backward(q, keys, values, out, dout, lse, p);
  auto [dq_obj, dq] = call.allocate(alloc, q, q.dtype, "dq");
  auto [dk_obj, dk] = call.allocate(alloc, keys, q.dtype, "d(additional_keys)");
  auto [dv_obj, dv] = call.allocate(alloc, values, q.dtype, "d(additional_values)");
  {
    nb::gil_scoped_release release;
    libna::na_additional_backward(q, keys, values, out, dout, lse, dq, dk, dv, p,
                                  reinterpret_cast<void*>(stream));
  }
  return nb::make_tuple(dq_obj, dk_obj, dv_obj);
}

std::vector<TensorView> views(const Call& call, const std::vector<InObject>& arrays,
                              const char* name) {
  std::vector<TensorView> result;
  for (std::size_t i = 0; i < arrays.size(); ++i) {
    const std::string label = std::string(name) + "[" + std::to_string(i) + "]";
    result.push_back(call.input(arrays[i], label));
  }
  return result;
}

nb::tuple merge_attentions(const std::vector<InObject>& outs_in,
                           const std::vector<InObject>& lses_in, const nb::callable& alloc,
                           bool uint16_is_bfloat16, std::uintptr_t stream) {
  const Call call{"merge_attentions", uint16_is_bfloat16, stream};
  const auto outs = views(call, outs_in, "outs"), lses = views(call, lses_in, "lses");
  libna::check_merge_attentions(outs, lses);
  auto [out_obj, out] = call.allocate(alloc, outs[0], outs[0].dtype, "out");
  auto [lse_obj, lse] =
      call.allocate(alloc, outs[0].with_last_dim(-1), libna::lse_dtype(outs[0].dtype), "lse");
  {
    nb::gil_scoped_release release;
    libna::merge_attentions(outs, lses, out, lse, reinterpret_cast<void*>(stream));
  }
  return nb::make_tuple(out_obj, lse_obj);
}

nb::tuple merge_attentions_backward(const std::vector<InObject>& outs_in,
                                    const std::vector<InObject>& lses_in, InObject out_in,
                                    InObject lse_in, InObject dout_in,
                                    InObject dlse_in, const nb::callable& alloc,
                                    bool uint16_is_bfloat16, std::uintptr_t stream) {
  const Call call{"merge_attentions_backward", uint16_is_bfloat16, stream};
  const auto outs = views(call, outs_in, "outs"), lses = views(call, lses_in, "lses");
  const TensorView out = call.input(out_in, "out"), lse = call.input(lse_in, "lse"),
                   dout = call.input(dout_in, "dout");
  std::optional<TensorView> dlse;
  if (!dlse_in.is_none()) dlse = call.input(dlse_in, "dlse");
  libna::check_merge_attentions_backward(outs, lses, out, lse, dout, dlse ? &*dlse : nullptr);
  nb::list douts_obj, dlses_obj;
  std::vector<TensorView> douts, dlses;
  for (std::size_t i = 0; i < outs.size(); ++i) {
    auto [dout_obj, dout_i] = call.allocate(alloc, outs[i], outs[i].dtype, "douts");
    auto [dlse_obj, dlse_i] = call.allocate(alloc, lses[i], lses[i].dtype, "dlses");
    douts_obj.append(dout_obj);
    dlses_obj.append(dlse_obj);
    douts.push_back(dout_i);
    dlses.push_back(dlse_i);
  }
  {
    nb::gil_scoped_release release;
    libna::merge_attentions_backward(outs, lses, out, lse, dout, dlse ? &*dlse : nullptr, douts,
                                     dlses, reinterpret_cast<void*>(stream));
  }
  return nb::make_tuple(douts_obj, dlses_obj);
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
  d["compiler"] = info.compiler;
  return d;
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "libna's compiled core (use the functions of the libna package instead)";

  register_dtype_error_as_type_error();

  m.def("na_forward", &na_forward, nb::arg("rank"), nb::arg("q"), nb::arg("k"), nb::arg("v"),
        nb::arg("rpb").none(), nb::arg("kernel_size"), nb::arg("stride"), nb::arg("dilation"),
        nb::arg("is_causal"), nb::arg("scale").none(), nb::arg("return_lse"), nb::arg("alloc"),
        nb::arg("uint16_is_bfloat16") = false, nb::arg("stream") = 0);
  m.def("na_qk", &na_qk, nb::arg("rank"), nb::arg("q"), nb::arg("k"), nb::arg("rpb").none(),
        nb::arg("kernel_size"), nb::arg("dilation"), nb::arg("is_causal"), nb::arg("alloc"),
        nb::arg("uint16_is_bfloat16") = false, nb::arg("stream") = 0);
  m.def("na_av", &na_av, nb::arg("rank"), nb::arg("attn"), nb::arg("v"), nb::arg("kernel_size"),
        nb::arg("dilation"), nb::arg("is_causal"), nb::arg("alloc"),
        nb::arg("uint16_is_bfloat16") = false, nb::arg("stream") = 0);
  m.def("na_backward", &na_backward, nb::arg("rank"), nb::arg("q"), nb::arg("k"), nb::arg("v"),
        nb::arg("rpb").none(), nb::arg("out"), nb::arg("dout"), nb::arg("lse"),
        nb::arg("kernel_size"), nb::arg("stride"), nb::arg("dilation"), nb::arg("is_causal"),
        nb::arg("scale").none(), nb::arg("alloc"), nb::arg("uint16_is_bfloat16") = false,
        nb::arg("stream") = 0);
  m.def("na_qk_backward", &na_qk_backward, nb::arg("rank"), nb::arg("dattn"), nb::arg("q"),
        nb::arg("k"), nb::arg("rpb").none(), nb::arg("kernel_size"), nb::arg("dilation"),
        nb::arg("is_causal"), nb::arg("alloc"), nb::arg("uint16_is_bfloat16") = false,
        nb::arg("stream") = 0);
  m.def("na_av_backward", &na_av_backward, nb::arg("rank"), nb::arg("dout"), nb::arg("attn"),
        nb::arg("v"), nb::arg("kernel_size"), nb::arg("dilation"), nb::arg("is_causal"),
        nb::arg("alloc"), nb::arg("uint16_is_bfloat16") = false, nb::arg("stream") = 0);
  m.def("na_additional_forward", &na_additional_forward, nb::arg("rank"), nb::arg("q"),
        nb::arg("additional_keys"), nb::arg("additional_values"), nb::arg("scale").none(),
        nb::arg("return_lse"), nb::arg("alloc"), nb::arg("uint16_is_bfloat16") = false,
        nb::arg("stream") = 0);
  m.def("na_additional_backward", &na_additional_backward, nb::arg("rank"), nb::arg("q"),
        nb::arg("additional_keys"), nb::arg("additional_values"), nb::arg("out"),
        nb::arg("dout"), nb::arg("lse"), nb::arg("scale").none(), nb::arg("alloc"),
        nb::arg("uint16_is_bfloat16") = false, nb::arg("stream") = 0);
  m.def("merge_attentions", &merge_attentions, nb::arg("outs"), nb::arg("lses"),
        nb::arg("alloc"), nb::arg("uint16_is_bfloat16") = false, nb::arg("stream") = 0);
  m.def("merge_attentions_backward", &merge_attentions_backward, nb::arg("outs"),
        nb::arg("lses"), nb::arg("out"), nb::arg("lse"), nb::arg("dout"), nb::arg("dlse").none(),
        nb::arg("alloc"), nb::arg("uint16_is_bfloat16") = false, nb::arg("stream") = 0);
  m.def("build_info", &build_info);
  m.def("set_num_threads", &libna::set_num_threads, nb::arg("num_threads"));
  m.def("get_num_threads", &libna::get_num_threads);
  m.attr("max_num_threads") = libna::kMaxNumThreads;
  m.def("environment_warnings", &libna::environment_warnings);
  m.def("set_cuda_emulator", &libna::set_cuda_emulator, nb::arg("arch"), nb::arg("checks") = false);
  m.def("cuda_emulator_arch", &libna::cuda_emulator_arch);
  m.def("cuda_emulator_checks", &libna::cuda_emulator_checks);
  m.def("cuda_emulator_launches", &libna::cuda_emulator_launches);
  m.def("cuda_emulator_self_test", &libna::cuda_emulator_self_test, nb::arg("kernel"));
}
