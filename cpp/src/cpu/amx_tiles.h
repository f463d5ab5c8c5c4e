// What the AMX kernels (amx_forward.cpp, amx_backward.cpp) share: tile
// shapes and configuration, a tile's queries and their windows along the
// last axis, the window rows of a row, the operands of the products over
// keys, and the AVX-512 pieces (exp2, bf16 rounding, 16 x 16 transposes).
// Included by those units only; everything here is compiled for AMX and
// AVX-512 (the target region below).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/kernels.h"
#include "libna/window.h"
#include "numeric.h"

// GCC 12 takes the AVX-512 intrinsics' deliberately undefined operands
// (`__m512i __Y = __Y;` in _mm512_undefined_epi32) for uninitialised reads
// once they are inlined here, and warns at every use; there is no read.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#if defined(__clang__)
#define LIBNA_AMX_BEGIN                                                                          \
  _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,amx-tile,amx-bf16,avx2,fma,f16c\"))), apply_to = function)")
#define LIBNA_AMX_END _Pragma("clang attribute pop")
#else
#define LIBNA_AMX_BEGIN \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,amx-tile,amx-bf16,avx2,fma,f16c\")")
#define LIBNA_AMX_END _Pragma("GCC pop_options")
#endif

// Loads tile A from `at` (rows `stride` bytes apart) and adds A . B to tile
// Acc. A macro: GCC's tile intrinsics spell their register numbers into the
// assembly, so they must be literals.
#define LIBNA_TILE_PRODUCT(Acc, A, B, at, stride) \
  do {                                           \
    _tile_loadd(A, at, stride);                  \
    _tile_dpbf16ps(Acc, A, B);                   \
  } while (0)

LIBNA_AMX_BEGIN

namespace libna::cpu::amx {

constexpr int kTile = 16;        // queries per tile, keys per S tile, channels per output tile
constexpr int kKeyPairs = 16;    // key pairs per product over keys (P.V, dS.K: 32 keys)
constexpr int kChannels = 32;    // channels per product over channels (q.k, dout.v)
constexpr int kBiasPad = kTile;  // zeros either side of a reversed rpb row

struct alignas(64) TileConfig {
  std::uint8_t palette = 1, start_row = 0;
  std::uint8_t reserved[14] = {};
  std::uint16_t bytes_per_row[16] = {};
  std::uint8_t rows[16] = {};
};

// tmm0..tmm7 all 16 rows of 64 bytes.
inline TileConfig full_tiles() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.bytes_per_row[t] = 64;
    c.rows[t] = kTile;
  }
  return c;
}

// 2^t in the lanes of `in`, 0 in the others; t <= 0 (a logit minus the
// maximum or, in the backward, minus lse, times log2(e)). 2^t = 2^n 2^f, n = round(t), |f| <= 1/2, 2^f by
// its Taylor polynomial of degree 6 (relative error below 2e-7); -inf gives 0
// and NaN stays NaN.
inline __m512 exp2_masked(__mmask16 in, __m512 t) {
  t = _mm512_max_ps(_mm512_set1_ps(-150.0f), t);  // NaN: the second operand, t
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(in, p, n);
}

// float -> bf16, round to nearest even, NaN kept quiet: numeric.h's
// to_bfloat16 on 16 lanes (AVX512-BF16's conversion flushes subnormals).
inline __m256i to_bf16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(
      _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet));
}

// r[i][j] <- r[j][i] (16 x 16 floats, or 32-bit words).
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int m = 0; m < 4; ++m) {
    t[m] = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x88);
    t[4 + m] = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xdd);
    t[8 + m] = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x88);
    t[12 + m] = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xdd);
  }
  for (int m = 0; m < 4; ++m) {
    r[m] = _mm512_shuffle_f32x4(t[m], t[8 + m], 0x88);
    r[8 + m] = _mm512_shuffle_f32x4(t[m], t[8 + m], 0xdd);
    r[4 + m] = _mm512_shuffle_f32x4(t[4 + m], t[12 + m], 0x88);
    r[12 + m] = _mm512_shuffle_f32x4(t[4 + m], t[12 + m], 0xdd);
  }
}
inline bool finite(std::uint16_t bf16) { return (bf16 & 0x7f80u) != 0x7f80u; }

