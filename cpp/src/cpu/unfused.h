// The vectorised unfused ops and their backward: na_qk (scores in the
// prod(kernel) slot layout) and na_av (their weighted sum of values), built
// from the fused kernels' lane pieces over whole packed tensors (pack()).
// Both go through the lane layout [key row][window position][lane] and move
// entries to or from each query's slots one lane at a time.
// Included inside the per-instruction-set namespace and target region of
// fast_kernels_impl.h (LIBNA_SIMD_NS), like every header of the vectorised
// kernels.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/backward.h"
#include "cpu/bias_grad.h"
#include "cpu/kernels.h"
#include "cpu/lane_kernel.h"
#include "cpu/lane_windows.h"
#include "cpu/micro_kernels.h"
#include "cpu/neighbour_rows.h"
#include "cpu/packed_layout.h"
#include "cpu/packing.h"
#include "cpu/thread_pool.h"
#include "cpu/thread_scratch.h"

namespace libna::cpu::LIBNA_SIMD_NS {

template <int Rank, typename T>
struct Unfused : LaneKernel<Rank, T> {
  using Base = LaneKernel<Rank, T>;
  using Base::g;
  const Packed& keys;  // k (na_qk and its backward) or v (na_av and its backward), packed

  struct Scratch {
    std::vector<float> lanes, values;  // [d][lane]; [row][window position][lane]
    RowList rows;
    std::vector<const float*> ptrs;
  };

  Unfused(const Geometry<Rank>& geometry, const ColumnLayout& columns, const TensorView& keys_view,
          const Packed& packed_keys, const NaParams& params, const TensorView* rpb)
      : Base(geometry, columns, keys_view, keys_view, params, rpb, 1.0), keys(packed_keys) {}

  // The packed key rows of s.rows for query head h at the block's first
  // window column.
  void window_rows(std::int64_t b, std::int64_t h, std::int64_t grp, const LaneWindows& w,
                   Scratch& s) const {
    s.ptrs.resize(s.rows.size);
    for (std::int64_t r = 0; r < s.rows.size; ++r) {
      s.ptrs[r] = keys.row(b, h / this->heads_per_kv, s.rows.rows[r]) +
                  this->layout.group_base[grp] + w.first;
    }
  }

  // Calls block(c, grp, w) for the lane blocks of one row, with s.rows
  // holding the row's key rows.
  template <typename Block>
  void for_blocks(std::int64_t row, Scratch& s, const Block& block) const {
    std::int64_t c[Rank];
    row_coords<Rank>(g, row, c);
    key_rows_of<Rank>(g, c, this->bias_strides, s.rows);
    this->for_query_blocks(this->whole_row(), [&](std::int64_t grp, const LaneWindows& w) {
      block(c, grp, w);
    });
  }

  // values[r][j][lane] (j = position in the block's covering range) =
  // attn[b, lane's query, h, slot of key (r, j)] for each lane's window, 0
  // elsewhere.
  void gather_query_slots(const TensorView& attn, std::int64_t b, std::int64_t* c, std::int64_t h,
                          std::int64_t grp, const LaneWindows& w, const RowList& rows,
                          float* values) const {
    std::fill(values, values + rows.size * w.window * kLanes, 0.0f);
    const T* src[kLanes];
    this->lane_tokens(attn, b, c, h, grp, w, src);
    const std::int64_t stride = attn.strides[Rank + 2];
    for (std::int64_t l = 0; l < w.lanes; ++l) {
      const std::int64_t j0 = w.lo[l] - l - w.first;
      for (std::int64_t r = 0; r < rows.size; ++r) {
        float* dst = values + (r * w.window + j0) * kLanes + l;
        const T* row = src[l] + rows.slot[r] * stride;
        for (std::int64_t t = 0; t < w.count[l]; ++t) dst[t * kLanes] = load<float>(row + t * stride);
      }
    }
  }

