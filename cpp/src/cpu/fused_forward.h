// The vectorised fused forward (float32/float16/bfloat16; float64 keeps the
// scalar kernel in kernels.h), included once per instruction set by
// fast_kernels_impl.h inside its target region, with LIBNA_SIMD_NS defined.
// The backward and the unfused ops are built from the same pieces.
//
// The idea: put 8 consecutive queries of one dilation group along the last
// spatial axis in SIMD lanes (lane_windows.h). Their windows along that axis
// are the same shape shifted by one position each (away from the borders),
// and along the other axes they are identical (neighbour_rows.h). With K and
// V repacked head-dim-major and group-contiguous ("[row][d][col]",
// packed_layout.h, packing.h), the keys of all 8 lanes at one window offset
// are a single contiguous load, so Q.K and P.V become FMAs with no
// broadcasts, no wasted products and no horizontal sums (micro_kernels.h).
// Blocks where the windows do not shift in step (borders, causal starts,
// stride > 1, partial blocks) read the same way over the smallest range that
// covers every lane's window, and mask each lane outside its own; the packed
// rows carry zero columns around each dilation group for the reads that fall
// outside it.
//
// Rows are computed two at a time where a row has a partner, the next row of
// its dilation group along the second-to-last axis (pair_kernels.h): the two
// share most key rows, and each load of keys or values serves both. With
// AVX-512, up to three consecutive pairs go together (pair_groups.h), each
// load serving all of them.
//
// Work items are (b, h, column tile, row), rows innermost (column_tiles.h),
// and each thread packs the rows an item reads, only the tile's columns, into
// its own small cache (row_cache.h): consecutive rows of a tile share all but
// a few key rows, so packed data is reused from cache and never written out
// as a full-size copy.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/column_tiles.h"
#include "cpu/kernels.h"
#include "cpu/lane_kernel.h"
#include "cpu/lane_windows.h"
#include "cpu/micro_kernels.h"
#include "cpu/neighbour_rows.h"
#include "cpu/packed_layout.h"
#include "cpu/packing.h"
#include "cpu/pair_groups.h"
#include "cpu/pair_kernels.h"
#include "cpu/pair_rows.h"
#include "cpu/row_cache.h"
#include "cpu/tuning.h"

namespace libna::cpu::LIBNA_SIMD_NS {

template <int Rank, typename T>
struct Forward : LaneKernel<Rank, T> {
  using Base = LaneKernel<Rank, T>;
  using Base::g;
  const detail::ForwardArgs& args;
  const PackSource<Rank, T> q, k, v;  // q times the softmax scale
  const ColumnTiles tiles;
  const TileColumns columns;
  // Rows two at a time (Rank >= 2), or in 1D with long windows, a row's
  // lane blocks two at a time (LIBNA_CPU_ROW_PAIRS, else the set's choice).
  const bool row_pairs, block_pairs;
  // Row pairs computed together (pair_groups.h); 1 without row pairs.
  const std::int64_t pairs_per_group;

  // Per-thread working memory.
  struct Scratch {
    std::vector<float> out;  // [d][lane]
    std::vector<float> logits;
    RowList key_rows;
    std::vector<const float*> key_ptrs, value_rows;
    RowCaches rows;  // a: q (own) and k (window); b: v (window)
    PairRows pair;  // row pairs: the second row's key rows and the union
    // Groups of pairs: each pair's rows, its packed q rows, joined q lanes,
    // logits and outputs; the union of their key rows.
    struct GroupPair : GroupPairRows<Rank> {
      const float *q_a, *q_b;
      std::vector<float> q, logits, out;  // [d][16], [u][j][16], [d][16]
    } group_pairs[kMaxGroupPairs];
    GroupRows group;
    std::vector<std::pair<std::int64_t, LaneWindows>> blocks;  // block pairs: a row's blocks
  };

