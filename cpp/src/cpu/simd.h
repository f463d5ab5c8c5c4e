// Eight-lane float vectors through GCC/Clang vector extensions: the same
// source compiles to AVX2+FMA in the AVX2 build of the kernels and to SSE or
// NEON pairs in the portable one. Included inside the per-instruction-set
// namespace and target region of fast_kernels_impl.h, so each build has its
// own copy and no function passes these vectors to one compiled for another
// instruction set.
#pragma once

#include <cstdint>
#include <cstring>

#define LIBNA_ALWAYS_INLINE inline __attribute__((always_inline))
#define LIBNA_NOINLINE __attribute__((noinline))

namespace libna::cpu::LIBNA_SIMD_NS::simd {

inline constexpr int kLanes = 8;
typedef float f32x8 __attribute__((vector_size(32)));
typedef std::int32_t i32x8 __attribute__((vector_size(32)));

LIBNA_ALWAYS_INLINE f32x8 splat(float x) { return f32x8{} + x; }

LIBNA_ALWAYS_INLINE f32x8 load(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

LIBNA_ALWAYS_INLINE void store(float* p, f32x8 v) { std::memcpy(p, &v, sizeof v); }

LIBNA_ALWAYS_INLINE f32x8 max(f32x8 a, f32x8 b) { return a > b ? a : b; }

// exp(x) for x <= 0 (logits minus their maximum), with exp(x) = 0 below
// -87 (so -inf maps to 0). Cody-Waite range reduction x = n ln2 + r,
// |r| <= ln2/2, and a degree-6 polynomial for exp(r): about 1 ulp. F: a
// float vector of any width (f32x8, or the row pairs' 16 lanes), each lane
// computed alike.
template <typename F>
LIBNA_ALWAYS_INLINE F exp_nonpositive(F x) {
  using I = decltype(x < x);  // the integer vector of F's width
  // (No helper lambda for the constants: GCC compiles a lambda's body
  // without the kernel set's target, and a vector return across that
  // boundary changes the ABI.)
  const F lowest = F{} - 87.0f;
  const I underflow = x < lowest;
  x = x < lowest ? lowest : x;
  const F round_magic = (F{} + 12582912.0f);  // 1.5 * 2^23
  const F n = (x * 1.44269504088896341f + round_magic) - round_magic;
  F r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  F p = F{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const I exponent = (__builtin_convertvector(n, I) + 127) << 23;
  F scale;
  std::memcpy(&scale, &exponent, sizeof scale);
  const F result = p * scale;
  I bits;
  std::memcpy(&bits, &result, sizeof bits);
  bits &= ~underflow;
  F out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

}  // namespace libna::cpu::LIBNA_SIMD_NS::simd
