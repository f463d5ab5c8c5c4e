// The vectorised fused backward, included after fast_forward_impl.h by the
// per-instruction-set translation units. float32/float16/bfloat16 only
// (float64 keeps the scalar kernels in backward.h).
//
// Same two passes as backward.h, each built from the forward's lane pieces:
//  - query pass, lanes = 8 queries: P = exp(q.k + rpb - lse), dP = dout.v,
//    dS = P (dP - D), dq = scale dS.k (and the rpb gradient), with D_i =
//    dout_i.out_i; it also stores lse and D in the packed column layout;
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
  w.finish(w.count[0]);
  return w;
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
        return std::pair<std::int64_t, std::int64_t>(query, w.rpb_first + (c[a] - w.first) / w.step);
      },
      bias_strides, out);
}

LIBNA_SIMD_TARGET inline float lane_sum(f32x8 x) {
  alignas(32) float lanes[kLanes];
  simd::store(lanes, x);
  float s = 0;
  for (int l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

template <int Rank, typename T>
struct Backward : LaneKernel<Rank, T> {
  using Base = LaneKernel<Rank, T>;
  using Base::g;
  using Base::k;
  using Base::layout;
  using Base::v;
  const detail::BackwardArgs& args;
  const Tables<Rank>& tables;
  const Packed &q_scaled, &dout;  // packed; q times the softmax scale
  float* lse;                     // [b][h][row][col]
  float* delta;                   // D_i = dout_i . out_i, [b][h][row][col]

  struct Scratch {
    std::vector<float> q, dout, k, v;  // lanes, [d][lane]
    std::vector<float> out_lanes;
    std::vector<float> probs, dlogits;  // [row][window position][lane]
    std::vector<float> acc, acc_k, acc_v;
    RowList rows_list;
    std::vector<const float*> ptrs_a, ptrs_b;
  };

  Backward(const detail::BackwardArgs& a, const Geometry<Rank>& geometry,
           const ColumnLayout& columns, const Tables<Rank>& t, const Packed& packed_k,
           const Packed& packed_v, const Packed& packed_q, const Packed& packed_dout,
           float* lse_buffer, float* delta_buffer)
      : Base(geometry, columns, packed_k, packed_v, a.params, a.rpb, a.scale), args(a),
        tables(t), q_scaled(packed_q), dout(packed_dout), lse(lse_buffer), delta(delta_buffer) {}

  std::int64_t scalar_row(std::int64_t b, std::int64_t h, std::int64_t row) const {
    return ((b * g.heads + h) * layout.rows + row) * layout.width;
  }

  // ---- query pass --------------------------------------------------------
  LIBNA_SIMD_TARGET void query_row(std::int64_t b, std::int64_t h, std::int64_t row,
                                   float* bias_grad, Scratch& s) const {
    std::int64_t c[Rank];
    row_coords<Rank>(g, row, c);
    key_rows_of<Rank>(g, c, this->bias_strides, s.rows_list);
    const AxisParams& last = this->last();
    for (std::int64_t grp = 0; grp < last.dilation; ++grp) {
      const std::int64_t len = group_length(last.length, last.dilation, grp);
      for (std::int64_t i0 = 0; i0 < len; i0 += kLanes) {
        const LaneWindows w = query_lanes(last, len, i0, std::min<std::int64_t>(kLanes, len - i0));
        query_block(b, h, row, c, grp, w, bias_grad, s);
      }
    }
  }

  LIBNA_SIMD_TARGET void query_block(std::int64_t b, std::int64_t h, std::int64_t row,
                                     std::int64_t* c, std::int64_t grp, const LaneWindows& w,
                                     float* bias_grad, Scratch& s) const {
    const std::int64_t dim = k.dim, dim_v = v.dim, n_rows = s.rows_list.size;
    const std::int64_t entries = n_rows * w.window, width = layout.width;
    const std::int64_t hk = h / this->heads_per_kv;
    s.q.resize(dim * kLanes);
    s.dout.resize(dim_v * kLanes);
    s.out_lanes.resize(dim_v * kLanes);
    this->load_lanes(args.q, b, c, h, grp, w, this->scale, s.q.data());
    this->load_lanes(args.dout, b, c, h, grp, w, 1.0f, s.dout.data());
    this->load_lanes(args.out, b, c, h, grp, w, 1.0f, s.out_lanes.data());

    // lse and D per lane (zero for absent lanes), kept for the key pass.
    alignas(32) float lse_lanes[kLanes] = {};
    const float* lse_data = static_cast<const float*>(args.lse.data);
    for (std::int64_t l = 0; l < w.lanes; ++l) {
      c[Rank - 1] = grp + (w.i0 + l) * this->last().dilation;
      lse_lanes[l] = lse_data[row_offset<Rank>(args.lse, b, c, 0) + h * args.lse.strides[Rank + 1]];
    }
    f32x8 delta_v = simd::splat(0.0f);
    for (std::int64_t d = 0; d < dim_v; ++d) {
      delta_v += simd::load(s.dout.data() + d * kLanes) * simd::load(s.out_lanes.data() + d * kLanes);
    }
    const std::int64_t packed = scalar_row(b, h, row) + layout.group_base[grp] + w.i0;
    alignas(32) float delta_lanes[kLanes];
    simd::store(delta_lanes, delta_v);
    std::copy(lse_lanes, lse_lanes + w.lanes, lse + packed);
    std::copy(delta_lanes, delta_lanes + w.lanes, delta + packed);

    // P, then dP, then dS = P (dP - D).
    s.probs.resize(entries * kLanes);
    s.dlogits.resize(entries * kLanes);
    this->logits(s.q.data(), b, h, grp, w, s.rows_list, s.probs.data());
    const f32x8 lse_v = simd::load(lse_lanes);
    for (std::int64_t e = 0; e < entries; ++e) {
      simd::store(s.probs.data() + e * kLanes,
                  simd::exp_nonpositive(simd::load(s.probs.data() + e * kLanes) - lse_v));
    }
    this->window_rows(v, b, hk, grp, w, s.rows_list, s.ptrs_a);
    for (std::int64_t r = 0; r < n_rows; ++r) {
      float* dp = s.dlogits.data() + r * w.window * kLanes;
      if (w.shifted) {
        qk_range<true>(s.dout.data(), s.ptrs_a[r], width, dim_v, w.window, dp);
      } else {
        qk_range<false>(s.dout.data(), s.ptrs_a[r], width, dim_v, w.window, dp);
      }
    }
    for (std::int64_t e = 0; e < entries; ++e) {
      const f32x8 p = simd::load(s.probs.data() + e * kLanes);
      simd::store(s.dlogits.data() + e * kLanes,
                  p * (simd::load(s.dlogits.data() + e * kLanes) - delta_v));
    }

    // dq = scale * dS . k
    this->window_rows(k, b, hk, grp, w, s.rows_list, s.ptrs_b);
    s.acc.resize(dim * kLanes);
    if (w.shifted) {
      pv_range<true>(s.dlogits.data(), s.ptrs_b.data(), n_rows, w.window, width, dim, s.acc.data());
    } else {
      pv_range<false>(s.dlogits.data(), s.ptrs_b.data(), n_rows, w.window, width, dim, s.acc.data());
    }
    this->store_lanes(args.dq, b, c, h, grp, w, simd::splat(this->scale), s.acc.data());

    // The rpb gradient: dS summed by relative position.
    if (bias_grad) {
      const std::int64_t kernel = this->last().kernel, step = this->bias_strides[Rank];
      for (std::int64_t r = 0; r < n_rows; ++r) {
        float* head = bias_grad + s.rows_list.bias[r];
        const float* ds = s.dlogits.data() + r * w.window * kLanes;
        for (std::int64_t j = 0; j < w.window; ++j) {
          const std::int64_t key = w.first + j;
          if (w.shifted) {
            head[(key - w.i0 + kernel - 1) * step] += lane_sum(simd::load(ds + j * kLanes));
          } else {
            for (std::int64_t l = 0; l < w.lanes; ++l) {
              if (w.covers(l, key)) head[(key - (w.i0 + l) + kernel - 1) * step] += ds[j * kLanes + l];
            }
          }
        }
      }
    }
  }

  // ---- key pass ----------------------------------------------------------
  LIBNA_SIMD_TARGET void key_row(std::int64_t b, std::int64_t hk, std::int64_t row,
                                 Scratch& s) const {
    std::int64_t c[Rank];
    row_coords<Rank>(g, row, c);
    query_rows_of<Rank>(g, tables, c, this->bias_strides, s.rows_list);
    const AxisParams& last = this->last();
    for (std::int64_t grp = 0; grp < last.dilation; ++grp) {
      const std::int64_t len = group_length(last.length, last.dilation, grp);
      for (std::int64_t i0 = 0; i0 < len; i0 += kLanes) {
        const LaneWindows w = key_lanes(tables.axis[Rank - 1], grp, last.dilation, i0,
                                        std::min<std::int64_t>(kLanes, len - i0));
        key_block(b, hk, row, c, grp, w, s);
      }
    }
  }

  // Lanes of a packed row at columns col0 .. col0 + lanes (zero beyond).
  LIBNA_SIMD_TARGET static void packed_lanes(const float* row, std::int64_t width,
                                             std::int64_t dim, std::int64_t col0,
                                             std::int64_t lanes, float* dst) {
    for (std::int64_t d = 0; d < dim; ++d) {
      const float* src = row + d * width + col0;
      if (lanes == kLanes) {
        simd::store(dst + d * kLanes, simd::load(src));
      } else {
        for (std::int64_t l = 0; l < kLanes; ++l) dst[d * kLanes + l] = l < lanes ? src[l] : 0.0f;
      }
    }
  }

  LIBNA_SIMD_TARGET void key_block(std::int64_t b, std::int64_t hk, std::int64_t row,
                                   std::int64_t* c, std::int64_t grp, const LaneWindows& w,
                                   Scratch& s) const {
    const std::int64_t dim = k.dim, dim_v = v.dim, n_rows = s.rows_list.size;
    const std::int64_t entries = n_rows * w.window, width = layout.width;
    const std::int64_t base = layout.group_base[grp], kernel = this->last().kernel;
    const std::int64_t step = this->bias_strides[Rank];
    const float neg_inf = -std::numeric_limits<float>::infinity();
    s.k.resize(dim * kLanes);
    s.v.resize(dim_v * kLanes);
    packed_lanes(k.row(b, hk, row), width, dim, base + w.i0, w.lanes, s.k.data());
    packed_lanes(v.row(b, hk, row), width, dim_v, base + w.i0, w.lanes, s.v.data());
    s.acc_k.assign(dim * kLanes, 0.0f);
    s.acc_v.assign(dim_v * kLanes, 0.0f);
    s.acc.resize(std::max(dim, dim_v) * kLanes);
    s.probs.resize(entries * kLanes);
    s.dlogits.resize(entries * kLanes);
    s.ptrs_a.resize(n_rows);
    s.ptrs_b.resize(n_rows);

    for (std::int64_t h = hk * this->heads_per_kv; h < (hk + 1) * this->heads_per_kv; ++h) {
      for (std::int64_t r = 0; r < n_rows; ++r) {
        const std::int64_t query_row = s.rows_list.rows[r];
        const float* q_row = q_scaled.row(b, h, query_row) + base + w.first;
        const float* do_row = dout.row(b, h, query_row) + base + w.first;
        const float* lse_row = lse + scalar_row(b, h, query_row) + base + w.first;
        const float* delta_row = delta + scalar_row(b, h, query_row) + base + w.first;
        s.ptrs_a[r] = do_row;
        s.ptrs_b[r] = q_row;
        float* probs = s.probs.data() + r * w.window * kLanes;
        float* dlog = s.dlogits.data() + r * w.window * kLanes;
        const float* bias_row = this->bias.empty()
                                    ? nullptr
                                    : this->bias.data() + h * this->bias_strides[0] + s.rows_list.bias[r];
        if (w.shifted) {
          qk_range<true>(s.k.data(), q_row, width, dim, w.window, probs);
          qk_range<true>(s.v.data(), do_row, width, dim_v, w.window, dlog);
          for (std::int64_t j = 0; j < w.window; ++j) {
            f32x8 logit = simd::load(probs + j * kLanes);
            if (bias_row) logit += simd::splat(bias_row[(w.i0 - (w.first + j) + kernel - 1) * step]);
            const f32x8 p = simd::exp_nonpositive(logit - simd::load(lse_row + j));
            simd::store(probs + j * kLanes, p);
            simd::store(dlog + j * kLanes,
                        p * (simd::load(dlog + j * kLanes) - simd::load(delta_row + j)));
          }
        } else {
          qk_range<false>(s.k.data(), q_row, width, dim, w.window, probs);
          qk_range<false>(s.v.data(), do_row, width, dim_v, w.window, dlog);
          for (std::int64_t j = 0; j < w.window; ++j) {
            const std::int64_t query = w.first + j;
            for (std::int64_t l = 0; l < kLanes; ++l) {
              float& x = probs[j * kLanes + l];
              if (!w.covers(l, query)) {
                x = neg_inf;
              } else if (bias_row) {
                x += bias_row[(w.i0 + l - query + kernel - 1) * step];
              }
            }
            const f32x8 p = simd::exp_nonpositive(simd::load(probs + j * kLanes) -
                                                  simd::splat(lse_row[j]));
            simd::store(probs + j * kLanes, p);
            simd::store(dlog + j * kLanes,
                        p * (simd::load(dlog + j * kLanes) - simd::splat(delta_row[j])));
          }
        }
      }
      // dv += P . dout and dk += dS . (scale q), over this head's queries.
      for (int which = 0; which < 2; ++which) {
        const float* weights = which == 0 ? s.probs.data() : s.dlogits.data();
        const float* const* rows = which == 0 ? s.ptrs_a.data() : s.ptrs_b.data();
        const std::int64_t n = which == 0 ? dim_v : dim;
        float* acc = which == 0 ? s.acc_v.data() : s.acc_k.data();
        if (w.shifted) {
          pv_range<true>(weights, rows, n_rows, w.window, width, n, s.acc.data());
        } else {
          pv_range<false>(weights, rows, n_rows, w.window, width, n, s.acc.data());
        }
        for (std::int64_t i = 0; i < n * kLanes; ++i) acc[i] += s.acc[i];
      }
    }

    this->store_lanes(args.dk, b, c, hk, grp, w, simd::splat(1.0f), s.acc_k.data());
    this->store_lanes(args.dv, b, c, hk, grp, w, simd::splat(1.0f), s.acc_v.data());
  }
};

template <int Rank, typename T>
void na_backward(const detail::BackwardArgs& args) {
  const Geometry<Rank> g(args.q, args.params);
  const ColumnLayout layout(g);
  const Tables<Rank> tables(g, args.params);
  const std::int64_t heads = g.heads, heads_kv = args.k.shape[Rank + 1];
  const std::int64_t dim = args.q.shape[Rank + 2], dim_v = args.v.shape[Rank + 2];
  const std::int64_t per_token = g.batch * g.tokens;
  const BiasBuffer<Rank, float> bias_layout(args.params, heads);
  const std::int64_t bias_head = args.rpb ? bias_layout.strides[0] : 0;
  const std::int64_t items = g.batch * heads * layout.rows;
  const std::int64_t sizes[] = {per_token * heads_kv * dim, per_token * heads_kv * dim_v,
                                per_token * heads * dim,    per_token * heads * dim_v,
                                per_token * heads,          per_token * heads,
                                items * bias_head};
  std::int64_t total = 0;
  for (std::int64_t size : sizes) total += size;
  float* buffer = workspace(total);
  float* next = buffer;
  const auto carve = [&](std::int64_t size) {
    float* p = next;
    next += size;
    return p;
  };
  const Packed k = pack<Rank, T>(args.k, g, layout, 1.0f, carve(sizes[0]));
  const Packed v = pack<Rank, T>(args.v, g, layout, 1.0f, carve(sizes[1]));
  const Packed q = pack<Rank, T>(args.q, g, layout, static_cast<float>(args.scale), carve(sizes[2]));
  const Packed dout = pack<Rank, T>(args.dout, g, layout, 1.0f, carve(sizes[3]));
  float* lse = carve(sizes[4]);
  float* delta = carve(sizes[5]);
  float* bias_partials = carve(sizes[6]);
  const Backward<Rank, T> bwd(args, g, layout, tables, k, v, q, dout, lse, delta);

  // Query pass; heads innermost, as in the forward. Each item owns one
  // partial of the rpb gradient (summed below in item order: deterministic).
  parallel_for(items, 1, [&](std::int64_t begin, std::int64_t end) {
    typename Backward<Rank, T>::Scratch scratch;
    for (std::int64_t item = begin; item < end; ++item) {
      const std::int64_t h = item % heads, row = (item / heads) % layout.rows,
                         b = item / (layout.rows * heads);
      float* partial = nullptr;
      if (bias_head) {
        partial = bias_partials + item * bias_head;
        std::fill(partial, partial + bias_head, 0.0f);
      }
      bwd.query_row(b, h, row, partial, scratch);
    }
  });
  if (args.drpb) {
    std::vector<float> grad(bias_layout.size, 0.0f);
    for (std::int64_t item = 0; item < items; ++item) {
      const float* partial = bias_partials + item * bias_head;
      float* head = grad.data() + (item % heads) * bias_head;
      for (std::int64_t i = 0; i < bias_head; ++i) head[i] += partial[i];
    }
    bias_layout.template store_to<T>(grad, *args.drpb);
  }

  // Key pass.
  parallel_for(g.batch * heads_kv * layout.rows, 1, [&](std::int64_t begin, std::int64_t end) {
    typename Backward<Rank, T>::Scratch scratch;
    for (std::int64_t item = begin; item < end; ++item) {
      const std::int64_t hk = item % heads_kv, row = (item / heads_kv) % layout.rows,
                         b = item / (layout.rows * heads_kv);
      bwd.key_row(b, hk, row, scratch);
    }
  });
}

}  // namespace libna::cpu::LIBNA_SIMD_NS
