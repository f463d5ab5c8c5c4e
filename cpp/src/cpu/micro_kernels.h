// The micro-kernels: the register-blocked loops over a block of lanes that
// do the flops. q.k logits (qk_rows), the P.V-shaped weighted sums
// (pv_range), and the softmax over a block's logits (softmax_lanes). Their
// register blocks are tuning values (tuning.h).
// Included inside the per-instruction-set namespace and target region of
// fast_kernels_impl.h (LIBNA_SIMD_NS), like every header of the vectorised
// kernels.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu/lane_windows.h"
#include "cpu/simd.h"
#include "cpu/tuning.h"

namespace libna::cpu::LIBNA_SIMD_NS {

using simd::f32x8;
using simd::i32x8;
using simd::kLanes;

// Runs chunk(std::integral_constant<int, N>()) over [0, total) in register
// blocks of N = kN, then once with N = the remainder (1 to 7), with `at` at
// the first index of each block as it runs.
template <int kN, typename Chunk>
LIBNA_ALWAYS_INLINE void for_register_blocks(std::int64_t total, std::int64_t& at,
                                             const Chunk& chunk) {
  static_assert(kN >= 1 && kN <= 8, "the remainder switch below covers 1 to 7");
  for (at = 0; at + kN <= total; at += kN) chunk(std::integral_constant<int, kN>());
  switch (total - at) {
    case 1: chunk(std::integral_constant<int, 1>()); break;
    case 2: chunk(std::integral_constant<int, 2>()); break;
    case 3: chunk(std::integral_constant<int, 3>()); break;
    case 4: chunk(std::integral_constant<int, 4>()); break;
    case 5: chunk(std::integral_constant<int, 5>()); break;
    case 6: chunk(std::integral_constant<int, 6>()); break;
    case 7: chunk(std::integral_constant<int, 7>()); break;
    default: break;
  }
}

// logits[r][j] (8 lanes) = sum_d q[d] * key(r, d, j) for R key rows and N
// window positions j, where q[d] is the 8 floats at q + d * q_stride and
// key(r, d, j) the 8 consecutive columns of row r from column j (lane l
// reads column j + l). Several rows at once (tuning::kQkKeyRows) give R * N
// independent accumulators per q load, enough to hide the FMA latency.
template <int R, int N>
void qk_chunk(const float* q, std::int64_t q_stride, const float* const* keys,
              std::int64_t j0,
              std::int64_t width, std::int64_t dim, float* const* logits) {
  f32x8 acc[R][N];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < N; ++j) acc[r][j] = simd::splat(0.0f);
  }
  for (std::int64_t d = 0; d < dim; ++d) {
    const f32x8 qd = simd::load(q + d * q_stride);
    for (int r = 0; r < R; ++r) {
      const float* kd = keys[r] + j0 + d * width;
      for (int j = 0; j < N; ++j) {
        acc[r][j] += qd * simd::load(kd + j);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < N; ++j) simd::store(logits[r] + (j0 + j) * kLanes, acc[r][j]);
  }
}

// qk_chunk over the whole window, tuning::kQkWindowPositions positions at a
// time.
template <int R>
void qk_window(const float* q, std::int64_t q_stride, const float* const* keys,
               std::int64_t width,
               std::int64_t dim, std::int64_t window, float* const* logits) {
  constexpr int kN = tuning::kQkWindowPositions;
  static_assert(kN >= 1 && kN <= 7, "the remainder switch below covers 1 to 6 positions");
  std::int64_t j = 0;
  for (; window - j >= kN; j += kN) qk_chunk<R, kN>(q, q_stride, keys, j, width, dim, logits);
  // (A switch: a fold expression doing the same changed how GCC 12 cloned
  // and inlined qk_rows.)
  switch (window - j) {
    case 1: qk_chunk<R, 1>(q, q_stride, keys, j, width, dim, logits); break;
    case 2: qk_chunk<R, 2>(q, q_stride, keys, j, width, dim, logits); break;
    case 3: qk_chunk<R, 3>(q, q_stride, keys, j, width, dim, logits); break;
    case 4: qk_chunk<R, 4>(q, q_stride, keys, j, width, dim, logits); break;
    case 5: qk_chunk<R, 5>(q, q_stride, keys, j, width, dim, logits); break;
    case 6: qk_chunk<R, 6>(q, q_stride, keys, j, width, dim, logits); break;
    default: break;
  }
}

