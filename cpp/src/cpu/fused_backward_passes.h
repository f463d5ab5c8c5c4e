// The two passes of the vectorised fused backward, block by block (Backward),
// which both of its schedules run (fused_backward.h): the same two passes as
// backward.h, each built from the forward's lane pieces, after one pass over
// the tokens that puts lse and D_i = dout_i.out_i in the packed column layout
// (store_row_terms):
//  - query pass, lanes = 8 queries: P = exp(q.k + rpb - lse), dP = dout.v,
//    dS = P (dP - D), dq = scale dS.k (and the rpb gradient);
//  - key pass, lanes = 8 keys, window = the queries that see them (the
//    inverse neighbourhood, which shifts by one per key away from borders,
//    just like the forward windows): dv = P.dout and dk = dS.(scale q).
//
// The key pass needs P and dS again: a key block either computes them again
// (key_block) or reads them back from where the query pass kept them
// (saved_key_block, SavedProbs), and a thread's row caches serve either way
// (Scratch).
// Included inside the per-instruction-set namespace and target region of
// fast_kernels_impl.h (LIBNA_SIMD_NS), like every header of the vectorised
// kernels.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "cpu/backward.h"
#include "cpu/bias_grad.h"
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
#include "cpu/saved_probs.h"
#include "cpu/simd.h"
#include "cpu/thread_pool.h"
#include "cpu/thread_scratch.h"

namespace libna::cpu::LIBNA_SIMD_NS {

template <int Rank, typename T>
struct Backward : LaneKernel<Rank, T> {
  using Base = LaneKernel<Rank, T>;
  using Base::g;
  using Base::layout;
  const detail::BackwardArgs& args;
  const Tables<Rank>& tables;
  const PackSource<Rank, T> k, v, q_scaled, dout;  // q times the softmax scale
  float* lse = nullptr;    // [b][h][row][col], set before the passes
  float* delta = nullptr;  // D_i = dout_i . out_i, [b][h][row][col]
  // The most query rows that see one key row (the inverse neighbourhood is
  // wider than the kernel near borders), times the query heads of a kv head:
  // the rows a key-pass item reads.
  const std::int64_t key_window_rows;
  const std::int64_t ring_rows;  // of SavedProbs (if kept)
  // Both passes read windows of dim + dim_v channels (k and v; q and dout).
  // In 1D and 2D the query tiles are also the strips (saved_strip_tiles), so
  // that the rpb gradient's partials sum the same blocks either way.
  const ColumnTiles query_tiles, key_tiles;
  const TileColumns query_columns, key_columns;
  // The strips of the saved pipeline (1D and 2D; empty in 3D), one per query
  // tile, set by the constructor.
  std::vector<Strip> strip_list;
  // 2D and 3D: the query pass takes rows two at a time (query_pair), and in
  // 2D, keeping P and dS, so does the key pass (key_pair);
  // LIBNA_CPU_ROW_PAIRS, else the kernel set's choice. The query pass
  // takes up to pairs_per_group pairs together (pair_groups.h, as the
  // forward; 1 without row pairs).
  const bool row_pairs;
  const std::int64_t pairs_per_group;

  struct Scratch {
    std::vector<float> probs, dlogits;  // [row][window position][lane]
    std::vector<float> acc, acc_k, acc_v;
    RowList rows_list;
    std::vector<const float*> ptrs_a, ptrs_b;
    // Query pass: a = q (own), k (window); b = dout (own), v (window).
    RowCaches query_rows;
    // Key pass: a = k (own), q (window); b = v (own), dout (window); the
    // window bases run over the heads of the kv head, then the rows. When
    // saving P and dS, the query pass reads its q and dout rows from these
    // windows too (whole rows, tile 0): each is packed once.
    RowCaches key_rows;
    SavedProbs saved;  // saved.data null: the key pass computes P and dS again
    PairRows pair;     // query_pair: the second row's key rows and the union
    PairRows key_pair;  // key_pair: the second key row's query rows and the union
    // query_group: each pair's rows, packed q and dout rows, q and dout
    // lanes joined ([d][16]), P, dS and dq; the union of their key rows.
    struct GroupPair : GroupPairRows<Rank> {
      std::int64_t row_a, row_b;
      const float *q_a, *q_b, *dout_a, *dout_b;
      float *bias_grad_a, *bias_grad_b;
      std::vector<float> q, dout, probs, dlogits, acc;
    } group_pairs[kMaxGroupPairs];
    GroupRows group;
    GrowingBuffer saved_memory;
  };

  Backward(const detail::BackwardArgs& a, const Geometry<Rank>& geometry,
           const ColumnLayout& columns, const Tables<Rank>& t)
      : Base(geometry, columns, a.k, a.v, a.params, a.rpb, a.scale), args(a), tables(t),
        k(a.k, geometry, columns, 1.0f), v(a.v, geometry, columns, 1.0f),
        q_scaled(a.q, geometry, columns, static_cast<float>(a.scale)),
        dout(a.dout, geometry, columns, 1.0f),
        key_window_rows(inverse_window_rows(t) * this->heads_per_kv),
        ring_rows(libna::cpu::LIBNA_SIMD_NS::ring_rows(geometry, t)),
        query_tiles(ring_rows ? saved_strip_tiles(*this, ring_rows)
                              : ColumnTiles(columns, geometry.window_rows(), this->k_dim + this->v_dim)),
        key_tiles(columns, key_window_rows, this->k_dim + this->v_dim),
        query_columns(*this, query_tiles,
                      [&](std::int64_t grp, std::int64_t i0, std::int64_t lanes) {
                        return query_lanes(this->last(), columns.group_len[grp], i0, lanes);
                      }),
        key_columns(*this, key_tiles, [&](std::int64_t grp, std::int64_t i0, std::int64_t lanes) {
          return key_lanes(t.axis[Rank - 1], grp, this->last().dilation, i0, lanes);
        }),
        row_pairs(Rank >= 2 && row_pairs_wanted()),
        pairs_per_group(row_pairs ? pairs_per_group_wanted() : 1) {
    std::vector<ColumnRanges> strip_columns;
    if (ring_rows) {
      strip_list = saved_strips(*this, t, query_tiles);
      for (const Strip& strip : strip_list) {
        strip_columns.push_back(strip.kv_columns);
        strip_columns.push_back(strip.q_columns);
      }
    }
    this->set_row_stride(query_columns.own, query_columns.window, key_columns.own,
                         key_columns.window, strip_columns);
  }

