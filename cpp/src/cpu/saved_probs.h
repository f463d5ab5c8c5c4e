// P and dS kept from the backward's query pass for its key pass (1D and 2D):
// the ring of query rows they are kept in (SavedProbs), which offsets it
// holds (saved_probs_layout), and the column strips that the pipeline keeping
// them runs down (saved_strips). The schedule that runs it is in
// fused_backward_saved.h.
// Included inside the per-instruction-set namespace and target region of
// fast_kernels_impl.h (LIBNA_SIMD_NS), like every header of the vectorised
// kernels.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "cpu/backward.h"
#include "cpu/column_tiles.h"
#include "cpu/environment.h"
#include "cpu/lane_kernel.h"
#include "cpu/lane_windows.h"
#include "cpu/neighbour_rows.h"
#include "cpu/packed_layout.h"
#include "cpu/simd.h"
#include "cpu/tuning.h"

namespace libna::cpu::LIBNA_SIMD_NS {

using simd::kLanes;

// The query rows from the first to the last that sees one key row, at most
// (1D: the one row): the ring SavedProbs keeps. 0 in 3D (not kept).
template <int Rank>
std::int64_t ring_rows(const Geometry<Rank>& g, const Tables<Rank>& tables) {
  if constexpr (Rank > 2) return 0;
  std::int64_t span = 1;
  if constexpr (Rank == 2) {
    for (const std::int64_t count : tables.axis[0].query_count) {
      span = std::max(span, (count - 1) * g.axes[0].dilation + 1);
    }
  }
  return std::min(span, Rank == 2 ? g.spatial[0] : 1);
}

// P and dS of the query pass, kept by a thread for its key pass. Along the
// last axis a query block's entry j holds one offset delta = key - query
// (group positions) in all 8 lanes, and so does a key block's: values are
// stored by (query head of the kv head, query row, m = the key row's index in
// the query row's window, delta) as a packed line indexed by the query's
// column, so that both passes read or write an entry as 8 consecutive
// floats. Query rows live in a ring of `slots` rows (row y in slot y % slots).
struct SavedProbs {
  float* data = nullptr;  // null: not saving
  std::int64_t heads = 0, slots = 0, key_rows = 0, delta_lo = 0, deltas = 0, width = 0;

  // The bytes the CPU backward may keep (LIBNA_CPU_SAVED_PROBS_BYTES, read
  // once per process; 0: compute P and dS again in the key pass).
  static std::int64_t budget() { return environment().saved_probs_bytes; }
  // Floats of the ring: P and dS of `slots` rows of every head.
  std::int64_t size() const { return 2 * heads * slots * key_rows * deltas * width; }
  // The line of P (which = 0) or dS (1) for (head, query row, m, delta).
  float* line(int which, std::int64_t head, std::int64_t row, std::int64_t m,
              std::int64_t delta) const {
    const std::int64_t slot = (which * heads + head) * slots + row % slots;
    return data + ((slot * key_rows + m) * deltas + delta - delta_lo) * width;
  }

  // Keeps P and dS of a query block of query head `head` (of the kv head),
  // query row `row` ([key row][window position][lane] over the key rows
  // `rows`): entry j (offset first + j - i0) at the block's own columns,
  // from col0 = group_base + i0. `kernel`: the last axis' kernel size.
  void save_query_block(std::int64_t head, std::int64_t row, std::int64_t col0,
                        std::int64_t kernel, const LaneWindows& w, const RowList& rows,
                        const float* probs, const float* dlogits) const {
    for (std::int64_t r = 0; r < rows.size; ++r) {
      save_query_row(head, row, rows.slot[r] / kernel, col0, w,
                     probs + r * w.window * kLanes, dlogits + r * w.window * kLanes, kLanes);
    }
  }