  Forward(const detail::ForwardArgs& a, const Geometry<Rank>& geometry,
          const ColumnLayout& columns_layout)
      : Base(geometry, columns_layout, a.k, a.v, a.params, a.rpb, a.scale), args(a),
        q(a.q, geometry, columns_layout, static_cast<float>(a.scale)),
        k(a.k, geometry, columns_layout, 1.0f), v(a.v, geometry, columns_layout, 1.0f),
        tiles(columns_layout, geometry.window_rows(), this->k_dim + this->v_dim),
        columns(*this, tiles, [&](std::int64_t grp, std::int64_t i0, std::int64_t lanes) {
          return query_lanes(this->last(), columns_layout.group_len[grp], i0, lanes);
        }),
        row_pairs(Rank >= 2 && row_pairs_wanted()),
        block_pairs(Rank == 1 && row_pairs_wanted() && geometry.axes[Rank - 1].kernel >= 2 * kLanes),
        pairs_per_group(row_pairs ? pairs_per_group_wanted() : 1) {
    this->set_row_stride(columns.own, columns.window);
  }

  void start(Scratch& s) const {
    // Items of a chunk are mostly consecutive rows, or rows of the next tile;
    // a pair sees at most twice a row's window rows, and its q rows are two.
    // A group of n pairs (2n rows, step apart) sees at most k + 2n - 1 of the
    // positions along the second-to-last axis, k its kernel size there: its
    // window rows, twice (as a row's), for the next group to reuse.
    std::int64_t capacity = tuning::kRowCacheWindows * g.window_rows();
    if constexpr (Rank >= 2) {
      if (pairs_per_group > 1) {
        capacity = tuning::kRowCacheWindows * group_window_rows(g, pairs_per_group);
      } else if (row_pairs) {
        capacity *= 2;
      }
    }
    s.rows.reset(capacity, this->k_dim, this->v_dim, this->row_stride, 2 * pairs_per_group);
  }

  // The queries of one (b, h, row) in one column tile, eight at a time; with
  // row pairs, those of the rows the row leads (itself and its partner, or
  // a group of pairs, rows_led), or none if an earlier row leads it.
  void row(const TiledRow& at, Scratch& s) const {
    std::int64_t c[Rank];
    row_coords<Rank>(g, at.row, c);
    if constexpr (Rank >= 2) {
      if (row_pairs) {
        const std::int64_t step = g.axes[Rank - 2].dilation;
        const std::int64_t led = rows_led(c[Rank - 2], step, g.spatial[Rank - 2], pairs_per_group);
        // (led 0: computed with an earlier row.)
        run_rows_led(
            led, [&](std::int64_t n_pairs) { group(at, c, n_pairs, s); },
            [&] { pair(at, c, s); },
            [&](std::int64_t i) {  // the last row of its dilation group, without a partner
              TiledRow last = at;
              last.row += i * step;
              c[Rank - 2] += i * step;
              single(last, c, s);
            });
        return;
      }
    }
    single(at, c, s);
  }

  // One query row by itself.
  void single(const TiledRow& at, std::int64_t* c, Scratch& s) const {
    key_rows_of<Rank>(g, c, this->bias_strides, s.key_rows);
    const std::int64_t hk = at.h / this->heads_per_kv, t = at.tile_index;
    RowCaches& rows = s.rows;
    rows.next_item();
    rows.load_window(k, v, at.b, hk, s.key_rows, t, columns.window[t]);
    const float* q_row = rows.own_a.get(q, at.b, at.h, at.row, t, columns.own[t]);
    if (block_pairs) return row_of_block_pairs(at, c, q_row, s);
    this->for_query_blocks(at.tile, [&](std::int64_t grp, const LaneWindows& w) {
      block(at.b, at.h, q_row, c, grp, w, s);
    });
  }