  // (capacity: of the window-row caches, RowCaches::reset.)
  void start_query_pass(Scratch& s, std::int64_t capacity) const {
    s.query_rows.reset(capacity, this->k_dim, this->v_dim, this->row_stride,
                       row_pairs ? 2 * pairs_per_group : 1);
  }
  // The most key rows a query-pass item reads with groups of pairs: 2n rows
  // (n pairs per group, step apart) see at most k + 2n - 1 positions along
  // the second-to-last axis, k its kernel size there.
  std::int64_t item_window_rows() const {
    if constexpr (Rank >= 2) return group_window_rows(g, pairs_per_group);
    return g.window_rows();
  }
  void start_key_pass(Scratch& s, std::int64_t capacity) const {
    s.key_rows.reset(capacity, this->k_dim, this->v_dim, this->row_stride);
  }
  // Sets s.saved to `saved` with the thread's ring memory (saved.slots 0:
  // not saving). The ring is read only where written.
  void start_saving(Scratch& s, const SavedProbs& saved) const {
    s.saved = saved;
    if (saved.slots > 0) s.saved.data = s.saved_memory.reserve(saved.size());
  }

  std::int64_t scalar_row(std::int64_t b, std::int64_t h, std::int64_t row) const {
    return ((b * g.heads + h) * layout.rows + row) * layout.width;
  }

  // ---- query pass --------------------------------------------------------
  // The blocks a query-pass item computes (TiledRow::tile), those of them
  // whose dq and rpb gradient it stores (the others only feed SavedProbs),
  // and the columns it packs of the k and v rows and of the q and dout rows.
  struct QueryTile {
    BlockRange own;
    const ColumnRanges& kv_columns;
    const ColumnRanges& q_columns;
  };
  QueryTile query_tile(std::int64_t t) const {
    return {query_tiles[t], query_columns.window[t], query_columns.own[t]};
  }

  void query_row(const TiledRow& at, const QueryTile& tile, float* bias_grad,
                 Scratch& s) const {
    std::int64_t c[Rank];
    row_coords<Rank>(g, at.row, c);
    key_rows_of<Rank>(g, c, this->bias_strides, s.rows_list);
    const std::int64_t hk = at.h / this->heads_per_kv, t = at.tile_index;
    RowCaches& rows = s.query_rows;
    rows.next_item();
    rows.load_window(k, v, at.b, hk, s.rows_list, t, tile.kv_columns);
    auto [q_cache, dout_cache] = q_and_dout_caches(s);
    const float* q_row = q_cache->get(q_scaled, at.b, at.h, at.row, t, tile.q_columns);
    const float* dout_row = dout_cache->get(dout, at.b, at.h, at.row, t, tile.q_columns);
    this->for_query_blocks(at.tile, [&](std::int64_t grp, const LaneWindows& w) {
      const std::int64_t block = layout.block(grp, w.i0);
      const bool own = block >= tile.own.begin && block < tile.own.end;
      query_block(at.b, at.h, at.row, q_row, dout_row, c, grp, w, own ? bias_grad : nullptr,
                  own, s);
    });
  }

  // The caches the query pass packs its q and dout rows into: when saving P
  // and dS, the key pass' window caches (it reads these rows again, and
  // each is packed once); else the pass' own rows. Starts an item of the
  // key pass' caches when it uses them.
  std::pair<RowCache*, RowCache*> q_and_dout_caches(Scratch& s) const {
    if (!s.saved.data) return {&s.query_rows.own_a, &s.query_rows.own_b};
    s.key_rows.next_item();
    return {&s.key_rows.window_a, &s.key_rows.window_b};
  }

