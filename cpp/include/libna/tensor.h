// Framework-free tensor views: a pointer plus shape and strides, in the
// spirit of DLTensor, so that any array library can hand memory to libna.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "libna/export.h"

namespace libna {

// The element types libna computes in, each named once, as X(name, bytes):
// the enum, kDTypes, dtype_name, dtype_size and the CPU dispatch
// (cpp/src/dispatch.h, which names each one's C++ type) expand this list.
// A new dtype is a line here, its element type in dispatch.h, its kernels,
// and its name in the frameworks' maps (python/libna/_frameworks.py,
// python/src/bindings.cpp, python/src/jax_ffi.cpp); test_core and
// tests/test_frameworks.py fail while one of them lacks it.
#define LIBNA_FOR_EACH_DTYPE(X) X(float16, 2) X(bfloat16, 2) X(float32, 4) X(float64, 8)

enum class DType : std::uint8_t {
#define LIBNA_DTYPE_ENUMERATOR(name, bytes) name,
  LIBNA_FOR_EACH_DTYPE(LIBNA_DTYPE_ENUMERATOR)
#undef LIBNA_DTYPE_ENUMERATOR
};

// Every DType, in declaration order.
inline constexpr DType kDTypes[] = {
#define LIBNA_DTYPE_VALUE(name, bytes) DType::name,
    LIBNA_FOR_EACH_DTYPE(LIBNA_DTYPE_VALUE)
#undef LIBNA_DTYPE_VALUE
};

LIBNA_API const char* dtype_name(DType dtype);
LIBNA_API std::size_t dtype_size(DType dtype);
// "float16, bfloat16, float32 or float64": for messages that list them.
LIBNA_API std::string dtype_names();

enum class DeviceType : std::uint8_t { cpu, cuda };

struct Device {
  DeviceType type = DeviceType::cpu;
  int index = 0;
  friend bool operator==(const Device& a, const Device& b) {
    return a.type == b.type && a.index == b.index;
  }
  friend bool operator!=(const Device& a, const Device& b) { return !(a == b); }
};

LIBNA_API std::string device_name(Device device);

// Spatial rank (1D, 2D, 3D) and the tensor rank that goes with it:
// [batch, *spatial, heads, head_dim].
inline constexpr int kMaxSpatialRank = 3;
inline constexpr int kMaxDims = kMaxSpatialRank + 3;

// A non-owning view. Strides are in elements (not bytes) and may be any
// value, negative and zero included, as long as reads stay inside the
// caller's buffer.
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::float32;
  Device device{};
  int ndim = 0;
  std::int64_t shape[kMaxDims] = {};
  std::int64_t strides[kMaxDims] = {};

  std::int64_t numel() const {
    std::int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }

  // The same view with the last dimension resized to `last`, or dropped when
  // last < 0: the shapes of op outputs such as out [..., D_v] or lse [...].
  TensorView with_last_dim(std::int64_t last) const {
    TensorView r = *this;
    if (last < 0) {
      r.ndim -= 1;
    } else {
      r.shape[r.ndim - 1] = last;
    }
    return r;
  }

  // A row-major (C-contiguous) view of `data`.
  static TensorView contiguous(void* data, DType dtype,
                               std::initializer_list<std::int64_t> shape,
                               Device device = {}) {
    if (shape.size() > static_cast<std::size_t>(kMaxDims)) {
      throw std::invalid_argument("[TensorView] at most " +
                                  std::to_string(kMaxDims) + " dimensions");
    }
    TensorView t;
    t.data = data;
    t.dtype = dtype;
    t.device = device;
    t.ndim = static_cast<int>(shape.size());
    int i = 0;
    for (std::int64_t s : shape) t.shape[i++] = s;
    std::int64_t stride = 1;
    for (int d = t.ndim - 1; d >= 0; --d) {
      t.strides[d] = stride;
      stride *= t.shape[d];
    }
    return t;
  }
};

// Thrown for an input of an unsupported element type (integer, bool,
// complex, or mixed dtypes). Python sees it as TypeError; every other user
// error is std::invalid_argument (ValueError).
class LIBNA_API dtype_error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

}  // namespace libna
