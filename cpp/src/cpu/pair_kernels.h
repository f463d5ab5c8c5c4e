// The micro-kernels of row pairs: two query rows computed together in 16
// lanes, lanes 0-7 the eight query lanes of the first row and lanes 8-15 the
// same columns of the second (the next row of its dilation group along the
// second-to-last axis). Their windows along the last axis are the same, and
// along the others they share all but a row or two, so every load of eight
// key or value columns serves both halves: one 16-lane FMA per load, where
// the single-row kernels (micro_kernels.h) do one 8-lane FMA per load and are
// bound by their loads. With AVX-512 a 16-lane vector is one register; with
// AVX2 or SSE it is two or four, and each load still feeds two FMAs.
// The products run over the union of the two rows' key rows; a key row that
// one row does not see is masked out of that half (-inf logits, 0
// probabilities), so each half computes exactly what the single-row kernels
// compute for its row, in the same order, and the results are bitwise equal.
// In 1D the same kernels take two consecutive lane blocks of one row (block
// pairs): the key "rows" are the one row, and the second half's window starts
// a few columns right of the first's (fused_forward.h).
// Included inside the per-instruction-set namespace and target region of
// fast_kernels_impl.h (LIBNA_SIMD_NS), like every header of the vectorised
// kernels.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu/lane_windows.h"
#include "cpu/micro_kernels.h"
#include "cpu/simd.h"
#include "cpu/tuning.h"

// A 16-lane vector is wider than an AVX2 (or SSE) register, and GCC warns
// that passing one by value would change the ABI: these functions are
// always inlined within one kernel set's target region, so none is passed.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace libna::cpu::LIBNA_SIMD_NS {

using simd::f32x8;
using simd::i32x8;
using simd::kLanes;

inline constexpr int kPairLanes = 2 * kLanes;

#if defined(LIBNA_SIMD_WIDE_REGISTERS)
// AVX-512: a 16-lane vector is one register, and each load feeds 16 lanes of
// FMA: the fused forward takes rows in pairs unless LIBNA_CPU_ROW_PAIRS=0.
inline constexpr bool kRowPairsByDefault = true;
inline constexpr int kPairQkPositions = tuning::kPairQkPositionsWide;
inline constexpr int kPairPvChannels = tuning::kPairPvChannelsWide;
typedef float f32x16 __attribute__((vector_size(64)));
typedef std::int32_t i32x16 __attribute__((vector_size(64)));

