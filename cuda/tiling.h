// Tile scheduling for the fused CUDA kernels, in host/device code so that the
// host tests (tests/cpp/test_tiling.cpp) run exactly what the kernels run.
//
// Every problem is padded to three spatial axes (missing axes have length 1,
// kernel 1), so one kernel serves ranks 1, 2 and 3. Along each axis the work
// is cut by dilation group: a block owns a box of consecutive positions of
// one group (queries for the forward and dq kernels, keys for the dk/dv
// kernel) and visits, tile by tile, the box of the other kind that its owned
// positions relate to. Window starts and ends never decrease along a group,
// so per axis
//   - the keys seen by queries [a, b) form the run [start(a), end(b - 1)),
//     and the keys seen by all of them the run [start(b - 1), end(a));
//   - the queries that see key j form a run [first(j), last(j)] (found by
//     binary search over the window rule itself, see `queries_seeing`).
// Boxes are products of those runs, so no visited tile is unreachable; a
// tile whose every slot relates to every owned position is "full" and needs
// no per-element mask.
#pragma once

#include <cstdint>

#include "libna/window.h"

// Loops over the three axes are unrolled on the device, so that per-axis
// arrays stay in registers instead of local memory.
#if defined(__CUDA_ARCH__)
#  define LIBNA_UNROLL _Pragma("unroll")
#else
#  define LIBNA_UNROLL
#endif

