// The one place where runtime values (rank, dtype) become template parameters.
#pragma once

#include <stdexcept>
#include <string>
#include <type_traits>

#include "libna/tensor.h"
#include "numeric.h"

namespace libna::detail {

template <int Rank>
using RankTag = std::integral_constant<int, Rank>;

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
decltype(auto) dispatch_rank(int rank, const char* op, F&& f) {
  switch (rank) {
    case 1: return f(RankTag<1>{});
    case 2: return f(RankTag<2>{});
    case 3: return f(RankTag<3>{});
    default:
      throw std::invalid_argument(std::string("[") + op + "] spatial rank must be 1, 2 or 3, got " +
                                  std::to_string(rank));
  }
}

// The C++ element type of each DType (a DType without one does not compile).
template <DType>
struct ElementOf;
// clang-format off
template <> struct ElementOf<DType::float16> { using type = Half; };
template <> struct ElementOf<DType::bfloat16> { using type = BFloat16; };
template <> struct ElementOf<DType::float32> { using type = float; };
template <> struct ElementOf<DType::float64> { using type = double; };
// clang-format on

template <typename F>
decltype(auto) dispatch_float_types(DType dtype, const char* op, F&& f) {
  switch (dtype) {
#define LIBNA_DISPATCH_DTYPE(name, bytes) \
  case DType::name: return f(TypeTag<typename ElementOf<DType::name>::type>{});
    LIBNA_FOR_EACH_DTYPE(LIBNA_DISPATCH_DTYPE)
#undef LIBNA_DISPATCH_DTYPE
  }
  throw dtype_error(std::string("[") + op + "] unsupported dtype code " +
                    std::to_string(static_cast<int>(dtype)));
}

}  // namespace libna::detail