  // Kept out of line: GCC 12 inlined it into the saved schedule's row loop
  // once that loop moved to its own function, and the 2D backward ran 8-12%
  // slower (56x56, k 7, D 32).
  LIBNA_NOINLINE void query_block(std::int64_t b, std::int64_t h, std::int64_t row,
                   const float* q_row, const float* dout_row, std::int64_t* c,
                   std::int64_t grp, const LaneWindows& w, float* bias_grad,
                   bool store_dq, Scratch& s) const {
    const std::int64_t dim = this->k_dim, dim_v = this->v_dim, n_rows = s.rows_list.size;
    const std::int64_t entries = n_rows * w.window, width = this->row_stride;
    // Lanes of the packed q (times scale) and dout; lse and D from the
    // row terms (zero beyond the lanes).
    const std::int64_t col0 = layout.group_base[grp] + w.i0;
    const float* q_lanes = this->lanes_at(q_row, grp, w);
    const float* dout_lanes = this->lanes_at(dout_row, grp, w);
    const f32x8 lse_v = simd::load(lse + scalar_row(b, h, row) + col0);
    const f32x8 delta_v = simd::load(delta + scalar_row(b, h, row) + col0);
    if (store_dq) this->prefetch_lanes(args.dq, b, c, h, grp, w);

    // P, then dP, then dS = P (dP - D).
    s.probs.resize(entries * kLanes);
    s.dlogits.resize(entries * kLanes);
    this->window_rows(s.query_rows.bases_a, grp, w, s.ptrs_b);
    this->logits(q_lanes, width, h, w, s.rows_list, s.ptrs_b.data(), s.probs.data());
    for (std::int64_t e = 0; e < entries; ++e) {
      simd::store(s.probs.data() + e * kLanes,
                  simd::exp_nonpositive(simd::load(s.probs.data() + e * kLanes) - lse_v));
    }
    this->window_rows(s.query_rows.bases_b, grp, w, s.ptrs_a);
    qk_rows(dout_lanes, width, s.ptrs_a.data(), n_rows, width, dim_v, w.window,
            s.dlogits.data());
    for (std::int64_t e = 0; e < entries; ++e) {
      const f32x8 p = simd::load(s.probs.data() + e * kLanes);
      simd::store(s.dlogits.data() + e * kLanes,
                  p * (simd::load(s.dlogits.data() + e * kLanes) - delta_v));
    }
    // dP outside a lane's window comes from values it does not see (maybe
    // non-finite): its dS is 0, not 0 * NaN.
    if (w.masked) {
      for (std::int64_t r = 0; r < n_rows; ++r) w.mask(s.dlogits.data() + r * w.window * kLanes, w.window, 0.0f);
    }

    if (s.saved.data) {
      s.saved.save_query_block(h % this->heads_per_kv, row, col0, this->last().kernel, w,
                               s.rows_list, s.probs.data(), s.dlogits.data());
    }

    if (!store_dq) return;
    // dq = scale * dS . k (ptrs_b: the key rows)
    s.acc.resize(dim * kLanes);
    pv_range(s.dlogits.data(), s.ptrs_b.data(), n_rows, w.window, width, dim, s.acc.data(),
             w.masked && !s.query_rows.window_finite_a ? &w : nullptr);
    this->store_lanes(args.dq, b, c, h, grp, w, simd::splat(this->scale), s.acc.data());

    // The rpb gradient: dS summed by relative position.
    if (bias_grad) {
      add_bias_grad(w, s.rows_list, this->last().kernel, this->bias_strides[Rank],
                    s.dlogits.data(), bias_grad);
    }
  }

  // The query rows at.row leads (led of them: rows_led): itself, a pair, or
  // a group of pairs, and a last row of its dilation group without a
  // partner. partial_of(at, row): row's rpb-gradient partial.
  template <typename PartialOf>
  void query_led(const TiledRow& at, std::int64_t led, const QueryTile& tile,
                 const PartialOf& partial_of, Scratch& s) const {
    if (led == 1) return query_row(at, tile, partial_of(at, at.row), s);
    if constexpr (Rank >= 2) {
      const std::int64_t step = g.axes[Rank - 2].dilation;
      run_rows_led(
          led, [&](std::int64_t n_pairs) { query_group(at, n_pairs, tile, partial_of, s); },
          [&] {
            query_pair(at, at.row + step, tile, partial_of(at, at.row),
                       partial_of(at, at.row + step), s);
          },
          [&](std::int64_t i) {
            TiledRow last = at;
            last.row += i * step;
            query_row(last, tile, partial_of(at, last.row), s);
          });
    }
  }

  // Query rows at.row and row_b, the next of its dilation group along the
  // second-to-last axis, in 16 lanes (pair_kernels.h, pair_rows.h): what
  // query_row does for each, bit for bit, with each load of a key or value
  // column feeding both. bias_grad_a/_b: each row's rpb-gradient partial.
  void query_pair(const TiledRow& at, std::int64_t row_b, const QueryTile& tile,
                  float* bias_grad_a, float* bias_grad_b, Scratch& s) const {
    std::int64_t ca[Rank], cb[Rank];
    row_coords<Rank>(g, at.row, ca);
    row_coords<Rank>(g, row_b, cb);
    key_rows_of<Rank>(g, ca, this->bias_strides, s.rows_list);
    key_rows_of<Rank>(g, cb, this->bias_strides, s.pair.b);
    s.pair.unite(s.rows_list);
    const std::int64_t hk = at.h / this->heads_per_kv, t = at.tile_index;
    s.query_rows.next_item();
    s.query_rows.load_window(k, v, at.b, hk, s.pair.rows.rows, t, tile.kv_columns);
    auto [q_cache, dout_cache] = q_and_dout_caches(s);
    const PairInputs in{q_cache->get(q_scaled, at.b, at.h, at.row, t, tile.q_columns),
                        q_cache->get(q_scaled, at.b, at.h, row_b, t, tile.q_columns),
                        dout_cache->get(dout, at.b, at.h, at.row, t, tile.q_columns),
                        dout_cache->get(dout, at.b, at.h, row_b, t, tile.q_columns),
                        at.row, row_b, ca, cb};
    this->for_query_blocks(at.tile, [&](std::int64_t grp, const LaneWindows& w) {
      const std::int64_t block = layout.block(grp, w.i0);
      const bool own = block >= tile.own.begin && block < tile.own.end;
      query_pair_block(at.b, at.h, in, grp, w, own ? bias_grad_a : nullptr,
                       own ? bias_grad_b : nullptr, own, s);
    });
  }

  struct PairInputs {
    const float *q_a, *q_b, *dout_a, *dout_b;  // packed rows
    std::int64_t row_a, row_b;
    std::int64_t *ca, *cb;
  };

