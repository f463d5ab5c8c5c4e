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
#include <cstdlib>
#include <vector>

#include "cpu/backward.h"
#include "cpu/fused_backward_passes.h"
#include "cpu/pair_rows.h"
#include "cpu/saved_probs.h"
#include "cpu/thread_pool.h"
#include "cpu/thread_scratch.h"
#include "cpu/tuning.h"

namespace libna::cpu::LIBNA_SIMD_NS {

// The order of the pipelined 1D/2D backward (SavedProbs): each thread takes
// whole (b, kv head, strip) items and runs down their query rows, each
// followed by the key rows whose queries are then all done (key_order, by
// key_ready; last_query_row: the leading-axis position of the last query
// that sees a key row, -1: none). `slots` query rows span every key item's
// queries.
struct SavedPlan {
  std::int64_t slots = 0;  // 0: compute P and dS again instead
  std::vector<std::int64_t> key_order, last_query_row;
  // With row pairs: key_order holds the key rows that lead a pair or have no
  // partner, each with its partner (-1: none) and when it can run: once
  // every query row up to key_ready is done (without pairs, its
  // last_query_row).
  std::vector<std::int64_t> key_partner, key_ready;
};

// The order of the saved pipeline's query rows: visit(row, led, done_upto,
// newest) for each row in turn, where row leads `led` rows (rows_led: with
// row pairs of step `step`, `pairs` of them per group, row, row + step, ...;
// 0 if an earlier row leads it; 1 without pairs) and, counting those as
// done, every row up to done_upto is done and newest is the largest done.
// Both saved_plan (sizing the ring) and run_saved_backward walk it.
template <typename Visit>
void walk_query_rows(std::int64_t rows, std::int64_t step, std::int64_t pairs,
                     const Visit& visit) {
  std::vector<char> done(rows, 0);
  std::int64_t done_upto = -1, newest = -1;
  for (std::int64_t row = 0; row < rows; ++row) {
    const std::int64_t led = step ? rows_led(row, step, rows, pairs) : 1;
    for (std::int64_t i = 0; i < led; ++i) {
      done[row + i * step] = 1;
      newest = std::max(newest, row + i * step);
    }
    while (done_upto + 1 < rows && done[done_upto + 1]) ++done_upto;
    visit(row, led, done_upto, newest);
  }
}

template <int Rank>
SavedPlan saved_plan(const Geometry<Rank>& g, const Tables<Rank>& tables, std::int64_t items,
                     SavedProbs layout, std::int64_t ring_rows, bool row_pairs,
                     std::int64_t pairs_per_group) {
  SavedPlan plan;
  if (ring_rows == 0) return plan;  // 3D: k^3 values per query
  const std::int64_t step = Rank == 2 && row_pairs ? g.axes[0].dilation : 0;
  const std::int64_t rows = Rank == 2 ? g.spatial[0] : 1;
  std::vector<std::int64_t> first_query_row(rows, 0);
  plan.last_query_row.assign(rows, 0);
  if constexpr (Rank == 2) {
    const AxisTable& axis = tables.axis[0];
    for (std::int64_t c = 0; c < rows; ++c) {
      const std::int64_t count = axis.query_count[c];
      first_query_row[c] = count ? axis.first_query[c] : -1;
      plan.last_query_row[c] = count ? axis.first_query[c] + (count - 1) * g.axes[0].dilation : -1;
    }
  }
  // The key rows in the order they run: each once every query row up to its
  // last is done (ready); with row pairs, two key rows of a dilation group
  // together when their last query rows are at most a step apart (near a
  // border they can be further: then each runs alone).
  std::vector<std::int64_t> ready(rows), partner(rows, -1);
  const auto close = [&](std::int64_t a, std::int64_t b) {
    return std::abs(plan.last_query_row[b] - plan.last_query_row[a]) <= step;
  };
  for (std::int64_t r = 0; r < rows; ++r) {
    ready[r] = plan.last_query_row[r];
    if (step) {
      partner[r] = partner_row(r, step, rows);
      if (partner[r] == -2) {
        if (close(r - step, r)) continue;  // runs with r - step
        partner[r] = -1;
      } else if (partner[r] >= 0 && !close(r, partner[r])) {
        partner[r] = -1;
      }
      if (partner[r] >= 0) ready[r] = std::max(ready[r], plan.last_query_row[partner[r]]);
    }
    plan.key_order.push_back(r);
  }
  std::stable_sort(plan.key_order.begin(), plan.key_order.end(),
                   [&](auto x, auto y) { return ready[x] < ready[y]; });
  for (const std::int64_t r : plan.key_order) {
    plan.key_partner.push_back(partner[r]);
    plan.key_ready.push_back(ready[r]);
  }
  // The ring's slots: the most query rows from a key item's first query row
  // to the newest done when it runs (one row's window span without pairs;
  // row pairs finish rows out of order and key pairs wait for the later
  // row), found by walking the pipeline's order.
  std::int64_t slots = ring_rows, next = 0;
  const std::int64_t keys = static_cast<std::int64_t>(plan.key_order.size());
  walk_query_rows(rows, step, pairs_per_group, [&](std::int64_t, std::int64_t,
                                                   std::int64_t done_upto, std::int64_t newest) {
    for (; next < keys && plan.key_ready[next] <= done_upto; ++next) {
      for (const std::int64_t r : {plan.key_order[next], plan.key_partner[next]}) {
        if (r >= 0 && first_query_row[r] >= 0) {
          slots = std::max(slots, newest - first_query_row[r] + 1);
        }
      }
    }
  });
  // The (b, kv head, strip) items must keep every thread busy; the ring must
  // fit.
  layout.slots = slots;
  const std::int64_t threads = get_num_threads();
  const bool balanced = (items + threads - 1) / threads * threads * tuning::kSavedBalanceDenominator <=
                        items * tuning::kSavedBalanceNumerator;
  if (!balanced || layout.size() * std::int64_t{sizeof(float)} > SavedProbs::budget()) {
    return SavedPlan();
  }
  plan.slots = slots;
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
// then the key rows whose query rows are all done. query_rows(at, led,
// tile, scratch) runs the query-pass rows at.row leads (walk_query_rows:
// with row pairs, at.row and the next led - 1 rows of its dilation group,
// which are skipped when their turn comes).
template <int Rank, typename T, typename QueryRows>
void run_saved_backward(const Backward<Rank, T>& pass, const SavedPlan& plan,
                        const SavedProbs& saved, const QueryRows& query_rows) {
  using Scratch = typename Backward<Rank, T>::Scratch;
  using QueryTile = typename Backward<Rank, T>::QueryTile;
  const Geometry<Rank>& g = pass.g;
  const ColumnLayout& layout = pass.layout;
  const std::int64_t heads_kv = pass.args.k.shape[Rank + 1];
  const std::vector<Strip>& strips = pass.strip_list;
  const std::int64_t n_strips = pass.query_tiles.count;  // (strips.size())
  const std::int64_t pair_step = pass.row_pairs ? g.axes[0].dilation : 0;
  const std::int64_t keys = static_cast<std::int64_t>(plan.key_order.size());
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
      // (A pair's window: the union of two rows'; a group's, with the rows
      // the next group adds.)
      const std::int64_t group_rows = 2 * pass.pairs_per_group;
      pass.start_query_pass(s, pass.pairs_per_group > 1
                                   ? pass.item_window_rows() + group_rows
                                   : pair_step ? 2 * g.window_rows() + 2 : g.window_rows() + 1);
      pass.start_key_pass(s, (std::max(plan.slots, group_rows) + 1) * pass.heads_per_kv);
      std::int64_t next_key = 0;
      walk_query_rows(layout.rows, pair_step, pass.pairs_per_group,
                      [&](std::int64_t row, std::int64_t led, std::int64_t done_upto, std::int64_t) {
        if (row + 1 < layout.rows) prefetch_rows(pass, b, hk, row + 1, strip, s);
        if (led > 0) {  // (0: done with an earlier row)
          for (std::int64_t h = hk * pass.heads_per_kv; h < (hk + 1) * pass.heads_per_kv; ++h) {
            query_rows(TiledRow{0, b, h, row, t, strip.queries}, led, tile, s);
          }
        }
        // The key rows whose query rows are all done.
        for (; next_key < keys && plan.key_ready[next_key] <= done_upto; ++next_key) {
          const TiledRow at{0, b, hk, plan.key_order[next_key], t, strip.keys};
          if (plan.key_partner[next_key] >= 0) {
            pass.key_pair(at, plan.key_partner[next_key], strip.q_columns, s);
          } else {
            pass.key_row(at, strip.q_columns, s);
          }
        }
      });
    }
  });
}

}  // namespace libna::cpu::LIBNA_SIMD_NS
