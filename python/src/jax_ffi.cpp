// libna._jax_ffi: XLA FFI handlers (CPU) around libna's C++ ops, for
// libna.jax. Built only when XLA's FFI headers are available (they ship with
// jaxlib, see python/CMakeLists.txt); the module does not link against jaxlib.
//
// Every handler accepts inputs with extra leading dimensions, which is how
// jax.vmap reaches it (ffi_call with vmap_method="broadcast_all": every
// operand and result carries the same leading dimensions); it runs the op
// once per leading index on row-major slices. Inputs are only read; XLA owns
// the result buffers the ops write.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <iterator>
#include <optional>
#include <string>
#include <vector>

#include "common.h"
#include "libna/libna.h"
#include "xla/ffi/api/ffi.h"

namespace nb = nanobind;
namespace ffi = xla::ffi;

namespace {

using libna::DType;
using libna::NaParams;
using libna::TensorView;
using Int64s = ffi::Span<const std::int64_t>;

DType dtype_of(ffi::DataType type) {
  switch (type) {
    case ffi::DataType::F16: return DType::float16;
    case ffi::DataType::BF16: return DType::bfloat16;
    case ffi::DataType::F32: return DType::float32;
    case ffi::DataType::F64: return DType::float64;
    default:
      throw libna::dtype_error("[libna.jax] unsupported element type " +
                               std::to_string(static_cast<int>(type)) +
                               "; expected " + libna::dtype_names());
  }
}

// Views of row-major XLA buffers whose first `leading` dimensions are vmap
// dimensions: slice(b, i) is the i-th slice as a TensorView.
struct Slices {
  int leading = 0;
  std::int64_t count = 1;

  // `base_ndim`: the op's own rank of the reference operand `b`.
  Slices(const ffi::AnyBuffer& b, int base_ndim) {
    const auto dims = b.dimensions();
    leading = static_cast<int>(dims.size()) - base_ndim;
    if (leading < 0) leading = 0;
    for (int i = 0; i < leading; ++i) count *= dims[i];
  }

  TensorView slice(const ffi::AnyBuffer& b, std::int64_t i) const {
    return view(b.untyped_data(), b.element_type(), b.dimensions(), i);
  }
  TensorView slice(ffi::Result<ffi::AnyBuffer> b, std::int64_t i) const {
    return view(b->untyped_data(), b->element_type(), b->dimensions(), i);
  }
  template <typename Buffer>  // Optional's: data, type, dims
  TensorView slice(const Buffer& b, std::int64_t i) const {
    return view(b.data, b.type, b.dims, i);
  }

 private:
  TensorView view(void* data, ffi::DataType type, Int64s dims, std::int64_t i) const {
    const int ndim = static_cast<int>(dims.size()) - leading;
    if (ndim > libna::kMaxDims) {
      throw std::invalid_argument("[libna.jax] an operand has " + std::to_string(ndim) +
                                  " dimensions; at most " + std::to_string(libna::kMaxDims));
    }
    TensorView t;
    t.dtype = dtype_of(type);
    t.ndim = ndim;
    std::int64_t numel = 1;
    for (int d = ndim - 1; d >= 0; --d) {
      t.shape[d] = dims[leading + d];
      t.strides[d] = numel;
      numel *= t.shape[d];
    }
    t.data = static_cast<char*>(data) + i * numel * static_cast<std::int64_t>(
                                                       libna::dtype_size(t.dtype));
    return t;
  }
};

NaParams make_params(Int64s kernel_size, Int64s stride, Int64s dilation, Int64s is_causal,
                     double scale) {
  NaParams p;
  p.rank = static_cast<int>(kernel_size.size());
  if (p.rank < 1 || p.rank > libna::kMaxSpatialRank || stride.size() != kernel_size.size() ||
      dilation.size() != kernel_size.size() || is_causal.size() != kernel_size.size()) {
    throw std::invalid_argument("[libna.jax] per-axis attributes of inconsistent lengths");
  }
  for (int a = 0; a < p.rank; ++a) {
    p.kernel_size[a] = kernel_size[a];
    p.stride[a] = stride[a];
    p.dilation[a] = dilation[a];
    p.is_causal[a] = is_causal[a] != 0;
  }
  p.scale = scale;
  return p;
}

// The optional operands (or results) of a handler, passed as remaining
// arguments in a fixed order, each present when its flag is set: slice(s, j,
// i) is the i-th vmap slice of optional j, nullopt when it is absent.
class Optional {
 public:
  template <typename Remaining>
  Optional(const Remaining& remaining, std::initializer_list<std::int64_t> flags) {
    std::size_t next = 0;
    for (std::int64_t flag : flags) {
      if (flag == 0) {
        buffers_.emplace_back(std::nullopt);
        continue;
      }
      if (next >= remaining.size()) {
        throw std::invalid_argument("[libna.jax] fewer optional operands than flags");
      }
      buffers_.emplace_back(buffer(remaining, next++));
    }
    if (next != remaining.size()) {
      throw std::invalid_argument("[libna.jax] more optional operands than flags");
    }
  }