  // query_block for the two rows of a pair in 16 lanes.
  LIBNA_NOINLINE void query_pair_block(std::int64_t b, std::int64_t h, const PairInputs& in,
                                       std::int64_t grp, const LaneWindows& w,
                                       float* bias_grad_a, float* bias_grad_b, bool store_dq,
                                       Scratch& s) const {
    const std::int64_t dim = this->k_dim, dim_v = this->v_dim, n = s.pair.rows.rows.size;
    const std::int64_t window = w.window, entries = n * window, width = this->row_stride;
    const std::int64_t col0 = layout.group_base[grp] + w.i0;
    const Halves x = row_pair(in.q_a, in.q_b, w, in.ca, in.cb);
    const f32x16 lse_v = pair::join(simd::load(lse + scalar_row(b, h, in.row_a) + col0),
                                    simd::load(lse + scalar_row(b, h, in.row_b) + col0));
    const f32x16 delta_v = pair::join(simd::load(delta + scalar_row(b, h, in.row_a) + col0),
                                      simd::load(delta + scalar_row(b, h, in.row_b) + col0));
    if (store_dq) {
      this->prefetch_lanes(args.dq, b, in.ca, h, grp, w);
      this->prefetch_lanes(args.dq, b, in.cb, h, grp, w);
    }

    // P, then dP, then dS = P (dP - D), as query_block computes them.
    s.probs.resize(entries * kPairLanes);
    s.dlogits.resize(entries * kPairLanes);
    this->window_rows(s.query_rows.bases_a, grp, w, s.ptrs_b);
    qk_pair_rows(this->lanes_at(in.q_a, grp, w), this->lanes_at(in.q_b, grp, w), width,
                 s.ptrs_b.data(), n, width, dim, window, s.probs.data());
    const bool masked = pair_masked(x, s.pair);
    i32x16 lo, hi;
    pair_bounds(x, &lo, &hi);
    pair_bias_and_mask(*this, h, x, masked, lo, hi, s.rows_list, s.pair, s.probs.data());
    for (std::int64_t e = 0; e < entries; ++e) {
      pair::store(s.probs.data() + e * kPairLanes,
                  pair::exp_nonpositive(pair::load(s.probs.data() + e * kPairLanes) - lse_v));
    }
    this->window_rows(s.query_rows.bases_b, grp, w, s.ptrs_a);
    qk_pair_rows(this->lanes_at(in.dout_a, grp, w), this->lanes_at(in.dout_b, grp, w), width,
                 s.ptrs_a.data(), n, width, dim_v, window, s.dlogits.data());
    for (std::int64_t e = 0; e < entries; ++e) {
      const f32x16 p = pair::load(s.probs.data() + e * kPairLanes);
      pair::store(s.dlogits.data() + e * kPairLanes,
                  p * (pair::load(s.dlogits.data() + e * kPairLanes) - delta_v));
    }
    // dS is 0 outside a half's windows and key rows (dP there may come from
    // values it does not see).
    if (masked) {
      for (std::int64_t u = 0; u < n; ++u) {
        s.pair.mask(u, lo, hi, s.dlogits.data() + u * window * kPairLanes, window, 0.0f);
      }
    }

    // Each half keeps the key rows of its own row's window.
    const std::int64_t kernel = this->last().kernel, head = h % this->heads_per_kv;
    const std::int64_t step = this->bias_strides[Rank];
    for (std::int64_t u = 0; s.saved.data && u < n; ++u) {
      const float* p = s.probs.data() + u * window * kPairLanes;
      const float* ds = s.dlogits.data() + u * window * kPairLanes;
      const std::int64_t ia = s.pair.rows.index_a[u], ib = s.pair.rows.index_b[u];
      if (ia >= 0) {
        s.saved.save_query_row(head, in.row_a, s.rows_list.slot[ia] / kernel, col0, w, p, ds,
                               kPairLanes);
      }
      if (ib >= 0) {
        s.saved.save_query_row(head, in.row_b, s.pair.b.slot[ib] / kernel, col0, w, p + kLanes,
                               ds + kLanes, kPairLanes);
      }
    }

    if (!store_dq) return;
    // dq = scale * dS . k (ptrs_b: the key rows)
    s.acc.resize(dim * kPairLanes);
    pv_pair_range(s.dlogits.data(), s.ptrs_b.data(), n, window, width, dim, s.acc.data(),
                  masked && !s.query_rows.window_finite_a, lo, hi, s.pair.halves.data());
    this->store_lanes(args.dq, b, in.ca, h, grp, w, simd::splat(this->scale), s.acc.data(),
                      kPairLanes);
    this->store_lanes(args.dq, b, in.cb, h, grp, w, simd::splat(this->scale),
                      s.acc.data() + kLanes, kPairLanes);

    // The rpb gradient: each half's dS by relative position, its key rows in
    // order (as add_bias_grad sums one row's).
    for (std::int64_t u = 0; u < n; ++u) {
      const float* ds = s.dlogits.data() + u * window * kPairLanes;
      const std::int64_t ia = s.pair.rows.index_a[u], ib = s.pair.rows.index_b[u];
      if (bias_grad_a && ia >= 0) {
        add_bias_grad_row(w, s.rows_list.bias[ia], kernel, step, ds, kPairLanes, bias_grad_a);
      }
      if (bias_grad_b && ib >= 0) {
        add_bias_grad_row(w, s.pair.b.bias[ib], kernel, step, ds + kLanes, kPairLanes,
                          bias_grad_b);
      }
    }
  }

  // Rows at.row, at.row + step, ... (2 * n_pairs rows of one dilation group)
  // as n_pairs row pairs whose products share their loads (pair_groups.h):
  // what query_pair does for each pair, bit for bit.
  template <typename PartialOf>
  void query_group(const TiledRow& at, std::int64_t n_pairs, const QueryTile& tile,
                   const PartialOf& partial_of, Scratch& s) const {
    const std::int64_t step = g.axes[Rank - 2].dilation;
    const std::int64_t hk = at.h / this->heads_per_kv, t = at.tile_index;
    for (std::int64_t p = 0; p < n_pairs; ++p) {
      auto& x = s.group_pairs[p];
      x.row_a = at.row + 2 * p * step;
      x.row_b = x.row_a + step;
      std::int64_t ca[Rank];
      row_coords<Rank>(g, x.row_a, ca);
      x.set(g, ca, step, this->bias_strides);
      x.bias_grad_a = partial_of(at, x.row_a);
      x.bias_grad_b = partial_of(at, x.row_b);
    }
    s.group.unite(s.group_pairs, n_pairs);
    s.query_rows.next_item();
    s.query_rows.load_window(k, v, at.b, hk, s.group.rows, t, tile.kv_columns);
    auto [q_cache, dout_cache] = q_and_dout_caches(s);
    for (std::int64_t p = 0; p < n_pairs; ++p) {
      auto& x = s.group_pairs[p];
      x.q_a = q_cache->get(q_scaled, at.b, at.h, x.row_a, t, tile.q_columns);
      x.q_b = q_cache->get(q_scaled, at.b, at.h, x.row_b, t, tile.q_columns);
      x.dout_a = dout_cache->get(dout, at.b, at.h, x.row_a, t, tile.q_columns);
      x.dout_b = dout_cache->get(dout, at.b, at.h, x.row_b, t, tile.q_columns);
    }
    this->for_query_blocks(at.tile, [&](std::int64_t grp, const LaneWindows& w) {
      const std::int64_t block = layout.block(grp, w.i0);
      const bool own = block >= tile.own.begin && block < tile.own.end;
      query_group_block(at.b, at.h, n_pairs, grp, w, own, s);
    });
  }

