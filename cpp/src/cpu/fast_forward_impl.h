// The vectorised fused forward, included once per instruction set by
// fast_kernels_impl.h (compiled by fast_kernels_{avx2,portable}.cpp) inside
// its target region, with LIBNA_SIMD_NS defined. Used for
// float32/float16/bfloat16 (float64 keeps the scalar kernel in kernels.h).
//
// The idea: put 8 consecutive queries of one dilation
// group along the last spatial axis in SIMD lanes. Their windows along that
// axis are the same shape shifted by one position each (away from the
// borders), and along the other axes they are identical. With K and V
// repacked head-dim-major and group-contiguous ("[row][d][col]"), the keys of
// all 8 lanes at one window offset are a single contiguous load, so Q.K and
// P.V become FMAs with no broadcasts, no wasted products and no horizontal
// sums. Blocks where the windows do not shift in step (borders, causal
// starts, stride > 1, partial blocks) read the same way over the smallest
// range that covers every lane's window, and mask each lane outside its own;
// the packed rows carry zero columns around each dilation group for the
// reads that fall outside it.
//
// Work items are (b, h, column tile, row), rows innermost (ColumnTiles,
// for_tiled_rows), and each thread packs the rows an item reads, only the
// tile's columns, into its own small cache (RowCache): consecutive rows of a
// tile share all but a few key rows, so packed data is reused from cache and
// never written out as a full-size copy.
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <stdexcept>
#include <type_traits>
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

// Uninitialised float memory owned by one thread's scratch, grown on demand
// and kept between calls (for the same reason as workspace()).
class GrowingBuffer {
 public:
  float* reserve(std::int64_t size) {
    if (size > size_) {
      data_.reset();  // release first: never hold both
      data_.reset(new float[size]);
      size_ = size;
    }
    return data_.get();
  }

 private:
  std::unique_ptr<float[]> data_;
  std::int64_t size_ = 0;
};

