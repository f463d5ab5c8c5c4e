// The vectorised fused backward, included after fast_forward_impl.h by the
// per-instruction-set translation units. float32/float16/bfloat16 only
// (float64 keeps the scalar kernels in backward.h).
//
// Same two passes as backward.h, each built from the forward's lane pieces,
// after one pass over the tokens that puts lse and D_i = dout_i.out_i in the
// packed column layout (store_row_terms):
//  - query pass, lanes = 8 queries: P = exp(q.k + rpb - lse), dP = dout.v,
//    dS = P (dP - D), dq = scale dS.k (and the rpb gradient);
//  - key pass, lanes = 8 keys, window = the queries that see them (the
//    inverse neighbourhood, which shifts by one per key away from borders,
//    just like the forward windows): dv = P.dout and dk = dS.(scale q).
//
// The key pass needs P and dS again. In 1D and 2D the query pass keeps them
// (SavedProbs) in a layout that both passes address with contiguous lane
// loads: five products of the head dim per (query, key) pair instead of
// seven, and one exp instead of two. Each thread then takes whole (b, kv
// head, column strip) items and runs down their rows, each query row
// followed by the key rows whose last query row it was, so that only a ring
// of recent query rows is kept (SavedPlan). 3D (k^3 values per query),
// problems whose ring would not fit SavedProbs::budget(), and too few items
// for the threads compute P and dS again in the key pass instead; both ways
// give bitwise-equal gradients.
#include <numeric>

#include "cpu/backward.h"
#include "cpu/environment.h"