// A tile's 16 queries (positions first .. first + 15 of dilation group grp
// along the last axis; those past the group's end idle): each one's window
// along that axis [lo, hi), in group positions, and their union.
struct TileLanes {
  alignas(64) std::int32_t lo[kTile], hi[kTile];
  std::int64_t grp, first, union_lo, union_hi;
  __mmask16 lanes = 0;

  TileLanes(std::int64_t group, std::int64_t first_position, std::int64_t len,
            const AxisParams& axis)
      : grp(group), first(first_position), union_lo(len), union_hi(0) {
    for (int l = 0; l < kTile; ++l) {
      lo[l] = hi[l] = 0;
      const std::int64_t iq = first + l;
      if (iq >= len) continue;
      std::int64_t start = 0, count = 0;
      group_window(iq, len, axis, &start, &count);
      lo[l] = static_cast<std::int32_t>(start);
      hi[l] = static_cast<std::int32_t>(start + count);
      union_lo = std::min(union_lo, start);
      union_hi = std::max(union_hi, start + count);
      lanes |= static_cast<__mmask16>(1u << l);
    }
  }
};

// Per key of a tile's run (union_lo + i), the lanes whose window holds it.
inline void window_masks(const TileLanes& t, __mmask16* holds) {
  const __m512i lane_lo = _mm512_load_si512(t.lo), lane_hi = _mm512_load_si512(t.hi);
  for (std::int64_t j = t.union_lo; j < t.union_hi; ++j) {
    const __m512i jv = _mm512_set1_epi32(static_cast<std::int32_t>(j));
    holds[j - t.union_lo] =
        t.lanes & _mm512_cmpge_epi32_mask(jv, lane_lo) & _mm512_cmplt_epi32_mask(jv, lane_hi);
  }
}

// The per-call layout: rows (positions of the leading axes), the last axis'
// dilation groups with their columns in V^T, and the tiles of a row.
template <int Rank>
struct Layout {
  const Geometry<Rank>& g;
  std::int64_t rows, extent, dilation;
  std::vector<std::int64_t> group_len, group_column;  // a group's length, its first V^T column
  std::vector<TileLanes> tiles_of_row;               // the tiles of every row
  std::int64_t vt_width = 0;                          // V^T columns of a row (groups + padding)

  explicit Layout(const Geometry<Rank>& geometry)
      : g(geometry), rows(geometry.tokens / geometry.spatial[Rank - 1]),
        extent(geometry.spatial[Rank - 1]), dilation(geometry.axes[Rank - 1].dilation) {
    for (std::int64_t grp = 0; grp < dilation; ++grp) {
      const std::int64_t len = group_length(extent, dilation, grp);
      group_len.push_back(len);
      group_column.push_back(vt_width);
      // A P.V product reads 32 keys from anywhere in the group: 32 zero
      // columns after it keep the reads inside the row.
      vt_width += len + 2 * kKeyPairs;
      for (std::int64_t first = 0; first < len; first += kTile) {
        tiles_of_row.push_back(TileLanes(grp, first, len, geometry.axes[Rank - 1]));
      }
    }
  }
  std::int64_t tiles() const { return static_cast<std::int64_t>(tiles_of_row.size()); }
};

// Element offset of [b, *lead, x, h, 0] in t (x along the last axis).
template <int Rank>
std::int64_t token_offset(const TensorView& t, std::int64_t b, const std::int64_t* lead,
                          std::int64_t x, std::int64_t h) {
  std::int64_t off = b * t.strides[0] + h * t.strides[Rank + 1] + x * t.strides[Rank];
  for (int a = 0; a < Rank - 1; ++a) off += lead[a] * t.strides[1 + a];
  return off;
}

// The tokens [b, lead, x, h] of a tile's active lanes (x: their positions
// along the last axis), null for the idle ones.
template <int Rank, typename T>
void lane_tokens(const TensorView& t, std::int64_t b, const std::int64_t* lead, std::int64_t grp,
                 std::int64_t first, std::int64_t dilation, std::int64_t h, __mmask16 lanes,
                 T** tokens) {
  for (int l = 0; l < kTile; ++l) {
    const std::int64_t x = grp + (first + l) * dilation;
    tokens[l] = (lanes >> l) & 1u ? static_cast<T*>(t.data) + token_offset<Rank>(t, b, lead, x, h)
                                  : nullptr;
  }
}