  // query_pair_block for each pair of a group, the q.k, dout.v and dS.k
  // products of all pairs together.
  LIBNA_NOINLINE void query_group_block(std::int64_t b, std::int64_t h, std::int64_t n_pairs,
                                        std::int64_t grp, const LaneWindows& w, bool own,
                                        Scratch& s) const {
    const std::int64_t dim = this->k_dim, dim_v = this->v_dim, window = w.window;
    const std::int64_t width = this->row_stride, col0 = layout.group_base[grp] + w.i0;
    const std::int64_t kernel = this->last().kernel, head = h % this->heads_per_kv;
    const std::int64_t step = this->bias_strides[Rank];
    auto& first = s.group_pairs[0];
    i32x16 lo, hi;  // (the same lanes in every pair)
    pair_bounds(row_pair(first.q_a, first.q_b, w, first.ca, first.cb), &lo, &hi);
    const float* q_joined[kMaxGroupPairs] = {};
    const float* dout_joined[kMaxGroupPairs] = {};
    float *probs[kMaxGroupPairs] = {}, *dlogits[kMaxGroupPairs] = {}, *acc[kMaxGroupPairs] = {};
    bool masked[kMaxGroupPairs] = {};
    for (std::int64_t p = 0; p < n_pairs; ++p) {
      auto& x = s.group_pairs[p];
      if (own) {
        this->prefetch_lanes(args.dq, b, x.ca, h, grp, w);
        this->prefetch_lanes(args.dq, b, x.cb, h, grp, w);
      }
      join_lanes(this->lanes_at(x.q_a, grp, w), this->lanes_at(x.q_b, grp, w), width, dim, x.q);
      join_lanes(this->lanes_at(x.dout_a, grp, w), this->lanes_at(x.dout_b, grp, w), width, dim_v,
                 x.dout);
      const std::int64_t entries = x.rows.rows.rows.size * window;
      x.probs.resize(entries * kPairLanes);
      x.dlogits.resize(entries * kPairLanes);
      q_joined[p] = x.q.data();
      dout_joined[p] = x.dout.data();
      probs[p] = x.probs.data();
      dlogits[p] = x.dlogits.data();
      masked[p] = pair_masked(row_pair(x.q_a, x.q_b, w, x.ca, x.cb), x.rows);
    }

    // P, then dP, then dS = P (dP - D), as query_pair_block computes them.
    this->window_rows(s.query_rows.bases_a, grp, w, s.ptrs_b);  // k
    qk_group_rows(s.group, n_pairs, q_joined, s.ptrs_b.data(), width, dim, window, probs);
    for (std::int64_t p = 0; p < n_pairs; ++p) {
      auto& x = s.group_pairs[p];
      const f32x16 lse_v = pair::join(simd::load(lse + scalar_row(b, h, x.row_a) + col0),
                                      simd::load(lse + scalar_row(b, h, x.row_b) + col0));
      pair_bias_and_mask(*this, h, row_pair(x.q_a, x.q_b, w, x.ca, x.cb), masked[p], lo, hi,
                         x.key_rows, x.rows, probs[p]);
      const std::int64_t entries = x.rows.rows.rows.size * window;
      for (std::int64_t e = 0; e < entries; ++e) {
        pair::store(probs[p] + e * kPairLanes,
                    pair::exp_nonpositive(pair::load(probs[p] + e * kPairLanes) - lse_v));
      }
    }
    this->window_rows(s.query_rows.bases_b, grp, w, s.ptrs_a);  // v
    qk_group_rows(s.group, n_pairs, dout_joined, s.ptrs_a.data(), width, dim_v, window,
                  dlogits);
    bool mask_keys = false;
    for (std::int64_t p = 0; p < n_pairs; ++p) {
      auto& x = s.group_pairs[p];
      const f32x16 delta_v = pair::join(simd::load(delta + scalar_row(b, h, x.row_a) + col0),
                                        simd::load(delta + scalar_row(b, h, x.row_b) + col0));
      const std::int64_t n = x.rows.rows.rows.size, entries = n * window;
      for (std::int64_t e = 0; e < entries; ++e) {
        const f32x16 pe = pair::load(probs[p] + e * kPairLanes);
        pair::store(dlogits[p] + e * kPairLanes,
                    pe * (pair::load(dlogits[p] + e * kPairLanes) - delta_v));
      }
      if (masked[p]) {
        for (std::int64_t u = 0; u < n; ++u) {
          x.rows.mask(u, lo, hi, dlogits[p] + u * window * kPairLanes, window, 0.0f);
        }
      }
      for (std::int64_t u = 0; s.saved.data && u < n; ++u) {
        const float* pu = probs[p] + u * window * kPairLanes;
        const float* ds = dlogits[p] + u * window * kPairLanes;
        const std::int64_t ia = x.rows.rows.index_a[u], ib = x.rows.rows.index_b[u];
        if (ia >= 0) {
          s.saved.save_query_row(head, x.row_a, x.key_rows.slot[ia] / kernel, col0, w, pu, ds,
                                 kPairLanes);
        }
        if (ib >= 0) {
          s.saved.save_query_row(head, x.row_b, x.rows.b.slot[ib] / kernel, col0, w,
                                 pu + kLanes, ds + kLanes, kPairLanes);
        }
      }
      mask_keys = mask_keys || (masked[p] && !s.query_rows.window_finite_a);
    }

    if (!own) return;
    // dq = scale * dS . k (ptrs_b: the key rows)
    for (std::int64_t p = 0; p < n_pairs; ++p) {
      s.group_pairs[p].acc.resize(dim * kPairLanes);
      acc[p] = s.group_pairs[p].acc.data();
    }
    pv_group_or_pairs(s.group, s.group_pairs, n_pairs, dlogits, s.ptrs_b.data(), window, width,
                      dim, acc, mask_keys, masked, lo, hi, s.ptrs_a);
    for (std::int64_t p = 0; p < n_pairs; ++p) {
      auto& x = s.group_pairs[p];
      this->store_lanes(args.dq, b, x.ca, h, grp, w, simd::splat(this->scale), acc[p],
                        kPairLanes);
      this->store_lanes(args.dq, b, x.cb, h, grp, w, simd::splat(this->scale), acc[p] + kLanes,
                        kPairLanes);
      // The rpb gradient: each half's dS by relative position, its key rows
      // in order (as add_bias_grad sums one row's).
      for (std::int64_t u = 0; u < x.rows.rows.rows.size; ++u) {
        const float* ds = dlogits[p] + u * window * kPairLanes;
        const std::int64_t ia = x.rows.rows.index_a[u], ib = x.rows.rows.index_b[u];
        if (x.bias_grad_a && ia >= 0) {
          add_bias_grad_row(w, x.key_rows.bias[ia], kernel, step, ds, kPairLanes, x.bias_grad_a);
        }
        if (x.bias_grad_b && ib >= 0) {
          add_bias_grad_row(w, x.rows.b.bias[ib], kernel, step, ds + kLanes, kPairLanes,
                            x.bias_grad_b);
        }
      }
    }
  }

