// The vectorised fused forward, included once per instruction set by
// fast_kernels_impl.h (compiled by fast_kernels_{avx2,portable}.cpp) with LIBNA_SIMD_NS and LIBNA_SIMD_TARGET
// defined. Used for float32/float16/bfloat16 (float64 keeps the scalar
// kernel in kernels.h).
//
// The idea (see ../shared notes): put 8 consecutive queries of one dilation
// group along the last spatial axis in SIMD lanes. Their windows along that
// axis are the same shape shifted by one position each (away from the
// borders), and along the other axes they are identical. With K and V
// repacked head-dim-major and group-contiguous ("[row][d][col]"), the keys of
// all 8 lanes at one window offset are a single contiguous load, so Q.K and
// P.V become FMAs with no broadcasts, no wasted products and no horizontal
// sums. Blocks where the windows do not shift in step (borders, causal
// starts, stride > 1, partial blocks) use the union of the lanes' windows
// with broadcast keys and a per-lane mask instead.
#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/lanes.h"
#include "cpu/simd.h"

namespace libna::cpu::LIBNA_SIMD_NS {

using simd::f32x8;
using simd::kLanes;

template <int Rank>
void row_coords(const Geometry<Rank>& g, std::int64_t row, std::int64_t* c) {
  for (int a = Rank - 2; a >= 0; --a) {
    c[a] = row % g.spatial[a];
    row /= g.spatial[a];
  }
}

// How packed tensors lay out the spatial positions: `row` enumerates the
// positions of all but the last spatial axis; `col` is the last axis, with
// each dilation group's positions stored contiguously from group_base[g], so
// that a window (which stays inside one group) is a contiguous run.
struct ColumnLayout {
  std::int64_t rows = 0, width = 0, dilation = 1;
  std::vector<std::int64_t> group_base;

  template <int Rank>
  explicit ColumnLayout(const Geometry<Rank>& g)
      : rows(g.tokens / g.spatial[Rank - 1]), width(g.spatial[Rank - 1]),
        dilation(g.axes[Rank - 1].dilation), group_base(dilation) {
    for (std::int64_t grp = 0, base = 0; grp < dilation; ++grp) {
      group_base[grp] = base;
      base += group_length(width, dilation, grp);
    }
  }
  std::int64_t column(std::int64_t x) const { return group_base[x % dilation] + x / dilation; }
};

// One tensor [B, *spatial, heads, dim] as float, indexed [b][h][row][d][col].
struct Packed {
  float* data = nullptr;
  std::int64_t heads = 0, rows = 0, width = 0, dim = 0;

