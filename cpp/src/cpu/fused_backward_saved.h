// The schedule of the fused backward that keeps P and dS (1D and 2D, when
// the ring fits LIBNA_CPU_SAVED_PROBS_BYTES and the items keep the threads
// busy: saved_plan): each thread takes whole (b, kv head, column strip)
// items and runs down their rows, each query row followed by the key rows
// whose last query row it was, so that only a ring of recent query rows is
// kept (SavedProbs). Five products of the head dim per (query, key) pair
// instead of seven, and one exp instead of two. Its caches: the query pass
// reads its q and dout rows from the key pass' window caches, which then
// hold every row of the ring (Backward::Scratch).
// Included inside the per-instruction-set namespace and target region of
// fast_kernels_impl.h (LIBNA_SIMD_NS), like every header of the vectorised
// kernels.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "cpu/backward.h"
#include "cpu/fused_backward_passes.h"
#include "cpu/saved_probs.h"
#include "cpu/thread_pool.h"
#include "cpu/thread_scratch.h"
#include "cpu/tuning.h"

namespace libna::cpu::LIBNA_SIMD_NS {

// The order of the pipelined 1D/2D backward (SavedProbs): each thread takes
// whole (b, kv head, strip) items and runs down their query rows, each
// followed by the key rows whose last query row it was (key_order: the key
// rows by last_query_row, the leading-axis position of the last query that
// sees them; -1: none). `slots` query rows span every key row's queries.
struct SavedPlan {
  std::int64_t slots = 0;  // 0: compute P and dS again instead
  std::vector<std::int64_t> key_order, last_query_row;
};

template <int Rank>
SavedPlan saved_plan(const Geometry<Rank>& g, const Tables<Rank>& tables, std::int64_t items,
                     SavedProbs layout, std::int64_t ring_rows) {
  SavedPlan plan;
  if (ring_rows == 0) return plan;  // 3D: k^3 values per query
  // The (b, kv head, strip) items must keep every thread busy; the ring must
  // fit.
  layout.slots = ring_rows;
  const std::int64_t threads = get_num_threads();
  const bool balanced = (items + threads - 1) / threads * threads * tuning::kSavedBalanceDenominator <=
                        items * tuning::kSavedBalanceNumerator;
  if (!balanced || layout.size() * std::int64_t{sizeof(float)} > SavedProbs::budget()) return plan;
  plan.slots = ring_rows;
  const std::int64_t rows = Rank == 2 ? g.spatial[0] : 1;
  plan.last_query_row.assign(rows, 0);
  if constexpr (Rank == 2) {
    const AxisTable& axis = tables.axis[0];
    for (std::int64_t c = 0; c < rows; ++c) {
      const std::int64_t count = axis.query_count[c];
      plan.last_query_row[c] = count ? axis.first_query[c] + (count - 1) * g.axes[0].dilation : -1;
    }
  }
  plan.key_order.resize(rows);
  std::iota(plan.key_order.begin(), plan.key_order.end(), 0);
  std::stable_sort(plan.key_order.begin(), plan.key_order.end(), [&](auto x, auto y) {
    return plan.last_query_row[x] < plan.last_query_row[y];
  });
  return plan;
}

// Starts fetching the tokens the saved pipeline packs for query row `row`
// (while it works on the row before): its q and dout rows and the key rows
// its window adds, of every query head of kv head hk.
template <int Rank, typename T>
void prefetch_rows(const Backward<Rank, T>& pass, std::int64_t b, std::int64_t hk,
                   std::int64_t row, const Strip& strip,
                   typename Backward<Rank, T>::Scratch& s) {
  std::int64_t c[Rank];
  row_coords<Rank>(pass.g, row, c);
  key_rows_of<Rank>(pass.g, c, pass.bias_strides, s.rows_list);
  const std::int64_t newest = s.rows_list.rows[s.rows_list.size - 1];
  if (newest > 0) {  // (row 0's window is loaded with row 0)
    pass.k.prefetch_row(b, hk, newest, strip.kv_columns);
    pass.v.prefetch_row(b, hk, newest, strip.kv_columns);
  }
  for (std::int64_t h = hk * pass.heads_per_kv; h < (hk + 1) * pass.heads_per_kv; ++h) {
    pass.q_scaled.prefetch_row(b, h, row, strip.q_columns);
    pass.dout.prefetch_row(b, h, row, strip.q_columns);
  }
}

// Runs the backward keeping P and dS (`saved`, with plan.slots slots): each
// (b, kv head, strip) runs down the rows, query row y of every query head,
// then the key rows whose last query row is y. query_item(at, tile, scratch)
// runs one query-pass item.
template <int Rank, typename T, typename QueryItem>
void run_saved_backward(const Backward<Rank, T>& pass, const SavedPlan& plan,
                        const SavedProbs& saved, const QueryItem& query_item) {
  using Scratch = typename Backward<Rank, T>::Scratch;
  using QueryTile = typename Backward<Rank, T>::QueryTile;
  const Geometry<Rank>& g = pass.g;
  const ColumnLayout& layout = pass.layout;
  const std::int64_t heads_kv = pass.args.k.shape[Rank + 1];
  const std::vector<Strip>& strips = pass.strip_list;
  const std::int64_t n_strips = pass.query_tiles.count;  // (strips.size())
  parallel_for(g.batch * heads_kv * n_strips, 1, [&](std::int64_t begin, std::int64_t end) {
    Scratch& s = thread_scratch<Scratch>();
    pass.start_saving(s, saved);
    for (std::int64_t item = begin; item < end; ++item) {
      const std::int64_t t = item % n_strips, hk = item / n_strips % heads_kv;
      const std::int64_t b = item / (n_strips * heads_kv);
      const Strip& strip = strips[t];
      const QueryTile tile{strip.keys, strip.kv_columns, strip.q_columns};
      // The rows run in order: a window and the row it adds; the q and
      // dout rows of the ring's query rows and the next, every query head.
      pass.start_query_pass(s, g.window_rows() + 1);
      pass.start_key_pass(s, (plan.slots + 1) * pass.heads_per_kv);
      std::int64_t next_key = 0;
      for (std::int64_t row = 0; row < layout.rows; ++row) {
        if (row + 1 < layout.rows) prefetch_rows(pass, b, hk, row + 1, strip, s);
        for (std::int64_t h = hk * pass.heads_per_kv; h < (hk + 1) * pass.heads_per_kv; ++h) {
          query_item(TiledRow{0, b, h, row, t, strip.queries}, tile, s);
        }
        for (; next_key < layout.rows && plan.last_query_row[plan.key_order[next_key]] <= row;
             ++next_key) {
          pass.key_row(TiledRow{0, b, hk, plan.key_order[next_key], t, strip.keys},
                       strip.q_columns, s);
        }
      }
    }
  });
}

}  // namespace libna::cpu::LIBNA_SIMD_NS