  // ---- key pass ----------------------------------------------------------
  // (at.h is the kv head.)
  // q_columns: the columns of the q and dout rows to pack (the strip's when
  // saving P and dS: the query pass packed them).
  void key_row(const TiledRow& at, const ColumnRanges& q_columns,
               Scratch& s) const {
    std::int64_t c[Rank];
    row_coords<Rank>(g, at.row, c);
    query_rows_of<Rank>(g, tables, c, this->bias_strides, s.rows_list);
    const std::int64_t t = at.tile_index;
    RowCaches& rows = s.key_rows;
    rows.next_item();
    for (std::int64_t i = 0; i < this->heads_per_kv; ++i) {
      rows.load_window(q_scaled, dout, at.b, at.h * this->heads_per_kv + i, s.rows_list, t,
                       q_columns, i);
    }
    if (s.saved.data) {
      for_key_blocks(*this, tables, at.tile, [&](std::int64_t grp, const LaneWindows& w) {
        saved_key_block(at.b, at.h, c, grp, w, s);
      });
      return;
    }
    const float* k_row = rows.own_a.get(k, at.b, at.h, at.row, t, key_columns.own[t]);
    const float* v_row = rows.own_b.get(v, at.b, at.h, at.row, t, key_columns.own[t]);
    for_key_blocks(*this, tables, at.tile, [&](std::int64_t grp, const LaneWindows& w) {
      key_block(at.b, at.h, k_row, v_row, c, grp, w, s);
    });
  }

  // Key rows at.row and row_b, the next of its dilation group along the
  // second-to-last axis, in 16 lanes (pair_kernels.h), with P and dS read
  // back from `s.saved`: what key_row does for each, bit for bit, with each
  // load of a q or dout column feeding both.
  void key_pair(const TiledRow& at, std::int64_t row_b, const ColumnRanges& q_columns,
                Scratch& s) const {
    std::int64_t ca[Rank], cb[Rank];
    row_coords<Rank>(g, at.row, ca);
    row_coords<Rank>(g, row_b, cb);
    query_rows_of<Rank>(g, tables, ca, this->bias_strides, s.rows_list);
    query_rows_of<Rank>(g, tables, cb, this->bias_strides, s.key_pair.b);
    s.key_pair.unite(s.rows_list);
    const RowList& rows = s.key_pair.rows.rows;
    s.key_rows.next_item();
    for (std::int64_t i = 0; i < this->heads_per_kv; ++i) {
      s.key_rows.load_window(q_scaled, dout, at.b, at.h * this->heads_per_kv + i, rows,
                             at.tile_index, q_columns, i);
    }
    for_key_blocks(*this, tables, at.tile, [&](std::int64_t grp, const LaneWindows& w) {
      saved_key_pair_block(at.b, at.h, ca, cb, grp, w, s);
    });
  }

