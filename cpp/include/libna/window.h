// The neighbourhood rule along one axis, shared by every backend and usable
// from host and device code. Everything else (tiles, masks, rpb offsets) is
// derived from `axis_window`.
//
// An axis of length L with dilation d splits into d interleaved groups; a
// query at index i belongs to group g = i mod d, where it sits at position
// i' = i div d of a sequence of length L_g = ceil((L - g) / d). Its keys come
// from its own group only. Non-causal windows hold exactly `kernel` keys and
// are shifted (never clipped) at the borders; causal windows end at the query
// and so hold up to `kernel` keys. Stride s makes groups of s consecutive
// queries share the window of a "leader" query.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#  define LIBNA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#  define LIBNA_HOST_DEVICE inline
#endif

namespace libna {

struct AxisParams {
  std::int64_t length = 1;
  std::int64_t kernel = 1;
  std::int64_t stride = 1;
  std::int64_t dilation = 1;
  bool causal = false;
};

// Keys of one query along one axis: full-axis indices
// first, first + step, ..., first + (count - 1) * step.
struct AxisWindow {
  std::int64_t first;      // full-axis index of the first key
  std::int64_t step;       // distance between keys (the dilation)
  std::int64_t count;      // number of keys: `kernel`, or fewer when causal
  std::int64_t rpb_first;  // rpb index of the first key: (j' - i') + kernel - 1
};

// Length of dilation group g along an axis of `length`.
LIBNA_HOST_DEVICE std::int64_t group_length(std::int64_t length,
                                            std::int64_t dilation,
                                            std::int64_t group) {
  return (length - group + dilation - 1) / dilation;
}

// Window start (in group coordinates) and key count for the query at group
// position `iq` in a group of length `len_g`.
LIBNA_HOST_DEVICE void group_window(std::int64_t iq, std::int64_t len_g,
                                    const AxisParams& p, std::int64_t* start,
                                    std::int64_t* count) {
  const std::int64_t block = (iq / p.stride) * p.stride;
  if (p.causal) {
    std::int64_t leader = block + p.stride - 1;
    if (leader > len_g - 1) leader = len_g - 1;
    std::int64_t lo = leader - p.kernel + 1;
    if (lo < 0) lo = 0;
    *start = lo;
    *count = iq - lo + 1;
  } else {
    std::int64_t leader = block + p.stride / 2;
    if (leader > len_g - 1) leader = len_g - 1;
    std::int64_t lo = leader - p.kernel / 2;
    if (lo > len_g - p.kernel) lo = len_g - p.kernel;
    if (lo < 0) lo = 0;
    *start = lo;
    *count = p.kernel;
  }
}

LIBNA_HOST_DEVICE AxisWindow axis_window(std::int64_t i, const AxisParams& p) {
  const std::int64_t g = i % p.dilation;
  const std::int64_t iq = i / p.dilation;
  const std::int64_t len_g = group_length(p.length, p.dilation, g);
  std::int64_t lo = 0, count = 0;
  group_window(iq, len_g, p, &lo, &count);
  AxisWindow w;
  w.first = g + lo * p.dilation;
  w.step = p.dilation;
  w.count = count;
  w.rpb_first = lo - iq + p.kernel - 1;
  return w;
}

}  // namespace libna