// logits[r][j][lane] = sum_d q[d * q_stride + lane] * keys[r][d * width + j
// + lane] for the n_rows rows and window positions j < window; row r's
// logits start at logits + r * window * kLanes. q is either lanes in their
// own [d][lane] buffer (q_stride = kLanes) or eight columns of a packed row
// (q_stride = its width).
inline void qk_rows(const float* q, std::int64_t q_stride,
                    const float* const* keys, std::int64_t n_rows,
                    std::int64_t width, std::int64_t dim, std::int64_t window,
                    float* logits) {
  constexpr int kR = tuning::kQkKeyRows;
  static_assert(kR == 1 || kR == 2, "the remainder below is one row");
  std::int64_t r = 0;
  for (; r + kR <= n_rows; r += kR) {
    float* out[kR];
    for (int i = 0; i < kR; ++i) out[i] = logits + (r + i) * window * kLanes;
    qk_window<kR>(q, q_stride, keys + r, width, dim, window, out);
  }
  if (r < n_rows) {
    float* const out[1] = {logits + r * window * kLanes};
    qk_window<1>(q, q_stride, keys + r, width, dim, window, out);
  }
}

// out[j] (8 lanes) = (out[j] if accumulate) + the sum over key rows r and
// window positions c of probs[r][c] * value(r, d0 + j, c + lane), for N
// head-dim channels. With Masked, a value outside its lane's window (c
// outside [lo, hi) in that lane) counts as 0: its probability is 0, but the
// value may be inf or NaN, and 0 * NaN would carry it to a query that never
// sees it.
template <int N, bool Masked>
void pv_chunk(const float* probs, const float* const* value_rows,
              std::int64_t key_rows, std::int64_t window, std::int64_t width,
              std::int64_t d0, bool accumulate, const i32x8& lo, const i32x8& hi, float* out) {
  f32x8 acc[N];
  // Unrolled by hand: GCC turns a zeroing loop over acc into a memset (rep
  // stos) of the array in memory.
#pragma GCC unroll 8
  for (int j = 0; j < N; ++j) acc[j] = accumulate ? simd::load(out + j * kLanes) : simd::splat(0.0f);
  const f32x8 zero = simd::splat(0.0f);
  for (std::int64_t r = 0; r < key_rows; ++r) {
    const float* vr = value_rows[r] + d0 * width;
    const float* pr = probs + r * window * kLanes;
    for (std::int64_t c = 0; c < window; ++c) {
      const f32x8 p = simd::load(pr + c * kLanes);
      if constexpr (Masked) {
        const i32x8 position = i32x8{} + static_cast<std::int32_t>(c);
        const i32x8 inside = (position >= lo) & (position < hi);
        for (int j = 0; j < N; ++j) acc[j] += p * (inside ? simd::load(vr + j * width + c) : zero);
      } else {
        for (int j = 0; j < N; ++j) acc[j] += p * simd::load(vr + j * width + c);
      }
    }
  }
  for (int j = 0; j < N; ++j) simd::store(out + j * kLanes, acc[j]);
}

// Softmax over `entries` logit vectors in place (probabilities, unnormalised);
// returns the per-lane maximum and sum.
inline void softmax_lanes(float* logits, std::int64_t entries, f32x8* max_out,
                          f32x8* sum_out) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  f32x8 m = simd::splat(neg_inf);
  for (std::int64_t e = 0; e < entries; ++e) m = simd::max(m, simd::load(logits + e * kLanes));
  m = m == simd::splat(neg_inf) ? simd::splat(0.0f) : m;  // empty (padding) lanes
  f32x8 s = simd::splat(0.0f);
  for (std::int64_t e = 0; e < entries; ++e) {
    const f32x8 p = simd::exp_nonpositive(simd::load(logits + e * kLanes) - m);
    simd::store(logits + e * kLanes, p);
    s += p;
  }
  *max_out = m;
  *sum_out = s;
}

// out[d][lane] (+)= sum over rows r and positions c of probs[r][c][lane] *
// value_rows[r][d * width + c + lane], for d < dim_v. `w`: the block's lane
// windows when it is masked and its value rows may hold inf or NaN (probs
// must be 0 outside the windows), else null.
inline void pv_range(const float* probs, const float* const* value_rows,
                     std::int64_t key_rows, std::int64_t window,
                     std::int64_t width, std::int64_t dim_v, float* out,
                     const LaneWindows* w, bool accumulate = false) {
  i32x8 lo{}, hi{};
  if (w != nullptr) w->entry_bounds(&lo, &hi);
  std::int64_t d = 0;
  const auto chunk = [&](auto n) {
    constexpr int N = decltype(n)::value;
    if (w != nullptr) {
      pv_chunk<N, true>(probs, value_rows, key_rows, window, width, d, accumulate, lo, hi,
                        out + d * kLanes);
    } else {
      pv_chunk<N, false>(probs, value_rows, key_rows, window, width, d, accumulate, lo, hi,
                         out + d * kLanes);
    }
  };
  for_register_blocks<tuning::kPvChannels>(dim_v, d, chunk);
}

}  // namespace libna::cpu::LIBNA_SIMD_NS