  LIBNA_NOINLINE void saved_key_pair_block(std::int64_t b, std::int64_t hk, std::int64_t* ca,
                                           std::int64_t* cb, std::int64_t grp,
                                           const LaneWindows& w, Scratch& s) const {
    const PairRows& kp = s.key_pair;
    const std::int64_t n = kp.rows.rows.size, window = w.window, width = this->row_stride;
    const std::int64_t col0 = layout.group_base[grp] + w.first, kernel = this->last().kernel;
    for (std::int64_t* c : {ca, cb}) {
      this->prefetch_lanes(args.dk, b, c, hk, grp, w);
      this->prefetch_lanes(args.dv, b, c, hk, grp, w);
    }
    s.acc_k.assign(this->k_dim * kPairLanes, 0.0f);
    s.acc_v.assign(this->v_dim * kPairLanes, 0.0f);
    s.probs.resize(n * window * kPairLanes);
    s.dlogits.resize(n * window * kPairLanes);
    i32x8 lo{}, hi{};
    w.entry_bounds(&lo, &hi);
    const i32x16 lo16 = pair::join(lo, lo), hi16 = pair::join(hi, hi);
    // Entries outside a lane's window or in query rows its half does not
    // see hold 0; the values there are read only when they may be
    // non-finite (then masked too).
    const bool masked = w.masked || !kp.both_see_all;
    const bool mask_values =
        masked && !(s.key_rows.window_finite_a && s.key_rows.window_finite_b);
    const f32x8 zero = simd::splat(0.0f);
    for (std::int64_t i = 0; i < this->heads_per_kv; ++i) {
      for (std::int64_t u = 0; u < n; ++u) {
        float* p = s.probs.data() + u * window * kPairLanes;
        float* ds = s.dlogits.data() + u * window * kPairLanes;
        const std::int64_t query_row = kp.rows.rows.rows[u];
        const std::int64_t ia = kp.rows.index_a[u], ib = kp.rows.index_b[u];
        for (int half = 0; half < 2; ++half) {
          const std::int64_t index = half == 0 ? ia : ib;
          float* p_half = p + half * kLanes;
          float* ds_half = ds + half * kLanes;
          if (index < 0) {
            for (std::int64_t j = 0; j < window; ++j) {
              simd::store(p_half + j * kPairLanes, zero);
              simd::store(ds_half + j * kPairLanes, zero);
            }
            continue;
          }
          const std::int64_t slot = half == 0 ? s.rows_list.slot[index] : kp.b.slot[index];
          s.saved.load_key_row(i, query_row, slot / kernel, col0, w, lo, hi, p_half, ds_half,
                               kPairLanes);
        }
      }
      key_window_ptrs(i, n, grp, w, s);
      // dv += P . dout, dk += dS . (scale q)
      pv_pair_range(s.probs.data(), s.ptrs_a.data(), n, window, width, this->v_dim,
                    s.acc_v.data(), mask_values, lo16, hi16, kp.halves.data(), true);
      pv_pair_range(s.dlogits.data(), s.ptrs_b.data(), n, window, width, this->k_dim,
                    s.acc_k.data(), mask_values, lo16, hi16, kp.halves.data(), true);
    }
    for (int half = 0; half < 2; ++half) {
      std::int64_t* c = half == 0 ? ca : cb;
      this->store_lanes(args.dk, b, c, hk, grp, w, simd::splat(1.0f),
                        s.acc_k.data() + half * kLanes, kPairLanes);
      this->store_lanes(args.dv, b, c, hk, grp, w, simd::splat(1.0f),
                        s.acc_v.data() + half * kLanes, kPairLanes);
    }
  }

  // Points ptrs_a at the dout rows and ptrs_b at the (scale q) rows of
  // query head `i` of the kv head (n_rows rows each), at the block's first
  // window column.
  void key_window_ptrs(std::int64_t i, std::int64_t n_rows, std::int64_t grp,
                       const LaneWindows& w, Scratch& s) const {
    const std::int64_t at = layout.group_base[grp] + w.first;
    s.ptrs_a.resize(n_rows);
    s.ptrs_b.resize(n_rows);
    for (std::int64_t r = 0; r < n_rows; ++r) {
      s.ptrs_a[r] = s.key_rows.bases_b[i * n_rows + r] + at;  // dout
      s.ptrs_b[r] = s.key_rows.bases_a[i * n_rows + r] + at;  // q
    }
  }

  // dv += P . dout and dk += dS . (scale q) over one query head's window
  // (ptrs from key_window_ptrs).
  void accumulate_key_grads(const LaneWindows& w, Scratch& s) const {
    const std::int64_t n_rows = s.rows_list.size, width = this->row_stride;
    const bool finite = s.key_rows.window_finite_a && s.key_rows.window_finite_b;
    const LaneWindows* masked = w.masked && !finite ? &w : nullptr;
    pv_range(s.probs.data(), s.ptrs_a.data(), n_rows, w.window, width, this->v_dim,
             s.acc_v.data(), masked, /*accumulate=*/true);
    pv_range(s.dlogits.data(), s.ptrs_b.data(), n_rows, w.window, width, this->k_dim,
             s.acc_k.data(), masked, /*accumulate=*/true);
  }

  // The key block with P and dS read back from `saved`: key i0 + l and
  // query first + j + l are at offset i0 - first - j, column first + j + l.
  void saved_key_block(std::int64_t b, std::int64_t hk, std::int64_t* c,
                       std::int64_t grp, const LaneWindows& w,
                       Scratch& s) const {
    const std::int64_t n_rows = s.rows_list.size, entries = n_rows * w.window;
    const std::int64_t col0 = layout.group_base[grp] + w.first, kernel = this->last().kernel;
    this->prefetch_lanes(args.dk, b, c, hk, grp, w);
    this->prefetch_lanes(args.dv, b, c, hk, grp, w);
    s.acc_k.assign(this->k_dim * kLanes, 0.0f);
    s.acc_v.assign(this->v_dim * kLanes, 0.0f);
    s.probs.resize(entries * kLanes);
    s.dlogits.resize(entries * kLanes);
    for (std::int64_t i = 0; i < this->heads_per_kv; ++i) {
      s.saved.load_key_block(i, col0, kernel, w, s.rows_list, s.probs.data(), s.dlogits.data());
      key_window_ptrs(i, s.rows_list.size, grp, w, s);
      accumulate_key_grads(w, s);
    }
    this->store_lanes(args.dk, b, c, hk, grp, w, simd::splat(1.0f), s.acc_k.data());
    this->store_lanes(args.dv, b, c, hk, grp, w, simd::splat(1.0f), s.acc_v.data());
  }

