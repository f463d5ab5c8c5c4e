// The schedule of the fused backward that computes P and dS again in its key
// pass (3D, where a query has k^3 of them; problems whose ring of P and dS
// would not fit LIBNA_CPU_SAVED_PROBS_BYTES; too few (b, kv head, strip)
// items for the threads): a query pass, then a key pass, each over tiled rows
// as in the forward. Each pass has its own row caches (Backward::Scratch:
// query_rows, key_rows). Its gradients are bitwise equal to those of the
// schedule that keeps P and dS (fused_backward_saved.h).
// Included inside the per-instruction-set namespace and target region of
// fast_kernels_impl.h (LIBNA_SIMD_NS), like every header of the vectorised
// kernels.
#pragma once

#include <cstdint>

#include "cpu/column_tiles.h"
#include "cpu/fused_backward_passes.h"
#include "cpu/pair_rows.h"
#include "cpu/saved_probs.h"
#include "cpu/tuning.h"

namespace libna::cpu::LIBNA_SIMD_NS {

// Runs the backward computing P and dS again in the key pass: the query pass
// over (b, h, tile, row) items, then the key pass over (b, kv head, tile,
// row) items (at.h: the kv head); tiled rows, as in the forward.
// query_rows(at, led, tile, scratch) runs the query-pass rows at.row leads:
// itself, or with row pairs (pass.row_pairs) it and the next led - 1 of its
// dilation group along the second-to-last axis (rows_led), whose own items
// then do nothing (as in the forward).
template <int Rank, typename T, typename QueryRows>
void run_recomputing_backward(const Backward<Rank, T>& pass, const QueryRows& query_rows) {
  using Scratch = typename Backward<Rank, T>::Scratch;
  const Geometry<Rank>& g = pass.g;
  const std::int64_t heads_kv = pass.args.k.shape[Rank + 1], rows = pass.layout.rows;
  // (The pairs' axis: the second-to-last; none in 1D.)
  constexpr int kPairAxis = Rank >= 2 ? Rank - 2 : 0;
  const std::int64_t step = Rank >= 2 && pass.row_pairs ? g.axes[kPairAxis].dilation : 0;
  for_tiled_rows<Scratch>(
      g.batch, g.heads, rows, pass.query_tiles,
      [&](Scratch& s) {
        pass.start_query_pass(s, tuning::kRowCacheWindows * (pass.pairs_per_group > 1
                                                                 ? pass.item_window_rows()
                                                                 : g.window_rows()));
        pass.start_saving(s, SavedProbs());
      },
      [&](const TiledRow& at, Scratch& s) {
        std::int64_t led = 1;
        if (step) {
          std::int64_t c[Rank];
          row_coords<Rank>(g, at.row, c);
          led = rows_led(c[kPairAxis], step, g.spatial[kPairAxis], pass.pairs_per_group);
          if (led == 0) return;  // computed with an earlier row
        }
        // (Rows number the leading axes with the second-to-last fastest:
        // the rows led are at.row + i * step.)
        query_rows(at, led, pass.query_tile(at.tile_index), s);
      });
  for_tiled_rows<Scratch>(
      g.batch, heads_kv, rows, pass.key_tiles,
      [&](Scratch& s) {
        pass.start_key_pass(s, tuning::kRowCacheWindows * pass.key_window_rows);
        pass.start_saving(s, SavedProbs());
      },
      [&](const TiledRow& at, Scratch& s) {
        pass.key_row(at, pass.key_columns.window[at.tile_index], s);
      });
}

}  // namespace libna::cpu::LIBNA_SIMD_NS