  std::int64_t size() const { return heads * rows * width * dim; }  // per batch entry
  float* row(std::int64_t b, std::int64_t h, std::int64_t r) const {
    return data + (((b * heads + h) * rows + r) * dim) * width;
  }
};

// Scratch memory of the calling thread, kept between calls: a fresh
// allocation of this size would be mapped (and page-faulted) anew each call.
inline float* workspace(std::int64_t size) {
  thread_local std::vector<float> buffer;
  if (static_cast<std::int64_t>(buffer.size()) < size) {
    buffer = std::vector<float>();  // release first: never hold both
    buffer.resize(size);
  }
  return buffer.data();
}

// Packs `t` (times `factor`) into dst. One work item per (b, row) packs every
// head, so that the input is read token by token in order; eight tokens of a
// dilation group at a time go through a register transpose into eight
// consecutive columns.
template <int Rank, typename T>
Packed pack(const TensorView& t, const Geometry<Rank>& g, const ColumnLayout& layout,
            float factor, float* dst) {
  Packed p;
  p.data = dst;
  p.heads = t.shape[Rank + 1];
  p.dim = t.shape[Rank + 2];
  p.rows = layout.rows;
  p.width = layout.width;
  const T* data = static_cast<const T*>(t.data);
  const std::int64_t dilation = layout.dilation;
  parallel_for(g.batch * p.rows, 1, [&](std::int64_t begin, std::int64_t end) {
    const T* tokens[kLanes];
    for (std::int64_t item = begin; item < end; ++item) {
      const std::int64_t row = item % p.rows, b = item / p.rows;
      std::int64_t c[Rank];
      row_coords<Rank>(g, row, c);
      for (std::int64_t grp = 0; grp < dilation; ++grp) {
        const std::int64_t len = group_length(p.width, dilation, grp);
        for (std::int64_t i0 = 0; i0 < len; i0 += kLanes) {
          const std::int64_t lanes = std::min<std::int64_t>(kLanes, len - i0);
          for (std::int64_t h = 0; h < p.heads; ++h) {
            for (std::int64_t l = 0; l < lanes; ++l) {
              c[Rank - 1] = grp + (i0 + l) * dilation;
              tokens[l] = data + row_offset<Rank>(t, b, c, h);
            }
            gather_lanes(tokens, lanes, t.strides[Rank + 2], p.dim, factor,
                         p.row(b, h, row) + layout.group_base[grp] + i0, p.width);
          }
        }
      }
    }
  });
  return p;
}

// logits[j] (8 lanes) = sum_d q[d] * key(d, j) for N window positions j,
// where key(d, j) is 8 consecutive columns (Shifted) or one broadcast column.
template <int N, bool Shifted>
LIBNA_SIMD_TARGET void qk_chunk(const float* q, const float* keys, std::int64_t width,
                                std::int64_t dim, float* logits) {
  f32x8 acc[N];
  for (int j = 0; j < N; ++j) acc[j] = simd::splat(0.0f);
  for (std::int64_t d = 0; d < dim; ++d) {
    const f32x8 qd = simd::load(q + d * kLanes);
    const float* kd = keys + d * width;
    for (int j = 0; j < N; ++j) acc[j] += qd * (Shifted ? simd::load(kd + j) : simd::splat(kd[j]));
  }
  for (int j = 0; j < N; ++j) simd::store(logits + j * kLanes, acc[j]);
}

// out[j] (8 lanes) = sum over key rows r and window positions c of
// probs[r][c] * value(r, d0 + j, c), for N head-dim channels.
template <int N, bool Shifted>
LIBNA_SIMD_TARGET void pv_chunk(const float* probs, const float* const* value_rows,
                                std::int64_t key_rows, std::int64_t window, std::int64_t width,
                                std::int64_t d0, float* out) {
  f32x8 acc[N];
  for (int j = 0; j < N; ++j) acc[j] = simd::splat(0.0f);
  for (std::int64_t r = 0; r < key_rows; ++r) {
    const float* vr = value_rows[r] + d0 * width;
    const float* pr = probs + r * window * kLanes;
    for (std::int64_t c = 0; c < window; ++c) {
      const f32x8 p = simd::load(pr + c * kLanes);
      for (int j = 0; j < N; ++j) {
        acc[j] += p * (Shifted ? simd::load(vr + j * width + c) : simd::splat(vr[j * width + c]));
      }
    }
  }
  for (int j = 0; j < N; ++j) simd::store(out + j * kLanes, acc[j]);
}

template <bool Shifted>
LIBNA_SIMD_TARGET void qk_range(const float* q, const float* keys, std::int64_t width,
                                std::int64_t dim, std::int64_t window, float* logits) {
  std::int64_t j = 0;
  for (; j + 8 <= window; j += 8) qk_chunk<8, Shifted>(q, keys + j, width, dim, logits + j * kLanes);
  switch (window - j) {
    case 1: qk_chunk<1, Shifted>(q, keys + j, width, dim, logits + j * kLanes); break;
    case 2: qk_chunk<2, Shifted>(q, keys + j, width, dim, logits + j * kLanes); break;
    case 3: qk_chunk<3, Shifted>(q, keys + j, width, dim, logits + j * kLanes); break;
    case 4: qk_chunk<4, Shifted>(q, keys + j, width, dim, logits + j * kLanes); break;
    case 5: qk_chunk<5, Shifted>(q, keys + j, width, dim, logits + j * kLanes); break;
    case 6: qk_chunk<6, Shifted>(q, keys + j, width, dim, logits + j * kLanes); break;
    case 7: qk_chunk<7, Shifted>(q, keys + j, width, dim, logits + j * kLanes); break;
    default: break;
  }
}

template <bool Shifted>
LIBNA_SIMD_TARGET void pv_range(const float* probs, const float* const* value_rows,
                                std::int64_t key_rows, std::int64_t window, std::int64_t width,
                                std::int64_t dim_v, float* out) {
  std::int64_t d = 0;
  for (; d + 8 <= dim_v; d += 8) pv_chunk<8, Shifted>(probs, value_rows, key_rows, window, width, d, out + d * kLanes);
  switch (dim_v - d) {
    case 1: pv_chunk<1, Shifted>(probs, value_rows, key_rows, window, width, d, out + d * kLanes); break;
    case 2: pv_chunk<2, Shifted>(probs, value_rows, key_rows, window, width, d, out + d * kLanes); break;
    case 3: pv_chunk<3, Shifted>(probs, value_rows, key_rows, window, width, d, out + d * kLanes); break;
    case 4: pv_chunk<4, Shifted>(probs, value_rows, key_rows, window, width, d, out + d * kLanes); break;
    case 5: pv_chunk<5, Shifted>(probs, value_rows, key_rows, window, width, d, out + d * kLanes); break;
    case 6: pv_chunk<6, Shifted>(probs, value_rows, key_rows, window, width, d, out + d * kLanes); break;
    case 7: pv_chunk<7, Shifted>(probs, value_rows, key_rows, window, width, d, out + d * kLanes); break;
    default: break;
  }
}

// Softmax over `entries` logit vectors in place (probabilities, unnormalised);
// returns the per-lane maximum and sum.
LIBNA_SIMD_TARGET inline void softmax_lanes(float* logits, std::int64_t entries, f32x8* max_out,
                                            f32x8* sum_out) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  f32x8 m = simd::splat(neg_inf);
  for (std::int64_t e = 0; e < entries; ++e) m = simd::max(m, simd::load(logits + e * kLanes));
  m = m == simd::splat(neg_inf) ? simd::splat(0.0f) : m;  // empty (padding) lanes
  f32x8 s = simd::splat(0.0f);
  for (std::int64_t e = 0; e < entries; ++e) {
    const f32x8 p = simd::exp_nonpositive(simd::load(logits + e * kLanes) - m);
    simd::store(logits + e * kLanes, p);
    s += p;
  }
  *max_out = m;
  *sum_out = s;
}