  // The inverse: attn[b, lane's query, h, slots] = values (slots outside the
  // window, near causal starts, = `unfilled`).
  void scatter_query_slots(const float* values, const TensorView& attn, std::int64_t b,
                           std::int64_t* c, std::int64_t h, std::int64_t grp, const LaneWindows& w,
                           const RowList& rows, float unfilled) const {
    T* dst[kLanes];
    this->lane_tokens(attn, b, c, h, grp, w, dst);
    const std::int64_t stride = attn.strides[Rank + 2], slots = attn.shape[Rank + 2];
    const std::int64_t kernel = this->last().kernel;
    for (std::int64_t l = 0; l < w.lanes; ++l) {
      if (rows.size * kernel < slots || w.count[l] < kernel) {
        for (std::int64_t t = 0; t < slots; ++t) store<T, float>(dst[l] + t * stride, unfilled);
      }
      const std::int64_t j0 = w.lo[l] - l - w.first;
      for (std::int64_t r = 0; r < rows.size; ++r) {
        const float* src = values + (r * w.window + j0) * kLanes + l;
        T* row = dst[l] + rows.slot[r] * stride;
        for (std::int64_t t = 0; t < w.count[l]; ++t) store<T, float>(row + t * stride, src[t * kLanes]);
      }
    }
  }

  void qk_block(const detail::QkArgs& args, std::int64_t b, std::int64_t h,
                std::int64_t* c, std::int64_t grp, const LaneWindows& w,
                Scratch& s) const {
    s.lanes.resize(keys.dim * kLanes);
    this->load_lanes(args.q, b, c, h, grp, w, 1.0f, s.lanes.data());
    s.values.resize(s.rows.size * w.window * kLanes);
    window_rows(b, h, grp, w, s);
    this->logits(s.lanes.data(), kLanes, h, w, s.rows, s.ptrs.data(), s.values.data());
    scatter_query_slots(s.values.data(), args.attn, b, c, h, grp, w, s.rows,
                        -std::numeric_limits<float>::infinity());
  }

  // result[b, lane's query, h] = sum over the window of weights[..., slot]
  // times the packed rows (k = v here).
  void weighted_sum(const TensorView& weights, const TensorView& result,
                    std::int64_t b, std::int64_t h, std::int64_t* c,
                    std::int64_t grp, const LaneWindows& w, Scratch& s) const {
    s.values.resize(s.rows.size * w.window * kLanes);
    gather_query_slots(weights, b, c, h, grp, w, s.rows, s.values.data());
    window_rows(b, h, grp, w, s);
    s.lanes.resize(keys.dim * kLanes);
    pv_range(s.values.data(), s.ptrs.data(), s.rows.size, w.window, this->layout.width, keys.dim,
             s.lanes.data(), w.masked && !keys.finite ? &w : nullptr);
    this->store_lanes(result, b, c, h, grp, w, simd::splat(1.0f), s.lanes.data());
  }

  void av_block(const detail::AvArgs& args, std::int64_t b, std::int64_t h, std::int64_t* c,
                std::int64_t grp, const LaneWindows& w, Scratch& s) const {
    weighted_sum(args.attn, args.out, b, h, c, grp, w, s);
  }

  // ---- backward: query blocks ----------------------------------------------
  // dq = dattn . k (unscaled: na_qk does not scale), and the rpb gradient.
  void qk_backward_block(const detail::QkBackwardArgs& args, float* bias_grad, std::int64_t b,
                         std::int64_t h, std::int64_t* c, std::int64_t grp, const LaneWindows& w,
                         Scratch& s) const {
    weighted_sum(args.dattn, args.dq, b, h, c, grp, w, s);
    if (bias_grad) {
      add_bias_grad(w, s.rows, this->last().kernel, this->bias_strides[Rank], s.values.data(),
                    bias_grad);
    }
  }

  // dattn = dout . v (0 in unfilled slots).
  void av_backward_block(const detail::AvBackwardArgs& args, std::int64_t b,
                         std::int64_t h, std::int64_t* c, std::int64_t grp,
                         const LaneWindows& w, Scratch& s) const {
    s.lanes.resize(keys.dim * kLanes);
    this->load_lanes(args.dout, b, c, h, grp, w, 1.0f, s.lanes.data());
    s.values.resize(s.rows.size * w.window * kLanes);
    window_rows(b, h, grp, w, s);
    qk_rows(s.lanes.data(), kLanes, s.ptrs.data(), s.rows.size, this->layout.width, keys.dim,
            w.window, s.values.data());
    scatter_query_slots(s.values.data(), args.dattn, b, c, h, grp, w, s.rows, 0.0f);
  }
};

// The key pass of the unfused backward ops, lanes = 8 keys: grad[key] =
// sum over the queries that see it (and the query heads of its kv head) of
// weights[query, slot of key] * rows[query], with weights = dattn and rows =
// q (na_qk_backward: dk) or weights = attn and rows = dout (na_av_backward:
// dv). `rows` is packed, all heads.
template <int Rank, typename T>
struct UnfusedKeyPass : LaneKernel<Rank, T> {
  using Base = LaneKernel<Rank, T>;
  using Base::g;
  using Base::layout;
  const Tables<Rank>& tables;
  const Packed& rows;
  std::int64_t group;  // query heads per kv head

