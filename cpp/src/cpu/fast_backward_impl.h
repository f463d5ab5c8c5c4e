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
#include "cpu/backward.h"

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

LIBNA_SIMD_TARGET inline float lane_sum(f32x8 x) {
  alignas(32) float lanes[kLanes];
  simd::store(lanes, x);
  float s = 0;
  for (int l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

// bias_grad (one head of the rpb gradient) += ds[r][j][lane] summed by
// relative position: entry j of every lane is at first + j - i0 (entries
// outside a lane's window hold 0).
LIBNA_SIMD_TARGET inline void add_bias_grad(const LaneWindows& w, const RowList& rows,
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
  // Both passes read windows of dim + dim_v channels (k and v; q and dout).
  const ColumnTiles query_tiles, key_tiles;
  const TileColumns query_columns, key_columns;

  struct Scratch {
    std::vector<float> probs, dlogits;  // [row][window position][lane]
    std::vector<float> acc, acc_k, acc_v;
    RowList rows_list;
    std::vector<const float*> ptrs_a, ptrs_b;
    // Query pass: a = q (own), k (window); b = dout (own), v (window).
    // Key pass: a = k (own), q (window); b = v (own), dout (window); the
    // window bases run over the heads of the kv head, then the rows.
    RowCaches rows;
  };

  Backward(const detail::BackwardArgs& a, const Geometry<Rank>& geometry,
           const ColumnLayout& columns, const Tables<Rank>& t)
      : Base(geometry, columns, a.k, a.v, a.params, a.rpb, a.scale), args(a), tables(t),
        k(a.k, geometry, columns, 1.0f), v(a.v, geometry, columns, 1.0f),
        q_scaled(a.q, geometry, columns, static_cast<float>(a.scale)),
        dout(a.dout, geometry, columns, 1.0f),
        key_window_rows(inverse_window_rows(t) * this->heads_per_kv),
        query_tiles(columns, geometry.window_rows(), this->k_dim + this->v_dim),
        key_tiles(columns, key_window_rows, this->k_dim + this->v_dim),
        query_columns(*this, query_tiles,
                      [&](std::int64_t grp, std::int64_t i0, std::int64_t lanes) {
                        return query_lanes(this->last(), columns.group_len[grp], i0, lanes);
                      }),
        key_columns(*this, key_tiles, [&](std::int64_t grp, std::int64_t i0, std::int64_t lanes) {
          return key_lanes(t.axis[Rank - 1], grp, this->last().dilation, i0, lanes);
        }) {}

  void start_query_pass(Scratch& s) const {
    s.rows.reset(g.window_rows(), this->k_dim, this->v_dim, layout.width);
  }
  void start_key_pass(Scratch& s) const {
    s.rows.reset(key_window_rows, this->k_dim, this->v_dim, layout.width);
  }

  std::int64_t scalar_row(std::int64_t b, std::int64_t h, std::int64_t row) const {
    return ((b * g.heads + h) * layout.rows + row) * layout.width;
  }

  // ---- query pass --------------------------------------------------------
  LIBNA_SIMD_TARGET void query_row(const TiledRow& at, float* bias_grad, Scratch& s) const {
    std::int64_t c[Rank];
    row_coords<Rank>(g, at.row, c);
    key_rows_of<Rank>(g, c, this->bias_strides, s.rows_list);
    const std::int64_t hk = at.h / this->heads_per_kv, t = at.tile_index;
    RowCaches& rows = s.rows;
    rows.next_item();
    rows.load_window(k, v, at.b, hk, s.rows_list, t, query_columns.window[t]);
    const float* q_row = rows.own_a.get(q_scaled, at.b, at.h, at.row, t, query_columns.own[t]);
    const float* dout_row = rows.own_b.get(dout, at.b, at.h, at.row, t, query_columns.own[t]);
    this->for_query_blocks(at.tile, [&](std::int64_t grp, const LaneWindows& w) {
      query_block(at.b, at.h, at.row, q_row, dout_row, c, grp, w, bias_grad, s);
    });
  }

  LIBNA_SIMD_TARGET void query_block(std::int64_t b, std::int64_t h, std::int64_t row,
                                     const float* q_row, const float* dout_row, std::int64_t* c,
                                     std::int64_t grp, const LaneWindows& w, float* bias_grad,
                                     Scratch& s) const {
    const std::int64_t dim = this->k_dim, dim_v = this->v_dim, n_rows = s.rows_list.size;
    const std::int64_t entries = n_rows * w.window, width = layout.width;
    // Lanes of the packed q (times scale) and dout; lse and D from the
    // row terms (zero beyond the lanes).
    const std::int64_t col0 = layout.group_base[grp] + w.i0;
    const float* q_lanes = this->lanes_at(q_row, grp, w);
    const float* dout_lanes = this->lanes_at(dout_row, grp, w);
    const f32x8 lse_v = simd::load(lse + scalar_row(b, h, row) + col0);
    const f32x8 delta_v = simd::load(delta + scalar_row(b, h, row) + col0);

    // P, then dP, then dS = P (dP - D).
    s.probs.resize(entries * kLanes);
    s.dlogits.resize(entries * kLanes);
    this->window_rows(s.rows.bases_a, grp, w, s.ptrs_b);
    this->logits(q_lanes, width, h, w, s.rows_list, s.ptrs_b.data(), s.probs.data());
    for (std::int64_t e = 0; e < entries; ++e) {
      simd::store(s.probs.data() + e * kLanes,
                  simd::exp_nonpositive(simd::load(s.probs.data() + e * kLanes) - lse_v));
    }
    this->window_rows(s.rows.bases_b, grp, w, s.ptrs_a);
    qk_rows(dout_lanes, width, s.ptrs_a.data(), n_rows, width, dim_v, w.window,
            s.dlogits.data());
    for (std::int64_t e = 0; e < entries; ++e) {
      const f32x8 p = simd::load(s.probs.data() + e * kLanes);
      simd::store(s.dlogits.data() + e * kLanes,
                  p * (simd::load(s.dlogits.data() + e * kLanes) - delta_v));
    }

    // dq = scale * dS . k (ptrs_b: the key rows)
    s.acc.resize(dim * kLanes);
    pv_range(s.dlogits.data(), s.ptrs_b.data(), n_rows, w.window, width, dim, s.acc.data());
    this->store_lanes(args.dq, b, c, h, grp, w, simd::splat(this->scale), s.acc.data());

    // The rpb gradient: dS summed by relative position.
    if (bias_grad) {
      add_bias_grad(w, s.rows_list, this->last().kernel, this->bias_strides[Rank],
                    s.dlogits.data(), bias_grad);
    }
  }

  // ---- key pass ----------------------------------------------------------
  // (at.h is the kv head.)
  LIBNA_SIMD_TARGET void key_row(const TiledRow& at, Scratch& s) const {
    std::int64_t c[Rank];
    row_coords<Rank>(g, at.row, c);
    query_rows_of<Rank>(g, tables, c, this->bias_strides, s.rows_list);
    const std::int64_t t = at.tile_index;
    RowCaches& rows = s.rows;
    rows.next_item();
    for (std::int64_t i = 0; i < this->heads_per_kv; ++i) {
      rows.load_window(q_scaled, dout, at.b, at.h * this->heads_per_kv + i, s.rows_list, t,
                       key_columns.window[t], i);
    }
    const float* k_row = rows.own_a.get(k, at.b, at.h, at.row, t, key_columns.own[t]);
    const float* v_row = rows.own_b.get(v, at.b, at.h, at.row, t, key_columns.own[t]);
    for_key_blocks(*this, tables, at.tile, [&](std::int64_t grp, const LaneWindows& w) {
      key_block(at.b, at.h, k_row, v_row, c, grp, w, s);
    });
  }

  LIBNA_SIMD_TARGET void key_block(std::int64_t b, std::int64_t hk, const float* k_row,
                                   const float* v_row, std::int64_t* c, std::int64_t grp,
                                   const LaneWindows& w, Scratch& s) const {
    const std::int64_t dim = this->k_dim, dim_v = this->v_dim, n_rows = s.rows_list.size;
    const std::int64_t entries = n_rows * w.window, width = layout.width;
    const std::int64_t base = layout.group_base[grp], kernel = this->last().kernel;
    const std::int64_t step = this->bias_strides[Rank];
    const float* k_lanes = this->lanes_at(k_row, grp, w);
    const float* v_lanes = this->lanes_at(v_row, grp, w);
    s.acc_k.assign(dim * kLanes, 0.0f);
    s.acc_v.assign(dim_v * kLanes, 0.0f);
    s.probs.resize(entries * kLanes);
    s.dlogits.resize(entries * kLanes);
    s.ptrs_a.resize(n_rows);
    s.ptrs_b.resize(n_rows);

    for (std::int64_t h = hk * this->heads_per_kv; h < (hk + 1) * this->heads_per_kv; ++h) {
      const std::int64_t i = h - hk * this->heads_per_kv;
      for (std::int64_t r = 0; r < n_rows; ++r) {
        s.ptrs_a[r] = s.rows.bases_b[i * n_rows + r] + base + w.first;  // dout
        s.ptrs_b[r] = s.rows.bases_a[i * n_rows + r] + base + w.first;  // q
      }
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
        if (w.masked) w.mask(probs, w.window);
        for (std::int64_t j = 0; j < w.window; ++j) {
          const f32x8 p = simd::exp_nonpositive(simd::load(probs + j * kLanes) -
                                                simd::load(lse_row + j));
          simd::store(probs + j * kLanes, p);
          simd::store(dlog + j * kLanes,
                      p * (simd::load(dlog + j * kLanes) - simd::load(delta_row + j)));
        }
      }
      // dv += P . dout and dk += dS . (scale q), over this head's queries.
      for (int which = 0; which < 2; ++which) {
        const float* weights = which == 0 ? s.probs.data() : s.dlogits.data();
        const float* const* rows = which == 0 ? s.ptrs_a.data() : s.ptrs_b.data();
        const std::int64_t n = which == 0 ? dim_v : dim;
        float* acc = which == 0 ? s.acc_v.data() : s.acc_k.data();
        pv_range(weights, rows, n_rows, w.window, width, n, acc, /*accumulate=*/true);
      }
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
          delta[at] = dot;
          lse[at] = lse_in[row_offset<Rank>(args.lse, b, c, 0) + h * args.lse.strides[Rank + 1]];
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
  // lse and D in the packed column layout (the key pass reads their padding
  // too), then one rpb-gradient partial per query-pass item.
  const std::int64_t query_items = g.batch * heads * pass.query_tiles.count * layout.rows;
  float* buffer = workspace(2 * lanes_size + query_items * bias_head);
  float* bias_partials = buffer + 2 * lanes_size;
  pass.lse = buffer;
  pass.delta = buffer + lanes_size;
  std::fill(buffer, buffer + 2 * lanes_size, 0.0f);
  store_row_terms<Rank, T>(args, g, layout, pass.lse, pass.delta);
  using Scratch = typename Backward<Rank, T>::Scratch;

  // Query pass; tiled rows, as in the forward. Each item owns one partial
  // of the rpb gradient (summed below in item order: deterministic).
  for_tiled_rows<Scratch>(
      g.batch, heads, layout.rows, pass.query_tiles, [&](Scratch& s) { pass.start_query_pass(s); },
      [&](const TiledRow& at, Scratch& s) {
        float* partial = nullptr;
        if (bias_head) {
          partial = bias_partials + at.item * bias_head;
          std::fill(partial, partial + bias_head, 0.0f);
        }
        pass.query_row(at, partial, s);
      });
  if (args.drpb) {
    store_bias_grad<T>(bias_layout, bias_partials, query_items,
                       pass.query_tiles.count * layout.rows, *args.drpb);
  }

  // Key pass (at.h: the kv head).
  for_tiled_rows<Scratch>(
      g.batch, heads_kv, layout.rows, pass.key_tiles, [&](Scratch& s) { pass.start_key_pass(s); },
      [&](const TiledRow& at, Scratch& s) { pass.key_row(at, s); });
}

}  // namespace libna::cpu::LIBNA_SIMD_NS
