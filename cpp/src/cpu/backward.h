// The scalar CPU gradient kernels, written once for every rank and dtype and
// run for float64 (instantiated per rank by instantiate.cpp.in, like
// kernels.h). Its neighbourhood tables (AxisTable, Tables) serve the
// vectorised kernels too.
//
// Every gradient is computed by gathering, so no two threads ever write the
// same element and results do not depend on the thread count:
//  - a query pass computes, per query, dq (and the row terms D_i) and adds
//    the bias gradient into a partial owned by its block of queries;
//  - a key pass computes, per key, dk and dv from the queries that see that
//    key (the "inverse neighbourhood": along each axis a contiguous run of
//    same-group queries, because window starts and ends never decrease).
#pragma once

#include <array>
#include <stdexcept>

#include "cpu/kernels.h"

namespace libna::cpu {

// Along one axis: each position's window, and for each key position the
// queries that see it: first_query, first_query + dilation, ... (count of them).
struct AxisTable {
  std::vector<AxisWindow> window;
  std::vector<std::int64_t> first_query, query_count;

  explicit AxisTable(const AxisParams& p)
      : window(p.length), first_query(p.length, 0), query_count(p.length, 0) {
    std::vector<std::int64_t> hits(p.length, 0);
    for (std::int64_t i = 0; i < p.length; ++i) {
      const AxisWindow w = axis_window(i, p);
      window[i] = w;
      for (std::int64_t t = 0; t < w.count; ++t) {
        const std::int64_t j = w.first + t * w.step;
        if (hits[j]++ == 0) first_query[j] = i;
        query_count[j] = (i - first_query[j]) / p.dilation + 1;
      }
    }
    for (std::int64_t j = 0; j < p.length; ++j) {
      if (hits[j] != query_count[j]) {  // would mean a window rule that is not monotone
        throw std::logic_error("[libna] internal error: the queries that see key " +
                               std::to_string(j) + " are not a contiguous run");
      }
    }
  }
};

template <int Rank>
struct Tables {
  std::array<AxisTable, Rank> axis;
  std::int64_t slot_stride[Rank];

  template <std::size_t... I>
  Tables(const Geometry<Rank>& g, const NaParams& p, std::index_sequence<I...>)
      : axis{AxisTable(g.axes[I])...} {
    slot_stride[Rank - 1] = 1;
    for (int a = Rank - 2; a >= 0; --a) slot_stride[a] = slot_stride[a + 1] * p.kernel_size[a + 1];
  }
  Tables(const Geometry<Rank>& g, const NaParams& p)
      : Tables(g, p, std::make_index_sequence<Rank>{}) {}
};

// The queries that see one key, with the key's slot and bias offset (into a
// contiguous [heads, 2k-1, ...] buffer) in each query's window.
template <int Rank>
struct QueryList {
  std::vector<std::array<std::int64_t, Rank>> coords;
  std::vector<std::int64_t> slot, bias;
  std::int64_t size = 0;
};

template <int Rank>
void list_queries(const Tables<Rank>& tables, const std::int64_t* key, const std::int64_t* bias_strides,
                  QueryList<Rank>& out) {
  std::int64_t first[Rank], count[Rank], step[Rank];
  std::int64_t n = 1;
  for (int a = 0; a < Rank; ++a) {
    first[a] = tables.axis[a].first_query[key[a]];
    count[a] = tables.axis[a].query_count[key[a]];
    step[a] = tables.axis[a].window[key[a]].step;
    n *= count[a];
  }
  out.size = n;
  if (static_cast<std::int64_t>(out.slot.size()) < n) {
    out.coords.resize(n);
    out.slot.resize(n);
    out.bias.resize(n);
  }
  std::int64_t t[Rank] = {};
  for (std::int64_t i = 0; i < n; ++i) {
    std::int64_t slot = 0, bias = 0;
    for (int a = 0; a < Rank; ++a) {
      const std::int64_t qa = first[a] + t[a] * step[a];
      const AxisWindow& w = tables.axis[a].window[qa];
      const std::int64_t pos = (key[a] - w.first) / w.step;  // key's place in the window
      out.coords[i][a] = qa;
      slot += pos * tables.slot_stride[a];
      if (bias_strides) bias += (w.rpb_first + pos) * bias_strides[a];
    }
    out.slot[i] = slot;
    out.bias[i] = bias;
    for (int a = Rank - 1; a >= 0; --a) {
      if (++t[a] < count[a]) break;
      t[a] = 0;
    }
  }
}

// Each block of tuning::kScalarQueriesPerBlock queries in the query pass owns
// one bias-gradient partial, and partials are summed in block order
// (deterministic).

// Runs query_fn(b, coords, bias_partial) over every query, in fixed blocks,
// then sums the partials into `bias_grad` (when bias_size > 0).
template <int Rank, typename Acc, typename QueryFn>
void query_pass(const Geometry<Rank>& g, std::int64_t bias_size, std::vector<Acc>& bias_grad,
                QueryFn&& query_fn) {
  constexpr std::int64_t kBlock = tuning::kScalarQueriesPerBlock;
  const std::int64_t blocks_per_batch = (g.tokens + kBlock - 1) / kBlock;
  const std::int64_t blocks = g.batch * blocks_per_batch;
  std::vector<std::vector<Acc>> partials(bias_size > 0 ? blocks : 0);
  parallel_for(blocks, 1, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t block = begin; block < end; ++block) {
      const std::int64_t b = block / blocks_per_batch;
      const std::int64_t first = (block % blocks_per_batch) * kBlock;
      const std::int64_t last = std::min(g.tokens, first + kBlock);
      Acc* partial = nullptr;
      if (bias_size > 0) {
        partials[block].assign(bias_size, Acc(0));
        partial = partials[block].data();
      }
      for (std::int64_t token = first; token < last; ++token) {
        std::int64_t c[Rank];
        g.coords(token, c);
        query_fn(b, c, partial);
      }
    }
  });
  if (bias_size > 0) {
    bias_grad.assign(bias_size, Acc(0));
    for (const auto& partial : partials) {
      for (std::int64_t i = 0; i < bias_size; ++i) bias_grad[i] += partial[i];
    }
  }
}

