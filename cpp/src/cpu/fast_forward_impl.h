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
// starts, stride > 1, partial blocks) read the same way over the smallest
// range that covers every lane's window, and mask each lane outside its own;
// the packed rows carry zero columns around each dilation group for the
// reads that fall outside it.
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <thread>
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
  std::vector<std::int64_t> group_base, group_len;

  template <int Rank>
  explicit ColumnLayout(const Geometry<Rank>& g)
      : rows(g.tokens / g.spatial[Rank - 1]), extent(g.spatial[Rank - 1]),
        dilation(g.axes[Rank - 1].dilation), group_base(dilation), group_len(dilation) {
    std::int64_t base = kPad;
    for (std::int64_t grp = 0; grp < dilation; ++grp) {
      group_base[grp] = base;
      group_len[grp] = group_length(extent, dilation, grp);
      base += group_len[grp] + kPad;
      blocks += (group_len[grp] + kLanes - 1) / kLanes;
    }
    width = base;
  }
  // Packed column of position x along the last axis.
  std::int64_t column(std::int64_t x) const { return group_base[x % dilation] + x / dilation; }
  // Floats of a packed tensor with `heads` heads of `dim` channels.
  std::int64_t packed_size(std::int64_t batch, std::int64_t heads, std::int64_t dim) const {
    return batch * heads * rows * dim * width;
  }
  // Zeroes the padding columns of one packed line of `width` floats.
  void zero_padding(float* line) const {
    std::fill(line, line + kPad, 0.0f);
    for (std::int64_t grp = 0; grp < dilation; ++grp) {
      float* end = line + group_base[grp] + group_len[grp];
      std::fill(end, end + kPad, 0.0f);
    }
  }
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

// A tensor [B, *spatial, heads, dim] (times `factor`) in the packed layout,
// packed one (b, h, row) at a time: all at once by pack(), or on demand by
// ensure(), which kernels call just before they read a row so that the rows
// a thread works on are packed by that thread and still in its cache when it
// reads them (a separate packing pass writes the whole copy out to memory
// and reads it back). Every row is packed exactly once: the first thread to
// claim it packs it, a thread that needs it meanwhile waits.
template <int Rank, typename T>
class PackedTensor : public Packed {
 public:
  PackedTensor(const TensorView& t, const Geometry<Rank>& g, const ColumnLayout& layout,
               float factor, float* dst)
      : source_(t), g_(g), layout_(layout), factor_(factor) {
    data = dst;
    heads = t.shape[Rank + 1];
    dim = t.shape[Rank + 2];
    rows = layout.rows;
    width = layout.width;
    state_ = std::make_unique<std::atomic<std::uint8_t>[]>(g.batch * heads * rows);
  }

  void ensure(std::int64_t b, std::int64_t h, std::int64_t r) const {
    std::atomic<std::uint8_t>& state = state_[(b * heads + h) * rows + r];
    if (state.load(std::memory_order_acquire) == kPacked) return;
    std::uint8_t expected = kEmpty;
    if (state.compare_exchange_strong(expected, kPacking, std::memory_order_acquire)) {
      pack_row(b, h, r);
      state.store(kPacked, std::memory_order_release);
      return;
    }
    while (state.load(std::memory_order_acquire) != kPacked) std::this_thread::yield();
  }

  // Packs every row, one work item per (b, row) over all heads, so that the
  // input is read token by token in memory order.
  void pack_all() const {
    parallel_for(g_.batch * rows, 1, [&](std::int64_t begin, std::int64_t end) {
      for (std::int64_t item = begin; item < end; ++item) {
        for (std::int64_t h = 0; h < heads; ++h) ensure(item / rows, h, item % rows);
      }
    });
  }

 private:
  static constexpr std::uint8_t kEmpty = 0, kPacking = 1, kPacked = 2;