namespace libna::cpu::LIBNA_SIMD_NS {

// Key lanes: each lane's window is the run of queries (group positions)
// that see the key.
inline LaneWindows key_lanes(const AxisTable& table, std::int64_t grp, std::int64_t dilation,
                             std::int64_t i0, std::int64_t lanes) {
  LaneWindows w;
  w.i0 = i0;
  w.lanes = lanes;
  for (std::int64_t l = 0; l < lanes; ++l) {
    const std::int64_t j = grp + (i0 + l) * dilation;
    w.lo[l] = (table.first_query[j] - grp) / dilation;
    w.count[l] = table.query_count[j];
  }
  w.finish();
  return w;
}

inline float lane_sum(f32x8 x) {
  alignas(32) float lanes[kLanes];
  simd::store(lanes, x);
  float s = 0;
  for (int l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

// bias_grad (one head of the rpb gradient) += ds[r][j][lane] summed by
// relative position: entry j of every lane is at first + j - i0 (entries
// outside a lane's window hold 0).
inline void add_bias_grad(const LaneWindows& w, const RowList& rows,
                          std::int64_t kernel, std::int64_t step,
                          const float* ds, float* bias_grad) {
  const std::int64_t rel0 = w.first - w.i0 + kernel - 1;
  const std::int64_t j_begin = std::max<std::int64_t>(0, -rel0);
  const std::int64_t j_end = std::min(w.window, 2 * kernel - 1 - rel0);
  for (std::int64_t r = 0; r < rows.size; ++r) {
    float* head = bias_grad + rows.bias[r];
    const float* row = ds + r * w.window * kLanes;
    for (std::int64_t j = j_begin; j < j_end; ++j) {
      head[(rel0 + j) * step] += lane_sum(simd::load(row + j * kLanes));
    }
  }
}

// Calls block(grp, w) for the key-lane blocks of `kernel`'s last axis (each
// lane's window: the queries that see the key).
template <int Rank, typename Kernel, typename Block>
void for_key_blocks(const Kernel& kernel, const Tables<Rank>& tables, const BlockRange& tile,
                    const Block& block) {
  const AxisParams& last = kernel.last();
  kernel.for_lane_blocks(tile, [&](std::int64_t grp, std::int64_t i0, std::int64_t lanes) {
    return key_lanes(tables.axis[Rank - 1], grp, last.dilation, i0, lanes);
  }, block);
}

// Keys' view: the query rows that see key row `c`, with the rpb offset of
// the key in each one's window.
template <int Rank>
void query_rows_of(const Geometry<Rank>& g, const Tables<Rank>& tables, const std::int64_t* c,
                   const std::int64_t* bias_strides, RowList& out) {
  std::int64_t count[Rank] = {};
  for (int a = 0; a < Rank - 1; ++a) count[a] = tables.axis[a].query_count[c[a]];
  product_rows(
      g, count,
      [&](int a, std::int64_t t) {
        const AxisTable& table = tables.axis[a];
        const std::int64_t query = table.first_query[c[a]] + t * g.axes[a].dilation;
        const AxisWindow& w = table.window[query];
        const std::int64_t index = (c[a] - w.first) / w.step;
        return std::array<std::int64_t, 3>{query, w.rpb_first + index, index};
      },
      bias_strides, out);
}

// The most query rows (positions of the leading axes) that see one key row.
template <int Rank>
std::int64_t inverse_window_rows(const Tables<Rank>& tables) {
  std::int64_t n = 1;
  for (int a = 0; a < Rank - 1; ++a) {
    const auto& count = tables.axis[a].query_count;
    n *= std::max<std::int64_t>(1, *std::max_element(count.begin(), count.end()));
  }
  return n;
}

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

  // The bytes the CPU backward may keep (LIBNA_CPU_SAVED_PROBS_BYTES; 0:
  // compute P and dS again in the key pass).
  static std::int64_t budget() { return environment().saved_probs_bytes; }
  // Floats of the ring: P and dS of `slots` rows of every head.
  std::int64_t size() const { return 2 * heads * slots * key_rows * deltas * width; }
  // The line of P (which = 0) or dS (1) for (head, query row, m, delta).
  float* line(int which, std::int64_t head, std::int64_t row, std::int64_t m,
              std::int64_t delta) const {
    const std::int64_t slot = (which * heads + head) * slots + row % slots;
    return data + ((slot * key_rows + m) * deltas + delta - delta_lo) * width;
  }
};

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
  // In 1D and 2D the query tiles are also the strips (strips()), so that
  // the rpb gradient's partials sum the same blocks either way.
  const ColumnTiles query_tiles, key_tiles;
  const TileColumns query_columns, key_columns;

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
        query_tiles(ring_rows ? strip_tiles()
                              : ColumnTiles(columns, geometry.window_rows(), this->k_dim + this->v_dim)),
        key_tiles(columns, key_window_rows, this->k_dim + this->v_dim),
        query_columns(*this, query_tiles,
                      [&](std::int64_t grp, std::int64_t i0, std::int64_t lanes) {
                        return query_lanes(this->last(), columns.group_len[grp], i0, lanes);
                      }),
        key_columns(*this, key_tiles, [&](std::int64_t grp, std::int64_t i0, std::int64_t lanes) {
          return key_lanes(t.axis[Rank - 1], grp, this->last().dilation, i0, lanes);
        }) {
    std::vector<ColumnRanges> strip_columns;
    if (ring_rows) {
      strip_list = strips();
      for (const Strip& strip : strip_list) {
        strip_columns.push_back(strip.kv_columns);
        strip_columns.push_back(strip.q_columns);
      }
    }
    this->set_row_stride(query_columns.own, query_columns.window, key_columns.own,
                         key_columns.window, strip_columns);
  }

  // SavedProbs for this problem, without memory or slots: every offset a
  // query block writes or a key block reads.
  SavedProbs saved_layout() const {
    SavedProbs p;
    p.heads = this->heads_per_kv;
    p.key_rows = g.window_rows();
    p.width = layout.width;
    std::int64_t lo = 0, hi = 0;
    const auto add = [&](std::int64_t a, std::int64_t b) {
      lo = std::min(lo, a);
      hi = std::max(hi, b);
    };
    this->for_query_blocks(this->whole_row(), [&](std::int64_t, const LaneWindows& w) {
      if (w.window > 0) add(w.first - w.i0, w.first - w.i0 + w.window - 1);
    });
    for_key_blocks(*this, tables, this->whole_row(), [&](std::int64_t, const LaneWindows& w) {
      if (w.window > 0) add(w.i0 - w.first - w.window + 1, w.i0 - w.first);
    });
    p.delta_lo = lo;
    p.deltas = hi - lo + 1;
    return p;
  }

  // A column strip of the saved pipeline: one ring runs down the rows for
  // its key blocks, with the query blocks their windows read (computing P
  // and dS of the neighbouring strips' edge blocks again), and the columns
  // it packs. Strips keep a ring and its rows in L2 when rows are wide.
  struct Strip {
    BlockRange keys, queries;
    ColumnRanges kv_columns, q_columns;
  };
  // The strips of the saved pipeline (1D and 2D; empty in 3D), one per query
  // tile, set by the constructor.
  std::vector<Strip> strip_list;
  // Above L2: the rows stream through in order, and a strip edge costs more
  // (measured 56^2 .. 224^2).
  static constexpr std::int64_t kStripBudget = 768 * 1024;  // bytes

  // Strips whose ring and cached rows fit kStripBudget.
  ColumnTiles strip_tiles() const {
    const std::int64_t channels = this->k_dim + this->v_dim, hpk = this->heads_per_kv;
    const std::int64_t ring = 2 * hpk * g.window_rows() * this->last().kernel * ring_rows;
    const std::int64_t cached = ((ring_rows + 1) * hpk + g.window_rows()) * channels;
    const std::int64_t per_block = kLanes * (ring + cached) * std::int64_t{sizeof(float)};
    // A strip's edge blocks are computed twice (by its neighbours too), so
    // strips are wider than the budget rather than narrower: between fit
    // and 2 fit blocks, and at least 4.
    const std::int64_t fit = std::max<std::int64_t>(4, kStripBudget / per_block);
    const std::int64_t count = std::max<std::int64_t>(1, layout.blocks / fit);
    return ColumnTiles(layout.blocks, (layout.blocks + count - 1) / count);
  }

  std::vector<Strip> strips() const {
    const ColumnTiles& tiles = query_tiles;
    std::vector<Strip> out;
    for (std::int64_t t = 0; t < tiles.count; ++t) {
      Strip strip{tiles[t], tiles[t], ColumnRanges(layout.dilation), ColumnRanges(layout.dilation)};
      strip.keys.end = std::min(strip.keys.end, layout.blocks);
      strip.queries = strip.keys;
      for_key_blocks(*this, tables, strip.keys, [&](std::int64_t grp, const LaneWindows& w) {
        if (w.window == 0) return;
        strip.q_columns.add(grp, w.first, w.first + w.window + kLanes - 1);
        const std::int64_t len = layout.group_len[grp];
        const std::int64_t lo = std::clamp<std::int64_t>(w.first, 0, len - 1);
        const std::int64_t hi = std::clamp<std::int64_t>(w.first + w.window + kLanes - 2, 0, len - 1);
        strip.queries.begin = std::min(strip.queries.begin, layout.block(grp, lo));
        strip.queries.end = std::max(strip.queries.end, layout.block(grp, hi) + 1);
      });
      this->for_query_blocks(strip.queries, [&](std::int64_t grp, const LaneWindows& w) {
        strip.q_columns.add(grp, w.i0, w.i0 + kLanes);
        if (w.window > 0) strip.kv_columns.add(grp, w.first, w.first + w.window + kLanes - 1);
      });
      out.push_back(std::move(strip));
    }
    return out;
  }

  // Starts fetching the tokens the saved pipeline packs for query row `row`
  // (while it works on the row before): its q and dout rows and the key
  // rows its window adds, of every query head of kv head hk.
  void prefetch_rows(std::int64_t b, std::int64_t hk, std::int64_t row, const Strip& strip,
                     Scratch& s) const {
    std::int64_t c[Rank];
    row_coords<Rank>(g, row, c);
    key_rows_of<Rank>(g, c, this->bias_strides, s.rows_list);
    const std::int64_t newest = s.rows_list.rows[s.rows_list.size - 1];
    if (newest > 0) {  // (row 0's window is loaded with row 0)
      k.prefetch_row(b, hk, newest, strip.kv_columns);
      v.prefetch_row(b, hk, newest, strip.kv_columns);
    }
    for (std::int64_t h = hk * this->heads_per_kv; h < (hk + 1) * this->heads_per_kv; ++h) {
      q_scaled.prefetch_row(b, h, row, strip.q_columns);
      dout.prefetch_row(b, h, row, strip.q_columns);
    }
  }

  // (capacity: of the window-row caches, RowCaches::reset.)
  void start_query_pass(Scratch& s, std::int64_t capacity) const {
    s.query_rows.reset(capacity, this->k_dim, this->v_dim, this->row_stride);
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
    // Saving P and dS: the key pass reads these rows again (key_row).
    RowCaches& q_rows = s.saved.data ? s.key_rows : s.query_rows;
    RowCache& q_cache = s.saved.data ? q_rows.window_a : q_rows.own_a;
    RowCache& dout_cache = s.saved.data ? q_rows.window_b : q_rows.own_b;
    if (s.saved.data) q_rows.next_item();
    const float* q_row = q_cache.get(q_scaled, at.b, at.h, at.row, t, tile.q_columns);
    const float* dout_row = dout_cache.get(dout, at.b, at.h, at.row, t, tile.q_columns);
    this->for_query_blocks(at.tile, [&](std::int64_t grp, const LaneWindows& w) {
      const std::int64_t block = layout.block(grp, w.i0);
      const bool own = block >= tile.own.begin && block < tile.own.end;
      query_block(at.b, at.h, at.row, q_row, dout_row, c, grp, w, own ? bias_grad : nullptr,
                  own, s);
    });
  }

  void query_block(std::int64_t b, std::int64_t h, std::int64_t row,
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

    if (s.saved.data) save_block(h % this->heads_per_kv, row, grp, w, s);

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

  // P and dS of a query block into `saved`: entry j (offset first + j - i0)
  // at the block's own columns.
  void save_block(std::int64_t head, std::int64_t row, std::int64_t grp,
                  const LaneWindows& w, Scratch& s) const {
    const std::int64_t col0 = layout.group_base[grp] + w.i0, kernel = this->last().kernel;
    for (std::int64_t r = 0; r < s.rows_list.size; ++r) {
      const std::int64_t m = s.rows_list.slot[r] / kernel;
      const float* probs = s.probs.data() + r * w.window * kLanes;
      const float* dlog = s.dlogits.data() + r * w.window * kLanes;
      for (std::int64_t j = 0; j < w.window; ++j) {
        const std::int64_t delta = w.first + j - w.i0;
        simd::store(s.saved.line(0, head, row, m, delta) + col0, simd::load(probs + j * kLanes));
        simd::store(s.saved.line(1, head, row, m, delta) + col0, simd::load(dlog + j * kLanes));
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

  // Points ptrs_a at the dout rows and ptrs_b at the (scale q) rows of
  // query head `i` of the kv head, at the block's first window column.
  void key_window_ptrs(std::int64_t i, std::int64_t grp, const LaneWindows& w,
                       Scratch& s) const {
    const std::int64_t n_rows = s.rows_list.size, at = layout.group_base[grp] + w.first;
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
      for (std::int64_t r = 0; r < n_rows; ++r) {
        const std::int64_t query_row = s.rows_list.rows[r], m = s.rows_list.slot[r] / kernel;
        float* probs = s.probs.data() + r * w.window * kLanes;
        float* dlog = s.dlogits.data() + r * w.window * kLanes;
        for (std::int64_t j = 0; j < w.window; ++j) {
          const std::int64_t delta = w.i0 - w.first - j;
          simd::store(probs + j * kLanes, simd::load(s.saved.line(0, i, query_row, m, delta) + col0 + j));
          simd::store(dlog + j * kLanes, simd::load(s.saved.line(1, i, query_row, m, delta) + col0 + j));
        }
        // Outside a lane's window the lines hold other pairs (or nothing).
        if (w.masked) {
          w.mask(probs, w.window, 0.0f);
          w.mask(dlog, w.window, 0.0f);
        }
      }
      key_window_ptrs(i, grp, w, s);
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
      key_window_ptrs(i, grp, w, s);
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
// lse (copied) and D = dout . out, in one pass over the tokens in memory order.
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

// drpb = the sum of the query pass' per-item rpb-gradient partials (items
// numbered (b, h, ...) with items_per_head innermost), added in item order:
// deterministic.
template <typename T, int Rank>
void store_bias_grad(const BiasBuffer<Rank, float>& bias_layout, const float* partials,
                     std::int64_t items, std::int64_t items_per_head, const TensorView& drpb) {
  const std::int64_t per_head = bias_layout.strides[0];
  const std::int64_t heads = bias_layout.size / per_head;
  std::vector<float> grad(bias_layout.size, 0.0f);
  for (std::int64_t item = 0; item < items; ++item) {
    const float* partial = partials + item * per_head;
    float* head = grad.data() + ((item / items_per_head) % heads) * per_head;
    for (std::int64_t i = 0; i < per_head; ++i) head[i] += partial[i];
  }
  bias_layout.template store_to<T>(grad, drpb);
}

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
  const bool balanced = (items + threads - 1) / threads * threads * 4 <= items * 5;
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
  SavedProbs saved = pass.saved_layout();
  const std::int64_t tiles = pass.query_tiles.count;
  const SavedPlan plan =
      saved_plan<Rank>(g, tables, g.batch * heads_kv * tiles, saved, pass.ring_rows);
  using Strip = typename Backward<Rank, T>::Strip;
  const std::vector<Strip>& strips = pass.strip_list;  // (read only when plan.slots)
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
  const auto query_item = [&](const TiledRow& at, const QueryTile& tile, Scratch& s) {
    float* partial = nullptr;
    if (bias_head) {
      const std::int64_t item = ((at.b * heads + at.h) * tiles + at.tile_index) * layout.rows + at.row;
      partial = bias_partials + item * bias_head;
      std::fill(partial, partial + bias_head, 0.0f);
    }
    pass.query_row(at, tile, partial, s);
  };

  if (plan.slots == 0) {
    // Query pass, then key pass (at.h: the kv head); tiled rows, as in the
    // forward.
    for_tiled_rows<Scratch>(
        g.batch, heads, layout.rows, pass.query_tiles,
        [&](Scratch& s) {
          pass.start_query_pass(s, 2 * g.window_rows());
          pass.start_saving(s, SavedProbs());
        },
        [&](const TiledRow& at, Scratch& s) { query_item(at, pass.query_tile(at.tile_index), s); });
    for_tiled_rows<Scratch>(
        g.batch, heads_kv, layout.rows, pass.key_tiles,
        [&](Scratch& s) {
          pass.start_key_pass(s, 2 * pass.key_window_rows);
          pass.start_saving(s, SavedProbs());
        },
        [&](const TiledRow& at, Scratch& s) {
          pass.key_row(at, pass.key_columns.window[at.tile_index], s);
        });
  } else {
    // Each (b, kv head, strip) runs down the rows: query row y of every
    // query head, then the key rows whose last query row is y.
    saved.slots = plan.slots;
    const std::int64_t n_strips = tiles;  // the query tiles
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
          if (row + 1 < layout.rows) pass.prefetch_rows(b, hk, row + 1, strip, s);
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
  if (args.drpb) {
    store_bias_grad<T>(bias_layout, bias_partials, query_items, tiles * layout.rows, *args.drpb);
  }
}

}  // namespace libna::cpu::LIBNA_SIMD_NS