  // 1D: the row's lane blocks two at a time, each with the next block of its
  // dilation group where their windows overlap (pair_block); the others one
  // at a time.
  void row_of_block_pairs(const TiledRow& at, std::int64_t* c, const float* q_row,
                          Scratch& s) const {
    s.pair.b = s.key_rows;
    s.pair.unite(s.key_rows);  // both halves see every key row
    s.blocks.clear();
    this->for_query_blocks(at.tile, [&](std::int64_t grp, const LaneWindows& w) {
      s.blocks.push_back({grp, w});
    });
    for (std::size_t i = 0; i < s.blocks.size(); ++i) {
      const auto& [grp, wa] = s.blocks[i];
      if (i + 1 < s.blocks.size()) {
        const auto& [grp_b, wb] = s.blocks[i + 1];
        const std::int64_t offset = wb.first - wa.first;
        if (grp_b == grp && offset >= 0 && offset < wa.window && wa.window > 0 && wb.window > 0) {
          pair_block(at.b, at.h, grp,
                     Halves{q_row, q_row, wa, wb, c, c, offset,
                            std::max(wa.window, offset + wb.window)},
                     s);
          ++i;
          continue;
        }
      }
      block(at.b, at.h, q_row, c, grp, wa, s);
    }
  }

  void block(std::int64_t b, std::int64_t h, const float* q_row,
             std::int64_t* c, std::int64_t grp, const LaneWindows& w,
             Scratch& s) const {
    const std::int64_t dim_v = this->v_dim, n_rows = s.key_rows.size;
    this->prefetch_lanes(args.out, b, c, h, grp, w);
    s.logits.resize(n_rows * w.window * kLanes);
    this->window_rows(s.rows.bases_a, grp, w, s.key_ptrs);
    this->logits(this->lanes_at(q_row, grp, w), this->row_stride, h, w, s.key_rows,
                 s.key_ptrs.data(), s.logits.data());

    f32x8 max_logit, sum;
    softmax_lanes(s.logits.data(), n_rows * w.window, &max_logit, &sum);

    this->window_rows(s.rows.bases_b, grp, w, s.value_rows);
    s.out.resize(dim_v * kLanes);
    pv_range(s.logits.data(), s.value_rows.data(), n_rows, w.window, this->row_stride, dim_v,
             s.out.data(), w.masked && !s.rows.window_finite_b ? &w : nullptr);

    // Normalise and store. A query whose logits are all -inf attends to
    // nothing: out = 0 and lse = -inf (a NaN sum stays NaN).
    const f32x8 zero = simd::splat(0.0f);
    const f32x8 factor = sum == zero ? zero : simd::splat(1.0f) / sum;
    this->store_lanes(args.out, b, c, h, grp, w, factor, s.out.data());
    store_lse(b, c, h, grp, w, max_logit, sum);
  }

  void store_lse(std::int64_t b, std::int64_t* c, std::int64_t h, std::int64_t grp,
                 const LaneWindows& w, f32x8 max_logit, f32x8 sum) const {
    if (!args.lse) return;
    alignas(32) float m[kLanes], total[kLanes];
    simd::store(m, max_logit);
    simd::store(total, sum);
    float* lse = static_cast<float*>(args.lse->data);
    for (std::int64_t l = 0; l < w.lanes; ++l) {
      c[Rank - 1] = grp + (w.i0 + l) * this->last().dilation;
      // softmax_lanes shifted by m[l], which is 0 for all -inf logits.
      lse[row_offset<Rank>(*args.lse, b, c, 0) + h * args.lse->strides[Rank + 1]] =
          softmax_lse(m[l], total[l]);
    }
  }

  // Row `at.row` (coordinates c) and its partner one dilation step further
  // along the second-to-last axis, in 16 lanes (pair_kernels.h).
  void pair(const TiledRow& at, std::int64_t* c, Scratch& s) const {
    std::int64_t cb[Rank];
    std::copy(c, c + Rank, cb);
    const std::int64_t step = g.axes[Rank - 2].dilation, row_b = at.row + step;
    cb[Rank - 2] += step;
    key_rows_of<Rank>(g, c, this->bias_strides, s.key_rows);
    key_rows_of<Rank>(g, cb, this->bias_strides, s.pair.b);
    s.pair.unite(s.key_rows);
    const std::int64_t hk = at.h / this->heads_per_kv, t = at.tile_index;
    RowCaches& rows = s.rows;
    rows.next_item();
    rows.load_window(k, v, at.b, hk, s.pair.rows.rows, t, columns.window[t]);
    const float* q_a = rows.own_a.get(q, at.b, at.h, at.row, t, columns.own[t]);
    const float* q_b = rows.own_a.get(q, at.b, at.h, row_b, t, columns.own[t]);
    this->for_query_blocks(at.tile, [&](std::int64_t grp, const LaneWindows& w) {
      pair_block(at.b, at.h, grp, row_pair(q_a, q_b, w, c, cb), s);
    });
  }