// One row of the window of a tile: where its keys are, and its rpb row.
struct WindowRow {
  std::int64_t key_offset;    // of [0, leading coords, 0, 0, 0] in k
  std::int64_t value_offset;  // the same in v
  std::int64_t vt_row;      // its V^T, among the rows of one (batch, kv head)
  std::int64_t bias_row;    // its reversed rpb row, among one head's
};

// The window rows of the queries of `row`, leading axis by leading axis.
template <int Rank>
void window_rows(const Geometry<Rank>& g, const TensorView& k, const TensorView& v,
                 const NaParams& p, std::int64_t row, std::vector<WindowRow>& out) {
  out.clear();
  std::int64_t lead[Rank > 1 ? Rank - 1 : 1] = {};
  row_coords<Rank>(g, row, lead);
  AxisWindow w[Rank > 1 ? Rank - 1 : 1];
  std::int64_t count = 1;
  for (int a = 0; a < Rank - 1; ++a) {
    w[a] = axis_window(lead[a], g.axes[a]);
    count *= w[a].count;
  }
  std::int64_t t[Rank > 1 ? Rank - 1 : 1] = {};
  for (std::int64_t i = 0; i < count; ++i) {
    WindowRow r{0, 0, 0, 0};
    for (int a = 0; a < Rank - 1; ++a) {
      const std::int64_t pos = w[a].first + t[a] * w[a].step;
      r.key_offset += pos * k.strides[1 + a];
      r.value_offset += pos * v.strides[1 + a];
      r.vt_row = r.vt_row * g.spatial[a] + pos;
      r.bias_row = r.bias_row * (2 * p.kernel_size[a] - 1) + w[a].rpb_first + t[a];
    }
    out.push_back(r);
    for (int a = Rank - 2; a >= 0; --a) {  // odometer, last leading axis fastest
      if (++t[a] < w[a].count) break;
      t[a] = 0;
    }
  }
}

// The A operand of one product over 16 keys (or values) and where its 16 x
// 16 result goes: 16 rows `stride` bytes apart.
struct KeyTile {
  const std::uint16_t* keys;
  std::int64_t stride;
  float* scores;
};

// Element offsets [lowest, highest) that a strided view spans.
struct Extent {
  std::int64_t lowest = 0, highest = 1;
  explicit Extent(const TensorView& t) {
    for (int d = 0; d < t.ndim; ++d) {
      const std::int64_t span = (t.shape[d] - 1) * t.strides[d];
      (span < 0 ? lowest : highest) += span;
    }
  }
};

// The 16 rows of channels [0, width) from element `first` of `data` on,
// `step` elements apart, of which the first `valid` are tokens: read where
// they are (rows past the tokens are read as they are; their results are
// masked) unless a row lies outside the tensor (`extent`): then a copy in
// `edge` (16 x width) of the valid ones, zeros after.
inline KeyTile key_tile(const std::uint16_t* data, std::int64_t first, std::int64_t step,
                        std::int64_t valid, std::int64_t width, const Extent& extent,
                        std::uint16_t* edge, float* scores) {
  const std::int64_t last = first + (kTile - 1) * step;
  if (std::min(first, last) >= extent.lowest && std::max(first, last) + width <= extent.highest) {
    return KeyTile{data + first, step * 2, scores};
  }
  std::memset(edge, 0, sizeof(std::uint16_t) * kTile * width);
  for (std::int64_t j = 0; j < std::min<std::int64_t>(valid, kTile); ++j) {
    std::memcpy(edge + j * width, data + first + j * step, sizeof(std::uint16_t) * width);
  }
  return KeyTile{edge, width * 2, scores};
}

template <typename V>
void reserve(V& v, std::int64_t n) {
  if (static_cast<std::int64_t>(v.size()) < n) v.resize(n);
}