  struct Scratch {
    std::vector<float> values, acc;
    RowList queries;
    std::vector<const float*> ptrs;
  };

  UnfusedKeyPass(const Geometry<Rank>& geometry, const ColumnLayout& columns,
                 const Tables<Rank>& t, const TensorView& rows_view, const Packed& packed_rows,
                 const NaParams& params,
                 std::int64_t heads_kv)
      : Base(geometry, columns, rows_view, rows_view, params, nullptr, 1.0), tables(t),
        rows(packed_rows), group(geometry.heads / heads_kv) {}

  // values[r][j][lane] = weights[b, query first + j + lane of query row r, h,
  // slot of the lane's key], 0 outside the lane's queries.
  void gather_key_slots(const TensorView& weights, std::int64_t b, std::int64_t h,
                        std::int64_t grp, const LaneWindows& w, const RowList& queries,
                        float* values) const {
    std::fill(values, values + queries.size * w.window * kLanes, 0.0f);
    const AxisParams& last = this->last();
    const AxisTable& table = tables.axis[Rank - 1];
    const T* data = static_cast<const T*>(weights.data);
    const std::int64_t stride = weights.strides[Rank + 2];
    std::int64_t c[Rank];
    for (std::int64_t r = 0; r < queries.size; ++r) {
      row_coords<Rank>(g, queries.rows[r], c);
      for (std::int64_t l = 0; l < w.lanes; ++l) {
        const std::int64_t key = grp + (w.i0 + l) * last.dilation;
        float* dst = values + (r * w.window + w.lo[l] - l - w.first) * kLanes + l;
        for (std::int64_t t = 0; t < w.count[l]; ++t) {
          c[Rank - 1] = grp + (w.lo[l] + t) * last.dilation;
          const AxisWindow& window = table.window[c[Rank - 1]];
          const std::int64_t slot = queries.slot[r] + (key - window.first) / window.step;
          dst[t * kLanes] = load<float>(data + row_offset<Rank>(weights, b, c, h) + slot * stride);
        }
      }
    }
  }

  void key_row(const TensorView& weights, const TensorView& grad, std::int64_t b,
               std::int64_t hk, std::int64_t row, Scratch& s) const {
    std::int64_t c[Rank];
    row_coords<Rank>(g, row, c);
    query_rows_of<Rank>(g, tables, c, this->bias_strides, s.queries);
    const std::int64_t dim = rows.dim, n = s.queries.size;
    for_key_blocks(*this, tables, this->whole_row(), [&](std::int64_t grp, const LaneWindows& w) {
      s.acc.assign(dim * kLanes, 0.0f);
      s.values.resize(n * w.window * kLanes);
      s.ptrs.resize(n);
      for (std::int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        gather_key_slots(weights, b, h, grp, w, s.queries, s.values.data());
        for (std::int64_t r = 0; r < n; ++r) {
          s.ptrs[r] = rows.row(b, h, s.queries.rows[r]) + layout.group_base[grp] + w.first;
        }
        pv_range(s.values.data(), s.ptrs.data(), n, w.window, layout.width, dim, s.acc.data(),
                 w.masked && !rows.finite ? &w : nullptr, /*accumulate=*/true);
      }
      this->store_lanes(grad, b, c, hk, grp, w, simd::splat(1.0f), s.acc.data());
    });
  }
};

// Runs fn(b, h, row) over every (batch, head, row), rows innermost.
template <typename Fn>
void for_rows(std::int64_t batch, std::int64_t heads, std::int64_t rows, const Fn& fn) {
  parallel_for(batch * heads * rows, 1, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t item = begin; item < end; ++item) {
      fn(item / (rows * heads), (item / rows) % heads, item % rows);
    }
  });
}

// The query pass of an unfused op: run_block(b, h, row, c, grp, w, scratch)
// over the lane blocks of every (batch, head, row).
template <int Rank, typename T, typename RunBlock>
void unfused_query_pass(const Unfused<Rank, T>& op, const RunBlock& run_block) {
  for_rows(op.g.batch, op.g.heads, op.layout.rows,
           [&](std::int64_t b, std::int64_t h, std::int64_t row) {
    thread_local typename Unfused<Rank, T>::Scratch s;
    op.for_blocks(row, s, [&](std::int64_t* c, std::int64_t grp, const LaneWindows& w) {
      run_block(b, h, row, c, grp, w, s);
    });
  });
}