  // One key row's part of save_query_block: the key row is the m-th of the
  // query row's window, and entry j of P and dS is the 8 floats at
  // p + j * entry_stride and ds + j * entry_stride (16 in a row pair's
  // halves). Consecutive entries go to consecutive lines: `width` floats
  // apart.
  void save_query_row(std::int64_t head, std::int64_t row, std::int64_t m, std::int64_t col0,
                      const LaneWindows& w, const float* p, const float* ds,
                      std::int64_t entry_stride) const {
    const std::int64_t delta0 = w.first - w.i0;
    float* p_line = line(0, head, row, m, delta0) + col0;
    float* ds_line = line(1, head, row, m, delta0) + col0;
    for (std::int64_t j = 0; j < w.window; ++j) {
      simd::store(p_line + j * width, simd::load(p + j * entry_stride));
      simd::store(ds_line + j * width, simd::load(ds + j * entry_stride));
    }
  }

  // Reads P and dS of a key block back for query head `head` of the kv head
  // (the query rows `rows`, [query row][window position][lane]): key i0 + l
  // and query first + j + l are at offset i0 - first - j, column first + j +
  // l, from col0 = group_base + first. Outside a lane's window the lines
  // hold other pairs' values (or none): those entries read as 0.
  void load_key_block(std::int64_t head, std::int64_t col0, std::int64_t kernel,
                      const LaneWindows& w, const RowList& rows, float* probs,
                      float* dlogits) const {
    i32x8 lo{}, hi{};
    if (w.masked) w.entry_bounds(&lo, &hi);
    for (std::int64_t r = 0; r < rows.size; ++r) {
      load_key_row(head, rows.rows[r], rows.slot[r] / kernel, col0, w, lo, hi,
                   probs + r * w.window * kLanes, dlogits + r * w.window * kLanes, kLanes);
    }
  }