  std::optional<TensorView> slice(const Slices& s, std::size_t j, std::int64_t i) const {
    if (!buffers_[j]) return std::nullopt;
    return s.slice(*buffers_[j], i);
  }
  static const TensorView* ptr(const std::optional<TensorView>& t) { return t ? &*t : nullptr; }

 private:
  struct Buffer {
    void* data;
    ffi::DataType type;
    Int64s dims;
  };
  static Buffer buffer(const ffi::RemainingArgs& args, std::size_t j) {
    const auto b = *args.get<ffi::AnyBuffer>(j);
    return Buffer{b.untyped_data(), b.element_type(), b.dimensions()};
  }
  static Buffer buffer(const ffi::RemainingRets& rets, std::size_t j) {
    auto b = *rets.get<ffi::AnyBuffer>(j);
    return Buffer{b->untyped_data(), b->element_type(), b->dimensions()};
  }
  std::vector<std::optional<Buffer>> buffers_;
};

// Runs `body`, turning C++ exceptions into FFI errors with the same message.
template <typename F>
ffi::Error guarded(F&& body) {
  try {
    body();
    return ffi::Error::Success();
  } catch (const std::invalid_argument& e) {
    return ffi::Error::InvalidArgument(e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(e.what());
  }
}

// The optional arguments, in order: rpb (when with_rpb), then additional
// keys and values (when with_additional); results: out, lse.
ffi::Error na_forward(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                      ffi::RemainingArgs optional, ffi::Result<ffi::AnyBuffer> out,
                      ffi::Result<ffi::AnyBuffer> lse, Int64s kernel_size, Int64s stride,
                      Int64s dilation, Int64s is_causal, double scale, std::int64_t with_rpb,
                      std::int64_t with_additional) {
  return guarded([&] {
    const NaParams p = make_params(kernel_size, stride, dilation, is_causal, scale);
    const Optional given(optional, {with_rpb, with_additional, with_additional});
    const Slices s(q, p.rank + 3);
    for (std::int64_t i = 0; i < s.count; ++i) {
      const auto rpb = given.slice(s, 0, i), keys = given.slice(s, 1, i),
                 values = given.slice(s, 2, i);
      libna::plan_na_forward(s.slice(q, i), s.slice(k, i), s.slice(v, i), given.ptr(rpb), p,
                             true, given.ptr(keys), given.ptr(values))
          .run({s.slice(out, i), s.slice(lse, i)});
    }
  });
}

// The optional arguments, in order: rpb (when with_rpb), dlse (when
// with_dlse), additional keys and values (when with_additional); results:
// dq, dk, dv, then drpb and the additional keys' and values' gradients when
// their inputs are given.
ffi::Error na_backward(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer out,
                       ffi::AnyBuffer dout, ffi::AnyBuffer lse, ffi::RemainingArgs optional,
                       ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                       ffi::Result<ffi::AnyBuffer> dv, ffi::RemainingRets optional_grads,
                       Int64s kernel_size, Int64s stride, Int64s dilation, Int64s is_causal,
                       double scale, std::int64_t with_rpb, std::int64_t with_dlse,
                       std::int64_t with_additional) {
  return guarded([&] {
    const NaParams p = make_params(kernel_size, stride, dilation, is_causal, scale);
    const Optional given(optional, {with_rpb, with_dlse, with_additional, with_additional});
    const Optional grads(optional_grads, {with_rpb, with_additional, with_additional});
    const Slices s(q, p.rank + 3);
    for (std::int64_t i = 0; i < s.count; ++i) {
      const auto rpb = given.slice(s, 0, i), dlse = given.slice(s, 1, i),
                 keys = given.slice(s, 2, i), values = given.slice(s, 3, i);
      const auto none = [](const std::optional<TensorView>& t) { return t ? *t : TensorView{}; };
      libna::plan_na_backward(s.slice(q, i), s.slice(k, i), s.slice(v, i), given.ptr(rpb),
                              s.slice(out, i), s.slice(dout, i), s.slice(lse, i), p,
                              given.ptr(dlse), given.ptr(keys), given.ptr(values))
          .run({s.slice(dq, i), s.slice(dk, i), s.slice(dv, i), none(grads.slice(s, 0, i)),
                none(grads.slice(s, 1, i)), none(grads.slice(s, 2, i))});
    }
  });
}

// Merging works row by row, so every operand is viewed whole, flattened to
// [rows, D_v] (outs) and [rows] (lses), whatever vmap added in front.
TensorView flat(void* data, ffi::DataType type, Int64s dims, bool keep_last) {
  TensorView t;
  t.data = data;
  t.dtype = dtype_of(type);
  std::int64_t rows = 1;
  const std::size_t row_dims = keep_last ? dims.size() - 1 : dims.size();
  for (std::size_t d = 0; d < row_dims; ++d) rows *= dims[d];
  if (keep_last) {
    t.ndim = 2;
    t.shape[0] = rows;
    t.shape[1] = dims[dims.size() - 1];
    t.strides[0] = t.shape[1];
    t.strides[1] = 1;
  } else {
    t.ndim = 1;
    t.shape[0] = rows;
    t.strides[0] = 1;
  }
  return t;
}
TensorView flat(const ffi::AnyBuffer& b, bool keep_last) {
  return flat(b.untyped_data(), b.element_type(), b.dimensions(), keep_last);
}
TensorView flat(ffi::Result<ffi::AnyBuffer> b, bool keep_last) {
  return flat(b->untyped_data(), b->element_type(), b->dimensions(), keep_last);
}

// args: outs[0..parts), lses[0..parts); rets: out, lse.
ffi::Error merge_attentions(ffi::RemainingArgs args, ffi::Result<ffi::AnyBuffer> out,
                            ffi::Result<ffi::AnyBuffer> lse, std::int64_t parts) {
  return guarded([&] {
    std::vector<TensorView> outs, lses;
    for (std::int64_t i = 0; i < parts; ++i) {
      outs.push_back(flat(*args.get<ffi::AnyBuffer>(i), true));
      lses.push_back(flat(*args.get<ffi::AnyBuffer>(parts + i), false));
    }
    libna::merge_attentions(outs, lses, flat(out, true), flat(lse, false));
  });
}

// args: outs, lses, out, lse, dout[, dlse]; rets: douts, dlses.
ffi::Error merge_attentions_backward(ffi::RemainingArgs args, ffi::RemainingRets rets,
                                     std::int64_t parts) {
  return guarded([&] {
    std::vector<TensorView> outs, lses, douts, dlses;
    for (std::int64_t i = 0; i < parts; ++i) {
      outs.push_back(flat(*args.get<ffi::AnyBuffer>(i), true));
      lses.push_back(flat(*args.get<ffi::AnyBuffer>(parts + i), false));
      douts.push_back(flat(*rets.get<ffi::AnyBuffer>(i), true));
      dlses.push_back(flat(*rets.get<ffi::AnyBuffer>(parts + i), false));
    }
    const std::size_t base = 2 * static_cast<std::size_t>(parts);
    std::optional<TensorView> dlse;
    if (args.size() > base + 3) dlse = flat(*args.get<ffi::AnyBuffer>(base + 3), false);
    libna::merge_attentions_backward(outs, lses, flat(*args.get<ffi::AnyBuffer>(base), true),
                                     flat(*args.get<ffi::AnyBuffer>(base + 1), false),
                                     flat(*args.get<ffi::AnyBuffer>(base + 2), true),
                                     dlse ? &*dlse : nullptr, douts, dlses);
  });
}

}  // namespace

namespace {
// The attributes of NA's per-axis parameters and scale (see make_params).
template <typename Binding>
auto with_na_attributes(Binding binding) {
  return std::move(binding)
      .template Attr<Int64s>("kernel_size")
      .template Attr<Int64s>("stride")
      .template Attr<Int64s>("dilation")
      .template Attr<Int64s>("is_causal")
      .template Attr<double>("scale");
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(libna_na_forward, na_forward,
                              with_na_attributes(ffi::Ffi::Bind()
                                                     .Arg<ffi::AnyBuffer>()
                                                     .Arg<ffi::AnyBuffer>()
                                                     .Arg<ffi::AnyBuffer>()
                                                     .RemainingArgs()
                                                     .Ret<ffi::AnyBuffer>()
                                                     .Ret<ffi::AnyBuffer>())
                                  .Attr<std::int64_t>("with_rpb")
                                  .Attr<std::int64_t>("with_additional"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(libna_na_backward, na_backward,
                              with_na_attributes(ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .RemainingRets())
                                  .Attr<std::int64_t>("with_rpb")
                                  .Attr<std::int64_t>("with_dlse")
                                  .Attr<std::int64_t>("with_additional"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(libna_merge_attentions, merge_attentions,
                              ffi::Ffi::Bind()
                                  .RemainingArgs()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<std::int64_t>("parts"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(libna_merge_attentions_backward, merge_attentions_backward,
                              ffi::Ffi::Bind()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<std::int64_t>("parts"));

namespace {

template <typename Fn>
nb::capsule handler_capsule(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_jax_ffi, m) {
  m.doc() = "XLA FFI handlers of libna for libna.jax (CPU)";
  register_dtype_error_as_type_error();
  m.def("handlers", [] {
    nb::dict d;
    d["libna_na_forward"] = handler_capsule(libna_na_forward);
    d["libna_na_backward"] = handler_capsule(libna_na_backward);
    d["libna_merge_attentions"] = handler_capsule(libna_merge_attentions);
    d["libna_merge_attentions_backward"] = handler_capsule(libna_merge_attentions_backward);
    return d;
  });
}