namespace libna::tiling {

inline constexpr int kAxes = 3;

// The window [lo, hi) of group position `iq` in a group of length `len_g`,
// in group coordinates.
LIBNA_HOST_DEVICE void window_in_group(int iq, int len_g, const AxisParams& p, int* lo,
                                       int* hi) {
  std::int64_t start = 0, count = 0;
  group_window(iq, len_g, p, &start, &count);
  *lo = static_cast<int>(start);
  *hi = static_cast<int>(start + count);
}

// The group positions [*first, *last] of the queries whose windows hold key
// position `jk` (group coordinates); empty when *first > *last.
LIBNA_HOST_DEVICE void queries_seeing(int jk, int len_g, const AxisParams& p, int* first,
                                      int* last) {
  int a = 0, b = len_g, lo = 0, hi = 0;
  while (a < b) {  // first query whose window ends after jk
    const int m = a + (b - a) / 2;
    window_in_group(m, len_g, p, &lo, &hi);
    if (hi > jk) b = m; else a = m + 1;
  }
  *first = a;
  a = 0;
  b = len_g;
  while (a < b) {  // first query whose window starts after jk
    const int m = a + (b - a) / 2;
    window_in_group(m, len_g, p, &lo, &hi);
    if (lo > jk) b = m; else a = m + 1;
  }
  *last = a - 1;
}

// ---- block shapes of the fused kernels -----------------------------------------
// Head dims are served by buckets of a maximum size (the largest of D, D_v
// rounded up to 32, 64, 128 or 256). In the forward kernel a query is held by
// bucket/32 threads, 32 dims each; in the dq kernel (three rows in registers:
// q, dout, dq) by bucket/16 threads, 16 dims each, and in the dk/dv kernel a
// key likewise.
inline constexpr int kThreads = 128;
inline constexpr int kMaxHeadDim = 256;

// The bucket for head dims up to `dim`; 0 when there is none.
LIBNA_HOST_DEVICE constexpr int head_dim_bucket(std::int64_t dim) {
  return dim <= 32 ? 32 : dim <= 64 ? 64 : dim <= 128 ? 128 : dim <= kMaxHeadDim ? 256 : 0;
}
LIBNA_HOST_DEVICE constexpr int query_lanes(int bucket) { return bucket / 32; }
LIBNA_HOST_DEVICE constexpr int forward_queries(int bucket) {
  return kThreads / query_lanes(bucket);
}
LIBNA_HOST_DEVICE constexpr int forward_keys(int bucket) { return bucket <= 128 ? 32 : 16; }
LIBNA_HOST_DEVICE constexpr int dq_lanes(int bucket) { return bucket / 16; }
LIBNA_HOST_DEVICE constexpr int dq_queries(int bucket) { return kThreads / dq_lanes(bucket); }
LIBNA_HOST_DEVICE constexpr int key_lanes(int bucket) { return bucket / 16; }
LIBNA_HOST_DEVICE constexpr int backward_keys(int bucket) { return kThreads / key_lanes(bucket); }
LIBNA_HOST_DEVICE constexpr int backward_queries(int bucket) {
  return 4096 / bucket < 64 ? 4096 / bucket : 64;
}

// The tensor-core forward (float16/bfloat16 on sm_80+, buckets up to
// kTcMaxHeadDim): each of the kThreads / 32 warps owns 16 query rows (one
// m16 tile), and key tiles of 64 keys are the n extent of S = Q K^T and the
// k extent of O = P V.
inline constexpr int kTcMaxHeadDim = 128;
LIBNA_HOST_DEVICE constexpr int tc_forward_queries() { return kThreads / 32 * 16; }
LIBNA_HOST_DEVICE constexpr int tc_forward_keys(int /*bucket*/) { return 64; }
// The tensor-core backward (same dtypes, buckets and architectures):
//   dq: the forward's 64 queries per block (Q and dO in shared memory); key
//     tiles of 64, 16 for bucket 128 (all within 48 KiB of shared memory);
//   dk/dv: 64 keys per block (four warps of 16 key rows), query tiles of 64,
//     16 for bucket 128 (K, V, Q and dO tiles all sit in shared memory).
LIBNA_HOST_DEVICE constexpr int tc_dq_keys(int bucket) { return bucket <= 64 ? 64 : 16; }
LIBNA_HOST_DEVICE constexpr int tc_dkdv_keys() { return kThreads / 32 * 16; }
LIBNA_HOST_DEVICE constexpr int tc_dkdv_queries(int bucket) { return bucket <= 64 ? 64 : 16; }

struct TileAxis {
  AxisParams p;
  int group_len;  // length of the longest dilation group: ceil(length / dilation)
  int q_tile;     // queries per tile along this axis
  int k_tile;     // keys per tile along this axis
  int own_tiles;  // owned tiles per dilation group
};

struct Plan {
  TileAxis axis[kAxes];
  bool own_queries;     // blocks own queries (forward, dq) or keys (dk/dv)
  int q_slots, k_slots;  // prod(q_tile), prod(k_tile)
  std::int64_t blocks;   // blocks per (batch, head)
};

// Doubles tile extents, last axis first, while their product stays within
// `capacity` and no extent passes the next power of two of its bound.
inline void grow_tile(int* tile, const int* bound, int capacity) {
  int product = 1;
  for (int a = 0; a < kAxes; ++a) tile[a] = 1;
  for (bool grew = true; grew;) {
    grew = false;
    for (int a = kAxes - 1; a >= 0; --a) {
      if (tile[a] < bound[a] && product * 2 <= capacity) {
        tile[a] *= 2;
        product *= 2;
        grew = true;
      }
    }
  }
}

// A plan for `rank` real axes (the rest padded), with `own_capacity` owned
// and `visit_capacity` visited slots per tile (powers of two).
inline Plan make_plan(const AxisParams* axes, int rank, int own_capacity, int visit_capacity,
                      bool own_queries) {
  Plan plan{};
  plan.own_queries = own_queries;
  int own_bound[kAxes], own[kAxes], visit_bound[kAxes], visit[kAxes];
  for (int a = 0; a < kAxes; ++a) {
    TileAxis& t = plan.axis[a];
    t.p = a < rank ? axes[a] : AxisParams{1, 1, 1, 1, false};
    t.group_len = static_cast<int>((t.p.length + t.p.dilation - 1) / t.p.dilation);
    own_bound[a] = t.group_len;
  }
  grow_tile(own, own_bound, own_capacity);
  for (int a = 0; a < kAxes; ++a) {
    const TileAxis& t = plan.axis[a];
    const std::int64_t span = own[a] + t.p.kernel + t.p.stride - 2;
    visit_bound[a] = span < t.group_len ? static_cast<int>(span) : t.group_len;
  }
  grow_tile(visit, visit_bound, visit_capacity);
  plan.q_slots = plan.k_slots = 1;
  plan.blocks = 1;
  for (int a = 0; a < kAxes; ++a) {
    TileAxis& t = plan.axis[a];
    t.q_tile = own_queries ? own[a] : visit[a];
    t.k_tile = own_queries ? visit[a] : own[a];
    t.own_tiles = (t.group_len + own[a] - 1) / own[a];
    plan.q_slots *= t.q_tile;
    plan.k_slots *= t.k_tile;
    plan.blocks *= static_cast<std::int64_t>(t.p.dilation) * t.own_tiles;
  }
  return plan;
}

// What one block owns and visits. All positions are group coordinates.
struct Block {
  int group[kAxes];
  int len_g[kAxes];
  int own_lo[kAxes], own_hi[kAxes];    // owned positions, clipped to the group
  int box_lo[kAxes], box_hi[kAxes];    // visited positions related to any owned one
  int full_lo[kAxes], full_hi[kAxes];  // visited positions related to every owned one
  int tiles[kAxes];                    // visited tiles per axis
  int num_tiles;
  bool empty;                          // owns nothing (a short dilation group's tail)
};

LIBNA_HOST_DEVICE Block make_block(const Plan& plan, std::int64_t index) {
  Block b{};
  b.empty = false;
  b.num_tiles = 1;
  LIBNA_UNROLL
  for (int a = kAxes - 1; a >= 0; --a) {
    const TileAxis& t = plan.axis[a];
    const int own_tile = plan.own_queries ? t.q_tile : t.k_tile;
    const int visit_tile = plan.own_queries ? t.k_tile : t.q_tile;
    const std::int64_t per_axis = t.p.dilation * static_cast<std::int64_t>(t.own_tiles);
    const int c = static_cast<int>(index % per_axis);
    index /= per_axis;
    b.group[a] = c / t.own_tiles;
    b.len_g[a] = static_cast<int>(group_length(t.p.length, t.p.dilation, b.group[a]));
    b.own_lo[a] = (c % t.own_tiles) * own_tile;
    b.own_hi[a] = b.own_lo[a] + own_tile < b.len_g[a] ? b.own_lo[a] + own_tile : b.len_g[a];
    if (b.own_lo[a] >= b.own_hi[a]) {
      b.empty = true;
      b.box_lo[a] = b.box_hi[a] = b.full_lo[a] = b.full_hi[a] = 0;
      b.tiles[a] = 0;
      b.num_tiles = 0;
      continue;
    }
    if (plan.own_queries) {
      window_in_group(b.own_lo[a], b.len_g[a], t.p, &b.box_lo[a], &b.full_hi[a]);
      window_in_group(b.own_hi[a] - 1, b.len_g[a], t.p, &b.full_lo[a], &b.box_hi[a]);
    } else {
      int first_lo = 0, last_lo = 0, first_hi = 0, last_hi = 0;  // of keys own_lo, own_hi - 1
      queries_seeing(b.own_lo[a], b.len_g[a], t.p, &first_lo, &last_lo);
      queries_seeing(b.own_hi[a] - 1, b.len_g[a], t.p, &first_hi, &last_hi);
      b.box_lo[a] = first_lo;
      b.box_hi[a] = last_hi + 1;
      b.full_lo[a] = first_hi;
      b.full_hi[a] = last_lo + 1;
    }
    const int span = b.box_hi[a] - b.box_lo[a];
    b.tiles[a] = span > 0 ? (span + visit_tile - 1) / visit_tile : 0;
    b.num_tiles *= b.tiles[a];
  }
  if (b.empty) b.num_tiles = 0;
  return b;
}

// One visited tile: positions [lo, hi) per axis.
struct Tile {
  int lo[kAxes], hi[kAxes];
  bool full;  // every slot holds a position related to every owned one
};

LIBNA_HOST_DEVICE Tile make_tile(const Plan& plan, const Block& b, int index) {
  Tile t{};
  t.full = true;
  LIBNA_UNROLL
  for (int a = kAxes - 1; a >= 0; --a) {
    const int visit_tile = plan.own_queries ? plan.axis[a].k_tile : plan.axis[a].q_tile;
    const int i = index % b.tiles[a];
    index /= b.tiles[a];
    t.lo[a] = b.box_lo[a] + i * visit_tile;
    t.hi[a] = t.lo[a] + visit_tile < b.box_hi[a] ? t.lo[a] + visit_tile : b.box_hi[a];
    t.full = t.full && t.hi[a] - t.lo[a] == visit_tile && t.lo[a] >= b.full_lo[a] &&
             t.hi[a] <= b.full_hi[a];
  }
  return t;
}

// Slot `slot` of a tile with extents `extent` whose positions start at `lo`
// and end before `hi`: its positions in *c; false when it holds none.
LIBNA_HOST_DEVICE bool slot_position(int slot, const int* extent, const int* lo, const int* hi,
                                     int* c) {
  bool valid = true;
  LIBNA_UNROLL
  for (int a = kAxes - 1; a >= 0; --a) {
    c[a] = lo[a] + slot % extent[a];
    slot /= extent[a];
    valid = valid && c[a] < hi[a];
  }
  return valid && slot == 0;
}

// Per-axis extents of the query or key tile.
LIBNA_HOST_DEVICE void tile_extents(const Plan& plan, bool queries, int* extent) {
  LIBNA_UNROLL
  for (int a = 0; a < kAxes; ++a) extent[a] = queries ? plan.axis[a].q_tile : plan.axis[a].k_tile;
}

// Full-axis index of group position `pos` in group `group`.
LIBNA_HOST_DEVICE std::int64_t full_index(int group, int pos, const AxisParams& p) {
  return group + static_cast<std::int64_t>(pos) * p.dilation;
}

// Offset of key position jk from query position iq in a [2k-1]-long rpb axis.
LIBNA_HOST_DEVICE int rpb_index(int iq, int jk, const AxisParams& p) {
  return jk - iq + static_cast<int>(p.kernel) - 1;
}

// ---- unfused kernels: the prod(kernel_size) slot layout ------------------------

// The row-major strides of the slot layout over three (padded) axes.
LIBNA_HOST_DEVICE void slot_strides(const AxisParams* axes, std::int64_t* stride) {
  stride[kAxes - 1] = 1;
  LIBNA_UNROLL
  for (int a = kAxes - 2; a >= 0; --a) stride[a] = stride[a + 1] * axes[a + 1].kernel;
}

// The key (full-axis indices in *key) in slot `slot` of query `query`;
// false when a causal window leaves the slot empty.
LIBNA_HOST_DEVICE bool slot_key(const AxisParams* axes, const std::int64_t* query,
                                std::int64_t slot, std::int64_t* key, int* rpb) {
  bool valid = true;
  LIBNA_UNROLL
  for (int a = kAxes - 1; a >= 0; --a) {
    const std::int64_t t = slot % axes[a].kernel;
    slot /= axes[a].kernel;
    const AxisWindow w = axis_window(query[a], axes[a]);
    key[a] = w.first + t * w.step;
    if (rpb) rpb[a] = static_cast<int>(w.rpb_first + t);
    valid = valid && t < w.count;
  }
  return valid;
}

// The queries that see key `key` along axis a, as full-axis indices
// first, first + step, ... (count of them).
LIBNA_HOST_DEVICE void key_queries(std::int64_t key, const AxisParams& p, std::int64_t* first,
                                   std::int64_t* count) {
  const int g = static_cast<int>(key % p.dilation);
  const int len_g = static_cast<int>(group_length(p.length, p.dilation, g));
  int f = 0, l = 0;
  queries_seeing(static_cast<int>(key / p.dilation), len_g, p, &f, &l);
  *first = full_index(g, f, p);
  *count = l >= f ? l - f + 1 : 0;
}

// The slot of key `key` in the window of query `query` along axis a.
LIBNA_HOST_DEVICE std::int64_t slot_in_window(std::int64_t query, std::int64_t key,
                                              const AxisParams& p) {
  return (key - axis_window(query, p).first) / p.dilation;
}

}  // namespace libna::tiling
