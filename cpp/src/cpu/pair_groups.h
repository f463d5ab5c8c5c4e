// Groups of row pairs: up to three row pairs (pair_kernels.h) of the fused
// forward or of the backward's query pass whose products share their loads
// (q.k and P.V; in the backward q.k, dout.v and dS.k). The pairs of a group are
// consecutive along the second-to-last axis (rows y, y + s, ..., y + 5 s of
// one dilation group, s its step), so they read mostly the same key rows:
// each load of eight key or value columns then feeds one 16-lane FMA per pair
// that sees the row, two or three where a pair alone does one. A pair alone
// is bound by its loads (one 32-byte broadcast per FMA, and a shuffle per
// channel to join its q halves); three pairs with their q halves joined once
// per block run about 1.8x as many FMAs per second (AVX-512, keys in L1:
// benchmarks/cpu/qk_inner_loop.cpp).
// Each pair keeps its own logits, softmax, rpb, masks and outputs, and the
// group computes, for each pair, exactly the products and sums the pair
// alone computes, in the same order: the results are bitwise equal.
// Included inside the per-instruction-set namespace and target region of
// fast_kernels_impl.h (LIBNA_SIMD_NS), like every header of the vectorised
// kernels.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/neighbour_rows.h"
#include "cpu/pair_kernels.h"
#include "cpu/pair_rows.h"
#include "cpu/tuning.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // (as pair_kernels.h)

namespace libna::cpu::LIBNA_SIMD_NS {

inline constexpr int kMaxGroupPairs = 3;

// How many row pairs the fused forward computes together:
// LIBNA_CPU_PAIR_GROUP, else the kernel set's choice (three with AVX-512,
// where 32 registers hold three pairs' accumulators; elsewhere one: a pair
// alone is already two or four registers per vector).
inline std::int64_t pairs_per_group_wanted() {
  const int setting = environment().pair_group;
#if defined(LIBNA_SIMD_WIDE_REGISTERS)
  constexpr int kByDefault = kMaxGroupPairs;
#else
  constexpr int kByDefault = 1;
#endif
  return setting > 0 ? setting : kByDefault;
}

// The rows that position `row` of an axis of `rows` positions leads, in
// groups of `pairs` row pairs of step `step` (its dilation): 1 to 2 * pairs
// (each dilation group's positions, from its first, in groups of 2 * pairs;
// the last may be shorter), or 0 if it does not lead one. With one pair per
// group, as partner_row: 2 with a partner, 1 without.
inline std::int64_t rows_led(std::int64_t row, std::int64_t step, std::int64_t rows,
                             std::int64_t pairs) {
  if ((row / step) % (2 * pairs) != 0) return 0;
  return std::min(2 * pairs, (rows - 1 - row) / step + 1);
}

// The rows led (rows_led) as they run: led / 2 pairs, together
// (group(n_pairs), for two or more) or alone (pair()), then the last row by
// itself when led is odd (single(i), i = led - 1: its place among the rows
// led).
template <typename Group, typename Pair, typename Single>
void run_rows_led(std::int64_t led, const Group& group, const Pair& pair, const Single& single) {
  if (led >= 4) {
    group(led / 2);
  } else if (led >= 2) {
    pair();
  }
  if (led % 2 == 1) single(led - 1);
}

// The most key rows (positions of the leading axes) a group of `pairs` row
// pairs reads: its 2 pairs rows, step apart along the second-to-last axis,
// see at most k + 2 pairs - 1 positions there, k the kernel size there.
template <int Rank>
std::int64_t group_window_rows(const Geometry<Rank>& g, std::int64_t pairs) {
  static_assert(Rank >= 2, "rows pair along the second-to-last axis");
  const std::int64_t k_rows = g.axes[Rank - 2].kernel;
  return g.window_rows() / k_rows * (k_rows + 2 * pairs - 1);
}

// One pair of a group (the forward's and the backward's group pairs derive
// from it): its rows' coordinates, the first row's key rows and the union
// with the second's.
template <int Rank>
struct GroupPairRows {
  std::int64_t ca[Rank], cb[Rank];
  RowList key_rows;  // the first row's
  PairRows rows;