// The windows of up to kLanes consecutive positions i0, i0+1, ... of one
// dilation group along the last axis: lane l covers window positions
// [lo[l], lo[l] + count[l]) of the group. `shifted` when every lane is
// present and each lane's window is the previous one moved by one: then the
// block reads window positions first..first+window of all lanes with
// contiguous loads; otherwise it reads the union of the windows (first =
// its start) with broadcasts and masks lanes outside their own window.
struct LaneWindows {
  std::int64_t i0 = 0, lanes = 0, first = 0, window = 0;
  std::int64_t lo[kLanes] = {}, count[kLanes] = {};
  bool shifted = false;

  void finish(std::int64_t full_window) {
    shifted = lanes == kLanes;
    std::int64_t umin = lo[0], umax = lo[0] + count[0];
    for (std::int64_t l = 0; l < lanes; ++l) {
      shifted = shifted && count[l] == full_window && lo[l] == lo[0] + l;
      umin = std::min(umin, lo[l]);
      umax = std::max(umax, lo[l] + count[l]);
    }
    first = shifted ? lo[0] : umin;
    window = shifted ? full_window : umax - umin;
  }
  bool covers(std::int64_t l, std::int64_t position) const {
    return l < lanes && position >= lo[l] && position < lo[l] + count[l];
  }
};

// Query lanes: each lane's window of keys.
inline LaneWindows query_lanes(const AxisParams& axis, std::int64_t group_len, std::int64_t i0,
                               std::int64_t lanes) {
  LaneWindows w;
  w.i0 = i0;
  w.lanes = lanes;
  for (std::int64_t l = 0; l < lanes; ++l) group_window(i0 + l, group_len, axis, &w.lo[l], &w.count[l]);
  w.finish(axis.kernel);
  return w;
}

