// How the fused kernels split their work: each row's lane blocks in column
// tiles sized to stay in L2 (ColumnTiles, TileColumns), and work items (b,
// h, tile, row), rows innermost, run on the thread pool with each thread's
// own scratch (for_tiled_rows).
// Included inside the per-instruction-set namespace and target region of
// fast_kernels_impl.h (LIBNA_SIMD_NS), like every header of the vectorised
// kernels.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/lane_windows.h"
#include "cpu/packed_layout.h"
#include "cpu/thread_pool.h"
#include "cpu/thread_scratch.h"
#include "cpu/tuning.h"

namespace libna::cpu::LIBNA_SIMD_NS {

// A range [begin, end) of a row's lane blocks (ColumnLayout::blocks).
struct BlockRange {
  std::int64_t begin = 0, end = 0;
};

// The lane blocks of a row split into column tiles. Work items are (b, h,
// tile, row) with rows innermost, so a thread walks down the rows of one
// tile, and the key and value columns the tile's windows cover (`window_rows`
// packed rows of `channels` floats per column) stay in its L2 cache across
// the rows that share them (tuning::kColumnTileBytes). Rows narrow enough
// for that are one tile.
struct ColumnTiles {
  std::int64_t count = 1, blocks_per_tile = 1;

  ColumnTiles(const ColumnLayout& layout, std::int64_t window_rows, std::int64_t channels)
      : ColumnTiles(layout.blocks, tuning::kColumnTileBytes / (window_rows * kLanes * channels *
                                                               std::int64_t{sizeof(float)})) {}
  // Even tiles of at most `fit` (at least 1) of `blocks` blocks.
  ColumnTiles(std::int64_t blocks, std::int64_t fit) {
    fit = std::max<std::int64_t>(1, fit);
    count = std::max<std::int64_t>(1, (blocks + fit - 1) / fit);
    blocks_per_tile = (blocks + count - 1) / count;
  }
  BlockRange operator[](std::int64_t t) const { return {t * blocks_per_tile, (t + 1) * blocks_per_tile}; }
};

// One work item of for_tiled_rows: the blocks `tile` (tile number
// `tile_index`) of row `row` of (b, h); `item` numbers the items, rows
// innermost.
struct TiledRow {
  std::int64_t item, b, h, row, tile_index;
  BlockRange tile;
};

// Runs fn(item, scratch) over every (batch, head, tile, row), rows innermost,
// with the thread's thread_scratch(); start(scratch) runs before every chunk
// of items a thread takes.
template <typename Scratch, typename Start, typename Fn>
void for_tiled_rows(std::int64_t batch, std::int64_t heads, std::int64_t rows,
                    const ColumnTiles& tiles, const Start& start, const Fn& fn) {
  parallel_for(batch * heads * tiles.count * rows, 1, [&](std::int64_t begin, std::int64_t end) {
    Scratch& scratch = thread_scratch<Scratch>();
    start(scratch);
    for (std::int64_t item = begin; item < end; ++item) {
      const std::int64_t tile = (item / rows) % tiles.count;
      const std::int64_t h = (item / (rows * tiles.count)) % heads;
      fn(TiledRow{item, item / (rows * tiles.count * heads), h, item % rows, tile, tiles[tile]},
         scratch);
    }
  });
}

// The columns each column tile reads: of the rows its lanes sit in (`own`:
// the lanes' positions) and of the rows their windows cover (`window`: every
// block's covering range, first .. first + window + kLanes - 1).
struct TileColumns {
  std::vector<ColumnRanges> own, window;

  // (kernel: a LaneKernel; lanes_of as for its for_lane_blocks.)
  template <typename Kernel, typename LanesOf>
  TileColumns(const Kernel& kernel, const ColumnTiles& tiles, const LanesOf& lanes_of)
      : own(tiles.count, ColumnRanges(kernel.layout.dilation)),
        window(tiles.count, ColumnRanges(kernel.layout.dilation)) {
    for (std::int64_t t = 0; t < tiles.count; ++t) {
      kernel.for_lane_blocks(tiles[t], lanes_of, [&](std::int64_t grp, const LaneWindows& w) {
        own[t].add(grp, w.i0, w.i0 + kLanes);
        if (w.window > 0) window[t].add(grp, w.first, w.first + w.window + kLanes - 1);
      });
    }
  }
};

}  // namespace libna::cpu::LIBNA_SIMD_NS