// Packs `keys` (k for na_qk, v for na_av) and runs run_block(op, b, h, c,
// grp, w, scratch) over every lane block.
template <int Rank, typename T, typename RunBlock>
void run_unfused(const TensorView& like, const TensorView& keys, const TensorView* rpb,
                 const NaParams& params, const RunBlock& run_block) {
  const Geometry<Rank> g(like, params);
  const ColumnLayout layout(g);
  float* buffer = workspace(layout.packed_size(g.batch, keys.shape[Rank + 1], keys.shape[Rank + 2]));
  const Packed packed = pack<Rank, T>(keys, g, layout, 1.0f, buffer);
  const Unfused<Rank, T> op(g, layout, keys, packed, params, rpb);
  unfused_query_pass(op, [&](std::int64_t b, std::int64_t h, std::int64_t, auto&&... block) {
    run_block(op, b, h, block...);
  });
}

template <int Rank, typename T>
void na_qk(const detail::QkArgs& args) {
  run_unfused<Rank, T>(args.q, args.k, args.rpb, args.params, [&](const auto& op, auto&&... block) {
    op.qk_block(args, block...);
  });
}

template <int Rank, typename T>
void na_av(const detail::AvArgs& args) {
  run_unfused<Rank, T>(args.attn, args.v, nullptr, args.params, [&](const auto& op, auto&&... block) {
    op.av_block(args, block...);
  });
}

template <int Rank, typename T>
void unfused_key_pass(const Geometry<Rank>& g, const ColumnLayout& layout, const NaParams& params,
                      const TensorView& rows_view, const Packed& rows, std::int64_t heads_kv,
                      const TensorView& weights, const TensorView& grad) {
  const Tables<Rank> tables(g, params);
  const UnfusedKeyPass<Rank, T> op(g, layout, tables, rows_view, rows, params, heads_kv);
  for_rows(g.batch, heads_kv, layout.rows, [&](std::int64_t b, std::int64_t hk, std::int64_t row) {
    thread_local typename UnfusedKeyPass<Rank, T>::Scratch s;
    op.key_row(weights, grad, b, hk, row, s);
  });
}

template <int Rank, typename T>
void na_qk_backward(const detail::QkBackwardArgs& args) {
  const Geometry<Rank> g(args.q, args.params);
  const ColumnLayout layout(g);
  const auto [k, q] = pack_pair<Rank, T>(args.k, args.q, g, layout);

  const Unfused<Rank, T> op(g, layout, args.k, k, args.params, nullptr);
  const BiasBuffer<Rank, float> bias_layout(args.params, g.heads);
  const std::int64_t per_head = args.drpb ? bias_layout.strides[0] : 0;
  std::vector<float> partials(g.batch * g.heads * layout.rows * per_head, 0.0f);
  unfused_query_pass(op, [&](std::int64_t b, std::int64_t h, std::int64_t row, auto&&... block) {
    float* partial = per_head ? partials.data() + ((b * g.heads + h) * layout.rows + row) * per_head
                              : nullptr;
    op.qk_backward_block(args, partial, b, h, block...);
  });
  if (args.drpb) {
    store_bias_grad<T>(bias_layout, partials.data(), g.batch * g.heads * layout.rows, layout.rows,
                       *args.drpb);
  }
  unfused_key_pass<Rank, T>(g, layout, args.params, args.q, q, k.heads, args.dattn, args.dk);
}

template <int Rank, typename T>
void na_av_backward(const detail::AvBackwardArgs& args) {
  const Geometry<Rank> g(args.attn, args.params);
  const ColumnLayout layout(g);
  const auto [v, dout] = pack_pair<Rank, T>(args.v, args.dout, g, layout);

  const Unfused<Rank, T> op(g, layout, args.v, v, args.params, nullptr);
  unfused_query_pass(op, [&](std::int64_t b, std::int64_t h, std::int64_t, auto&&... block) {
    op.av_backward_block(args, b, h, block...);
  });
  unfused_key_pass<Rank, T>(g, layout, args.params, args.dout, dout, v.heads, args.attn,
                            args.dv);
}

}  // namespace libna::cpu::LIBNA_SIMD_NS