// Runs key_fn(b, coords) over every key position.
template <int Rank, typename KeyFn>
void key_pass(const Geometry<Rank>& g, KeyFn&& key_fn) {
  parallel_for(g.batch * g.tokens, tuning::kScalarTokensPerTask, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t item = begin; item < end; ++item) {
      std::int64_t c[Rank];
      g.coords(item % g.tokens, c);
      key_fn(item / g.tokens, c);
    }
  });
}

template <int Rank, typename T>
void na_backward(const detail::BackwardArgs& args) {
  using Acc = acc_t<T>;
  const TensorView &q = args.q, &k = args.k, &v = args.v, &out = args.out, &dout = args.dout,
                   &lse = args.lse;
  const NaParams& p = args.params;
  const Geometry<Rank> g(q, p);
  const Tables<Rank> tables(g, p);
  const std::int64_t heads_kv = k.shape[Rank + 1], group = g.heads / heads_kv;
  const std::int64_t dim = q.shape[Rank + 2], dim_v = v.shape[Rank + 2];
  const Acc scale = static_cast<Acc>(args.scale);
  const T *q_data = static_cast<const T*>(q.data), *k_data = static_cast<const T*>(k.data),
          *v_data = static_cast<const T*>(v.data), *out_data = static_cast<const T*>(out.data),
          *dout_data = static_cast<const T*>(dout.data);
  const Acc* lse_data = static_cast<const Acc*>(lse.data);
  const auto lse_at = [&](std::int64_t b, const std::int64_t* c, std::int64_t h) {
    return backward_lse(load<Acc>(lse_data + row_offset<Rank>(lse, b, c, 0) + h * lse.strides[Rank + 1]));
  };
  // The lse gradient, when given, enters the row terms: D_i = dout_i.out_i - dlse_i.
  const auto dlse_at = [&](std::int64_t b, const std::int64_t* c, std::int64_t h) {
    if (args.dlse == nullptr) return Acc(0);
    const TensorView& dl = *args.dlse;
    return load<Acc>(static_cast<const Acc*>(dl.data) + row_offset<Rank>(dl, b, c, 0) +
                     h * dl.strides[Rank + 1]);
  };

  const BiasBuffer<Rank, Acc> bias_layout(p, g.heads);
  const std::vector<Acc> bias = args.rpb ? bias_layout.template load_from<T>(*args.rpb)
                                         : std::vector<Acc>();
  const std::int64_t* bias_strides = args.rpb ? bias_layout.strides + 1 : nullptr;
  // Row terms D_i = dout_i . out_i, indexed [b, token, h].
  std::vector<Acc> row_term(g.batch * g.tokens * g.heads);
  const auto row_index = [&](std::int64_t b, const std::int64_t* c, std::int64_t h) {
    std::int64_t token = 0;
    for (int a = 0; a < Rank; ++a) token = token * g.spatial[a] + c[a];
    return (b * g.tokens + token) * g.heads + h;
  };

  // Query pass: D_i, dq and the bias gradient.
  std::vector<Acc> bias_grad;
  {
    struct Scratch {
      KeyList keys;
      std::vector<Acc> q_row, dout_row, dq_row;
    };
    query_pass<Rank, Acc>(g, args.rpb ? bias_layout.size : 0, bias_grad,
                          [&](std::int64_t b, const std::int64_t* c, Acc* bias_partial) {
      thread_local Scratch s;
      s.q_row.resize(dim);
      s.dout_row.resize(dim_v);
      s.dq_row.resize(dim);
      AxisWindow w[Rank];
      for (int a = 0; a < Rank; ++a) w[a] = tables.axis[a].window[c[a]];
      list_keys<Rank>(w, p, k.strides + 1, v.strides + 1, bias_strides, s.keys);
      for (std::int64_t h = 0; h < g.heads; ++h) {
        const std::int64_t hk = h / group;
        load_row(q_data + row_offset<Rank>(q, b, c, h), q.strides[Rank + 2], Acc(1),
                 s.q_row.data(), dim);
        load_row(dout_data + row_offset<Rank>(dout, b, c, h), dout.strides[Rank + 2], Acc(1),
                 s.dout_row.data(), dim_v);
        const Acc d_i = dot(s.dout_row.data(), out_data + row_offset<Rank>(out, b, c, h),
                            dim_v, out.strides[Rank + 2]) - dlse_at(b, c, h);
        row_term[row_index(b, c, h)] = d_i;
        const Acc lse_i = lse_at(b, c, h);
        const T* k_head = k_data + b * k.strides[0] + hk * k.strides[Rank + 1];
        const T* v_head = v_data + b * v.strides[0] + hk * v.strides[Rank + 1];
        const Acc* bias_head = args.rpb ? bias.data() + h * bias_layout.strides[0] : nullptr;
        std::fill(s.dq_row.begin(), s.dq_row.end(), Acc(0));
        for (std::int64_t t = 0; t < s.keys.size; ++t) {
          Acc logit = scale * dot(s.q_row.data(), k_head + s.keys.k[t], dim, k.strides[Rank + 2]);
          if (bias_head) logit += bias_head[s.keys.bias[t]];
          const Acc prob = std::exp(logit - lse_i);
          const Acc dprob = dot(s.dout_row.data(), v_head + s.keys.v[t], dim_v, v.strides[Rank + 2]);
          const Acc dlogit = prob * (dprob - d_i);
          axpy(dlogit, k_head + s.keys.k[t], k.strides[Rank + 2], s.dq_row.data(), dim);
          if (bias_partial) bias_partial[h * bias_layout.strides[0] + s.keys.bias[t]] += dlogit;
        }
        store_row(s.dq_row.data(), scale, static_cast<T*>(args.dq.data) +
                  row_offset<Rank>(args.dq, b, c, h), args.dq.strides[Rank + 2], dim);
      }
    });
  }
  if (args.drpb) bias_layout.template store_to<T>(bias_grad, *args.drpb);

  // Key pass: dk and dv from the queries that see each key.
  struct Scratch {
    QueryList<Rank> queries;
    std::vector<Acc> k_row, v_row, q_row, dout_row, dk_row, dv_row;
  };
  key_pass<Rank>(g, [&](std::int64_t b, const std::int64_t* c) {
    thread_local Scratch s;
    s.k_row.resize(dim);
    s.q_row.resize(dim);
    s.dk_row.resize(dim);
    s.v_row.resize(dim_v);
    s.dout_row.resize(dim_v);
    s.dv_row.resize(dim_v);
    list_queries<Rank>(tables, c, bias_strides, s.queries);
    for (std::int64_t hk = 0; hk < heads_kv; ++hk) {
      load_row(k_data + row_offset<Rank>(k, b, c, hk), k.strides[Rank + 2], Acc(1),
               s.k_row.data(), dim);
      load_row(v_data + row_offset<Rank>(v, b, c, hk), v.strides[Rank + 2], Acc(1),
               s.v_row.data(), dim_v);
      std::fill(s.dk_row.begin(), s.dk_row.end(), Acc(0));
      std::fill(s.dv_row.begin(), s.dv_row.end(), Acc(0));
      for (std::int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const Acc* bias_head = args.rpb ? bias.data() + h * bias_layout.strides[0] : nullptr;
        for (std::int64_t i = 0; i < s.queries.size; ++i) {
          const std::int64_t* ci = s.queries.coords[i].data();
          const T* q_ptr = q_data + row_offset<Rank>(q, b, ci, h);
          const T* dout_ptr = dout_data + row_offset<Rank>(dout, b, ci, h);
          Acc logit = scale * dot(s.k_row.data(), q_ptr, dim, q.strides[Rank + 2]);
          if (bias_head) logit += bias_head[s.queries.bias[i]];
          const Acc prob = std::exp(logit - lse_at(b, ci, h));
          const Acc dprob = dot(s.v_row.data(), dout_ptr, dim_v, dout.strides[Rank + 2]);
          const Acc dlogit = prob * (dprob - row_term[row_index(b, ci, h)]);
          axpy(dlogit, q_ptr, q.strides[Rank + 2], s.dk_row.data(), dim);
          axpy(prob, dout_ptr, dout.strides[Rank + 2], s.dv_row.data(), dim_v);
        }
      }
      store_row(s.dk_row.data(), scale, static_cast<T*>(args.dk.data) +
                row_offset<Rank>(args.dk, b, c, hk), args.dk.strides[Rank + 2], dim);
      store_row(s.dv_row.data(), Acc(1), static_cast<T*>(args.dv.data) +
                row_offset<Rank>(args.dv, b, c, hk), args.dv.strides[Rank + 2], dim_v);
    }
  });
}

