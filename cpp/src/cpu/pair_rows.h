// The bookkeeping of row pairs (pair_kernels.h), shared by the fused forward
// and the backward's query pass: the key rows of both rows of a pair and
// their union (PairRows), the two halves' lanes (Halves), and the rpb and
// masks of a pair's logits (pair_bias_and_mask), which give each half what
// one row at a time gives it.
// Included inside the per-instruction-set namespace and target region of
// fast_kernels_impl.h (LIBNA_SIMD_NS), like every header of the vectorised
// kernels.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/environment.h"
#include "cpu/lane_kernel.h"
#include "cpu/lane_windows.h"
#include "cpu/neighbour_rows.h"
#include "cpu/pair_kernels.h"

namespace libna::cpu::LIBNA_SIMD_NS {

// Whether the kernels take rows in pairs: LIBNA_CPU_ROW_PAIRS, else the
// kernel set's choice (pair_kernels.h).
inline bool row_pairs_wanted() {
  const int setting = environment().row_pairs;
  return setting < 0 ? kRowPairsByDefault : setting == 1;
}

// Which rows pair, along an axis of `rows` positions with pairs of step
// `step` (its dilation): the partner of position `row` if it leads a pair
// (the next of its dilation group, row + step), -1 if it has none (a last
// odd one), -2 if it is the partner of row - step.
inline std::int64_t partner_row(std::int64_t row, std::int64_t step, std::int64_t rows) {
  if ((row / step) % 2 == 1) return -2;
  return row + step < rows ? row + step : -1;
}

// The key rows a pair reads: the second row's list (`b`; the first's is the
// caller's), their union, and which halves see each union row.
struct PairRows {
  RowList b;
  RowUnion rows;
  std::vector<std::int32_t> halves;  // [u][16]: -1 where the lane's row sees union row u
  bool both_see_all = true;

  // The union of a and b (b filled first).
  void unite(const RowList& a) {
    unite_rows(a, b, rows);
    const std::int64_t n = rows.rows.size;
    halves.resize(n * kPairLanes);
    both_see_all = true;
    for (std::int64_t u = 0; u < n; ++u) {
      const bool in_a = rows.index_a[u] >= 0, in_b = rows.index_b[u] >= 0;
      std::fill_n(halves.begin() + u * kPairLanes, kLanes, in_a ? -1 : 0);
      std::fill_n(halves.begin() + u * kPairLanes + kLanes, kLanes, in_b ? -1 : 0);
      both_see_all = both_see_all && in_a && in_b;
    }
  }

  // values[j][16] = fill for j < window where union row u's entry j is
  // outside a lane's window (lo <= j < hi) or in a row its half does not
  // see.
  void mask(std::int64_t u, const i32x16& lo, const i32x16& hi, float* values,
            std::int64_t window, float fill) const {
    const i32x16 row_mask = pair::load_mask(halves.data() + u * kPairLanes);
    const f32x16 outside = pair::splat(fill);
    for (std::int64_t j = 0; j < window; ++j) {
      const i32x16 inside =
          pair::inside(pair::splat_int(static_cast<std::int32_t>(j)), lo, hi, row_mask);
      pair::store(values + j * kPairLanes,
                  pair::select(inside, pair::load(values + j * kPairLanes), outside));
    }
  }
};

// Two blocks of query lanes computed together in 16 lanes, half a and half
// b: each with its q lanes, lane windows and coordinates (for storing). A
// row pair is one block of two rows (the same windows); a block pair (1D) is
// two consecutive blocks of one row, b's windows `offset` columns right of
// a's. The key rows are PairRows::rows, read from a's first column:
// position j of the union window is position j of half a and j - offset of
// half b.
struct Halves {
  const float *q_a, *q_b;
  const LaneWindows &wa, &wb;
  std::int64_t *ca, *cb;
  std::int64_t offset, window;
};

inline Halves row_pair(const float* q_a, const float* q_b, const LaneWindows& w,
                       std::int64_t* ca, std::int64_t* cb) {
  return {q_a, q_b, w, w, ca, cb, 0, w.window};
}

// Whether some half reads an entry outside its lanes' windows or key rows.
inline bool pair_masked(const Halves& x, const PairRows& p) {
  return x.wa.masked || x.wb.masked || x.offset != 0 || x.wb.window != x.window ||
         !p.both_see_all;
}

// Each lane's entries of the union window: lo <= j < hi.
inline void pair_bounds(const Halves& x, i32x16* lo, i32x16* hi) {
  i32x8 lo_a, hi_a, lo_b, hi_b;
  x.wa.entry_bounds(&lo_a, &hi_a);
  x.wb.entry_bounds(&lo_b, &hi_b);
  const std::int32_t offset = static_cast<std::int32_t>(x.offset);
  *lo = pair::join(lo_a, lo_b + offset);
  *hi = pair::join(hi_a, hi_b + offset);
}

// The rpb and the masks of a pair's logits ([u][j][16] over the union rows),
// as LaneKernel::logits adds and applies them to one block's: each half gets
// the bias of its own row's window at its own relative positions, and -inf
// outside its lanes' windows and in the key rows it does not see.
// rows_a: the first row's key rows.
template <int Rank, typename T>
void pair_bias_and_mask(const LaneKernel<Rank, T>& kernel, std::int64_t h, const Halves& x,
                        bool masked, const i32x16& lo, const i32x16& hi, const RowList& rows_a,
                        const PairRows& p, float* logits_out) {
  const std::int64_t window = x.window, kernel_size = kernel.last().kernel;
  const std::int64_t n = p.rows.rows.size, bias_step = kernel.bias_strides[Rank];
  // Position j of the union is relative position rel_a + j in half a and
  // rel_b + j in half b, each valid below 2 kernel - 1.
  const std::int64_t rel_a = x.wa.first - x.wa.i0 + kernel_size - 1;
  const std::int64_t rel_b = x.wb.first - x.wb.i0 + kernel_size - 1 - x.offset;
  const std::int64_t j_begin = std::max<std::int64_t>(0, -std::max(rel_a, rel_b));
  const std::int64_t j_end = std::min(window, 2 * kernel_size - 1 - std::min(rel_a, rel_b));
  const auto bias_at = [&](const float* row, std::int64_t rel) {
    return rel >= 0 && rel < 2 * kernel_size - 1 ? row[rel * bias_step] : 0.0f;
  };
  for (std::int64_t u = 0; u < n; ++u) {
    float* logits = logits_out + u * window * kPairLanes;
    if (!kernel.bias.empty()) {
      const float* head = kernel.bias.data() + h * kernel.bias_strides[0];
      const std::int64_t ia = p.rows.index_a[u], ib = p.rows.index_b[u];
      // A half that does not see the row is masked below: any bias does.
      const float* bias_a = ia >= 0 ? head + rows_a.bias[ia] : head;
      const float* bias_b = ib >= 0 ? head + p.b.bias[ib] : head;
      // (Outside a half's relative positions the entry is outside its
      // lanes' windows: masked below, whatever it adds.)
      for (std::int64_t j = j_begin; j < j_end; ++j) {
        pair::store(logits + j * kPairLanes,
                    pair::load(logits + j * kPairLanes) +
                        pair::join(simd::splat(bias_at(bias_a, rel_a + j)),
                                   simd::splat(bias_at(bias_b, rel_b + j))));
      }
    }
    if (masked) p.mask(u, lo, hi, logits, window, -std::numeric_limits<float>::infinity());
  }
}

}  // namespace libna::cpu::LIBNA_SIMD_NS