// Rows (positions of the leading axes) seen by one position of the leading
// axes, with each one's offset into a contiguous rpb head.
struct RowList {
  std::vector<std::int64_t> rows, bias;
  std::int64_t size = 0;
};

// Fills `out` with the rows of a cartesian product over the leading axes:
// axis a offers count[a] choices, and choice t is position and rpb index
// pick(a, t) along that axis.
template <int Rank, typename Pick>
void product_rows(const Geometry<Rank>& g, const std::int64_t* count, Pick pick,
                  const std::int64_t* bias_strides, RowList& out) {
  std::int64_t n = 1;
  for (int a = 0; a < Rank - 1; ++a) n *= count[a];
  out.size = n;
  out.rows.resize(n);
  out.bias.resize(n);
  std::int64_t t[Rank] = {};
  for (std::int64_t r = 0; r < n; ++r) {
    std::int64_t row = 0, bias = 0;
    for (int a = 0; a < Rank - 1; ++a) {
      const auto [position, rpb_index] = pick(a, t[a]);
      row = row * g.spatial[a] + position;
      bias += rpb_index * bias_strides[a + 1];
    }
    out.rows[r] = row;
    out.bias[r] = bias;
    for (int a = Rank - 2; a >= 0; --a) {
      if (++t[a] < count[a]) break;
      t[a] = 0;
    }
  }
}

// Queries' view: the key rows of query row `c`.
template <int Rank>
void key_rows_of(const Geometry<Rank>& g, const std::int64_t* c, const std::int64_t* bias_strides,
                 RowList& out) {
  AxisWindow w[Rank];
  std::int64_t count[Rank] = {};
  for (int a = 0; a < Rank - 1; ++a) {
    w[a] = axis_window(c[a], g.axes[a]);
    count[a] = w[a].count;
  }
  product_rows(
      g, count,
      [&](int a, std::int64_t t) {
        return std::pair<std::int64_t, std::int64_t>(w[a].first + t * w[a].step, w[a].rpb_first + t);
      },
      bias_strides, out);
}

// State shared by the vectorised forward and backward: geometry, the packed
// K and V, the bias as contiguous float.
template <int Rank, typename T>
struct LaneKernel {
  const Geometry<Rank>& g;
  const ColumnLayout& layout;
  const Packed &k, &v;
  BiasBuffer<Rank, float> bias_layout;
  std::vector<float> bias;           // rpb as contiguous float [heads][2k-1...], or empty
  const std::int64_t* bias_strides;  // bias_layout.strides
  std::int64_t heads_per_kv;
  float scale;

  LaneKernel(const Geometry<Rank>& geometry, const ColumnLayout& columns, const Packed& packed_k,
             const Packed& packed_v, const NaParams& params, const TensorView* rpb, double sc)
      : g(geometry), layout(columns), k(packed_k), v(packed_v),
        bias_layout(params, geometry.heads),
        bias(rpb ? bias_layout.template load_from<T>(*rpb) : std::vector<float>()),
        bias_strides(bias_layout.strides), heads_per_kv(geometry.heads / packed_k.heads),
        scale(static_cast<float>(sc)) {}

  const AxisParams& last() const { return g.axes[Rank - 1]; }

  // Pointers to t[b, c (last axis: the lanes' positions), h] for the lanes
  // of w in dilation group grp.
  template <typename U>
  void lane_tokens(const TensorView& t, std::int64_t b, std::int64_t* c, std::int64_t h,
                   std::int64_t grp, const LaneWindows& w, U** tokens) const {
    U* data = static_cast<U*>(t.data);
    for (std::int64_t l = 0; l < w.lanes; ++l) {
      c[Rank - 1] = grp + (w.i0 + l) * last().dilation;
      tokens[l] = data + row_offset<Rank>(t, b, c, h);
    }
  }