template <int Rank, typename T>
void na_qk_backward(const detail::QkBackwardArgs& args) {
  using Acc = acc_t<T>;
  const TensorView &dattn = args.dattn, &q = args.q, &k = args.k;
  const NaParams& p = args.params;
  const Geometry<Rank> g(q, p);
  const Tables<Rank> tables(g, p);
  const std::int64_t heads_kv = k.shape[Rank + 1], group = g.heads / heads_kv;
  const std::int64_t dim = q.shape[Rank + 2], ad = dattn.strides[Rank + 2];
  const T *dattn_data = static_cast<const T*>(dattn.data), *q_data = static_cast<const T*>(q.data),
          *k_data = static_cast<const T*>(k.data);
  const BiasBuffer<Rank, Acc> bias_layout(p, g.heads);
  const std::int64_t* bias_strides = args.drpb ? bias_layout.strides + 1 : nullptr;

  std::vector<Acc> bias_grad;
  query_pass<Rank, Acc>(g, args.drpb ? bias_layout.size : 0, bias_grad,
                        [&](std::int64_t b, const std::int64_t* c, Acc* bias_partial) {
    thread_local KeyList keys;
    thread_local std::vector<Acc> dq_row;
    dq_row.resize(dim);
    AxisWindow w[Rank];
    for (int a = 0; a < Rank; ++a) w[a] = tables.axis[a].window[c[a]];
    list_keys<Rank>(w, p, k.strides + 1, nullptr, bias_strides, keys);
    for (std::int64_t h = 0; h < g.heads; ++h) {
      const T* row = dattn_data + row_offset<Rank>(dattn, b, c, h);
      const T* k_head = k_data + b * k.strides[0] + (h / group) * k.strides[Rank + 1];
      std::fill(dq_row.begin(), dq_row.end(), Acc(0));
      for (std::int64_t t = 0; t < keys.size; ++t) {
        const Acc da = load<Acc>(row + keys.slot[t] * ad);
        axpy(da, k_head + keys.k[t], k.strides[Rank + 2], dq_row.data(), dim);
        if (bias_partial) bias_partial[h * bias_layout.strides[0] + keys.bias[t]] += da;
      }
      store_row(dq_row.data(), Acc(1), static_cast<T*>(args.dq.data) +
                row_offset<Rank>(args.dq, b, c, h), args.dq.strides[Rank + 2], dim);
    }
  });
  if (args.drpb) bias_layout.template store_to<T>(bias_grad, *args.drpb);

  key_pass<Rank>(g, [&](std::int64_t b, const std::int64_t* c) {
    thread_local QueryList<Rank> queries;
    thread_local std::vector<Acc> dk_row;
    dk_row.resize(dim);
    list_queries<Rank>(tables, c, nullptr, queries);
    for (std::int64_t hk = 0; hk < heads_kv; ++hk) {
      std::fill(dk_row.begin(), dk_row.end(), Acc(0));
      for (std::int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (std::int64_t i = 0; i < queries.size; ++i) {
          const std::int64_t* ci = queries.coords[i].data();
          const Acc da = load<Acc>(dattn_data + row_offset<Rank>(dattn, b, ci, h) +
                                   queries.slot[i] * ad);
          axpy(da, q_data + row_offset<Rank>(q, b, ci, h), q.strides[Rank + 2], dk_row.data(), dim);
        }
      }
      store_row(dk_row.data(), Acc(1), static_cast<T*>(args.dk.data) +
                row_offset<Rank>(args.dk, b, c, hk), args.dk.strides[Rank + 2], dim);
    }
  });
}

