// A block of eight lanes: consecutive positions of one dilation group along
// the last axis, each with its window there (LaneWindows). Query lanes see
// windows of keys (query_lanes); key lanes, the run of queries that see them
// (key_lanes). Away from borders the windows shift by one per lane, and a
// block reads one contiguous run per window position.
// Included inside the per-instruction-set namespace and target region of
// fast_kernels_impl.h (LIBNA_SIMD_NS), like every header of the vectorised
// kernels.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu/backward.h"
#include "cpu/simd.h"
#include "libna/window.h"

namespace libna::cpu::LIBNA_SIMD_NS {

using simd::f32x8;
using simd::i32x8;
using simd::kLanes;

// The windows of up to kLanes consecutive positions i0, i0+1, ... of one
// dilation group along the last axis: lane l covers window positions
// [lo[l], lo[l] + count[l]) of the group. The block reads, for j < window,
// position first + j + l in lane l: contiguous loads covering every lane's
// window. `masked` unless every lane is present and reads exactly its own
// window (each lane's window the previous one moved by one, away from the
// borders); then mask() sets the entries outside a lane's window to -inf.
struct LaneWindows {
  std::int64_t i0 = 0, lanes = 0, first = 0, window = 0;
  std::int64_t lo[kLanes] = {}, count[kLanes] = {};
  bool masked = true;

  void finish() {
    std::int64_t begin = 0, end = 0;
    bool any = false;
    for (std::int64_t l = 0; l < lanes; ++l) {
      if (count[l] == 0) continue;  // a key no query sees (stride > 1)
      begin = any ? std::min(begin, lo[l] - l) : lo[l] - l;
      end = any ? std::max(end, lo[l] + count[l] - l) : lo[l] + count[l] - l;
      any = true;
    }
    first = begin;
    window = end - begin;
    masked = lanes != kLanes;
    for (std::int64_t l = 0; l < lanes; ++l) {
      masked = masked || lo[l] - l != first || count[l] != window;
    }
  }
  // Per lane, the entries j of its window: lo <= j < hi (none in absent
  // lanes).
  void entry_bounds(i32x8* lo_v, i32x8* hi_v) const {
    alignas(32) std::int32_t lo32[kLanes] = {}, hi32[kLanes] = {};
    for (std::int64_t l = 0; l < lanes; ++l) {
      lo32[l] = static_cast<std::int32_t>(lo[l] - l - first);
      hi32[l] = static_cast<std::int32_t>(lo[l] + count[l] - l - first);
    }
    std::memcpy(lo_v, lo32, sizeof *lo_v);
    std::memcpy(hi_v, hi32, sizeof *hi_v);
  }

  // values[j][lane] = fill (-inf: logits; 0: probabilities) where position
  // first + j + lane is outside the lane's window, for j < n.
  void mask(float* values, std::int64_t n,
            float fill = -std::numeric_limits<float>::infinity()) const {
    i32x8 lo_v, hi_v;
    entry_bounds(&lo_v, &hi_v);
    const f32x8 outside = simd::splat(fill);
    for (std::int64_t j = 0; j < n; ++j) {
      const i32x8 jv = i32x8{} + static_cast<std::int32_t>(j);
      const i32x8 inside = (jv >= lo_v) & (jv < hi_v);
      simd::store(values + j * kLanes, inside ? simd::load(values + j * kLanes) : outside);
    }
  }
};

// Query lanes: each lane's window of keys.
inline LaneWindows query_lanes(const AxisParams& axis, std::int64_t group_len, std::int64_t i0,
                               std::int64_t lanes) {
  LaneWindows w;
  w.i0 = i0;
  w.lanes = lanes;
  for (std::int64_t l = 0; l < lanes; ++l) group_window(i0 + l, group_len, axis, &w.lo[l], &w.count[l]);
  w.finish();
  return w;
}

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
  w.finish();
  return w;
}

}  // namespace libna::cpu::LIBNA_SIMD_NS
