// The scalar CPU kernels, written once for every rank and dtype and run for
// float64 (gradient checking). This header holds the definitions; each rank
// is instantiated in its own generated translation unit (see
// instantiate.cpp.in), and backend.cpp dispatches to them. Its geometry
// (Geometry, row_offset, BiasBuffer) serves the vectorised kernels too.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "backend.h"
#include "libna/window.h"
#include "numeric.h"
#include "cpu/tuning.h"
#include "thread_pool.h"

namespace libna::cpu {

using detail::acc_t;
using detail::load;
using detail::store;
using detail::backward_lse;
using detail::softmax_lse;
using detail::softmax_normaliser;
using detail::softmax_shift;

// Batch, heads and spatial extents of an attention tensor
// [B, *spatial, heads, dim], plus each axis' neighbourhood parameters.
template <int Rank>
struct Geometry {
  std::int64_t batch, heads, tokens;
  std::int64_t spatial[Rank];
  AxisParams axes[Rank];

  Geometry(const TensorView& t, const NaParams& p) : batch(t.shape[0]), heads(t.shape[Rank + 1]) {
    tokens = 1;
    for (int a = 0; a < Rank; ++a) {
      spatial[a] = t.shape[1 + a];
      axes[a] = p.axis(a, spatial[a]);
      tokens *= spatial[a];
    }
  }

  // The most rows (positions of the leading axes) one window covers.
  std::int64_t window_rows() const {
    std::int64_t n = 1;
    for (int a = 0; a < Rank - 1; ++a) n *= axes[a].kernel;
    return n;
  }

  void coords(std::int64_t token, std::int64_t* c) const {
    for (int a = Rank - 1; a >= 0; --a) {
      c[a] = token % spatial[a];
      token /= spatial[a];
    }
  }
};

// The coordinates along the leading axes (all but the last) of `row`, the
// rows' row-major index: what packed rows and tiles number their rows by.
template <int Rank>
void row_coords(const Geometry<Rank>& g, std::int64_t row, std::int64_t* c) {
  for (int a = Rank - 2; a >= 0; --a) {
    c[a] = row % g.spatial[a];
    row /= g.spatial[a];
  }
}

// Element offset of [b, *c, h, 0] in t.
template <int Rank>
inline std::int64_t row_offset(const TensorView& t, std::int64_t b, const std::int64_t* c,
                               std::int64_t h) {
  std::int64_t off = b * t.strides[0] + h * t.strides[Rank + 1];
  for (int a = 0; a < Rank; ++a) off += c[a] * t.strides[1 + a];
  return off;
}

// One query's keys in row-major slot order: spatial offsets into k and v, the
// offset into one head of rpb, and the slot in the prod(kernel_size) layout.
struct KeyList {
  std::vector<std::int64_t> k, v, bias, slot;
  std::int64_t size = 0;
};

template <int Rank>
void list_keys(const AxisWindow* w, const NaParams& p, const std::int64_t* k_strides,
               const std::int64_t* v_strides, const std::int64_t* bias_strides, KeyList& keys) {
  std::int64_t n = 1;
  for (int a = 0; a < Rank; ++a) n *= w[a].count;
  keys.size = n;
  if (static_cast<std::int64_t>(keys.slot.size()) < n) {
    keys.k.resize(n);
    keys.v.resize(n);
    keys.bias.resize(n);
    keys.slot.resize(n);
  }
  std::int64_t slot_stride[Rank];
  slot_stride[Rank - 1] = 1;
  for (int a = Rank - 2; a >= 0; --a) slot_stride[a] = slot_stride[a + 1] * p.kernel_size[a + 1];
  std::int64_t t[Rank] = {};
  for (std::int64_t i = 0; i < n; ++i) {
    std::int64_t ko = 0, vo = 0, bo = 0, so = 0;
    for (int a = 0; a < Rank; ++a) {
      const std::int64_t j = w[a].first + t[a] * w[a].step;
      if (k_strides) ko += j * k_strides[a];
      if (v_strides) vo += j * v_strides[a];
      if (bias_strides) bo += (w[a].rpb_first + t[a]) * bias_strides[a];
      so += t[a] * slot_stride[a];
    }
    keys.k[i] = ko;
    keys.v[i] = vo;
    keys.bias[i] = bo;
    keys.slot[i] = so;
    for (int a = Rank - 1; a >= 0; --a) {  // odometer, last axis fastest
      if (++t[a] < w[a].count) break;
      t[a] = 0;
    }
  }
}

// rpb-shaped [heads, 2k_1-1, ...] buffer in contiguous Acc storage.
template <int Rank, typename Acc>
struct BiasBuffer {
  std::int64_t strides[Rank + 1];
  std::int64_t size = 0;

  explicit BiasBuffer(const NaParams& p, std::int64_t heads) {
    std::int64_t s = 1;
    for (int a = Rank - 1; a >= 0; --a) {
      strides[a + 1] = s;
      s *= 2 * p.kernel_size[a] - 1;
    }
    strides[0] = s;
    size = s * heads;
  }

