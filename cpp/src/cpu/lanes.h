// Moving the head vectors of eight tokens between the tensors' layout (one
// token's [d] run after another, any strides, any of the storage types) and
// the vectorised kernels' lane layout ([d][lane]: one f32x8 per channel),
// through 8x8 register transposes. Included by the vectorised kernels'
// headers (packing.h, lane_kernel.h) inside the per-instruction-set
// namespace.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/simd.h"
#include "numeric.h"

namespace libna::cpu::LIBNA_SIMD_NS {

using simd::f32x8;
using simd::i32x8;
using simd::kLanes;
using detail::BFloat16;
using detail::Half;

LIBNA_ALWAYS_INLINE f32x8 bits_as_float(i32x8 x) {
  f32x8 f;
  std::memcpy(&f, &x, sizeof f);
  return f;
}

// Eight 16-bit values widened to 32-bit integers (p may be at any byte).
LIBNA_ALWAYS_INLINE i32x8 widen_u16(const void* p) {
  typedef std::uint16_t u16x8 __attribute__((vector_size(16)));
  u16x8 h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, i32x8);
}

// half -> float for eight values, exact (normals, subnormals, inf, nan).
LIBNA_ALWAYS_INLINE f32x8 half_to_float(i32x8 h) {
  const i32x8 exponent = h & 0x7c00;
  const i32x8 body = (h & 0x7fff) << 13;  // exponent and mantissa in float position
  const i32x8 rebias = exponent == 0x7c00 ? i32x8{} + (224 << 23) : i32x8{} + (112 << 23);
  f32x8 magnitude = bits_as_float(body + rebias);
  // Zero and subnormals: read the mantissa as 2^-14 (1 + m / 1024) and drop the 1.
  const f32x8 small = bits_as_float(body + (113 << 23)) - simd::splat(6.103515625e-05f);
  magnitude = exponent == 0 ? small : magnitude;
  i32x8 bits;
  std::memcpy(&bits, &magnitude, sizeof bits);
  return bits_as_float(bits | ((h & 0x8000) << 16));
}

// Elements p[0], p[stride], ... p[(n-1) stride] as floats, zero beyond n.
template <typename T>
LIBNA_ALWAYS_INLINE f32x8 load8(const T* p, std::int64_t stride, std::int64_t n) {
  if (stride == 1 && n == kLanes) {
    if constexpr (std::is_same_v<T, float>) {
      return simd::load(p);
    } else if constexpr (std::is_same_v<T, BFloat16>) {
      return bits_as_float(widen_u16(p) << 16);
    } else if constexpr (std::is_same_v<T, Half>) {
#if defined(LIBNA_SIMD_F16C)
      __m128i h;
      std::memcpy(&h, p, sizeof h);
      const __m256 f = _mm256_cvtph_ps(h);  // exact, as half_to_float
      f32x8 x;
      std::memcpy(&x, &f, sizeof x);
      return x;
#else
      return half_to_float(widen_u16(p));
#endif
    }
  }
  alignas(32) float x[kLanes] = {};
  for (std::int64_t i = 0; i < n; ++i) x[i] = load<float>(p + i * stride);
  return simd::load(x);
}

// p[0], p[stride], ... p[(n-1) stride] = the first n elements of x.
template <typename T>
LIBNA_ALWAYS_INLINE void store8(T* p, std::int64_t stride, std::int64_t n, f32x8 x) {
  if constexpr (std::is_same_v<T, float>) {
    if (stride == 1 && n == kLanes) return simd::store(p, x);
  }
#if defined(LIBNA_SIMD_F16C)
  if constexpr (std::is_same_v<T, Half>) {
    if (stride == 1 && n == kLanes) {  // round to nearest even, as to_half
      __m256 f;
      std::memcpy(&f, &x, sizeof f);
      const __m128i h = _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      std::memcpy(p, &h, sizeof h);
      return;
    }
  }
#endif
  alignas(32) float y[kLanes];
  simd::store(y, x);
  for (std::int64_t i = 0; i < n; ++i) store<T, float>(p + i * stride, y[i]);
}