// The window rows of every row, built once per call (offsets without the
// batch and head).
template <int Rank>
struct WindowTable {
  std::vector<WindowRow> all;
  std::vector<std::int64_t> start;  // row r's: all[start[r] .. start[r + 1])

  WindowTable(const Geometry<Rank>& g, const TensorView& k, const TensorView& v, const NaParams& p,
              std::int64_t rows) {
    std::vector<WindowRow> one;
    for (std::int64_t r = 0; r < rows; ++r) {
      start.push_back(static_cast<std::int64_t>(all.size()));
      window_rows<Rank>(g, k, v, p, r, one);
      all.insert(all.end(), one.begin(), one.end());
    }
    start.push_back(static_cast<std::int64_t>(all.size()));
  }
  const WindowRow* rows(std::int64_t r) const { return all.data() + start[r]; }
  std::int64_t count(std::int64_t r) const { return start[r + 1] - start[r]; }
};


// A tile's queries and where their keys are: what the phases of a tile share.
template <int Rank>
struct TileShape {
  std::int64_t b, h, hk;
  std::int64_t lead[Rank > 1 ? Rank - 1 : 1] = {};
  const TileLanes& lanes;
  std::int64_t keys;        // the run of keys of each window row
  std::int64_t key_tiles;   // 16 keys per S^T product
  std::int64_t pair_tiles;  // 32 keys (16 pairs) per product with P^T or dS^T as B
  const WindowRow* rows;
  std::int64_t window;
  std::int64_t column;      // the run's first column in V^T or K^T (Layout::group_column)

  TileShape(const Geometry<Rank>& g, const Layout<Rank>& layout, const WindowTable<Rank>& windows,
            std::int64_t batch, std::int64_t head, std::int64_t heads_per_kv, std::int64_t row,
            const TileLanes& tile)
      : b(batch), h(head), hk(head / heads_per_kv), lanes(tile),
        keys(tile.union_hi - tile.union_lo), key_tiles((keys + kTile - 1) / kTile),
        pair_tiles((keys + 2 * kKeyPairs - 1) / (2 * kKeyPairs)), rows(windows.rows(row)),
        window(windows.count(row)), column(layout.group_column[tile.grp] + tile.union_lo) {
    row_coords<Rank>(g, row, lead);
  }
  std::int64_t key_rows() const { return pair_tiles * 2 * kKeyPairs; }  // keys, padded to pairs
  std::int64_t row_floats() const { return key_tiles * kTile * kTile; }
  std::int64_t row_pairs() const { return pair_tiles * kKeyPairs * kTile; }
};

// The A operands of a tile's products over keys, from k (or, with
// `values`, v): window row by window row, 16 keys of the run each, their 16
// x 16 results at `results` (window row w's from w * row_floats() on); rows
// outside the tensor copied into `edges` (key_tile).
template <int Rank>
void key_operands(const TensorView& t, bool values, const Extent& extent,
                  const Layout<Rank>& layout, const TileShape<Rank>& shape, std::uint16_t* edges,
                  float* results, std::vector<KeyTile>& out) {
  const auto* data = static_cast<const std::uint16_t*>(t.data);
  const std::int64_t width = t.shape[Rank + 2], grp = shape.lanes.grp;
  const std::int64_t base = shape.b * t.strides[0] + shape.hk * t.strides[Rank + 1];
  const std::int64_t step = layout.dilation * t.strides[Rank], len = layout.group_len[grp];
  out.clear();
  for (std::int64_t w = 0; w < shape.window; ++w) {
    const std::int64_t row_start =
        base + (values ? shape.rows[w].value_offset : shape.rows[w].key_offset) +
        grp * t.strides[Rank];
    for (std::int64_t kt = 0; kt < shape.key_tiles; ++kt) {
      const std::int64_t j0 = shape.lanes.union_lo + kt * kTile;
      out.push_back(key_tile(data, row_start + j0 * step, step, len - j0, width, extent,
                             edges + (w * shape.key_tiles + kt) * kTile * width,
                             results + w * shape.row_floats() + kt * kTile * kTile));
    }
  }
}

}  // namespace libna::cpu::amx

LIBNA_AMX_END