  // Element offset of linear index `i` of this buffer in a strided view `t`.
  std::int64_t offset_in(const TensorView& t, std::int64_t i) const {
    std::int64_t off = 0;
    for (int d = Rank; d >= 0; --d) {
      off += (i % t.shape[d]) * t.strides[d];
      i /= t.shape[d];
    }
    return off;
  }

  template <typename T>
  std::vector<Acc> load_from(const TensorView& t) const {
    std::vector<Acc> buf(size);
    const T* data = static_cast<const T*>(t.data);
    for (std::int64_t i = 0; i < size; ++i) buf[i] = load<Acc>(data + offset_in(t, i));
    return buf;
  }

  template <typename T>
  void store_to(const std::vector<Acc>& buf, const TensorView& t) const {
    T* data = static_cast<T*>(t.data);
    for (std::int64_t i = 0; i < size; ++i) store<T, Acc>(data + offset_in(t, i), buf[i]);
  }
};

template <typename Acc, typename T>
inline Acc dot(const Acc* x, const T* y, std::int64_t n, std::int64_t y_stride) {
  Acc s = 0;
  if (y_stride == 1) {
    for (std::int64_t d = 0; d < n; ++d) s += x[d] * load<Acc>(y + d);
  } else {
    for (std::int64_t d = 0; d < n; ++d) s += x[d] * load<Acc>(y + d * y_stride);
  }
  return s;
}

template <typename Acc, typename T>
inline void axpy(Acc a, const T* x, std::int64_t x_stride, Acc* y, std::int64_t n) {
  if (x_stride == 1) {
    for (std::int64_t d = 0; d < n; ++d) y[d] += a * load<Acc>(x + d);
  } else {
    for (std::int64_t d = 0; d < n; ++d) y[d] += a * load<Acc>(x + d * x_stride);
  }
}

template <typename Acc, typename T>
inline void load_row(const T* x, std::int64_t stride, Acc factor, Acc* y, std::int64_t n) {
  for (std::int64_t d = 0; d < n; ++d) y[d] = factor * load<Acc>(x + d * stride);
}

template <typename T, typename Acc>
inline void store_row(const Acc* x, Acc factor, T* y, std::int64_t stride, std::int64_t n) {
  for (std::int64_t d = 0; d < n; ++d) store<T, Acc>(y + d * stride, factor * x[d]);
}

template <int Rank, typename T>
void na_forward(const detail::ForwardArgs& args) {
  using Acc = acc_t<T>;
  const TensorView &q = args.q, &k = args.k, &v = args.v, &out = args.out;
  const Geometry<Rank> g(q, args.params);
  const std::int64_t heads_per_kv = g.heads / k.shape[Rank + 1];
  const std::int64_t dim = q.shape[Rank + 2], dim_v = v.shape[Rank + 2];
  const std::int64_t qd = q.strides[Rank + 2], kd = k.strides[Rank + 2],
                     vd = v.strides[Rank + 2], od = out.strides[Rank + 2];
  const T* q_data = static_cast<const T*>(q.data);
  const T* k_data = static_cast<const T*>(k.data);
  const T* v_data = static_cast<const T*>(v.data);
  const T* rpb = args.rpb ? static_cast<const T*>(args.rpb->data) : nullptr;
  T* out_data = static_cast<T*>(out.data);
  Acc* lse_data = args.lse ? static_cast<Acc*>(args.lse->data) : nullptr;
  const Acc scale = static_cast<Acc>(args.scale);

  parallel_for(g.batch * g.tokens, tuning::kScalarTokensPerTask, [&](std::int64_t begin, std::int64_t end) {
    KeyList keys;
    std::vector<Acc> q_row(dim), acc(dim_v), logits(args.params.window_size());
    for (std::int64_t item = begin; item < end; ++item) {
      const std::int64_t b = item / g.tokens;
      std::int64_t c[Rank];
      g.coords(item % g.tokens, c);
      AxisWindow w[Rank];
      for (int a = 0; a < Rank; ++a) w[a] = axis_window(c[a], g.axes[a]);
      list_keys<Rank>(w, args.params, k.strides + 1, v.strides + 1,
                      rpb ? args.rpb->strides + 1 : nullptr, keys);
      for (std::int64_t h = 0; h < g.heads; ++h) {
        const std::int64_t hk = h / heads_per_kv;
        load_row(q_data + row_offset<Rank>(q, b, c, h), qd, scale, q_row.data(), dim);
        const T* k_head = k_data + b * k.strides[0] + hk * k.strides[Rank + 1];
        const T* v_head = v_data + b * v.strides[0] + hk * v.strides[Rank + 1];
        Acc max_logit = -std::numeric_limits<Acc>::infinity();
        for (std::int64_t t = 0; t < keys.size; ++t) {
          Acc s = dot(q_row.data(), k_head + keys.k[t], dim, kd);
          if (rpb) s += load<Acc>(rpb + h * args.rpb->strides[0] + keys.bias[t]);
          logits[t] = s;
          max_logit = std::max(max_logit, s);
        }
        std::fill(acc.begin(), acc.end(), Acc(0));
        const Acc shift = softmax_shift(max_logit);
        Acc sum = 0;
        for (std::int64_t t = 0; t < keys.size; ++t) {
          const Acc p = std::exp(logits[t] - shift);
          sum += p;
          axpy(p, v_head + keys.v[t], vd, acc.data(), dim_v);
        }
        store_row(acc.data(), softmax_normaliser(sum), out_data + row_offset<Rank>(out, b, c, h),
                  od, dim_v);
        if (lse_data) {
          lse_data[row_offset<Rank>(*args.lse, b, c, 0) + h * args.lse->strides[Rank + 1]] =
              softmax_lse(max_logit, sum);
        }
      }
    }
  });
}

template <int Rank, typename T>
void na_qk(const detail::QkArgs& args) {
  using Acc = acc_t<T>;
  const TensorView &q = args.q, &k = args.k, &attn = args.attn;
  const Geometry<Rank> g(q, args.params);
  const std::int64_t heads_per_kv = g.heads / k.shape[Rank + 1];
  const std::int64_t dim = q.shape[Rank + 2], slots = args.params.window_size();
  const std::int64_t qd = q.strides[Rank + 2], kd = k.strides[Rank + 2],
                     ad = attn.strides[Rank + 2];
  const T* q_data = static_cast<const T*>(q.data);
  const T* k_data = static_cast<const T*>(k.data);
  const T* rpb = args.rpb ? static_cast<const T*>(args.rpb->data) : nullptr;
  T* attn_data = static_cast<T*>(attn.data);
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();

  parallel_for(g.batch * g.tokens, tuning::kScalarTokensPerTask, [&](std::int64_t begin, std::int64_t end) {
    KeyList keys;
    std::vector<Acc> q_row(dim);
    for (std::int64_t item = begin; item < end; ++item) {
      const std::int64_t b = item / g.tokens;
      std::int64_t c[Rank];
      g.coords(item % g.tokens, c);
      AxisWindow w[Rank];
      for (int a = 0; a < Rank; ++a) w[a] = axis_window(c[a], g.axes[a]);
      list_keys<Rank>(w, args.params, k.strides + 1, nullptr,
                      rpb ? args.rpb->strides + 1 : nullptr, keys);
      for (std::int64_t h = 0; h < g.heads; ++h) {
        load_row(q_data + row_offset<Rank>(q, b, c, h), qd, Acc(1), q_row.data(), dim);
        const T* k_head = k_data + b * k.strides[0] + (h / heads_per_kv) * k.strides[Rank + 1];
        T* row = attn_data + row_offset<Rank>(attn, b, c, h);
        if (keys.size < slots) {
          for (std::int64_t s = 0; s < slots; ++s) store<T, Acc>(row + s * ad, neg_inf);
        }
        for (std::int64_t t = 0; t < keys.size; ++t) {
          Acc s = dot(q_row.data(), k_head + keys.k[t], dim, kd);
          if (rpb) s += load<Acc>(rpb + h * args.rpb->strides[0] + keys.bias[t]);
          store<T, Acc>(row + keys.slot[t] * ad, s);
        }
      }
    }
  });
}

template <int Rank, typename T>
void na_av(const detail::AvArgs& args) {
  using Acc = acc_t<T>;
  const TensorView &attn = args.attn, &v = args.v, &out = args.out;
  const Geometry<Rank> g(attn, args.params);
  const std::int64_t heads_per_kv = g.heads / v.shape[Rank + 1];
  const std::int64_t dim_v = v.shape[Rank + 2];
  const std::int64_t ad = attn.strides[Rank + 2], vd = v.strides[Rank + 2],
                     od = out.strides[Rank + 2];
  const T* attn_data = static_cast<const T*>(attn.data);
  const T* v_data = static_cast<const T*>(v.data);
  T* out_data = static_cast<T*>(out.data);

  parallel_for(g.batch * g.tokens, tuning::kScalarTokensPerTask, [&](std::int64_t begin, std::int64_t end) {
    KeyList keys;
    std::vector<Acc> acc(dim_v);
    for (std::int64_t item = begin; item < end; ++item) {
      const std::int64_t b = item / g.tokens;
      std::int64_t c[Rank];
      g.coords(item % g.tokens, c);
      AxisWindow w[Rank];
      for (int a = 0; a < Rank; ++a) w[a] = axis_window(c[a], g.axes[a]);
      list_keys<Rank>(w, args.params, nullptr, v.strides + 1, nullptr, keys);
      for (std::int64_t h = 0; h < g.heads; ++h) {
        const T* row = attn_data + row_offset<Rank>(attn, b, c, h);
        const T* v_head = v_data + b * v.strides[0] + (h / heads_per_kv) * v.strides[Rank + 1];
        std::fill(acc.begin(), acc.end(), Acc(0));
        for (std::int64_t t = 0; t < keys.size; ++t) {
          axpy(load<Acc>(row + keys.slot[t] * ad), v_head + keys.v[t], vd, acc.data(), dim_v);
        }
        store_row(acc.data(), Acc(1), out_data + row_offset<Rank>(out, b, c, h), od, dim_v);
      }
    }
  });
}

}  // namespace libna::cpu