// In-place transpose of the 8x8 matrix whose rows are r[0..8).
LIBNA_ALWAYS_INLINE void transpose8(f32x8* r) {
  f32x8 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = __builtin_shufflevector(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 1] = __builtin_shufflevector(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    u[i + 2] = __builtin_shufflevector(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 3] = __builtin_shufflevector(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = __builtin_shufflevector(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[i + 4] = __builtin_shufflevector(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

// dst[0 .. n) = src[0 .. n) for n <= kLanes, in fixed-size pieces (a copy
// of a run-time length is a call of memmove, which took a tenth of a small
// problem's time in the rows' last, partial blocks).
LIBNA_ALWAYS_INLINE void store_first(float* dst, const float* src, std::int64_t n) {
  static_assert(kLanes == 8, "pieces of 4, 2 and 1 cover fewer than 8");
  if (n == kLanes) {
    std::memcpy(dst, src, kLanes * sizeof(float));
    return;
  }
  std::int64_t i = 0;
  if (n & 4) {
    std::memcpy(dst, src, 4 * sizeof(float));
    i = 4;
  }
  if (n & 2) {
    std::memcpy(dst + i, src + i, 2 * sizeof(float));
    i += 2;
  }
  if (n & 1) dst[i] = src[i];
}

// dst[d * dst_stride + l] = factor * tokens[l][d * stride] for d < dim and
// l < lanes (tokens beyond `lanes` are not read; with lanes < kLanes only
// those lanes of dst are written, so dst may be a packed row's columns).
// *probe (if given) accumulates 0 times every value written: it stays 0 while
// they are finite and becomes NaN with an inf or NaN.
template <typename T>
void gather_lanes(const T* const* tokens, std::int64_t lanes, std::int64_t stride,
                  std::int64_t dim, float factor, float* dst, std::int64_t dst_stride,
                  f32x8* probe = nullptr) {
  const f32x8 scale = simd::splat(factor), zero = simd::splat(0.0f);
  f32x8 bad = zero;
  f32x8 r[kLanes];
  std::int64_t d0 = 0;
  // Whole 8x8 blocks: straight-line code that keeps r in registers.
  if (lanes == kLanes) {
    for (; d0 + kLanes <= dim; d0 += kLanes) {
      for (int l = 0; l < kLanes; ++l) r[l] = load8(tokens[l] + d0 * stride, stride, kLanes);
      transpose8(r);
      f32x8 x[kLanes];
      for (int i = 0; i < kLanes; ++i) {
        x[i] = r[i] * scale;
        simd::store(dst + (d0 + i) * dst_stride, x[i]);
      }
      // 0 * x, summed as a tree: one add per block on the probe's chain
      // (eight in a row, each waiting for the last, made packing
      // latency-bound).
      bad += ((x[0] * zero + x[1] * zero) + (x[2] * zero + x[3] * zero)) +
             ((x[4] * zero + x[5] * zero) + (x[6] * zero + x[7] * zero));
    }
  }
  for (; d0 < dim; d0 += kLanes) {
    const std::int64_t n = std::min<std::int64_t>(kLanes, dim - d0);
    for (std::int64_t l = 0; l < kLanes; ++l) {
      r[l] = l < lanes ? load8(tokens[l] + d0 * stride, stride, n) : simd::splat(0.0f);
    }
    transpose8(r);
    for (std::int64_t i = 0; i < n; ++i) {
      alignas(32) float y[kLanes];
      const f32x8 x = r[i] * scale;  // lanes past `lanes` are 0
      simd::store(y, x);
      store_first(dst + (d0 + i) * dst_stride, y, lanes);
      bad += x * zero;
    }
  }
  if (probe) *probe += bad;
}

// tokens[l][d * stride] = factor[l] * src[d * src_stride + l] for d < dim
// and l < lanes.
template <typename T>
void scatter_lanes(const float* src, f32x8 factor, std::int64_t dim,
                   T* const* tokens, std::int64_t lanes, std::int64_t stride,
                   std::int64_t src_stride = kLanes) {
  f32x8 r[kLanes];
  std::int64_t d0 = 0;
  if (lanes == kLanes) {
    for (; d0 + kLanes <= dim; d0 += kLanes) {
      for (int i = 0; i < kLanes; ++i) r[i] = simd::load(src + (d0 + i) * src_stride) * factor;
      transpose8(r);
      for (int l = 0; l < kLanes; ++l) store8(tokens[l] + d0 * stride, stride, kLanes, r[l]);
    }
  }
  for (; d0 < dim; d0 += kLanes) {
    const std::int64_t n = std::min<std::int64_t>(kLanes, dim - d0);
    for (std::int64_t i = 0; i < kLanes; ++i) {
      r[i] = i < n ? simd::load(src + (d0 + i) * src_stride) * factor : simd::splat(0.0f);
    }
    transpose8(r);
    for (std::int64_t l = 0; l < lanes; ++l) store8(tokens[l] + d0 * stride, stride, n, r[l]);
  }
}

}  // namespace libna::cpu::LIBNA_SIMD_NS
