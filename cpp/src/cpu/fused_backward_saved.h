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
                     SavedProbs layout, std::int64_t ring_rows, bool row_pairs) {
  SavedPlan plan;
  if (ring_rows == 0) return plan;  // 3D: k^3 values per query
  // With row pairs the query rows finish out of order (row y with y + step),
  // and a key row's queries are read up to 3 steps - 1 rows after its last
  // query row (run_saved_backward): the ring holds as many more.
  if (row_pairs) ring_rows += 3 * g.axes[0].dilation - 2;
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

// With row pairs of step `step` (the dilation along the second-to-last
// axis): the partner of query row `row` if it leads a pair (the next row of
// its dilation group, row + step), -1 if it has none (a last odd row), -2
// if it is the partner of row - step.
inline std::int64_t partner_row(std::int64_t row, std::int64_t step, std::int64_t rows) {
  if ((row / step) % 2 == 1) return -2;
  return row + step < rows ? row + step : -1;
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
// then the key rows whose query rows are all done. query_item(at, tile,
// scratch) runs one query-pass item; with row pairs (pass.row_pairs),
// query_pair(at, row_b, tile, scratch) runs rows at.row and row_b (the next
// of its dilation group) together, and row_b is skipped when its turn comes.
template <int Rank, typename T, typename QueryItem, typename QueryPair>
void run_saved_backward(const Backward<Rank, T>& pass, const SavedPlan& plan,
                        const SavedProbs& saved, const QueryItem& query_item,
                        const QueryPair& query_pair) {
  using Scratch = typename Backward<Rank, T>::Scratch;
  using QueryTile = typename Backward<Rank, T>::QueryTile;
  const Geometry<Rank>& g = pass.g;
  const ColumnLayout& layout = pass.layout;
  const std::int64_t heads_kv = pass.args.k.shape[Rank + 1];
  const std::vector<Strip>& strips = pass.strip_list;
  const std::int64_t n_strips = pass.query_tiles.count;  // (strips.size())
  const std::int64_t pair_step = pass.row_pairs ? g.axes[0].dilation : 0;
  parallel_for(g.batch * heads_kv * n_strips, 1, [&](std::int64_t begin, std::int64_t end) {
    Scratch& s = thread_scratch<Scratch>();
    std::vector<char> done;
    pass.start_saving(s, saved);
    for (std::int64_t item = begin; item < end; ++item) {
      const std::int64_t t = item % n_strips, hk = item / n_strips % heads_kv;
      const std::int64_t b = item / (n_strips * heads_kv);
      const Strip& strip = strips[t];
      const QueryTile tile{strip.keys, strip.kv_columns, strip.q_columns};
      // The rows run in order: a window and the row it adds; the q and
      // dout rows of the ring's query rows and the next, every query head.
      // (A pair's window: the union of two rows'.)
      pass.start_query_pass(s, pair_step ? 2 * g.window_rows() + 2 : g.window_rows() + 1);
      pass.start_key_pass(s, (plan.slots + 1) * pass.heads_per_kv);
      // Query rows done: all those up to done_upto, and some after it.
      std::int64_t next_key = 0, done_upto = -1;
      done.assign(layout.rows, 0);
      for (std::int64_t row = 0; row < layout.rows; ++row) {
        if (row + 1 < layout.rows) prefetch_rows(pass, b, hk, row + 1, strip, s);
        const std::int64_t partner = pair_step ? partner_row(row, pair_step, layout.rows) : -1;
        if (partner != -2) {  // (-2: done as a partner)
          for (std::int64_t h = hk * pass.heads_per_kv; h < (hk + 1) * pass.heads_per_kv; ++h) {
            const TiledRow at{0, b, h, row, t, strip.queries};
            if (partner >= 0) {
              query_pair(at, partner, tile, s);
            } else {
              query_item(at, tile, s);
            }
          }
          done[row] = 1;
          if (partner >= 0) done[partner] = 1;
        }
        while (done_upto + 1 < layout.rows && done[done_upto + 1]) ++done_upto;
        for (; next_key < layout.rows &&
               plan.last_query_row[plan.key_order[next_key]] <= done_upto;
             ++next_key) {
          pass.key_row(TiledRow{0, b, hk, plan.key_order[next_key], t, strip.keys},
                       strip.q_columns, s);
        }
      }
    }
  });
}

}  // namespace libna::cpu::LIBNA_SIMD_NS
