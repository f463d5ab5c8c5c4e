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

template <typename F>
decltype(auto) dispatch_float_types(DType dtype, const char* op, F&& f) {
  switch (dtype) {
    case DType::float16: return f(TypeTag<Half>{});
    case DType::bfloat16: return f(TypeTag<BFloat16>{});
    case DType::float32: return f(TypeTag<float>{});
    case DType::float64: return f(TypeTag<double>{});
  }
  throw dtype_error(std::string("[") + op + "] unsupported dtype code " +
                    std::to_string(static_cast<int>(dtype)));
}

}  // namespace libna::detail