  void pair_block(std::int64_t b, std::int64_t h, std::int64_t grp, const Halves& x,
                  Scratch& s) const {
    const std::int64_t dim_v = this->v_dim, n = s.pair.rows.rows.size, window = x.window;
    this->prefetch_lanes(args.out, b, x.ca, h, grp, x.wa);
    this->prefetch_lanes(args.out, b, x.cb, h, grp, x.wb);
    s.logits.resize(n * window * kPairLanes);
    this->window_rows(s.rows.bases_a, grp, x.wa, s.key_ptrs);
    qk_pair_rows(this->lanes_at(x.q_a, grp, x.wa), this->lanes_at(x.q_b, grp, x.wb),
                 this->row_stride, s.key_ptrs.data(), n, this->row_stride, this->k_dim, window,
                 s.logits.data());
    const bool masked = pair_masked(x, s.pair);
    i32x16 lo, hi;
    pair_bounds(x, &lo, &hi);
    pair_bias_and_mask(*this, h, x, masked, lo, hi, s.key_rows, s.pair, s.logits.data());

    f32x16 max_logit, sum;
    softmax_pair(s.logits.data(), n * window, &max_logit, &sum);

    this->window_rows(s.rows.bases_b, grp, x.wa, s.value_rows);
    s.out.resize(dim_v * kPairLanes);
    const bool mask_values = masked && !s.rows.window_finite_b;
    pv_pair_range(s.logits.data(), s.value_rows.data(), n, window, this->row_stride, dim_v,
                  s.out.data(), mask_values, lo, hi, s.pair.halves.data());

    // Normalise and store, as block() does for each half.
    const f32x16 factor = pair::inverse_or_zero(sum);
    this->store_lanes(args.out, b, x.ca, h, grp, x.wa, pair::low(factor), s.out.data(),
                      kPairLanes);
    this->store_lanes(args.out, b, x.cb, h, grp, x.wb, pair::high(factor),
                      s.out.data() + kLanes, kPairLanes);
    store_lse(b, x.ca, h, grp, x.wa, pair::low(max_logit), pair::low(sum));
    store_lse(b, x.cb, h, grp, x.wb, pair::high(max_logit), pair::high(sum));
  }

  // Rows at.row, at.row + step, ... (coordinates c on), 2 * n_pairs rows of
  // one dilation group, as n_pairs row pairs whose products share their
  // loads (pair_groups.h).
  void group(const TiledRow& at, const std::int64_t* c, std::int64_t n_pairs, Scratch& s) const {
    const std::int64_t step = g.axes[Rank - 2].dilation;
    const std::int64_t hk = at.h / this->heads_per_kv, t = at.tile_index;
    RowCaches& rows = s.rows;
    rows.next_item();
    std::int64_t ca[Rank];
    std::copy(c, c + Rank, ca);
    for (std::int64_t p = 0; p < n_pairs; ++p, ca[Rank - 2] += 2 * step) {
      auto& x = s.group_pairs[p];
      x.set(g, ca, step, this->bias_strides);
      x.q_a = rows.own_a.get(q, at.b, at.h, at.row + 2 * p * step, t, columns.own[t]);
      x.q_b = rows.own_a.get(q, at.b, at.h, at.row + (2 * p + 1) * step, t, columns.own[t]);
    }
    s.group.unite(s.group_pairs, n_pairs);
    rows.load_window(k, v, at.b, hk, s.group.rows, t, columns.window[t]);
    this->for_query_blocks(at.tile, [&](std::int64_t grp, const LaneWindows& w) {
      group_block(at.b, at.h, grp, w, n_pairs, s);
    });
  }