  void key_block(std::int64_t b, std::int64_t hk, const float* k_row,
                 const float* v_row, std::int64_t* c, std::int64_t grp,
                 const LaneWindows& w, Scratch& s) const {
    const std::int64_t dim = this->k_dim, dim_v = this->v_dim, n_rows = s.rows_list.size;
    const std::int64_t entries = n_rows * w.window, width = this->row_stride;
    const std::int64_t base = layout.group_base[grp], kernel = this->last().kernel;
    const std::int64_t step = this->bias_strides[Rank];
    const float* k_lanes = this->lanes_at(k_row, grp, w);
    const float* v_lanes = this->lanes_at(v_row, grp, w);
    s.acc_k.assign(dim * kLanes, 0.0f);
    s.acc_v.assign(dim_v * kLanes, 0.0f);
    s.probs.resize(entries * kLanes);
    s.dlogits.resize(entries * kLanes);

    for (std::int64_t h = hk * this->heads_per_kv; h < (hk + 1) * this->heads_per_kv; ++h) {
      const std::int64_t i = h - hk * this->heads_per_kv;
      key_window_ptrs(i, s.rows_list.size, grp, w, s);
      qk_rows(k_lanes, width, s.ptrs_b.data(), n_rows, width, dim, w.window, s.probs.data());
      qk_rows(v_lanes, width, s.ptrs_a.data(), n_rows, width, dim_v, w.window,
              s.dlogits.data());
      // Query first + j + l of key i0 + l: relative position i0 - first - j.
      const std::int64_t rel0 = w.i0 - w.first + kernel - 1;
      const std::int64_t j_begin = std::max<std::int64_t>(0, rel0 - (2 * kernel - 2));
      const std::int64_t j_end = std::min(w.window, rel0 + 1);
      for (std::int64_t r = 0; r < n_rows; ++r) {
        const std::int64_t query_row = s.rows_list.rows[r];
        const float* lse_row = lse + scalar_row(b, h, query_row) + base + w.first;
        const float* delta_row = delta + scalar_row(b, h, query_row) + base + w.first;
        float* probs = s.probs.data() + r * w.window * kLanes;
        float* dlog = s.dlogits.data() + r * w.window * kLanes;
        if (!this->bias.empty()) {
          const float* bias_row =
              this->bias.data() + h * this->bias_strides[0] + s.rows_list.bias[r];
          for (std::int64_t j = j_begin; j < j_end; ++j) {
            simd::store(probs + j * kLanes, simd::load(probs + j * kLanes) +
                                                simd::splat(bias_row[(rel0 - j) * step]));
          }
        }
        for (std::int64_t j = 0; j < w.window; ++j) {
          const f32x8 p = simd::exp_nonpositive(simd::load(probs + j * kLanes) -
                                                simd::load(lse_row + j));
          simd::store(probs + j * kLanes, p);
          simd::store(dlog + j * kLanes,
                      p * (simd::load(dlog + j * kLanes) - simd::load(delta_row + j)));
        }
        // Outside a lane's window the entries pair it with queries that do
        // not see it, whose terms may be non-finite: P and dS are 0 there.
        if (w.masked) {
          w.mask(probs, w.window, 0.0f);
          w.mask(dlog, w.window, 0.0f);
        }
      }
      accumulate_key_grads(w, s);
    }

    this->store_lanes(args.dk, b, c, hk, grp, w, simd::splat(1.0f), s.acc_k.data());
    this->store_lanes(args.dv, b, c, hk, grp, w, simd::splat(1.0f), s.acc_v.data());
  }
};

// The per-query row terms in the packed scalar layout [b][h][row][col]:
// lse (copied) and D = dout . out - dlse, in one pass over the tokens in memory order.
template <int Rank, typename T>
void store_row_terms(const detail::BackwardArgs& args, const Geometry<Rank>& g,
                     const ColumnLayout& layout, float* lse, float* delta) {
  const T* out = static_cast<const T*>(args.out.data);
  const T* dout = static_cast<const T*>(args.dout.data);
  const float* lse_in = static_cast<const float*>(args.lse.data);
  // The lse gradient, when given, enters the row terms: D = dout . out - dlse.
  const float* dlse_in = args.dlse ? static_cast<const float*>(args.dlse->data) : nullptr;
  const std::int64_t dim_v = args.out.shape[Rank + 2];
  const std::int64_t od = args.out.strides[Rank + 2], dd = args.dout.strides[Rank + 2];
  parallel_for(g.batch * layout.rows, 1, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t item = begin; item < end; ++item) {
      const std::int64_t row = item % layout.rows, b = item / layout.rows;
      std::int64_t c[Rank];
      row_coords<Rank>(g, row, c);
      for (std::int64_t x = 0; x < layout.extent; ++x) {
        c[Rank - 1] = x;
        const std::int64_t col = layout.column(x);
        for (std::int64_t h = 0; h < g.heads; ++h) {
          const T* o = out + row_offset<Rank>(args.out, b, c, h);
          const T* d_o = dout + row_offset<Rank>(args.dout, b, c, h);
          float dot = 0.0f;
          for (std::int64_t d = 0; d < dim_v; ++d) dot += load<float>(o + d * od) * load<float>(d_o + d * dd);
          const std::int64_t at = ((b * g.heads + h) * layout.rows + row) * layout.width + col;
          delta[at] = dlse_in == nullptr
                          ? dot
                          : dot - load<float>(dlse_in + row_offset<Rank>(*args.dlse, b, c, 0) +
                                              h * args.dlse->strides[Rank + 1]);
          lse[at] = backward_lse(
              load<float>(lse_in + row_offset<Rank>(args.lse, b, c, 0) + h * args.lse.strides[Rank + 1]));
        }
      }
    }
  });
}

}  // namespace libna::cpu::LIBNA_SIMD_NS