  // One query row's part of load_key_block: the key row is the m-th of the
  // query row's window; entry j goes to p + j * entry_stride and ds + j *
  // entry_stride (16 in a key-row pair's halves). lo, hi: the lanes'
  // entries (w.entry_bounds) when w.masked. Consecutive entries are (width -
  // 1) floats apart, backwards.
  void load_key_row(std::int64_t head, std::int64_t query_row, std::int64_t m,
                    std::int64_t col0, const LaneWindows& w, const i32x8& lo, const i32x8& hi,
                    float* p, float* ds, std::int64_t entry_stride) const {
    const std::int64_t step = 1 - width;
    const float* p_line = line(0, head, query_row, m, w.i0 - w.first) + col0;
    const float* ds_line = line(1, head, query_row, m, w.i0 - w.first) + col0;
    if (!w.masked) {
      for (std::int64_t j = 0; j < w.window; ++j) {
        simd::store(p + j * entry_stride, simd::load(p_line + j * step));
        simd::store(ds + j * entry_stride, simd::load(ds_line + j * step));
      }
      return;
    }
    const f32x8 zero = simd::splat(0.0f);
    for (std::int64_t j = 0; j < w.window; ++j) {
      const i32x8 jv = i32x8{} + static_cast<std::int32_t>(j);
      const i32x8 inside = (jv >= lo) & (jv < hi);
      simd::store(p + j * entry_stride, inside ? simd::load(p_line + j * step) : zero);
      simd::store(ds + j * entry_stride, inside ? simd::load(ds_line + j * step) : zero);
    }
  }
};

// SavedProbs for this problem, without memory or slots: every offset a
// query block writes or a key block reads.
template <int Rank, typename T>
SavedProbs saved_probs_layout(const LaneKernel<Rank, T>& kernel, const Tables<Rank>& tables) {
  SavedProbs p;
  p.heads = kernel.heads_per_kv;
  p.key_rows = kernel.g.window_rows();
  p.width = kernel.layout.width;
  std::int64_t lo = 0, hi = 0;
  const auto add = [&](std::int64_t a, std::int64_t b) {
    lo = std::min(lo, a);
    hi = std::max(hi, b);
  };
  kernel.for_query_blocks(kernel.whole_row(), [&](std::int64_t, const LaneWindows& w) {
    if (w.window > 0) add(w.first - w.i0, w.first - w.i0 + w.window - 1);
  });
  for_key_blocks(kernel, tables, kernel.whole_row(), [&](std::int64_t, const LaneWindows& w) {
    if (w.window > 0) add(w.i0 - w.first - w.window + 1, w.i0 - w.first);
  });
  p.delta_lo = lo;
  p.deltas = hi - lo + 1;
  return p;
}

// A column strip of the saved pipeline: one ring runs down the rows for its
// key blocks, with the query blocks their windows read (computing P and dS
// of the neighbouring strips' edge blocks again), and the columns it packs.
// Strips keep a ring and its rows in L2 when rows are wide.
struct Strip {
  BlockRange keys, queries;
  ColumnRanges kv_columns, q_columns;
};

// The strips' key blocks as column tiles: strips whose ring (`ring_rows`
// query rows) and cached rows fit tuning::kStripBytes. In 1D and 2D the
// backward's query tiles are these, whether it keeps P and dS or not, so that
// the rpb gradient's partials sum the same blocks either way.
template <int Rank, typename T>
ColumnTiles saved_strip_tiles(const LaneKernel<Rank, T>& kernel, std::int64_t ring_rows) {
  const Geometry<Rank>& g = kernel.g;
  const ColumnLayout& layout = kernel.layout;
  const std::int64_t channels = kernel.k_dim + kernel.v_dim, hpk = kernel.heads_per_kv;
  const std::int64_t ring = 2 * hpk * g.window_rows() * kernel.last().kernel * ring_rows;
  const std::int64_t cached = ((ring_rows + 1) * hpk + g.window_rows()) * channels;
  const std::int64_t per_block = kLanes * (ring + cached) * std::int64_t{sizeof(float)};
  // A strip's edge blocks are computed twice (by its neighbours too), so
  // strips are wider than the budget rather than narrower: between fit and 2
  // fit blocks, and at least tuning::kMinStripBlocks.
  const std::int64_t fit = std::max<std::int64_t>(tuning::kMinStripBlocks,
                                                  tuning::kStripBytes / per_block);
  const std::int64_t count = std::max<std::int64_t>(1, layout.blocks / fit);
  return ColumnTiles(layout.blocks, (layout.blocks + count - 1) / count);
}

// The strips of the saved pipeline, one per tile of `tiles`
// (saved_strip_tiles).
template <int Rank, typename T>
std::vector<Strip> saved_strips(const LaneKernel<Rank, T>& kernel, const Tables<Rank>& tables,
                                const ColumnTiles& tiles) {
  const ColumnLayout& layout = kernel.layout;
  std::vector<Strip> out;
  for (std::int64_t t = 0; t < tiles.count; ++t) {
    Strip strip{tiles[t], tiles[t], ColumnRanges(layout.dilation), ColumnRanges(layout.dilation)};
    strip.keys.end = std::min(strip.keys.end, layout.blocks);
    strip.queries = strip.keys;
    for_key_blocks(kernel, tables, strip.keys, [&](std::int64_t grp, const LaneWindows& w) {
      if (w.window == 0) return;
      strip.q_columns.add(grp, w.first, w.first + w.window + kLanes - 1);
      const std::int64_t len = layout.group_len[grp];
      const std::int64_t lo = std::clamp<std::int64_t>(w.first, 0, len - 1);
      const std::int64_t hi = std::clamp<std::int64_t>(w.first + w.window + kLanes - 2, 0, len - 1);
      strip.queries.begin = std::min(strip.queries.begin, layout.block(grp, lo));
      strip.queries.end = std::max(strip.queries.end, layout.block(grp, hi) + 1);
    });
    kernel.for_query_blocks(strip.queries, [&](std::int64_t grp, const LaneWindows& w) {
      strip.q_columns.add(grp, w.i0, w.i0 + kLanes);
      if (w.window > 0) strip.kv_columns.add(grp, w.first, w.first + w.window + kLanes - 1);
    });
    out.push_back(std::move(strip));
  }
  return out;
}

}  // namespace libna::cpu::LIBNA_SIMD_NS
