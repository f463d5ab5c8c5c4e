// The column layout of packed rows, the vectorised kernels' view of a tensor
// [B, *spatial, heads, dim]: a row is one position of all but the last
// spatial axis, stored head-dim-major ([d][col]), with the last axis' columns
// regrouped so that each dilation group is contiguous. A window, which stays
// inside one group, is then a contiguous run, and eight consecutive columns
// are one vector load.
// Included inside the per-instruction-set namespace and target region of
// fast_kernels_impl.h (LIBNA_SIMD_NS), like every header of the vectorised
// kernels.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/simd.h"

namespace libna::cpu::LIBNA_SIMD_NS {

using simd::kLanes;

// How packed tensors lay out the spatial positions: `row` enumerates the
// positions of all but the last spatial axis; `col` is the last axis, with
// each dilation group's positions stored contiguously from group_base[g], so
// that a window (which stays inside one group) is a contiguous run. kPad zero
// columns precede and follow every group: a block of lanes may read up to
// kLanes - 1 columns beyond its group on either side (always masked).
struct ColumnLayout {
  static constexpr std::int64_t kPad = kLanes;
  std::int64_t rows = 0, extent = 0, width = 0, dilation = 1;
  std::int64_t blocks = 0;  // lane blocks of a row: kLanes positions of one group each
  std::vector<std::int64_t> group_base, group_len, group_blocks;  // group_blocks: its first block

  template <int Rank>
  explicit ColumnLayout(const Geometry<Rank>& g)
      : rows(g.tokens / g.spatial[Rank - 1]), extent(g.spatial[Rank - 1]),
        dilation(g.axes[Rank - 1].dilation), group_base(dilation), group_len(dilation),
        group_blocks(dilation) {
    std::int64_t base = kPad;
    for (std::int64_t grp = 0; grp < dilation; ++grp) {
      group_base[grp] = base;
      group_len[grp] = group_length(extent, dilation, grp);
      base += group_len[grp] + kPad;
      group_blocks[grp] = blocks;
      blocks += (group_len[grp] + kLanes - 1) / kLanes;
    }
    width = base;
  }
  // The lane block holding group position i of group grp.
  std::int64_t block(std::int64_t grp, std::int64_t i) const { return group_blocks[grp] + i / kLanes; }
  // Packed column of position x along the last axis.
  std::int64_t column(std::int64_t x) const { return group_base[x % dilation] + x / dilation; }
  // Floats of a packed tensor with `heads` heads of `dim` channels.
  std::int64_t packed_size(std::int64_t batch, std::int64_t heads, std::int64_t dim) const {
    return batch * heads * rows * dim * width;
  }
};

// Group positions [lo(g), hi(g)) of each dilation group g: the columns of a
// packed row to fill. Positions outside [0, group_len) are the zero padding
// (at most ColumnLayout::kPad either side); lo >= hi: none. Up to
// kInlineGroups groups are held inline: every call's set-up makes a few of
// these, and small dilations then allocate nothing.
class ColumnRanges {
 public:
  static constexpr std::int64_t kInlineGroups = 4;

  explicit ColumnRanges(std::int64_t groups = 0) : groups_(groups) {
    if (groups > kInlineGroups) heap_.resize(2 * groups);
    std::int64_t* b = bounds();
    for (std::int64_t grp = 0; grp < groups; ++grp) {
      b[2 * grp] = std::numeric_limits<std::int64_t>::max();
      b[2 * grp + 1] = std::numeric_limits<std::int64_t>::min();
    }
  }
  std::int64_t lo(std::int64_t grp) const { return bounds()[2 * grp]; }
  std::int64_t hi(std::int64_t grp) const { return bounds()[2 * grp + 1]; }
  void add(std::int64_t grp, std::int64_t begin, std::int64_t end) {
    std::int64_t* b = bounds();
    b[2 * grp] = std::min(b[2 * grp], begin);
    b[2 * grp + 1] = std::max(b[2 * grp + 1], end);
  }
  // The packed columns [first, end) that span every range (end <= first:
  // none).
  std::pair<std::int64_t, std::int64_t> span_columns(const ColumnLayout& layout) const {
    std::int64_t first = layout.width, end = 0;
    for (std::int64_t grp = 0; grp < groups_; ++grp) {
      if (lo(grp) >= hi(grp)) continue;
      first = std::min(first, layout.group_base[grp] + lo(grp));
      end = std::max(end, layout.group_base[grp] + hi(grp));
    }
    return {first, end};
  }
  std::int64_t first(const ColumnLayout& layout) const { return span_columns(layout).first; }
  std::int64_t span(const ColumnLayout& layout) const {
    const auto [first, end] = span_columns(layout);
    return std::max<std::int64_t>(0, end - first);
  }
  // Every column of every group, padding included.
  static ColumnRanges whole(const ColumnLayout& layout) {
    ColumnRanges all(layout.dilation);
    for (std::int64_t grp = 0; grp < layout.dilation; ++grp) {
      all.add(grp, -ColumnLayout::kPad, layout.group_len[grp] + ColumnLayout::kPad);
    }
    return all;
  }

 private:
  // lo(g) at [2g], hi(g) at [2g + 1].
  std::int64_t* bounds() { return groups_ > kInlineGroups ? heap_.data() : inline_; }
  const std::int64_t* bounds() const { return groups_ > kInlineGroups ? heap_.data() : inline_; }

  std::int64_t groups_;
  std::int64_t inline_[2 * kInlineGroups] = {};
  std::vector<std::int64_t> heap_;
};

}  // namespace libna::cpu::LIBNA_SIMD_NS
