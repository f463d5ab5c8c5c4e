// The vectorised fused backward (float32/float16/bfloat16; float64 keeps
// the scalar kernels in backward.h): the row terms (lse and D) in the packed
// layout, then the query and key passes (fused_backward_passes.h) under one
// of two schedules: keeping P and dS from the query pass for the key pass
// (fused_backward_saved.h), or computing them again
// (fused_backward_recompute.h). Both give bitwise-equal gradients; the rpb
// gradient is summed in item order (bias_grad.h).
// Included inside the per-instruction-set namespace and target region of
// fast_kernels_impl.h (LIBNA_SIMD_NS), like every header of the vectorised
// kernels.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/backward.h"
#include "cpu/bias_grad.h"
#include "cpu/kernels.h"
#include "cpu/fused_backward_passes.h"
#include "cpu/fused_backward_recompute.h"
#include "cpu/fused_backward_saved.h"
#include "cpu/packed_layout.h"
#include "cpu/saved_probs.h"
#include "cpu/thread_scratch.h"

namespace libna::cpu::LIBNA_SIMD_NS {

template <int Rank, typename T>
void na_backward(const detail::BackwardArgs& args) {
  const Geometry<Rank> g(args.q, args.params);
  const ColumnLayout layout(g);
  const Tables<Rank> tables(g, args.params);
  const std::int64_t heads = g.heads, heads_kv = args.k.shape[Rank + 1];
  const std::int64_t lanes_size = layout.packed_size(g.batch, heads, 1);
  const BiasBuffer<Rank, float> bias_layout(args.params, heads);
  const std::int64_t bias_head = args.rpb ? bias_layout.strides[0] : 0;
  Backward<Rank, T> pass(args, g, layout, tables);
  // Query pass items (b, h, tile, row) each own one partial of the rpb
  // gradient (summed below in item order: deterministic).
  SavedProbs saved = saved_probs_layout(pass, tables);
  const std::int64_t tiles = pass.query_tiles.count;
  const SavedPlan plan =
      saved_plan<Rank>(g, tables, g.batch * heads_kv * tiles, saved, pass.ring_rows,
                       pass.row_pairs, pass.pairs_per_group);
  const std::int64_t query_items = g.batch * heads * tiles * layout.rows;
  // lse and D in the packed column layout (the key pass reads their padding
  // too), then the rpb-gradient partials.
  float* buffer = workspace(2 * lanes_size + query_items * bias_head);
  float* bias_partials = buffer + 2 * lanes_size;
  pass.lse = buffer;
  pass.delta = buffer + lanes_size;
  std::fill(buffer, buffer + 2 * lanes_size, 0.0f);
  store_row_terms<Rank, T>(args, g, layout, pass.lse, pass.delta);

  using Scratch = typename Backward<Rank, T>::Scratch;
  using QueryTile = typename Backward<Rank, T>::QueryTile;
  // (The item's rpb-gradient partial, zeroed; null without rpb.)
  const auto partial_of = [&](const TiledRow& at, std::int64_t row) -> float* {
    if (!bias_head) return nullptr;
    const std::int64_t item = ((at.b * heads + at.h) * tiles + at.tile_index) * layout.rows + row;
    float* partial = bias_partials + item * bias_head;
    std::fill(partial, partial + bias_head, 0.0f);
    return partial;
  };
  const auto query_rows = [&](const TiledRow& at, std::int64_t led, const QueryTile& tile,
                              Scratch& s) { pass.query_led(at, led, tile, partial_of, s); };

  if (plan.slots == 0) {
    run_recomputing_backward(pass, query_rows);
  } else {
    saved.slots = plan.slots;
    run_saved_backward(pass, plan, saved, query_rows);
  }
  if (args.drpb) {
    store_bias_grad<T>(bias_layout, bias_partials, query_items, tiles * layout.rows, *args.drpb);
  }
}

}  // namespace libna::cpu::LIBNA_SIMD_NS