  // dst[d][lane] = factor * t[b, c (last axis: lane positions), h, d]; lanes
  // beyond w.lanes are zero.
  void load_lanes(const TensorView& t, std::int64_t b, std::int64_t* c, std::int64_t h,
                  std::int64_t grp, const LaneWindows& w, float factor, float* dst) const {
    const T* tokens[kLanes];
    lane_tokens(t, b, c, h, grp, w, tokens);
    const std::int64_t dim = t.shape[Rank + 2];
    if (w.lanes < kLanes) std::fill(dst, dst + dim * kLanes, 0.0f);
    gather_lanes(tokens, w.lanes, t.strides[Rank + 2], dim, factor, dst, kLanes);
  }

  // t[b, c (lane positions), h, d] = factor[lane] * src[d][lane], for the
  // lanes of w.
  void store_lanes(const TensorView& t, std::int64_t b, std::int64_t* c, std::int64_t h,
                   std::int64_t grp, const LaneWindows& w, f32x8 factor, const float* src) const {
    T* tokens[kLanes];
    lane_tokens(t, b, c, h, grp, w, tokens);
    scatter_lanes(src, factor, t.shape[Rank + 2], tokens, w.lanes, t.strides[Rank + 2]);
  }

  // logits[r][j][lane] = q.k (+ rpb) of each lane's query with the key at
  // window position w.first + j of key row r; -inf outside a lane's window.
  LIBNA_SIMD_TARGET void logits(const float* q_lanes, std::int64_t b, std::int64_t h,
                                std::int64_t grp, const LaneWindows& w, const RowList& key_rows,
                                float* out) const {
    const std::int64_t hk = h / heads_per_kv, window = w.window, kernel = last().kernel;
    const std::int64_t first_col = layout.group_base[grp] + w.first;
    const float neg_inf = -std::numeric_limits<float>::infinity();
    const std::int64_t bias_step = bias_strides[Rank];
    for (std::int64_t r = 0; r < key_rows.size; ++r) {
      const float* keys = k.row(b, hk, key_rows.rows[r]) + first_col;
      float* logits = out + r * window * kLanes;
      const float* bias_row =
          bias.empty() ? nullptr : bias.data() + h * bias_strides[0] + key_rows.bias[r];
      if (w.shifted) {
        qk_range<true>(q_lanes, keys, layout.width, k.dim, window, logits);
        if (bias_row) {
          const std::int64_t rel0 = w.first - w.i0 + kernel - 1;
          for (std::int64_t j = 0; j < window; ++j) {
            simd::store(logits + j * kLanes, simd::load(logits + j * kLanes) +
                                                 simd::splat(bias_row[(rel0 + j) * bias_step]));
          }
        }
      } else {
        qk_range<false>(q_lanes, keys, layout.width, k.dim, window, logits);
        for (std::int64_t j = 0; j < window; ++j) {
          const std::int64_t key = w.first + j;
          for (std::int64_t l = 0; l < kLanes; ++l) {
            float& x = logits[j * kLanes + l];
            if (!w.covers(l, key)) {
              x = neg_inf;
            } else if (bias_row) {
              x += bias_row[(key - (w.i0 + l) + kernel - 1) * bias_step];
            }
          }
        }
      }
    }
  }

  // Packed rows (of k or v, head hk) at the block's first window column.
  void window_rows(const Packed& p, std::int64_t b, std::int64_t hk, std::int64_t grp,
                   const LaneWindows& w, const RowList& rows,
                   std::vector<const float*>& out) const {
    out.resize(rows.size);
    for (std::int64_t r = 0; r < rows.size; ++r) {
      out[r] = p.row(b, hk, rows.rows[r]) + layout.group_base[grp] + w.first;
    }
  }
};

template <int Rank, typename T>
struct Forward : LaneKernel<Rank, T> {
  using Base = LaneKernel<Rank, T>;
  using Base::g;
  using Base::k;
  using Base::v;
  const detail::ForwardArgs& args;

  // Per-thread working memory.
  struct Scratch {
    std::vector<float> q, out;  // [d][lane]
    std::vector<float> logits;
    RowList key_rows;
    std::vector<const float*> value_rows;
  };

  Forward(const detail::ForwardArgs& a, const Geometry<Rank>& geometry,
          const ColumnLayout& columns, const Packed& packed_k, const Packed& packed_v)
      : Base(geometry, columns, packed_k, packed_v, a.params, a.rpb, a.scale), args(a) {}