  // The rows at coordinates c_a and one step further along the
  // second-to-last axis.
  void set(const Geometry<Rank>& g, const std::int64_t* c_a, std::int64_t step,
           const std::int64_t* bias_strides) {
    std::copy(c_a, c_a + Rank, ca);
    std::copy(c_a, c_a + Rank, cb);
    cb[Rank - 2] += step;
    key_rows_of<Rank>(g, ca, bias_strides, key_rows);
    key_rows_of<Rank>(g, cb, bias_strides, rows.b);
    rows.unite(key_rows);
  }
};

// lanes[d][16] = the eight lanes at a + d * stride, then those at b + d *
// stride, for d < channels: a pair's q (or dout) halves joined once per
// block, for the group kernels.
inline void join_lanes(const float* a, const float* b, std::int64_t stride,
                       std::int64_t channels, std::vector<float>& lanes) {
  lanes.resize(channels * kPairLanes);
  for (std::int64_t d = 0; d < channels; ++d) {
    pair::store(lanes.data() + d * kPairLanes,
                pair::join(simd::load(a + d * stride), simd::load(b + d * stride)));
  }
}

// The key rows of a group: the union of its pairs' unions (PairRows::rows),
// in increasing order, with each one's index in each pair's union (-1: the
// pair does not read it).
struct GroupRows {
  RowList rows;  // rows.rows and rows.size only
  std::vector<std::int64_t> index[kMaxGroupPairs];

  // (pairs: GroupPairRows, or types derived from it.)
  template <typename Pair>
  void unite(const Pair* pairs, std::int64_t n_pairs) {
    std::vector<std::int64_t>& all = rows.rows;
    all.clear();
    for (std::int64_t p = 0; p < n_pairs; ++p) {
      const RowList& u = pairs[p].rows.rows.rows;
      all.insert(all.end(), u.rows.begin(), u.rows.begin() + u.size);
    }
    std::sort(all.begin(), all.end());
    all.erase(std::unique(all.begin(), all.end()), all.end());
    rows.size = static_cast<std::int64_t>(all.size());
    for (std::int64_t p = 0; p < n_pairs; ++p) {
      const RowList& u = pairs[p].rows.rows.rows;
      index[p].assign(all.size(), -1);
      for (std::int64_t i = 0, r = 0; i < u.size; ++i) {  // both increasing
        while (all[r] != u.rows[i]) ++r;
        index[p][r] = i;
      }
    }
  }
};

// The accumulators of the group kernels: G pairs' N vectors each.
template <int G, int N>
LIBNA_ALWAYS_INLINE void set_zero(f32x16 (&acc)[G][N]) {
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g) {
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) acc[g][j] = pair::splat(0.0f);
  }
}
// out[g][first + j][16] = acc[g][j].
template <int G, int N>
LIBNA_ALWAYS_INLINE void store_all(const f32x16 (&acc)[G][N], float* const* out,
                                   std::int64_t first) {
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g) {
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) pair::store(out[g] + (first + j) * kPairLanes, acc[g][j]);
  }
}

// logits of each of `Count` pairs (out[g] + (j0 + j) * 16, j < N) for one key
// row: as qk_pair_chunk, with each pair's q halves joined ([d][16] at q[g]),
// one load of keys for all of them.
template <int Count, int N>
void qk_group_chunk(const float* const* q, const float* key, std::int64_t j0, std::int64_t width,
                    std::int64_t dim, float* const* out) {
  f32x16 acc[Count][N];
  set_zero(acc);
  for (std::int64_t d = 0; d < dim; ++d) {
    f32x16 qd[Count];
#pragma GCC unroll 8
    for (int g = 0; g < Count; ++g) qd[g] = pair::load(q[g] + d * kPairLanes);
    const float* kd = key + j0 + d * width;
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) {
      const f32x16 x = pair::twice(kd + j);
#pragma GCC unroll 8
      for (int g = 0; g < Count; ++g) acc[g][j] += qd[g] * x;
    }
  }
  store_all(acc, out, j0);
}

// Each pair's logits ([u][j][16] over its union rows, at logits[p]) for the
// group's key rows (at keys[r], window positions j < window).
inline void qk_group_rows(const GroupRows& rows, std::int64_t n_pairs, const float* const* q,
                          const float* const* keys, std::int64_t width, std::int64_t dim,
                          std::int64_t window, float* const* logits) {
  for (std::int64_t r = 0; r < rows.rows.size; ++r) {
    const float* q_of[kMaxGroupPairs] = {};
    float* out[kMaxGroupPairs] = {};
    int count = 0;
    for (std::int64_t p = 0; p < n_pairs; ++p) {
      if (rows.index[p][r] < 0) continue;
      q_of[count] = q[p];
      out[count++] = logits[p] + rows.index[p][r] * window * kPairLanes;
    }
    std::int64_t j = 0;
    const auto run = [&](auto count_constant) {
      constexpr int C = decltype(count_constant)::value;
      for_register_blocks<kPairQkPositions>(window, j, [&](auto n) {
        qk_group_chunk<C, decltype(n)::value>(q_of, keys[r], j, width, dim, out);
      });
    };
    if (count == 1) run(std::integral_constant<int, 1>());
    if (count == 2) run(std::integral_constant<int, 2>());
    if (count == 3) run(std::integral_constant<int, 3>());
  }
}

