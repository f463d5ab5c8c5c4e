// Packing: reading a tensor's head vectors into packed rows
// (packed_layout.h), eight tokens at a time through the register transposes
// of lanes.h, with prefetches ahead of the reads. PackSource packs single
// rows on demand (the fused kernels' row caches); pack() packs a whole tensor
// (the unfused ops).
// Included inside the per-instruction-set namespace and target region of
// fast_kernels_impl.h (LIBNA_SIMD_NS), like every header of the vectorised
// kernels.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <utility>

#include "cpu/kernels.h"  // (before lanes.h, which uses its load and store)
#include "cpu/lanes.h"
#include "cpu/packed_layout.h"
#include "cpu/thread_pool.h"
#include "cpu/thread_scratch.h"

namespace libna::cpu::LIBNA_SIMD_NS {

// Starts fetching the cache lines of `bytes` bytes from p (for writing: the
// lines an output store will fill).
template <bool ForWrite = false>
inline void prefetch_lines(const void* p, std::int64_t bytes) {
  const char* at = static_cast<const char*>(p);
  for (std::int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(at + i, ForWrite);
}

// One tensor [B, *spatial, heads, dim] as float, indexed [b][h][row][d][col].
struct Packed {
  float* data = nullptr;
  std::int64_t heads = 0, rows = 0, width = 0, dim = 0;
  bool finite = true;  // no inf or NaN anywhere in it

  std::int64_t size() const { return heads * rows * width * dim; }  // per batch entry
  float* row(std::int64_t b, std::int64_t h, std::int64_t r) const {
    return data + (((b * heads + h) * rows + r) * dim) * width;
  }
};

// A tensor [B, *spatial, heads, dim] (times `factor`) as a source of packed
// rows ([d][col], layout.width columns per channel).
template <int Rank, typename T>
class PackSource {
 public:
  PackSource(const TensorView& t, const Geometry<Rank>& g, const ColumnLayout& layout,
             float factor)
      : heads(t.shape[Rank + 1]), dim(t.shape[Rank + 2]), source_(t), g_(g), layout_(layout),
        factor_(factor) {}

  const std::int64_t heads, dim;
  const ColumnLayout& layout() const { return layout_; }

  // Starts fetching one token's head vector into cache (contiguous vectors
  // only: scattered channels are left to the hardware).
  void prefetch(const T* token) const {
    if (source_.strides[Rank + 2] == 1) prefetch_lines(token, dim * std::int64_t{sizeof(T)});
  }

  // Starts fetching the tokens pack(b, h, r, cols, ...) will read.
  void prefetch_row(std::int64_t b, std::int64_t h, std::int64_t r, const ColumnRanges& cols) const {
    const T* src = static_cast<const T*>(source_.data);
    std::int64_t c[Rank];
    row_coords<Rank>(g_, r, c);
    for (std::int64_t grp = 0; grp < layout_.dilation; ++grp) {
      const std::int64_t end = std::min(cols.hi(grp), layout_.group_len[grp]);
      for (std::int64_t i = std::max<std::int64_t>(cols.lo(grp), 0); i < end; ++i) {
        c[Rank - 1] = grp + i * layout_.dilation;
        prefetch(src + row_offset<Rank>(source_, b, c, h));
      }
    }
  }

  // Packs the columns `cols` of row r of (b, h) into `memory` (dim rows of
  // `stride` >= cols.span() floats, column cols.first() first) and returns
  // the row as the kernels address it: channel d of packed column x at
  // [d * stride + x] (*finite: whether its values are). Rows narrower than
  // the whole packed row keep only their tile's columns, so a long last axis
  // never takes whole rows of scratch.
  float* pack_columns(std::int64_t b, std::int64_t h, std::int64_t r, const ColumnRanges& cols,
                      float* memory, std::int64_t stride, bool* finite) const {
    // The origin of absolute column 0, outside `memory` when cols.first() >
    // 0: formed through an integer (implementation-defined, not undefined),
    // and only ever read at columns inside it.
    const auto origin = reinterpret_cast<std::uintptr_t>(memory) -
                        static_cast<std::uintptr_t>(cols.first(layout_)) * sizeof(float);
    float* row = reinterpret_cast<float*>(origin);
    *finite = pack(b, h, r, cols, row, stride);
    return row;
  }

  // Fills the columns `cols` of dst with row r of (b, h): eight tokens of a
  // dilation group at a time go through a register transpose into eight
  // consecutive columns; the padding columns in range are zeroed. Channel d
  // of column x goes to dst[d * width + x]. Returns whether every value
  // packed is finite.
  bool pack(std::int64_t b, std::int64_t h, std::int64_t r, const ColumnRanges& cols,
            float* dst, std::int64_t width) const {
    f32x8 probe = simd::splat(0.0f);
    const T* tokens[kLanes];
    const T* src = static_cast<const T*>(source_.data);
    std::int64_t c[Rank];
    row_coords<Rank>(g_, r, c);
    for (std::int64_t grp = 0; grp < layout_.dilation; ++grp) {
      const std::int64_t len = layout_.group_len[grp], lo = cols.lo(grp), hi = cols.hi(grp);
      if (lo >= hi) continue;
      float* base = dst + layout_.group_base[grp];
      alignas(32) static constexpr float kZeros[kLanes] = {};
      for (std::int64_t d = 0; d < dim; ++d) {  // (at most kPad = kLanes columns each side)
        if (lo < 0) store_first(base + d * width + lo, kZeros, -lo);
        if (hi > len) store_first(base + d * width + len, kZeros, hi - len);
      }
      const std::int64_t end = std::min(hi, len), begin = std::max<std::int64_t>(lo, 0);
      const auto token = [&](std::int64_t i) {
        c[Rank - 1] = grp + i * layout_.dilation;
        return src + row_offset<Rank>(source_, b, c, h);
      };
      // The tokens are rarely in cache: fetch the next block's while
      // transposing this one.
      for (std::int64_t i = begin; i < std::min(end, begin + kLanes); ++i) prefetch(token(i));
      for (std::int64_t i0 = begin; i0 < end; i0 += kLanes) {
        const std::int64_t lanes = std::min<std::int64_t>(kLanes, end - i0);
        for (std::int64_t i = i0 + kLanes; i < std::min(end, i0 + 2 * kLanes); ++i) {
          prefetch(token(i));
        }
        for (std::int64_t l = 0; l < lanes; ++l) tokens[l] = token(i0 + l);
        gather_lanes(tokens, lanes, source_.strides[Rank + 2], dim, factor_, base + i0, width,
                     &probe);
      }
    }
    alignas(32) float lanes[kLanes];
    simd::store(lanes, probe);
    return std::all_of(lanes, lanes + kLanes, [](float x) { return x == 0.0f; });
  }

 private:
  const TensorView& source_;
  const Geometry<Rank>& g_;
  const ColumnLayout& layout_;
  float factor_;
};

// A whole tensor packed into dst (the unfused ops' layout). One work item per
// (b, row) over all heads, so that the input is read token by token in
// memory order.
template <int Rank, typename T>
Packed pack(const TensorView& t, const Geometry<Rank>& g, const ColumnLayout& layout,
            float factor, float* dst) {
  const PackSource<Rank, T> source(t, g, layout, factor);
  Packed p;
  p.data = dst;
  p.heads = source.heads;
  p.dim = source.dim;
  p.rows = layout.rows;
  p.width = layout.width;
  const ColumnRanges all = ColumnRanges::whole(layout);
  std::atomic<bool> finite{true};
  parallel_for(g.batch * p.rows, 1, [&](std::int64_t begin, std::int64_t end) {
    bool rows_finite = true;
    for (std::int64_t item = begin; item < end; ++item) {
      const std::int64_t b = item / p.rows, r = item % p.rows;
      for (std::int64_t h = 0; h < p.heads; ++h) {
        rows_finite = source.pack(b, h, r, all, p.row(b, h, r), p.width) && rows_finite;
      }
    }
    if (!rows_finite) finite = false;
  });
  p.finite = finite;
  return p;
}

// Packs two tensors into the calling thread's workspace.
template <int Rank, typename T>
std::pair<Packed, Packed> pack_pair(const TensorView& a, const TensorView& b,
                                    const Geometry<Rank>& g, const ColumnLayout& layout) {
  const auto size = [&](const TensorView& t) {
    return layout.packed_size(g.batch, t.shape[Rank + 1], t.shape[Rank + 2]);
  };
  float* buffer = workspace(size(a) + size(b));
  return {pack<Rank, T>(a, g, layout, 1.0f, buffer),
          pack<Rank, T>(b, g, layout, 1.0f, buffer + size(a))};
}

}  // namespace libna::cpu::LIBNA_SIMD_NS
