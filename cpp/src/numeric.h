// Host-side 16-bit float storage types and their exact conversions to and
// from float (round to nearest even), independent of compiler extensions so
// that the CPU backend builds the same on x86-64 and aarch64.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace libna::detail {

struct Half {
  std::uint16_t bits;
};
struct BFloat16 {
  std::uint16_t bits;
};

inline float bits_to_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline std::uint32_t float_to_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float to_float(Half h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h.bits & 0x8000u) << 16;
  std::uint32_t exponent = (h.bits >> 10) & 0x1fu;
  std::uint32_t mantissa = h.bits & 0x3ffu;
  if (exponent == 0x1f) {  // inf / nan
    return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  }
  if (exponent == 0) {
    if (mantissa == 0) return bits_to_float(sign);
    // subnormal half: value = mantissa * 2^-24, exact in float
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline Half to_half(float f) {
  const std::uint32_t u = float_to_bits(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t abs = u & 0x7fffffffu;
  if (abs >= 0x7f800000u) {  // inf / nan (keep nan quiet)
    return Half{static_cast<std::uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u))};
  }
  if (abs >= 0x477ff000u) {  // rounds to >= 65520: overflow to inf
    return Half{static_cast<std::uint16_t>(sign | 0x7c00u)};
  }
  if (abs < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    // Adding 0.5 makes the FPU round the low bits away (nearest even).
    const float shifted = bits_to_float(abs) + 0.5f;
    return Half{static_cast<std::uint16_t>(sign | (float_to_bits(shifted) - 0x3f000000u))};
  }
  const std::uint32_t odd = (abs >> 13) & 1u;
  const std::uint32_t rounded = abs + 0xfffu + odd - (112u << 23);
  return Half{static_cast<std::uint16_t>(sign | (rounded >> 13))};
}

inline float to_float(BFloat16 b) { return bits_to_float(static_cast<std::uint32_t>(b.bits) << 16); }

inline BFloat16 to_bfloat16(float f) {
  const std::uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // nan: keep it a quiet nan
    return BFloat16{static_cast<std::uint16_t>((u >> 16) | 0x40u)};
  }
  const std::uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
  return BFloat16{static_cast<std::uint16_t>(rounded >> 16)};
}

// Accumulation type: float64 for float64 inputs, float32 otherwise.
template <typename T>
struct AccumulatorOf {
  using type = float;
};
template <>
struct AccumulatorOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccumulatorOf<T>::type;

// Element loads and stores through memcpy: a view may start at any byte (a
// NumPy view at an odd offset), and a plain dereference of a misaligned
// pointer is undefined behaviour. Compilers emit the same single move.
template <typename E>
inline E load_element(const E* p) {
  E x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
template <typename E>
inline void store_element(E* p, E x) { std::memcpy(p, &x, sizeof x); }

template <typename Acc>
inline Acc load(const float* p) { return static_cast<Acc>(load_element(p)); }
template <typename Acc>
inline Acc load(const double* p) { return static_cast<Acc>(load_element(p)); }
template <typename Acc>
inline Acc load(const Half* p) { return static_cast<Acc>(to_float(load_element(p))); }
template <typename Acc>
inline Acc load(const BFloat16* p) { return static_cast<Acc>(to_float(load_element(p))); }

template <typename T, typename Acc>
inline void store(T* p, Acc x);
template <>
inline void store<float, float>(float* p, float x) { store_element(p, x); }
template <>
inline void store<double, double>(double* p, double x) { store_element(p, x); }
template <>
inline void store<Half, float>(Half* p, float x) { store_element(p, to_half(x)); }
template <>
inline void store<BFloat16, float>(BFloat16* p, float x) { store_element(p, to_bfloat16(x)); }

// The edges of softmax, the same in every kernel and in libna.reference
// (README, "Non-finite values"): a query whose logits are all -inf (an rpb of
// -inf, say) attends to nothing: out = 0, lse = -inf, and no gradient flows
// through it. A +inf logit leaves the softmax undefined: lse = +inf and out =
// NaN. A NaN logit gives NaN.
//
// The shift subtracted from the logits before exp: their maximum, or 0 when
// every logit is -inf (so that exp(-inf - shift) = 0, not NaN).
template <typename Acc>
inline Acc softmax_shift(Acc max_logit) {
  return max_logit == -std::numeric_limits<Acc>::infinity() ? Acc(0) : max_logit;
}
// lse from the maximum logit and sum = sum of exp(logit - softmax_shift).
template <typename Acc>
inline Acc softmax_lse(Acc max_logit, Acc sum) {
  return max_logit == std::numeric_limits<Acc>::infinity() ? max_logit
                                                          : softmax_shift(max_logit) + std::log(sum);
}
// The factor that normalises the weighted sum of values: 0 for a query that
// attends to nothing (its sum is 0; a NaN sum stays NaN).
template <typename Acc>
inline Acc softmax_normaliser(Acc sum) { return sum == Acc(0) ? Acc(0) : Acc(1) / sum; }
// The lse a backward subtracts from a logit to get its probability: a query
// that attends to nothing (lse = -inf) gets exp(-inf - +inf) = 0, not NaN.
template <typename Acc>
inline Acc backward_lse(Acc lse) {
  return lse == -std::numeric_limits<Acc>::infinity() ? std::numeric_limits<Acc>::infinity() : lse;
}

}  // namespace libna::detail