  // One block of query lanes of a group's rows: pair_block for each pair,
  // with the q.k and P.V products of all pairs together.
  void group_block(std::int64_t b, std::int64_t h, std::int64_t grp, const LaneWindows& w,
                   std::int64_t n_pairs, Scratch& s) const {
    const std::int64_t dim_k = this->k_dim, dim_v = this->v_dim, window = w.window;
    const float* q_joined[kMaxGroupPairs] = {};
    float *logits[kMaxGroupPairs] = {}, *out[kMaxGroupPairs] = {};
    for (std::int64_t p = 0; p < n_pairs; ++p) {
      auto& x = s.group_pairs[p];
      this->prefetch_lanes(args.out, b, x.ca, h, grp, w);
      this->prefetch_lanes(args.out, b, x.cb, h, grp, w);
      // (A pair alone joins its q halves in its q.k loop.)
      join_lanes(this->lanes_at(x.q_a, grp, w), this->lanes_at(x.q_b, grp, w), this->row_stride,
                 dim_k, x.q);
      x.logits.resize(x.rows.rows.rows.size * window * kPairLanes);
      x.out.resize(dim_v * kPairLanes);
      q_joined[p] = x.q.data();
      logits[p] = x.logits.data();
      out[p] = x.out.data();
    }
    this->window_rows(s.rows.bases_a, grp, w, s.key_ptrs);
    qk_group_rows(s.group, n_pairs, q_joined, s.key_ptrs.data(), this->row_stride, dim_k, window,
                  logits);

    auto& first = s.group_pairs[0];
    i32x16 lo, hi;  // (the same lanes in every pair)
    pair_bounds(row_pair(first.q_a, first.q_b, w, first.ca, first.cb), &lo, &hi);
    f32x16 max_logit[kMaxGroupPairs], sum[kMaxGroupPairs];
    bool masked[kMaxGroupPairs] = {}, mask_values = false;
    for (std::int64_t p = 0; p < n_pairs; ++p) {
      auto& x = s.group_pairs[p];
      const Halves halves = row_pair(x.q_a, x.q_b, w, x.ca, x.cb);
      masked[p] = pair_masked(halves, x.rows);
      pair_bias_and_mask(*this, h, halves, masked[p], lo, hi, x.key_rows, x.rows,
                         x.logits.data());
      softmax_pair(x.logits.data(), x.rows.rows.rows.size * window, &max_logit[p], &sum[p]);
      mask_values = mask_values || (masked[p] && !s.rows.window_finite_b);
    }

    this->window_rows(s.rows.bases_b, grp, w, s.value_rows);
    pv_group_or_pairs(s.group, s.group_pairs, n_pairs, logits, s.value_rows.data(), window,
                      this->row_stride, dim_v, out, mask_values, masked, lo, hi, s.key_ptrs);

    for (std::int64_t p = 0; p < n_pairs; ++p) {
      auto& x = s.group_pairs[p];
      const f32x16 factor = pair::inverse_or_zero(sum[p]);
      this->store_lanes(args.out, b, x.ca, h, grp, w, pair::low(factor), x.out.data(), kPairLanes);
      this->store_lanes(args.out, b, x.cb, h, grp, w, pair::high(factor),
                        x.out.data() + kLanes, kPairLanes);
      store_lse(b, x.ca, h, grp, w, pair::low(max_logit[p]), pair::low(sum[p]));
      store_lse(b, x.cb, h, grp, w, pair::high(max_logit[p]), pair::high(sum[p]));
    }
  }
};

template <int Rank, typename T>
void na_forward(const detail::ForwardArgs& args) {
  const Geometry<Rank> g(args.q, args.params);
  const ColumnLayout layout(g);
  const Forward<Rank, T> fwd(args, g, layout);
  using Scratch = typename Forward<Rank, T>::Scratch;
  for_tiled_rows<Scratch>(
      g.batch, g.heads, layout.rows, fwd.tiles, [&](Scratch& s) { fwd.start(s); },
      [&](const TiledRow& at, Scratch& s) { fwd.row(at, s); });
}

}  // namespace libna::cpu::LIBNA_SIMD_NS