namespace pair {
LIBNA_ALWAYS_INLINE f32x16 join(f32x8 a, f32x8 b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
LIBNA_ALWAYS_INLINE i32x16 join(i32x8 a, i32x8 b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
LIBNA_ALWAYS_INLINE f32x8 low(f32x16 x) { return __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7); }
LIBNA_ALWAYS_INLINE f32x8 high(f32x16 x) {
  return __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
}
LIBNA_ALWAYS_INLINE f32x16 load(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
LIBNA_ALWAYS_INLINE void store(float* p, f32x16 v) { std::memcpy(p, &v, sizeof v); }
// The eight floats at p in both halves: one vbroadcastf32x8 from memory (a
// load, no shuffle on the port that also runs 512-bit FMAs).
LIBNA_ALWAYS_INLINE f32x16 twice(const float* p) {
#if !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12's intrinsic header
#endif
  return reinterpret_cast<f32x16>(_mm512_broadcast_f32x8(_mm256_loadu_ps(p)));
#if !defined(__clang__)
#pragma GCC diagnostic pop
#endif
}
// Lanes of x where `keep`, else of `fill`.
LIBNA_ALWAYS_INLINE f32x16 select(i32x16 keep, f32x16 x, f32x16 fill) { return keep ? x : fill; }
// Lanes with lo <= position < hi, where `rows` too.
LIBNA_ALWAYS_INLINE i32x16 inside(i32x16 position, i32x16 lo, i32x16 hi, i32x16 rows) {
  return (position >= lo) & (position < hi) & rows;
}
LIBNA_ALWAYS_INLINE f32x16 max(f32x16 a, f32x16 b) { return a > b ? a : b; }
LIBNA_ALWAYS_INLINE f32x16 exp_nonpositive(f32x16 x) { return simd::exp_nonpositive(x); }
// 1 / x, and 0 where x is 0.
LIBNA_ALWAYS_INLINE f32x16 inverse_or_zero(f32x16 x) {
  const f32x16 zero = f32x16{};
  return x == zero ? zero : (f32x16{} + 1.0f) / x;
}
}  // namespace pair
#else
// AVX2 or SSE: a 16-lane vector is two f32x8 (each two registers with SSE),
// spelled out: GCC lowers a 64-byte vector extension type through memory
// where AVX-512 is not enabled. Each load then feeds two FMAs, but the
// accumulators take twice the registers and the blocks are smaller: no
// faster than single rows on AVX2 (measured), so pairs only with
// LIBNA_CPU_ROW_PAIRS=1.
inline constexpr bool kRowPairsByDefault = false;
inline constexpr int kPairQkPositions = tuning::kPairQkPositions;
inline constexpr int kPairPvChannels = tuning::kPairPvChannels;
struct f32x16 {
  f32x8 lo, hi;
};
struct i32x16 {
  i32x8 lo, hi;
};
LIBNA_ALWAYS_INLINE f32x16 operator+(f32x16 a, f32x16 b) { return {a.lo + b.lo, a.hi + b.hi}; }
LIBNA_ALWAYS_INLINE f32x16 operator-(f32x16 a, f32x16 b) { return {a.lo - b.lo, a.hi - b.hi}; }
LIBNA_ALWAYS_INLINE f32x16 operator*(f32x16 a, f32x16 b) { return {a.lo * b.lo, a.hi * b.hi}; }
LIBNA_ALWAYS_INLINE f32x16& operator+=(f32x16& a, f32x16 b) { return a = a + b; }

namespace pair {
LIBNA_ALWAYS_INLINE f32x16 join(f32x8 a, f32x8 b) { return {a, b}; }
LIBNA_ALWAYS_INLINE i32x16 join(i32x8 a, i32x8 b) { return {a, b}; }
LIBNA_ALWAYS_INLINE f32x8 low(f32x16 x) { return x.lo; }
LIBNA_ALWAYS_INLINE f32x8 high(f32x16 x) { return x.hi; }
LIBNA_ALWAYS_INLINE f32x16 load(const float* p) { return {simd::load(p), simd::load(p + kLanes)}; }
LIBNA_ALWAYS_INLINE f32x16 twice(const float* p) {
  const f32x8 x = simd::load(p);
  return {x, x};
}
LIBNA_ALWAYS_INLINE void store(float* p, f32x16 v) {
  simd::store(p, v.lo);
  simd::store(p + kLanes, v.hi);
}
LIBNA_ALWAYS_INLINE f32x16 select(i32x16 keep, f32x16 x, f32x16 fill) {
  return {keep.lo ? x.lo : fill.lo, keep.hi ? x.hi : fill.hi};
}
LIBNA_ALWAYS_INLINE i32x16 inside(i32x16 position, i32x16 lo, i32x16 hi, i32x16 rows) {
  return {(position.lo >= lo.lo) & (position.lo < hi.lo) & rows.lo,
          (position.hi >= lo.hi) & (position.hi < hi.hi) & rows.hi};
}
LIBNA_ALWAYS_INLINE f32x16 max(f32x16 a, f32x16 b) {
  return {simd::max(a.lo, b.lo), simd::max(a.hi, b.hi)};
}
LIBNA_ALWAYS_INLINE f32x16 exp_nonpositive(f32x16 x) {
  return {simd::exp_nonpositive(x.lo), simd::exp_nonpositive(x.hi)};
}
LIBNA_ALWAYS_INLINE f32x16 inverse_or_zero(f32x16 x) {
  const f32x8 zero = simd::splat(0.0f), one = simd::splat(1.0f);
  return {x.lo == zero ? zero : one / x.lo, x.hi == zero ? zero : one / x.hi};
}
}  // namespace pair
#endif

namespace pair {
LIBNA_ALWAYS_INLINE f32x16 splat(float x) { return join(simd::splat(x), simd::splat(x)); }
LIBNA_ALWAYS_INLINE i32x16 splat_int(std::int32_t x) { return join(i32x8{} + x, i32x8{} + x); }
// A mask of 16 lanes from 16 int32 at p (any alignment).
LIBNA_ALWAYS_INLINE i32x16 load_mask(const std::int32_t* p) {
  i32x8 a, b;
  std::memcpy(&a, p, sizeof a);
  std::memcpy(&b, p + kLanes, sizeof b);
  return join(a, b);
}
}  // namespace pair

// logits[j][16] for N window positions from j0 on, of one key row: lanes 0-7
// sum_d qa[d] * key(d, j + lane), lanes 8-15 the same with qb (qa, qb: eight
// lanes at + d * q_stride; key(d, c) at key + d * width + c).
template <int N>
void qk_pair_chunk(const float* qa, const float* qb, std::int64_t q_stride, const float* key,
                   std::int64_t j0, std::int64_t width, std::int64_t dim, float* logits) {
  f32x16 acc[N];
#pragma GCC unroll 8
  for (int j = 0; j < N; ++j) acc[j] = pair::splat(0.0f);
  for (std::int64_t d = 0; d < dim; ++d) {
    const f32x16 qd = pair::join(simd::load(qa + d * q_stride), simd::load(qb + d * q_stride));
    const float* kd = key + j0 + d * width;
    for (int j = 0; j < N; ++j) acc[j] += qd * pair::twice(kd + j);
  }
  for (int j = 0; j < N; ++j) pair::store(logits + (j0 + j) * kPairLanes, acc[j]);
}

// logits[u][j][16] (row u's at logits + u * window * 16) for the n_rows key
// rows at keys[u] and window positions j < window.
inline void qk_pair_rows(const float* qa, const float* qb, std::int64_t q_stride,
                         const float* const* keys, std::int64_t n_rows, std::int64_t width,
                         std::int64_t dim, std::int64_t window, float* logits) {
  for (std::int64_t u = 0; u < n_rows; ++u) {
    float* out = logits + u * window * kPairLanes;
    std::int64_t j = 0;
    for_register_blocks<kPairQkPositions>(window, j, [&](auto n) {
      qk_pair_chunk<decltype(n)::value>(qa, qb, q_stride, keys[u], j, width, dim, out);
    });
  }
}

// out[j][16] = (out[j] if accumulate) + the sum over key rows u and
// positions c of probs[u][c][16] * value(u, d0 + j, c + lane), for N
// channels. With Masked, a value outside
// its lane's window (c outside [lo, hi)) or in a key row its half does not
// see (rows[u * 16 + lane] = 0) counts as 0: its probability is 0, but the
// value may be inf or NaN.
template <int N, bool Masked>
void pv_pair_chunk(const float* probs, const float* const* value_rows, const std::int32_t* rows,
                   std::int64_t n_rows, std::int64_t window, std::int64_t width, std::int64_t d0,
                   bool accumulate, const i32x16& lo, const i32x16& hi, float* out) {
  f32x16 acc[N];
#pragma GCC unroll 8
  for (int j = 0; j < N; ++j) acc[j] = accumulate ? pair::load(out + j * kPairLanes) : pair::splat(0.0f);
  const f32x16 zero = pair::splat(0.0f);
  for (std::int64_t u = 0; u < n_rows; ++u) {
    const float* vr = value_rows[u] + d0 * width;
    const float* pr = probs + u * window * kPairLanes;
    [[maybe_unused]] const i32x16 row_mask = Masked ? pair::load_mask(rows + u * kPairLanes) : i32x16{};
    for (std::int64_t c = 0; c < window; ++c) {
      const f32x16 p = pair::load(pr + c * kPairLanes);
      if constexpr (Masked) {
        const i32x16 inside =
            pair::inside(pair::splat_int(static_cast<std::int32_t>(c)), lo, hi, row_mask);
        for (int j = 0; j < N; ++j) {
          acc[j] += p * pair::select(inside, pair::twice(vr + j * width + c), zero);
        }
      } else {
        for (int j = 0; j < N; ++j) acc[j] += p * pair::twice(vr + j * width + c);
      }
    }
  }
  for (int j = 0; j < N; ++j) pair::store(out + j * kPairLanes, acc[j]);
}

// out[d][16] = (out[d] if accumulate) + the sum over rows u and positions c
// of probs[u][c][16] * value_rows[u][d * width + c + lane], for d < dim_v. `masked` when the
// values may hold inf or NaN where probs are 0: then only the entries c of
// each lane with lo <= c < hi, in the key rows u its half sees (rows[u * 16 +
// lane] = -1, else 0), are read.
inline void pv_pair_range(const float* probs, const float* const* value_rows,
                          std::int64_t n_rows, std::int64_t window, std::int64_t width,
                          std::int64_t dim_v, float* out, bool masked, const i32x16& lo,
                          const i32x16& hi, const std::int32_t* rows, bool accumulate = false) {
  std::int64_t d = 0;
  const auto chunk = [&](auto n) {
    constexpr int N = decltype(n)::value;
    float* o = out + d * kPairLanes;
    if (masked) {
      pv_pair_chunk<N, true>(probs, value_rows, rows, n_rows, window, width, d, accumulate, lo,
                             hi, o);
    } else {
      pv_pair_chunk<N, false>(probs, value_rows, rows, n_rows, window, width, d, accumulate, lo,
                              hi, o);
    }
  };
  for_register_blocks<kPairPvChannels>(dim_v, d, chunk);
}

// softmax_lanes (micro_kernels.h) in 16 lanes: the `entries` logit vectors
// become unnormalised probabilities; returns each lane's maximum and sum.
inline void softmax_pair(float* logits, std::int64_t entries, f32x16* max_out, f32x16* sum_out) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  f32x16 m = pair::splat(neg_inf);
  for (std::int64_t e = 0; e < entries; ++e) {
    const f32x16 x = pair::load(logits + e * kPairLanes);
    m = pair::max(m, x);  // as simd::max: a NaN logit makes the maximum NaN
  }
  // Empty (padding) lanes.
  const f32x8 zero = simd::splat(0.0f), empty = simd::splat(neg_inf);
  m = pair::join(pair::low(m) == empty ? zero : pair::low(m),
                 pair::high(m) == empty ? zero : pair::high(m));
  f32x16 s = pair::splat(0.0f);
  for (std::int64_t e = 0; e < entries; ++e) {
    const f32x16 p = pair::exp_nonpositive(pair::load(logits + e * kPairLanes) - m);
    pair::store(logits + e * kPairLanes, p);
    s += p;
  }
  *max_out = m;
  *sum_out = s;
}

}  // namespace libna::cpu::LIBNA_SIMD_NS