// One key row's products for `Count` of the pairs that read it, as
// pv_pair_chunk's unmasked loop: out[g][j][16] (+)= the sum over positions c
// of probs[g][c][16] * value(j, c + lane) (value(j, c) at values + j * width
// + c), for N channels; each pair's sums start at 0 where first[g], else
// from out[g] (where its earlier key rows left them: the same sums in the
// same order as one register accumulator across the rows).
template <int Count, int N>
void pv_group_row(const float* const* probs, const float* values, std::int64_t window,
                  std::int64_t width, const bool* first, float* const* out) {
  f32x16 acc[Count][N];
#pragma GCC unroll 8
  for (int g = 0; g < Count; ++g) {
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) {
      acc[g][j] = first[g] ? pair::splat(0.0f) : pair::load(out[g] + j * kPairLanes);
    }
  }
  for (std::int64_t c = 0; c < window; ++c) {
    f32x16 p[Count];
#pragma GCC unroll 8
    for (int g = 0; g < Count; ++g) p[g] = pair::load(probs[g] + c * kPairLanes);
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) {
      const f32x16 x = pair::twice(values + j * width + c);
#pragma GCC unroll 8
      for (int g = 0; g < Count; ++g) acc[g][j] += p[g] * x;
    }
  }
  store_all(acc, out, 0);
}

// out[p][d][16] for d < dim_v of the n_pairs pairs: the sum over the
// group's key rows u that pair p reads and positions c of
// probs[p][index_p(u)][c][16] * value(u, d, c + lane) (values finite where
// probabilities are 0: see pv_pair_range for the masked reads). Channels in
// register blocks; each key row runs for the pairs that read it.
inline void pv_group_range(const GroupRows& rows, std::int64_t n_pairs,
                           const float* const* probs, const float* const* value_rows,
                           std::int64_t window, std::int64_t width, std::int64_t dim_v,
                           float* const* out) {
  std::int64_t d = 0;
  for_register_blocks<kPairPvChannels>(dim_v, d, [&](auto n) {
    constexpr int N = decltype(n)::value;
    bool started[kMaxGroupPairs] = {};
    for (std::int64_t u = 0; u < rows.rows.size; ++u) {
      const float* probs_of[kMaxGroupPairs] = {};
      float* out_of[kMaxGroupPairs] = {};
      bool first[kMaxGroupPairs] = {};
      int count = 0;
      for (std::int64_t p = 0; p < n_pairs; ++p) {
        if (rows.index[p][u] < 0) continue;
        probs_of[count] = probs[p] + rows.index[p][u] * window * kPairLanes;
        out_of[count] = out[p] + d * kPairLanes;
        first[count++] = !started[p];
        started[p] = true;
      }
      const float* values = value_rows[u] + d * width;
      if (count == 1) pv_group_row<1, N>(probs_of, values, window, width, first, out_of);
      if (count == 2) pv_group_row<2, N>(probs_of, values, window, width, first, out_of);
      if (count == 3) pv_group_row<3, N>(probs_of, values, window, width, first, out_of);
    }
  });
}

// out[p][d][16] for d < dim_v of each of the n_pairs pairs: the P.V sums
// (pv_pair_range's) of its probabilities probs[p] over its union rows, whose
// values are value_rows[r] for the group's key rows r. All pairs together
// (pv_group_range), unless `masked_reads`: then values may be inf or NaN
// where probabilities are 0, and each pair goes by itself, reading only its
// lanes' entries where masked[p] (pv_pair_range). pairs: the group's pairs
// (GroupPairRows or derived); `rows_of_pair`: scratch for a pair's value
// rows.
template <typename Pair>
void pv_group_or_pairs(const GroupRows& rows, const Pair* pairs, std::int64_t n_pairs,
                       const float* const* probs, const float* const* value_rows,
                       std::int64_t window, std::int64_t width, std::int64_t dim_v,
                       float* const* out, bool masked_reads, const bool* masked,
                       const i32x16& lo, const i32x16& hi,
                       std::vector<const float*>& rows_of_pair) {
  if (!masked_reads) {
    return pv_group_range(rows, n_pairs, probs, value_rows, window, width, dim_v, out);
  }
  for (std::int64_t p = 0; p < n_pairs; ++p) {
    const PairRows& pair = pairs[p].rows;
    const std::int64_t n = pair.rows.rows.size;
    rows_of_pair.resize(n);
    for (std::int64_t r = 0, u = 0; r < rows.rows.size; ++r) {
      if (rows.index[p][r] >= 0) rows_of_pair[u++] = value_rows[r];
    }
    pv_pair_range(probs[p], rows_of_pair.data(), n, window, width, dim_v, out[p], masked[p], lo,
                  hi, pair.halves.data());
  }
}

}  // namespace libna::cpu::LIBNA_SIMD_NS