  // Eight tokens of a dilation group at a time go through a register
  // transpose into eight consecutive columns.
  void pack_row(std::int64_t b, std::int64_t h, std::int64_t r) const {
    const T* tokens[kLanes];
    const T* src = static_cast<const T*>(source_.data);
    std::int64_t c[Rank];
    row_coords<Rank>(g_, r, c);
    float* dst = row(b, h, r);
    for (std::int64_t grp = 0; grp < layout_.dilation; ++grp) {
      const std::int64_t len = layout_.group_len[grp];
      for (std::int64_t i0 = 0; i0 < len; i0 += kLanes) {
        const std::int64_t lanes = std::min<std::int64_t>(kLanes, len - i0);
        for (std::int64_t l = 0; l < lanes; ++l) {
          c[Rank - 1] = grp + (i0 + l) * layout_.dilation;
          tokens[l] = src + row_offset<Rank>(source_, b, c, h);
        }
        gather_lanes(tokens, lanes, source_.strides[Rank + 2], dim, factor_,
                     dst + layout_.group_base[grp] + i0, width);
      }
    }
    for (std::int64_t d = 0; d < dim; ++d) layout_.zero_padding(dst + d * width);
  }

  const TensorView& source_;
  const Geometry<Rank>& g_;
  const ColumnLayout& layout_;
  float factor_;
  std::unique_ptr<std::atomic<std::uint8_t>[]> state_;
};

// `t` (times `factor`) packed into dst, every row.
template <int Rank, typename T>
PackedTensor<Rank, T> pack(const TensorView& t, const Geometry<Rank>& g,
                           const ColumnLayout& layout, float factor, float* dst) {
  PackedTensor<Rank, T> packed(t, g, layout, factor, dst);
  packed.pack_all();
  return packed;
}