template <int Rank, typename T>
void na_av_backward(const detail::AvBackwardArgs& args) {
  using Acc = acc_t<T>;
  const TensorView &dout = args.dout, &attn = args.attn, &v = args.v, &dattn = args.dattn;
  const NaParams& p = args.params;
  const Geometry<Rank> g(attn, p);
  const Tables<Rank> tables(g, p);
  const std::int64_t heads_kv = v.shape[Rank + 1], group = g.heads / heads_kv;
  const std::int64_t dim_v = v.shape[Rank + 2], slots = p.window_size();
  const T *dout_data = static_cast<const T*>(dout.data), *attn_data = static_cast<const T*>(attn.data),
          *v_data = static_cast<const T*>(v.data);
  T* dattn_data = static_cast<T*>(dattn.data);

  std::vector<Acc> unused;
  query_pass<Rank, Acc>(g, 0, unused, [&](std::int64_t b, const std::int64_t* c, Acc*) {
    thread_local KeyList keys;
    thread_local std::vector<Acc> dout_row;
    dout_row.resize(dim_v);
    AxisWindow w[Rank];
    for (int a = 0; a < Rank; ++a) w[a] = tables.axis[a].window[c[a]];
    list_keys<Rank>(w, p, nullptr, v.strides + 1, nullptr, keys);
    for (std::int64_t h = 0; h < g.heads; ++h) {
      load_row(dout_data + row_offset<Rank>(dout, b, c, h), dout.strides[Rank + 2], Acc(1),
               dout_row.data(), dim_v);
      const T* v_head = v_data + b * v.strides[0] + (h / group) * v.strides[Rank + 1];
      T* row = dattn_data + row_offset<Rank>(dattn, b, c, h);
      if (keys.size < slots) {
        for (std::int64_t s = 0; s < slots; ++s) store<T, Acc>(row + s * dattn.strides[Rank + 2], Acc(0));
      }
      for (std::int64_t t = 0; t < keys.size; ++t) {
        store<T, Acc>(row + keys.slot[t] * dattn.strides[Rank + 2],
                      dot(dout_row.data(), v_head + keys.v[t], dim_v, v.strides[Rank + 2]));
      }
    }
  });

  key_pass<Rank>(g, [&](std::int64_t b, const std::int64_t* c) {
    thread_local QueryList<Rank> queries;
    thread_local std::vector<Acc> dv_row;
    dv_row.resize(dim_v);
    list_queries<Rank>(tables, c, nullptr, queries);
    for (std::int64_t hk = 0; hk < heads_kv; ++hk) {
      std::fill(dv_row.begin(), dv_row.end(), Acc(0));
      for (std::int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (std::int64_t i = 0; i < queries.size; ++i) {
          const std::int64_t* ci = queries.coords[i].data();
          const Acc a = load<Acc>(attn_data + row_offset<Rank>(attn, b, ci, h) +
                                  queries.slot[i] * attn.strides[Rank + 2]);
          axpy(a, dout_data + row_offset<Rank>(dout, b, ci, h), dout.strides[Rank + 2],
               dv_row.data(), dim_v);
        }
      }
      store_row(dv_row.data(), Acc(1), static_cast<T*>(args.dv.data) +
                row_offset<Rank>(args.dv, b, c, hk), args.dv.strides[Rank + 2], dim_v);
    }
  });
}

}  // namespace libna::cpu
