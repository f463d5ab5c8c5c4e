// LaneKernel: what every vectorised kernel shares (fused forward and
// backward, the unfused ops): the geometry, the rpb as contiguous float, the
// walk over a row's lane blocks, moving lanes to and from the tensors, and
// the logits of a block of query lanes.
// Included inside the per-instruction-set namespace and target region of
// fast_kernels_impl.h (LIBNA_SIMD_NS), like every header of the vectorised
// kernels.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/backward.h"
#include "cpu/column_tiles.h"
#include "cpu/kernels.h"
#include "cpu/lane_windows.h"
#include "cpu/lanes.h"
#include "cpu/micro_kernels.h"
#include "cpu/neighbour_rows.h"
#include "cpu/packed_layout.h"
#include "cpu/packing.h"

namespace libna::cpu::LIBNA_SIMD_NS {

// State shared by the vectorised forward and backward: geometry, the packed
// K and V, the bias as contiguous float.
template <int Rank, typename T>
struct LaneKernel {
  const Geometry<Rank>& g;
  const ColumnLayout& layout;
  std::int64_t k_dim, v_dim;
  BiasBuffer<Rank, float> bias_layout;
  std::vector<float> bias;           // rpb as contiguous float [heads][2k-1...], or empty
  const std::int64_t* bias_strides;  // bias_layout.strides
  std::int64_t heads_per_kv;
  float scale;
  // Floats between the channels of a packed row: the whole packed width for
  // the unfused ops' full-size packed tensors; the widest tile's columns for
  // the fused kernels' row caches (set_row_stride).
  std::int64_t row_stride;

  LaneKernel(const Geometry<Rank>& geometry, const ColumnLayout& columns, const TensorView& k,
             const TensorView& v, const NaParams& params, const TensorView* rpb, double sc)
      : g(geometry), layout(columns), k_dim(k.shape[Rank + 2]), v_dim(v.shape[Rank + 2]),
        bias_layout(params, geometry.heads),
        bias(rpb ? bias_layout.template load_from<T>(*rpb) : std::vector<float>()),
        bias_strides(bias_layout.strides), heads_per_kv(geometry.heads / k.shape[Rank + 1]),
        scale(static_cast<float>(sc)), row_stride(columns.width) {}

  // Packed rows as wide as the widest of the column ranges the kernel packs
  // (each a std::vector<ColumnRanges>).
  template <typename... RangeLists>
  void set_row_stride(const RangeLists&... lists) {
    row_stride = 0;
    const auto widen = [&](const auto& list) {
      for (const ColumnRanges& r : list) row_stride = std::max(row_stride, r.span(layout));
    };
    (widen(lists), ...);
  }

  const AxisParams& last() const { return g.axes[Rank - 1]; }
  BlockRange whole_row() const { return {0, layout.blocks}; }

  // Calls block(grp, lanes_of(grp, i0, lanes)) for the blocks of up to
  // kLanes consecutive positions i0, ... of each dilation group along the
  // last axis, numbered group by group, that are in `tile`.
  template <typename LanesOf, typename Block>
  void for_lane_blocks(const BlockRange& tile, const LanesOf& lanes_of, const Block& block) const {
    std::int64_t index = 0;
    for (std::int64_t grp = 0; grp < layout.dilation; ++grp) {
      const std::int64_t len = layout.group_len[grp];
      for (std::int64_t i0 = 0; i0 < len; i0 += kLanes, ++index) {
        if (index < tile.begin) continue;
        if (index >= tile.end) return;
        block(grp, lanes_of(grp, i0, std::min<std::int64_t>(kLanes, len - i0)));
      }
    }
  }
  // The same with query lanes (each lane's window of keys).
  template <typename Block>
  void for_query_blocks(const BlockRange& tile, const Block& block) const {
    for_lane_blocks(tile, [&](std::int64_t grp, std::int64_t i0, std::int64_t lanes) {
      return query_lanes(last(), layout.group_len[grp], i0, lanes);
    }, block);
  }

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

  // Starts fetching, for writing, the lanes' head vectors of an output that
  // store_lanes will write once the block is computed (contiguous vectors).
  void prefetch_lanes(const TensorView& t, std::int64_t b, std::int64_t* c, std::int64_t h,
                      std::int64_t grp, const LaneWindows& w) const {
    if (t.strides[Rank + 2] != 1) return;
    T* tokens[kLanes];
    lane_tokens(t, b, c, h, grp, w, tokens);
    const std::int64_t bytes = t.shape[Rank + 2] * std::int64_t{sizeof(T)};
    for (std::int64_t l = 0; l < w.lanes; ++l) prefetch_lines<true>(tokens[l], bytes);
  }

  // t[b, c (lane positions), h, d] = factor[lane] * src[d * src_stride +
  // lane], for the lanes of w.
  void store_lanes(const TensorView& t, std::int64_t b, std::int64_t* c, std::int64_t h,
                   std::int64_t grp, const LaneWindows& w, f32x8 factor, const float* src,
                   std::int64_t src_stride = kLanes) const {
    T* tokens[kLanes];
    lane_tokens(t, b, c, h, grp, w, tokens);
    scatter_lanes(src, factor, t.shape[Rank + 2], tokens, w.lanes, t.strides[Rank + 2], src_stride);
  }

  // logits[r][j][lane] = q.k (+ rpb) of each lane's query (channel d at
  // q_lanes + d * q_stride: from lanes_at, or a [d][lane] buffer) with the
  // key at group position w.first + j + lane of key row r (packed row at
  // key_ptrs[r], from window_rows); -inf outside a lane's window.
  void logits(const float* q_lanes, std::int64_t q_stride, std::int64_t h,
              const LaneWindows& w, const RowList& key_rows,
              const float* const* key_ptrs, float* out) const {
    const std::int64_t window = w.window, kernel = last().kernel;
    const std::int64_t bias_step = bias_strides[Rank];
    qk_rows(q_lanes, q_stride, key_ptrs, key_rows.size, row_stride, k_dim, window, out);
    // Key first + j + l of query i0 + l: relative position first + j - i0,
    // the same in every lane.
    const std::int64_t rel0 = w.first - w.i0 + kernel - 1;
    const std::int64_t j_begin = std::max<std::int64_t>(0, -rel0);
    const std::int64_t j_end = std::min(window, 2 * kernel - 1 - rel0);
    for (std::int64_t r = 0; r < key_rows.size; ++r) {
      float* logits = out + r * window * kLanes;
      if (!bias.empty()) {
        const float* bias_row = bias.data() + h * bias_strides[0] + key_rows.bias[r];
        for (std::int64_t j = j_begin; j < j_end; ++j) {
          simd::store(logits + j * kLanes, simd::load(logits + j * kLanes) +
                                               simd::splat(bias_row[(rel0 + j) * bias_step]));
        }
      }
      if (w.masked) w.mask(logits, window);
    }
  }

  // The lanes of w in a packed row: column group_base + i0, read with stride
  // row_stride (lanes past the group read its zero padding).
  const float* lanes_at(const float* packed_row, std::int64_t grp, const LaneWindows& w) const {
    return packed_row + layout.group_base[grp] + w.i0;
  }

  // The packed rows `rows` (row r at bases[r]) at the block's first window
  // column.
  void window_rows(const std::vector<const float*>& bases, std::int64_t grp, const LaneWindows& w,
                   std::vector<const float*>& out) const {
    out.resize(bases.size());
    for (std::size_t r = 0; r < bases.size(); ++r) out[r] = bases[r] + layout.group_base[grp] + w.first;
  }
};

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

}  // namespace libna::cpu::LIBNA_SIMD_NS