  // All queries of one (b, h, row): every dilation group of the last axis,
  // eight queries at a time.
  LIBNA_SIMD_TARGET void row(std::int64_t b, std::int64_t h, std::int64_t row_index,
                             Scratch& s) const {
    std::int64_t c[Rank];
    row_coords<Rank>(g, row_index, c);
    key_rows_of<Rank>(g, c, this->bias_strides, s.key_rows);
    const AxisParams& last = this->last();
    for (std::int64_t grp = 0; grp < last.dilation; ++grp) {
      const std::int64_t len = group_length(last.length, last.dilation, grp);
      for (std::int64_t i0 = 0; i0 < len; i0 += kLanes) {
        block(b, h, c, grp, query_lanes(last, len, i0, std::min<std::int64_t>(kLanes, len - i0)), s);
      }
    }
  }

  LIBNA_SIMD_TARGET void block(std::int64_t b, std::int64_t h, std::int64_t* c, std::int64_t grp,
                               const LaneWindows& w, Scratch& s) const {
    const std::int64_t dim = k.dim, dim_v = v.dim, n_rows = s.key_rows.size;
    s.q.resize(dim * kLanes);
    this->load_lanes(args.q, b, c, h, grp, w, this->scale, s.q.data());
    s.logits.resize(n_rows * w.window * kLanes);
    this->logits(s.q.data(), b, h, grp, w, s.key_rows, s.logits.data());

    f32x8 max_logit, sum;
    softmax_lanes(s.logits.data(), n_rows * w.window, &max_logit, &sum);

    this->window_rows(v, b, h / this->heads_per_kv, grp, w, s.key_rows, s.value_rows);
    s.out.resize(dim_v * kLanes);
    if (w.shifted) {
      pv_range<true>(s.logits.data(), s.value_rows.data(), n_rows, w.window, this->layout.width,
                     dim_v, s.out.data());
    } else {
      pv_range<false>(s.logits.data(), s.value_rows.data(), n_rows, w.window, this->layout.width,
                      dim_v, s.out.data());
    }

    // Normalise and store.
    this->store_lanes(args.out, b, c, h, grp, w, simd::splat(1.0f) / sum, s.out.data());
    if (args.lse) {
      alignas(32) float m[kLanes], total[kLanes];
      simd::store(m, max_logit);
      simd::store(total, sum);
      float* lse = static_cast<float*>(args.lse->data);
      for (std::int64_t l = 0; l < w.lanes; ++l) {
        c[Rank - 1] = grp + (w.i0 + l) * this->last().dilation;
        lse[row_offset<Rank>(*args.lse, b, c, 0) + h * args.lse->strides[Rank + 1]] =
            m[l] + std::log(total[l]);
      }
    }
  }
};

template <int Rank, typename T>
void na_forward(const detail::ForwardArgs& args) {
  const Geometry<Rank> g(args.q, args.params);
  const ColumnLayout layout(g);
  const std::int64_t k_size = g.batch * args.k.shape[Rank + 1] * g.tokens * args.k.shape[Rank + 2];
  const std::int64_t v_size = g.batch * args.v.shape[Rank + 1] * g.tokens * args.v.shape[Rank + 2];
  float* buffer = workspace(k_size + v_size);
  const Packed k = pack<Rank, T>(args.k, g, layout, 1.0f, buffer);
  const Packed v = pack<Rank, T>(args.v, g, layout, 1.0f, buffer + k_size);
  const Forward<Rank, T> fwd(args, g, layout, k, v);
  const std::int64_t rows = layout.rows;
  parallel_for(g.batch * g.heads * rows, 1, [&](std::int64_t begin, std::int64_t end) {
    typename Forward<Rank, T>::Scratch scratch;
    // Heads innermost: consecutive items read the same query tokens.
    for (std::int64_t item = begin; item < end; ++item) {
      const std::int64_t h = item % g.heads, row = (item / g.heads) % rows,
                         b = item / (rows * g.heads);
      fwd.row(b, h, row, scratch);
    }
  });
}

}  // namespace libna::cpu::LIBNA_SIMD_NS