// Packs two tensors into the calling thread's workspace.
template <int Rank, typename T>
std::pair<PackedTensor<Rank, T>, PackedTensor<Rank, T>> pack_pair(const TensorView& a,
                                                                  const TensorView& b,
                                                                  const Geometry<Rank>& g,
                                                                  const ColumnLayout& layout) {
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
LIBNA_SIMD_TARGET void qk_chunk(const float* q, std::int64_t q_stride, const float* const* keys,
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
LIBNA_SIMD_TARGET void qk_window(const float* q, std::int64_t q_stride, const float* const* keys,
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
LIBNA_SIMD_TARGET inline void qk_rows(const float* q, std::int64_t q_stride,
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
// head-dim channels.
template <int N>
LIBNA_SIMD_TARGET void pv_chunk(const float* probs, const float* const* value_rows,
                                std::int64_t key_rows, std::int64_t window, std::int64_t width,
                                std::int64_t d0, bool accumulate, float* out) {
  f32x8 acc[N];
  // Unrolled by hand: GCC turns a zeroing loop over acc into a memset (rep
  // stos) of the array in memory.
#pragma GCC unroll 8
  for (int j = 0; j < N; ++j) acc[j] = accumulate ? simd::load(out + j * kLanes) : simd::splat(0.0f);
  for (std::int64_t r = 0; r < key_rows; ++r) {
    const float* vr = value_rows[r] + d0 * width;
    const float* pr = probs + r * window * kLanes;
    for (std::int64_t c = 0; c < window; ++c) {
      const f32x8 p = simd::load(pr + c * kLanes);
      for (int j = 0; j < N; ++j) acc[j] += p * simd::load(vr + j * width + c);
    }
  }
  for (int j = 0; j < N; ++j) simd::store(out + j * kLanes, acc[j]);
}

// out[d][lane] (+)= sum over rows r and positions c of probs[r][c][lane] *
// value_rows[r][d * width + c + lane], for d < dim_v.
LIBNA_SIMD_TARGET inline void pv_range(const float* probs, const float* const* value_rows,
                                       std::int64_t key_rows, std::int64_t window,
                                       std::int64_t width, std::int64_t dim_v, float* out,
                                       bool accumulate = false) {
  std::int64_t d = 0;
  const auto chunk = [&](auto n) {
    pv_chunk<decltype(n)::value>(probs, value_rows, key_rows, window, width, d, accumulate,
                                 out + d * kLanes);
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
  // values[j][lane] = -inf where position first + j + lane is outside the
  // lane's window, for j < n.
  LIBNA_SIMD_TARGET void mask(float* values, std::int64_t n) const {
    alignas(32) std::int32_t lo32[kLanes] = {}, hi32[kLanes] = {};
    for (std::int64_t l = 0; l < lanes; ++l) {
      lo32[l] = static_cast<std::int32_t>(lo[l] - l - first);
      hi32[l] = static_cast<std::int32_t>(lo[l] + count[l] - l - first);
    }
    i32x8 lo_v, hi_v;
    std::memcpy(&lo_v, lo32, sizeof lo_v);
    std::memcpy(&hi_v, hi32, sizeof hi_v);
    const f32x8 neg_inf = simd::splat(-std::numeric_limits<float>::infinity());
    for (std::int64_t j = 0; j < n; ++j) {
      const i32x8 jv = i32x8{} + static_cast<std::int32_t>(j);
      const i32x8 inside = (jv >= lo_v) & (jv < hi_v);
      simd::store(values + j * kLanes, inside ? simd::load(values + j * kLanes) : neg_inf);
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

  ColumnTiles(const ColumnLayout& layout, std::int64_t window_rows, std::int64_t channels) {
    const std::int64_t per_block = window_rows * kLanes * channels * std::int64_t{sizeof(float)};
    const std::int64_t fit = std::max<std::int64_t>(1, kBudget / per_block);
    count = (layout.blocks + fit - 1) / fit;
    blocks_per_tile = (layout.blocks + count - 1) / count;  // even tiles
  }
  BlockRange operator[](std::int64_t t) const { return {t * blocks_per_tile, (t + 1) * blocks_per_tile}; }
};

// One work item of for_tiled_rows: the blocks `tile` of row `row` of (b, h);
// `item` numbers the items, rows innermost.
struct TiledRow {
  std::int64_t item, b, h, row;
  BlockRange tile;
};

// Runs fn(item, scratch) over every (batch, head, tile, row), rows innermost,
// with one Scratch per thread.
template <typename Scratch, typename Fn>
void for_tiled_rows(std::int64_t batch, std::int64_t heads, std::int64_t rows,
                    const ColumnTiles& tiles, const Fn& fn) {
  parallel_for(batch * heads * tiles.count * rows, 1, [&](std::int64_t begin, std::int64_t end) {
    Scratch scratch;
    for (std::int64_t item = begin; item < end; ++item) {
      const std::int64_t tile = (item / rows) % tiles.count;
      const std::int64_t h = (item / (rows * tiles.count)) % heads;
      fn(TiledRow{item, item / (rows * tiles.count * heads), h, item % rows, tiles[tile]}, scratch);
    }
  });
}

// State shared by the vectorised forward and backward: geometry, the packed
// K and V, the bias as contiguous float.
template <int Rank, typename T>
struct LaneKernel {
  const Geometry<Rank>& g;
  const ColumnLayout& layout;
  const PackedTensor<Rank, T>&k, &v;
  BiasBuffer<Rank, float> bias_layout;
  std::vector<float> bias;           // rpb as contiguous float [heads][2k-1...], or empty
  const std::int64_t* bias_strides;  // bias_layout.strides
  std::int64_t heads_per_kv;
  float scale;

  LaneKernel(const Geometry<Rank>& geometry, const ColumnLayout& columns,
             const PackedTensor<Rank, T>& packed_k, const PackedTensor<Rank, T>& packed_v,
             const NaParams& params, const TensorView* rpb, double sc)
      : g(geometry), layout(columns), k(packed_k), v(packed_v),
        bias_layout(params, geometry.heads),
        bias(rpb ? bias_layout.template load_from<T>(*rpb) : std::vector<float>()),
        bias_strides(bias_layout.strides), heads_per_kv(geometry.heads / packed_k.heads),
        scale(static_cast<float>(sc)) {}

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
  LIBNA_SIMD_TARGET void logits(const float* q_lanes, std::int64_t q_stride, std::int64_t h,
                                const LaneWindows& w, const RowList& key_rows,
                                const float* const* key_ptrs, float* out) const {
    const std::int64_t window = w.window, kernel = last().kernel;
    const std::int64_t bias_step = bias_strides[Rank];
    qk_rows(q_lanes, q_stride, key_ptrs, key_rows.size, layout.width, k.dim, window, out);
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

  // The lanes of w in row `row` of p: column group_base + i0 of the packed
  // row, read with stride layout.width (lanes past the group read its zero
  // padding).
  const float* lanes_at(const Packed& p, std::int64_t b, std::int64_t h, std::int64_t row,
                        std::int64_t grp, const LaneWindows& w) const {
    return p.row(b, h, row) + layout.group_base[grp] + w.i0;
  }

  // Packs the rows of `rows` in p (head h) that are not packed yet.
  static void ensure_rows(const PackedTensor<Rank, T>& p, std::int64_t b, std::int64_t h,
                          const RowList& rows) {
    for (std::int64_t r = 0; r < rows.size; ++r) p.ensure(b, h, rows.rows[r]);
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
    std::vector<float> out;  // [d][lane]
    std::vector<float> logits;
    RowList key_rows;
    std::vector<const float*> key_ptrs, value_rows;
  };

  const PackedTensor<Rank, T>& q;  // times the softmax scale

  Forward(const detail::ForwardArgs& a, const Geometry<Rank>& geometry,
          const ColumnLayout& columns, const PackedTensor<Rank, T>& packed_q,
          const PackedTensor<Rank, T>& packed_k, const PackedTensor<Rank, T>& packed_v)
      : Base(geometry, columns, packed_k, packed_v, a.params, a.rpb, a.scale), args(a),
        q(packed_q) {}

  // The queries of one (b, h, row) in one column tile, eight at a time.
  LIBNA_SIMD_TARGET void row(std::int64_t b, std::int64_t h, std::int64_t row_index,
                             const BlockRange& tile, Scratch& s) const {
    std::int64_t c[Rank];
    row_coords<Rank>(g, row_index, c);
    key_rows_of<Rank>(g, c, this->bias_strides, s.key_rows);
    q.ensure(b, h, row_index);
    this->ensure_rows(k, b, h / this->heads_per_kv, s.key_rows);
    this->ensure_rows(v, b, h / this->heads_per_kv, s.key_rows);
    this->for_query_blocks(tile, [&](std::int64_t grp, const LaneWindows& w) {
      block(b, h, row_index, c, grp, w, s);
    });
  }

  LIBNA_SIMD_TARGET void block(std::int64_t b, std::int64_t h, std::int64_t row, std::int64_t* c,
                               std::int64_t grp,
                               const LaneWindows& w, Scratch& s) const {
    const std::int64_t dim_v = v.dim, n_rows = s.key_rows.size;
    s.logits.resize(n_rows * w.window * kLanes);
    this->window_rows(k, b, h / this->heads_per_kv, grp, w, s.key_rows, s.key_ptrs);
    this->logits(this->lanes_at(q, b, h, row, grp, w), this->layout.width, h, w, s.key_rows,
                 s.key_ptrs.data(), s.logits.data());

    f32x8 max_logit, sum;
    softmax_lanes(s.logits.data(), n_rows * w.window, &max_logit, &sum);

    this->window_rows(v, b, h / this->heads_per_kv, grp, w, s.key_rows, s.value_rows);
    s.out.resize(dim_v * kLanes);
    pv_range(s.logits.data(), s.value_rows.data(), n_rows, w.window, this->layout.width, dim_v,
             s.out.data());

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
  const auto size = [&](const TensorView& t) {
    return layout.packed_size(g.batch, t.shape[Rank + 1], t.shape[Rank + 2]);
  };
  float* buffer = workspace(size(args.q) + size(args.k) + size(args.v));
  // Rows are packed by the threads that use them first (Forward::row).
  const PackedTensor<Rank, T> q(args.q, g, layout, static_cast<float>(args.scale), buffer);
  const PackedTensor<Rank, T> k(args.k, g, layout, 1.0f, buffer + size(args.q));
  const PackedTensor<Rank, T> v(args.v, g, layout, 1.0f, buffer + size(args.q) + size(args.k));
  const Forward<Rank, T> fwd(args, g, layout, q, k, v);
  const ColumnTiles tiles(layout, g.window_rows(), k.dim + v.dim);
  for_tiled_rows<typename Forward<Rank, T>::Scratch>(
      g.batch, g.heads, layout.rows, tiles,
      [&](const TiledRow& at, auto& scratch) { fwd.row(at.b, at.h, at.row, at.tile, scratch); });
}

}  // namespace libna::cpu::LIBNA_SIMD_NS