// Starts fetching the cache lines of `bytes` bytes from p (for writing: the
// lines an output store will fill).
template <bool ForWrite = false>
inline void prefetch_lines(const void* p, std::int64_t bytes) {
  const char* at = static_cast<const char*>(p);
  for (std::int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(at + i, ForWrite);
}

// Group positions [lo[g], hi[g]) of each dilation group g: the columns of a
// packed row to fill. Positions outside [0, group_len) are the zero padding
// (at most ColumnLayout::kPad either side); lo >= hi: none.
struct ColumnRanges {
  std::vector<std::int64_t> lo, hi;

  explicit ColumnRanges(std::int64_t groups = 0)
      : lo(groups, std::numeric_limits<std::int64_t>::max()),
        hi(groups, std::numeric_limits<std::int64_t>::min()) {}
  void add(std::int64_t grp, std::int64_t begin, std::int64_t end) {
    lo[grp] = std::min(lo[grp], begin);
    hi[grp] = std::max(hi[grp], end);
  }
  // The packed columns [first, end) that span every range (end <= first:
  // none).
  std::pair<std::int64_t, std::int64_t> span_columns(const ColumnLayout& layout) const {
    std::int64_t first = layout.width, end = 0;
    for (std::size_t grp = 0; grp < lo.size(); ++grp) {
      if (lo[grp] >= hi[grp]) continue;
      first = std::min(first, layout.group_base[grp] + lo[grp]);
      end = std::max(end, layout.group_base[grp] + hi[grp]);
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
      const std::int64_t end = std::min(cols.hi[grp], layout_.group_len[grp]);
      for (std::int64_t i = std::max<std::int64_t>(cols.lo[grp], 0); i < end; ++i) {
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
      const std::int64_t len = layout_.group_len[grp], lo = cols.lo[grp], hi = cols.hi[grp];
      if (lo >= hi) continue;
      float* base = dst + layout_.group_base[grp];
      for (std::int64_t d = 0; d < dim; ++d) {
        if (lo < 0) std::fill(base + d * width + lo, base + d * width, 0.0f);
        if (hi > len) std::fill(base + d * width + len, base + d * width + hi, 0.0f);
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

// A thread's most recently used packed rows. The fused kernels pack the
// rows they read here, on demand and only the columns the current tile reads,
// instead of into a full-size copy of the tensor: a thread walks down the
// rows of one tile and consecutive query rows share all but a few key rows,
// so a row is packed once per tile and stays in the thread's cache, and the
// packed copy never travels to memory and back. get() pins a row until the
// next next_item(): a row's whole window stays valid while it is in use.
class RowCache {
 public:
  // Forgets every row (a new call, or a new chunk of items) and makes room
  // for `capacity` rows of `dim` channels of `stride` floats.
  void reset(std::int64_t capacity, std::int64_t dim, std::int64_t stride) {
    row_floats_ = dim * stride;
    stride_ = stride;
    data_ = memory_.reserve(capacity * row_floats_);  // only the packed columns are touched
    entries_.assign(capacity, Entry{});
    stamp_ = 1;
  }
  void next_item() { ++stamp_; }

  // Row r of (b, h) with tile `tile`'s columns `cols` packed from `source`;
  // *finite (if given) becomes false unless all of them are finite.
  template <typename Source>
  const float* get(const Source& source, std::int64_t b, std::int64_t h, std::int64_t r,
                   std::int64_t tile, const ColumnRanges& cols, bool* finite = nullptr) {
    Entry* victim = nullptr;
    for (Entry& e : entries_) {
      if (e.b == b && e.h == h && e.r == r && e.tile == tile) {
        e.stamp = stamp_;
        if (finite) *finite = *finite && e.finite;
        return e.row;
      }
      if (e.stamp < stamp_ && (!victim || e.stamp < victim->stamp)) victim = &e;
    }
    if (!victim) throw std::logic_error("libna: RowCache is smaller than one item's rows");
    if (cols.span(source.layout()) > stride_) {
      throw std::logic_error("libna: a packed row is wider than its RowCache's stride");
    }
    float* memory = data_ + (victim - entries_.data()) * row_floats_;
    bool row_finite = true;
    float* row = source.pack_columns(b, h, r, cols, memory, stride_, &row_finite);
    *victim = Entry{b, h, r, tile, stamp_, row, row_finite};
    if (finite) *finite = *finite && row_finite;
    return row;
  }

 private:
  struct Entry {
    std::int64_t b = -1, h = -1, r = -1, tile = -1, stamp = 0;
    float* row = nullptr;  // as pack_columns returns it
    bool finite = true;    // no inf or NaN in its packed columns
  };

  GrowingBuffer memory_;
  float* data_ = nullptr;
  std::int64_t row_floats_ = 0, stride_ = 0, stamp_ = 1;
  std::vector<Entry> entries_;
};

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

// logits[r][j] (8 lanes) = sum_d q[d] * key(r, d, j) for R key rows and N
// window positions j, where q[d] is the 8 floats at q + d * q_stride and
// key(r, d, j) the 8 consecutive columns of row r from column j (lane l
// reads column j + l). Two rows at once give 2N independent accumulators per
// q load, enough to hide the FMA latency.
template <int R, int N>
void qk_chunk(const float* q, std::int64_t q_stride, const float* const* keys,
              std::int64_t j0,
              std::int64_t width, std::int64_t dim, float* const* logits) {
  f32x8 acc[R][N];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < N; ++j) acc[r][j] = simd::splat(0.0f);
  }
  for (std::int64_t d = 0; d < dim; ++d) {
    const f32x8 qd = simd::load(q + d * q_stride);
    for (int r = 0; r < R; ++r) {
      const float* kd = keys[r] + j0 + d * width;
      for (int j = 0; j < N; ++j) {
        acc[r][j] += qd * simd::load(kd + j);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < N; ++j) simd::store(logits[r] + (j0 + j) * kLanes, acc[r][j]);
  }
}

template <int R>
void qk_window(const float* q, std::int64_t q_stride, const float* const* keys,
               std::int64_t width,
               std::int64_t dim, std::int64_t window, float* const* logits) {
  std::int64_t j = 0;
  for (; window - j >= 7; j += 7) qk_chunk<R, 7>(q, q_stride, keys, j, width, dim, logits);
  switch (window - j) {
    case 1: qk_chunk<R, 1>(q, q_stride, keys, j, width, dim, logits); break;
    case 2: qk_chunk<R, 2>(q, q_stride, keys, j, width, dim, logits); break;
    case 3: qk_chunk<R, 3>(q, q_stride, keys, j, width, dim, logits); break;
    case 4: qk_chunk<R, 4>(q, q_stride, keys, j, width, dim, logits); break;
    case 5: qk_chunk<R, 5>(q, q_stride, keys, j, width, dim, logits); break;
    case 6: qk_chunk<R, 6>(q, q_stride, keys, j, width, dim, logits); break;
    default: break;
  }
}

// logits[r][j][lane] = sum_d q[d * q_stride + lane] * keys[r][d * width + j
// + lane] for the n_rows rows and window positions j < window; row r's
// logits start at logits + r * window * kLanes. q is either lanes in their
// own [d][lane] buffer (q_stride = kLanes) or eight columns of a packed row
// (q_stride = its width).
inline void qk_rows(const float* q, std::int64_t q_stride,
                    const float* const* keys, std::int64_t n_rows,
                    std::int64_t width, std::int64_t dim, std::int64_t window,
                    float* logits) {
  std::int64_t r = 0;
  for (; r + 2 <= n_rows; r += 2) {
    float* const out[2] = {logits + r * window * kLanes, logits + (r + 1) * window * kLanes};
    qk_window<2>(q, q_stride, keys + r, width, dim, window, out);
  }
  if (r < n_rows) {
    float* const out[1] = {logits + r * window * kLanes};
    qk_window<1>(q, q_stride, keys + r, width, dim, window, out);
  }
}

// out[j] (8 lanes) = (out[j] if accumulate) + the sum over key rows r and
// window positions c of probs[r][c] * value(r, d0 + j, c + lane), for N
// head-dim channels. With Masked, a value outside its lane's window (c
// outside [lo, hi) in that lane) counts as 0: its probability is 0, but the
// value may be inf or NaN, and 0 * NaN would carry it to a query that never
// sees it.
template <int N, bool Masked>
void pv_chunk(const float* probs, const float* const* value_rows,
              std::int64_t key_rows, std::int64_t window, std::int64_t width,
              std::int64_t d0, bool accumulate, const i32x8& lo, const i32x8& hi, float* out) {
  f32x8 acc[N];
  // Unrolled by hand: GCC turns a zeroing loop over acc into a memset (rep
  // stos) of the array in memory.
#pragma GCC unroll 8
  for (int j = 0; j < N; ++j) acc[j] = accumulate ? simd::load(out + j * kLanes) : simd::splat(0.0f);
  const f32x8 zero = simd::splat(0.0f);
  for (std::int64_t r = 0; r < key_rows; ++r) {
    const float* vr = value_rows[r] + d0 * width;
    const float* pr = probs + r * window * kLanes;
    for (std::int64_t c = 0; c < window; ++c) {
      const f32x8 p = simd::load(pr + c * kLanes);
      if constexpr (Masked) {
        const i32x8 position = i32x8{} + static_cast<std::int32_t>(c);
        const i32x8 inside = (position >= lo) & (position < hi);
        for (int j = 0; j < N; ++j) acc[j] += p * (inside ? simd::load(vr + j * width + c) : zero);
      } else {
        for (int j = 0; j < N; ++j) acc[j] += p * simd::load(vr + j * width + c);
      }
    }
  }
  for (int j = 0; j < N; ++j) simd::store(out + j * kLanes, acc[j]);
}

// Softmax over `entries` logit vectors in place (probabilities, unnormalised);
// returns the per-lane maximum and sum.
inline void softmax_lanes(float* logits, std::int64_t entries, f32x8* max_out,
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

// out[d][lane] (+)= sum over rows r and positions c of probs[r][c][lane] *
// value_rows[r][d * width + c + lane], for d < dim_v. `w`: the block's lane
// windows when it is masked and its value rows may hold inf or NaN (probs
// must be 0 outside the windows), else null.
inline void pv_range(const float* probs, const float* const* value_rows,
                     std::int64_t key_rows, std::int64_t window,
                     std::int64_t width, std::int64_t dim_v, float* out,
                     const LaneWindows* w, bool accumulate = false) {
  i32x8 lo{}, hi{};
  if (w != nullptr) w->entry_bounds(&lo, &hi);
  std::int64_t d = 0;
  const auto chunk = [&](auto n) {
    constexpr int N = decltype(n)::value;
    if (w != nullptr) {
      pv_chunk<N, true>(probs, value_rows, key_rows, window, width, d, accumulate, lo, hi,
                        out + d * kLanes);
    } else {
      pv_chunk<N, false>(probs, value_rows, key_rows, window, width, d, accumulate, lo, hi,
                         out + d * kLanes);
    }
  };
  for (; d + 8 <= dim_v; d += 8) chunk(std::integral_constant<int, 8>());
  switch (dim_v - d) {
    case 1: chunk(std::integral_constant<int, 1>()); break;
    case 2: chunk(std::integral_constant<int, 2>()); break;
    case 3: chunk(std::integral_constant<int, 3>()); break;
    case 4: chunk(std::integral_constant<int, 4>()); break;
    case 5: chunk(std::integral_constant<int, 5>()); break;
    case 6: chunk(std::integral_constant<int, 6>()); break;
    case 7: chunk(std::integral_constant<int, 7>()); break;
    default: break;
  }
}

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

// Rows (positions of the leading axes) seen by one position of the leading
// axes, with each one's offset into a contiguous rpb head.
// `slot` is the first slot of the (key row, query row) pair in the unfused
// ops' prod(kernel) layout: row-major over the key's per-axis positions in
// the query's window, times the last axis' kernel.
struct RowList {
  std::vector<std::int64_t> rows, bias, slot;
  std::int64_t size = 0;
};

// Fills `out` with the rows of a cartesian product over the leading axes:
// axis a offers count[a] choices, and choice t is {position, rpb index, the
// key's position in the query's window} = pick(a, t) along that axis.
template <int Rank, typename Pick>
void product_rows(const Geometry<Rank>& g, const std::int64_t* count, Pick pick,
                  const std::int64_t* bias_strides, RowList& out) {
  std::int64_t n = 1;
  for (int a = 0; a < Rank - 1; ++a) n *= count[a];
  out.size = n;
  out.rows.resize(n);
  out.bias.resize(n);
  out.slot.resize(n);
  std::int64_t t[Rank] = {};
  for (std::int64_t r = 0; r < n; ++r) {
    std::int64_t row = 0, bias = 0, slot = 0;
    for (int a = 0; a < Rank - 1; ++a) {
      const auto [position, rpb_index, window_index] = pick(a, t[a]);
      row = row * g.spatial[a] + position;
      bias += rpb_index * bias_strides[a + 1];
      slot = slot * g.axes[a].kernel + window_index;
    }
    out.rows[r] = row;
    out.bias[r] = bias;
    out.slot[r] = slot * g.axes[Rank - 1].kernel;
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
        return std::array<std::int64_t, 3>{w[a].first + t * w[a].step, w[a].rpb_first + t, t};
      },
      bias_strides, out);
}

// A range [begin, end) of a row's lane blocks (ColumnLayout::blocks).
struct BlockRange {
  std::int64_t begin = 0, end = 0;
};

// The lane blocks of a row split into column tiles. Work items are (b, h,
// tile, row) with rows innermost, so a thread walks down the rows of one
// tile, and the key and value columns the tile's windows cover (`window_rows`
// packed rows of `channels` floats per column) stay in its L2 cache across
// the rows that share them. Rows narrow enough for that are one tile.
struct ColumnTiles {
  static constexpr std::int64_t kBudget = 192 * 1024;  // bytes, well under a 512 KiB L2
  std::int64_t count = 1, blocks_per_tile = 1;

  ColumnTiles(const ColumnLayout& layout, std::int64_t window_rows, std::int64_t channels)
      : ColumnTiles(layout.blocks,
                    kBudget / (window_rows * kLanes * channels * std::int64_t{sizeof(float)})) {}
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

// The calling thread's Scratch of one type, kept across calls (its row caches
// stay allocated) and shared by every loop that runs on that type.
template <typename Scratch>
Scratch& thread_scratch() {
  thread_local Scratch scratch;
  return scratch;
}

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

  // t[b, c (lane positions), h, d] = factor[lane] * src[d][lane], for the
  // lanes of w.
  void store_lanes(const TensorView& t, std::int64_t b, std::int64_t* c, std::int64_t h,
                   std::int64_t grp, const LaneWindows& w, f32x8 factor, const float* src) const {
    T* tokens[kLanes];
    lane_tokens(t, b, c, h, grp, w, tokens);
    scatter_lanes(src, factor, t.shape[Rank + 2], tokens, w.lanes, t.strides[Rank + 2]);
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

// The columns each column tile reads: of the rows its lanes sit in (`own`:
// the lanes' positions) and of the rows their windows cover (`window`: every
// block's covering range, first .. first + window + kLanes - 1).
struct TileColumns {
  std::vector<ColumnRanges> own, window;

  template <int Rank, typename T, typename LanesOf>
  TileColumns(const LaneKernel<Rank, T>& kernel, const ColumnTiles& tiles, const LanesOf& lanes_of)
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

// A thread's packed rows in the fused kernels: caches for the rows its lanes
// sit in (one row at a time) and for the window rows (`window_capacity`
// rows: more than a window, so that consecutive items reuse the rows they
// share; no more than needed, each cached row takes room in L2).
struct RowCaches {
  RowCache own_a, own_b, window_a, window_b;
  std::vector<const float*> bases_a, bases_b;  // the current item's window rows
  // Whether the current item's window rows are all finite: blocks then skip
  // masking the values outside each lane's window (pv_range).
  bool window_finite_a = true, window_finite_b = true;

  // (stride: of the packed rows, LaneKernel::row_stride.)
  void reset(std::int64_t window_capacity, std::int64_t dim_a, std::int64_t dim_b,
             std::int64_t stride) {
    own_a.reset(1, dim_a, stride);
    own_b.reset(1, dim_b, stride);
    window_a.reset(window_capacity, dim_a, stride);
    window_b.reset(window_capacity, dim_b, stride);
  }
  void next_item() {
    own_a.next_item();
    own_b.next_item();
    window_a.next_item();
    window_b.next_item();
    window_finite_a = window_finite_b = true;
  }

  // Loads the window rows `rows` of head h from sources a and b (tile t,
  // columns cols) into bases_a/bases_b at index slot * rows.size on; the
  // bases end there (fill slots 0, 1, ... in order).
  template <typename SourceA, typename SourceB>
  void load_window(const SourceA& a, const SourceB& b, std::int64_t batch, std::int64_t h,
                   const RowList& rows, std::int64_t t, const ColumnRanges& cols,
                   std::int64_t slot = 0) {
    bases_a.resize((slot + 1) * rows.size);
    bases_b.resize((slot + 1) * rows.size);
    for (std::int64_t r = 0; r < rows.size; ++r) {
      bases_a[slot * rows.size + r] = window_a.get(a, batch, h, rows.rows[r], t, cols, &window_finite_a);
      bases_b[slot * rows.size + r] = window_b.get(b, batch, h, rows.rows[r], t, cols, &window_finite_b);
    }
  }
};

template <int Rank, typename T>
struct Forward : LaneKernel<Rank, T> {
  using Base = LaneKernel<Rank, T>;
  using Base::g;
  const detail::ForwardArgs& args;
  const PackSource<Rank, T> q, k, v;  // q times the softmax scale
  const ColumnTiles tiles;
  const TileColumns columns;

  // Per-thread working memory.
  struct Scratch {
    std::vector<float> out;  // [d][lane]
    std::vector<float> logits;
    RowList key_rows;
    std::vector<const float*> key_ptrs, value_rows;
    RowCaches rows;  // a: q (own) and k (window); b: v (window)
  };

  Forward(const detail::ForwardArgs& a, const Geometry<Rank>& geometry,
          const ColumnLayout& columns_layout)
      : Base(geometry, columns_layout, a.k, a.v, a.params, a.rpb, a.scale), args(a),
        q(a.q, geometry, columns_layout, static_cast<float>(a.scale)),
        k(a.k, geometry, columns_layout, 1.0f), v(a.v, geometry, columns_layout, 1.0f),
        tiles(columns_layout, geometry.window_rows(), this->k_dim + this->v_dim),
        columns(*this, tiles, [&](std::int64_t grp, std::int64_t i0, std::int64_t lanes) {
          return query_lanes(this->last(), columns_layout.group_len[grp], i0, lanes);
        }) {
    this->set_row_stride(columns.own, columns.window);
  }

  void start(Scratch& s) const {
    // Items of a chunk are mostly consecutive rows, or rows of the next tile.
    s.rows.reset(2 * g.window_rows(), this->k_dim, this->v_dim, this->row_stride);
  }

  // The queries of one (b, h, row) in one column tile, eight at a time.
  void row(const TiledRow& at, Scratch& s) const {
    std::int64_t c[Rank];
    row_coords<Rank>(g, at.row, c);
    key_rows_of<Rank>(g, c, this->bias_strides, s.key_rows);
    const std::int64_t hk = at.h / this->heads_per_kv, t = at.tile_index;
    RowCaches& rows = s.rows;
    rows.next_item();
    rows.load_window(k, v, at.b, hk, s.key_rows, t, columns.window[t]);
    const float* q_row = rows.own_a.get(q, at.b, at.h, at.row, t, columns.own[t]);
    this->for_query_blocks(at.tile, [&](std::int64_t grp, const LaneWindows& w) {
      block(at.b, at.h, q_row, c, grp, w, s);
    });
  }

  void block(std::int64_t b, std::int64_t h, const float* q_row,
             std::int64_t* c, std::int64_t grp, const LaneWindows& w,
             Scratch& s) const {
    const std::int64_t dim_v = this->v_dim, n_rows = s.key_rows.size;
    this->prefetch_lanes(args.out, b, c, h, grp, w);
    s.logits.resize(n_rows * w.window * kLanes);
    this->window_rows(s.rows.bases_a, grp, w, s.key_ptrs);
    this->logits(this->lanes_at(q_row, grp, w), this->row_stride, h, w, s.key_rows,
                 s.key_ptrs.data(), s.logits.data());

    f32x8 max_logit, sum;
    softmax_lanes(s.logits.data(), n_rows * w.window, &max_logit, &sum);

    this->window_rows(s.rows.bases_b, grp, w, s.value_rows);
    s.out.resize(dim_v * kLanes);
    pv_range(s.logits.data(), s.value_rows.data(), n_rows, w.window, this->row_stride, dim_v,
             s.out.data(), w.masked && !s.rows.window_finite_b ? &w : nullptr);

    // Normalise and store. A query whose logits are all -inf attends to
    // nothing: out = 0 and lse = -inf (a NaN sum stays NaN).
    const f32x8 zero = simd::splat(0.0f);
    const f32x8 factor = sum == zero ? zero : simd::splat(1.0f) / sum;
    this->store_lanes(args.out, b, c, h, grp, w, factor, s.out.data());
    if (args.lse) {
      alignas(32) float m[kLanes], total[kLanes];
      simd::store(m, max_logit);
      simd::store(total, sum);
      float* lse = static_cast<float*>(args.lse->data);
      for (std::int64_t l = 0; l < w.lanes; ++l) {
        c[Rank - 1] = grp + (w.i0 + l) * this->last().dilation;
        // softmax_lanes shifted by m[l], which is 0 for all -inf logits.
        lse[row_offset<Rank>(*args.lse, b, c, 0) + h * args.lse->strides[Rank + 1]] =
            softmax_lse(m[l], total[l]);
      }
    }
  }
};

template <int Rank, typename T>
void na_forward(const detail::ForwardArgs& args) {
  const Geometry<Rank> g(args.q, args.params);
  const ColumnLayout layout(g);
  const Forward<Rank, T> fwd(args, g, layout);
  using Scratch = typename Forward<Rank, T>::Scratch;
  for_tiled_rows<Scratch>(
      g.batch, g.heads, layout.rows, fwd.tiles, [&](Scratch& s) { fwd.start(s); },
      [&](const TiledRow& at, Scratch& s) { fwd.row(at, s); });
}

}  // namespace libna::cpu::LIBNA_SIMD_NS
