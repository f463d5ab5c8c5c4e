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
// |r| <= ln2/2, and a degree-6 polynomial for exp(r): about 1 ulp.
LIBNA_ALWAYS_INLINE f32x8 exp_nonpositive(f32x8 x) {
  const f32x8 lowest = splat(-87.0f);
  const i32x8 underflow = x < lowest;
  x = x < lowest ? lowest : x;
  const f32x8 round_magic = splat(12582912.0f);  // 1.5 * 2^23
  const f32x8 n = (x * splat(1.44269504088896341f) + round_magic) - round_magic;
  f32x8 r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  f32x8 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  const i32x8 exponent = (__builtin_convertvector(n, i32x8) + 127) << 23;
  f32x8 scale;
  std::memcpy(&scale, &exponent, sizeof scale);
  const f32x8 result = p * scale;
  i32x8 bits;
  std::memcpy(&bits, &result, sizeof bits);
  bits &= ~underflow;
  f32x8 out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

}  // namespace libna::cpu::LIBNA_SIMD_NS::simd
