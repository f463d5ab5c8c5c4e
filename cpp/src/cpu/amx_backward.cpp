// The fused backward for bfloat16 inputs on CPUs with AMX: the five products
// of attention's gradient as tile products (TDPBF16PS), the softmax terms in
// AVX-512, on the forward's tiles (amx_forward.cpp): 16 queries of one row
// and dilation group along the last axis, the run of keys their windows
// cover in each window row.
//
// Per tile, with lanes = queries and P = exp(scale q.k + rpb - lse):
//   S^T = K . Q^T and dP^T = V . dO^T   (keys by queries, 16 x 16 products)
//   dS = P (dP - D), D = dout . out - dlse, lane-wise down the keys
//   dq^T = K^T . (scale dS)^T           (K^T packed once per work item)
//   dk += (scale dS)^T . Q, dv += P^T . dO
// dk and dv accumulate in float32, per (batch, kv head), in the column
// layout of the forward's V^T (a dilation group's keys consecutive, padding
// after it), and are rounded to bf16 once every query head of the kv head
// has added to them. A work item is one (batch, kv head), or with fewer of
// those than threads (2D and 3D) one stripe of its rows: the stripe owns the
// dq of its query rows and the dk and dv of its key rows, and computes the
// tiles of its neighbours' query rows whose windows reach into it again
// (for their contributions to its keys). Each key gets the same products in
// the same order either way, and the rpb gradient is summed from one partial
// per block of rows (RowCuts), so the gradients are the same bits whatever
// the threads.
//
// P and scale dS are rounded to bf16 for the products (FlashAttention's and
// NATTEN's GPU backward do the same); the gradients are within bf16's
// precision of the exact ones but not the float32 kernels' bits.
//
// A product adds 0 x value for the keys outside a query's window, which is
// NaN when the value is not finite: non-finite values of q, k and dout stay
// out of the operands of the products that would multiply them by such
// zeros (dk's q, dq's K^T, dv's dout; zeros there) and are added to the
// gradients of the keys or queries of their neighbourhood afterwards, so
// that a NaN reaches those and no others, as in the vectorised kernels
// (v and rpb enter only terms that are masked lane by lane).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "backend.h"
#include "cpu/amx.h"
#include "cpu/amx_tiles.h"
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"
#include "dispatch.h"
#include "libna/na.h"
#include "libna/window.h"
#include "numeric.h"

namespace libna::cpu::amx {

namespace {

// How the rows of each (batch, kv head) are cut: into blocks of rows as tall
// along the first axis as a window's reach there (the rpb gradient is
// summed from one partial per block, in block order), and into stripes of
// whole blocks, one per work item: one stripe when there are as many pairs
// as threads, else enough for the threads. A stripe recomputes the tiles of
// its neighbours' rows whose windows reach into it: at most a block each
// side. 1D has one row.
struct RowCuts {
  std::int64_t block = 1, blocks = 1, stripes = 1;

  explicit RowCuts(const detail::BackwardArgs& args) {
    const int rank = args.params.rank;
    std::int64_t rows = 1;
    for (int a = 0; a < rank - 1; ++a) rows *= args.q.shape[1 + a];
    block = rows;  // 1D: the one row
    if (rank > 1) {
      block = args.params.kernel_size[0] * args.params.dilation[0];
      for (int a = 1; a < rank - 1; ++a) block *= args.q.shape[1 + a];  // whole planes in 3D
    }
    blocks = (rows + block - 1) / block;
    const std::int64_t pairs = args.q.shape[0] * args.k.shape[rank + 1];
    const std::int64_t threads = get_num_threads();
    if (pairs < threads) stripes = std::min((threads + pairs - 1) / pairs, blocks);
  }
  // The rows of stripe `cut`: whole blocks, as evenly as they go.
  std::int64_t first_row(std::int64_t cut, std::int64_t rows) const {
    return std::min(rows, block * (blocks * cut / stripes));
  }
};

}  // namespace

bool runs(const detail::BackwardArgs& args) {
  if (args.q.dtype != DType::bfloat16 ||
      (args.dlse != nullptr && args.dlse->dtype != DType::float32)) {
    return false;
  }
  const int rank = args.params.rank;
  const std::int64_t dim = args.q.shape[rank + 2], dim_v = args.v.shape[rank + 2];
  if (dim % 32 != 0 || dim_v % 32 != 0 || dim == 0 || dim_v == 0) return false;
  for (const TensorView* t : {&args.q, &args.k, &args.v, &args.out, &args.dout, &args.dq,
                              &args.dk, &args.dv}) {
    if (t->strides[rank + 2] != 1) return false;
  }
  const int last = rank - 1;
  if (args.rpb && (args.params.is_causal[last] || args.params.stride[last] != 1)) return false;
  // Fewer work items than threads would idle some, where the vectorised
  // kernels split the rows finer.
  return args.q.shape[0] * args.k.shape[rank + 1] * RowCuts(args).stripes >= get_num_threads();
}

}  // namespace libna::cpu::amx

LIBNA_AMX_BEGIN

namespace libna::cpu::amx {

namespace {

// tmm0, tmm4 and tmm5 accumulate (S^T, dP^T, dq^T, dk, dv); tmm1 holds A
// operands of 16 x 32 bf16 (keys, values, K^T), tmm2 B operands of 16 pairs
// (Q^T, dO^T, dS^T); tmm6 holds 16 keys x 16 queries (dS^T or P^T), and
// tmm7 and tmm3 the 8 query pairs x 16 channels of q or dout that it
// multiplies (32 channels, kept for a whole pass over the keys).
TileConfig backward_config() {
  TileConfig c = full_tiles();
  c.bytes_per_row[6] = 2 * kTile;
  c.rows[3] = c.rows[7] = kTile / 2;
  return c;
}

// Accumulator tile `i` % 3: tmm0, tmm4 or tmm5.
inline void zero_accumulator(int i) {
  switch (i % 3) {
    case 0: _tile_zero(0); break;
    case 1: _tile_zero(4); break;
    default: _tile_zero(5); break;
  }
}
inline void store_accumulator(int i, void* at, std::int64_t stride) {
  switch (i % 3) {
    case 0: _tile_stored(0, at, stride); break;
    case 1: _tile_stored(4, at, stride); break;
    default: _tile_stored(5, at, stride); break;
  }
}
// Accumulator i % 3 += A (loaded from `a` into tmm1) . tmm2.
inline void accumulate_pairs(int i, const void* a, std::int64_t stride) {
  switch (i % 3) {
    case 0: LIBNA_TILE_PRODUCT(0, 1, 2, a, stride); break;
    case 1: LIBNA_TILE_PRODUCT(4, 1, 2, a, stride); break;
    default: LIBNA_TILE_PRODUCT(5, 1, 2, a, stride); break;
  }
}

// The float32 16 x 32 block at `acc` (rows `stride` bytes apart) += tmm6 .
// (tmm7 | tmm3): 16 keys by 32 channels.
inline void accumulate_block(float* acc, std::int64_t stride) {
  _tile_loadd(0, acc, stride);
  _tile_loadd(4, acc + kTile, stride);
  _tile_dpbf16ps(0, 6, 7);
  _tile_dpbf16ps(4, 6, 3);
  _tile_stored(0, acc, stride);
  _tile_stored(4, acc + kTile, stride);
}

// The 16 x 16 results of `products` A operands times the B operand (channel
// pairs [width / 2][lane]), three in flight.
inline void key_products(const KeyTile* t, std::int64_t products, const std::uint32_t* b,
                         std::int64_t width) {
  for (std::int64_t i = 0; i < products; i += 3) {
    const int n = static_cast<int>(std::min<std::int64_t>(3, products - i));
    for (int j = 0; j < n; ++j) zero_accumulator(j);
    for (std::int64_t c = 0; c < width; c += kChannels) {
      _tile_loadd(2, b + (c / 2) * kTile, 64);
      for (int j = 0; j < n; ++j) accumulate_pairs(j, t[i + j].keys + c, t[i + j].stride);
    }
    for (int j = 0; j < n; ++j) store_accumulator(j, t[i + j].scores, 64);
  }
}

// A value left out of a product's operand: its lane (or key column), channel
// and value.
struct LeftOut {
  std::int64_t at, channel;
  float value;
};

// Channels [c, c + 32) of 16 tokens (null: zeros) into r, as 16 channel
// pairs each, and per token the mask of the bf16 values that are not
// finite; returns whether any is not.
inline bool load_tokens(const std::uint16_t* const* tokens, std::int64_t c, __m512 r[kTile],
                        __mmask32 bad[kTile]) {
  const __m512i exponent = _mm512_set1_epi16(0x7f80);
  __mmask32 any = 0;
  for (int l = 0; l < kTile; ++l) {
    r[l] = tokens[l] ? _mm512_loadu_ps(tokens[l] + c) : _mm512_setzero_ps();
    bad[l] = _mm512_cmpeq_epi16_mask(_mm512_and_si512(_mm512_castps_si512(r[l]), exponent),
                                     exponent);
    any |= bad[l];
  }
  return any != 0;
}

// Lists the values of `bad` (token t's at its key `at0 + t`, channels from
// c) in `left_out` and zeroes them in r.
inline void leave_out(const std::uint16_t* const* tokens, std::int64_t c, std::int64_t at0,
                      __m512 r[kTile], const __mmask32 bad[kTile], std::vector<LeftOut>& left_out) {
  for (int t = 0; t < kTile; ++t) {
    if (!bad[t]) continue;
    for (int i = 0; i < 2 * kTile; ++i) {
      if ((bad[t] >> i) & 1u) {
        left_out.push_back({at0 + t, c + i, detail::to_float(detail::BFloat16{tokens[t][c + i]})});
      }
    }
    r[t] = _mm512_castsi512_ps(_mm512_maskz_mov_epi16(~bad[t], _mm512_castps_si512(r[t])));
  }
}

// The 16 lanes' tokens (null: idle, zeros) as the two B operands: channel
// pairs [width / 2][lane] (as they are: what they multiply is masked lane by
// lane) and lane pairs [width / 16][8][32] (lanes 2p and 2p + 1 interleaved,
// 16 channels), where non-finite values are zeros and listed in `left_out`
// (at = the lane).
inline void pack_lanes(const std::uint16_t* const* tokens, std::int64_t width,
                       std::uint32_t* channel_pairs, std::uint16_t* lane_pairs,
                       std::vector<LeftOut>& left_out) {
  alignas(64) std::uint16_t low[32], high[32];
  for (int i = 0; i < kTile; ++i) {
    low[2 * i] = static_cast<std::uint16_t>(i);
    low[2 * i + 1] = static_cast<std::uint16_t>(32 + i);
    high[2 * i] = static_cast<std::uint16_t>(16 + i);
    high[2 * i + 1] = static_cast<std::uint16_t>(48 + i);
  }
  const __m512i take_low = _mm512_load_si512(low), take_high = _mm512_load_si512(high);
  left_out.clear();
  for (std::int64_t c = 0; c < width; c += kChannels) {
    __m512 r[kTile], finite_r[kTile];
    __mmask32 bad[kTile];
    const bool any = load_tokens(tokens, c, r, bad);
    const __m512* pairs_of = r;
    if (any) {
      std::copy(r, r + kTile, finite_r);
      leave_out(tokens, c, 0, finite_r, bad, left_out);
      pairs_of = finite_r;
    }
    std::uint16_t* block = lane_pairs + (c / kTile) * (kTile / 2) * 32;
    for (int p = 0; p < kTile / 2; ++p) {
      const __m512i a = _mm512_castps_si512(pairs_of[2 * p]);
      const __m512i b = _mm512_castps_si512(pairs_of[2 * p + 1]);
      _mm512_storeu_si512(block + p * 32, _mm512_permutex2var_epi16(a, take_low, b));
      _mm512_storeu_si512(block + (kTile / 2 + p) * 32, _mm512_permutex2var_epi16(a, take_high, b));
    }
    transpose16(r);
    for (int p = 0; p < kTile; ++p) _mm512_storeu_ps(channel_pairs + (c / 2 + p) * kTile, r[p]);
  }
}

// K^T of one row: [dim][width] bf16, a dilation group's keys in its columns
// (Layout::group_column) and zeros after them; non-finite values are zeros
// too, listed in `left_out` (at = the column).
template <int Rank>
void transpose_keys(const TensorView& k, const Layout<Rank>& layout, std::int64_t b,
                    const std::int64_t* lead, std::int64_t h, std::uint16_t* out,
                    std::vector<LeftOut>& left_out) {
  const std::int64_t dim = k.shape[Rank + 2], width = layout.vt_width;
  const auto* data = static_cast<const std::uint16_t*>(k.data);
  const __m512i split = _mm512_set_epi16(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1,
                                         30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  for (std::int64_t grp = 0; grp < layout.dilation; ++grp) {
    const std::int64_t len = layout.group_len[grp], column0 = layout.group_column[grp];
    for (std::int64_t c = 0; c < dim; ++c) {
      std::memset(out + c * width + column0 + len, 0, sizeof(std::uint16_t) * 2 * kKeyPairs);
    }
    for (std::int64_t i = 0; i < len; i += kTile) {
      const std::int64_t n = std::min<std::int64_t>(kTile, len - i);
      const std::uint16_t* tokens[kTile];
      for (int t = 0; t < kTile; ++t) {
        tokens[t] = t < n ? data + token_offset<Rank>(k, b, lead, grp + (i + t) * layout.dilation, h)
                          : nullptr;
      }
      for (std::int64_t c = 0; c < dim; c += kChannels) {
        __m512 r[kTile];
        __mmask32 bad[kTile];
        if (load_tokens(tokens, c, r, bad)) leave_out(tokens, c, column0 + i, r, bad, left_out);
        transpose16(r);  // r[p]: channels c + 2p and c + 2p + 1 of the 16 tokens
        for (int p = 0; p < kTile; ++p) {
          alignas(64) std::uint16_t halves[2 * kTile];
          _mm512_store_si512(halves, _mm512_permutexvar_epi16(split, _mm512_castps_si512(r[p])));
          std::uint16_t* at = out + (c + 2 * p) * width + column0 + i;
          std::memcpy(at, halves, sizeof(std::uint16_t) * n);
          std::memcpy(at + width, halves + kTile, sizeof(std::uint16_t) * n);
        }
      }
    }
  }
}

// The scratch of one thread, kept between calls.
struct Scratch {
  std::vector<float> scores, dprobs;           // S^T, dP^T: [window row][key][lane]
  std::vector<std::uint16_t> prob_rows;        // P^T in bf16, the same layout
  std::vector<std::uint16_t> dscore_rows;      // (scale dS)^T in bf16, the same layout
  std::vector<std::uint32_t> dscore_pairs;     // (scale dS)^T in key pairs: [window row][key / 2][lane]
  std::vector<std::uint32_t> queries, grads;   // Q^T, dO^T in channel pairs: [channel / 2][lane]
  std::vector<std::uint16_t> query_pairs, grad_pairs;  // q, dout in lane pairs (pack_lanes)
  std::vector<float> dq;                       // dq^T: [channel][lane]
  std::vector<std::uint16_t> edges;            // key_tile's copies, per product
  std::vector<KeyTile> products;
  std::vector<__mmask16> masks;                // per key of the run: the lanes whose window holds it
  std::vector<std::uint16_t> keys_t;           // K^T of the item's rows: [row][dim][vt_width]
  std::vector<float> dk, dv;                   // the item's accumulators: [row][vt_width][dim]
  std::vector<LeftOut> left_queries, left_grads;  // a tile's, at = the lane
  std::vector<LeftOut> left_keys;              // an item's, at = the column, by row:
  std::vector<std::int64_t> left_keys_start;   // row r's: [start[r], start[r + 1])
  std::vector<std::int64_t> query_rows;        // the item's
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// dq^T[channel] (its 16 lanes at `dq`) += (scale dS)^T[j][lane] * value for
// the lanes whose window holds key j of the run (a left-out value of k;
// `ds_rows`: the window row's (scale dS)^T in bf16, [key][lane]).
inline void add_left_out(std::int64_t j, std::int64_t keys, const __mmask16* holds, float value,
                         const std::uint16_t* ds_rows, float* dq) {
  if (j < 0 || j >= keys) return;
  for (int l = 0; l < kTile; ++l) {
    if ((holds[j] >> l) & 1u) {
      dq[l] += detail::to_float(detail::BFloat16{ds_rows[j * kTile + l]}) * value;
    }
  }
}

// The rows [first, end) of a (batch, kv head) that a work item owns.
struct Stripe {
  std::int64_t first, end;
  bool owns(std::int64_t row) const { return row >= first && row < end; }
};

// One call's backward: its inputs, layout and tables, the work of an item
// and of a tile.
template <int Rank>
struct Backward {
  const detail::BackwardArgs& args;
  const Geometry<Rank>& g;
  const Layout<Rank>& layout;
  const WindowTable<Rank>& windows;
  Extent keys_extent, values_extent;
  const float* bias;  // reversed rpb rows, [head][rpb row][bias_width]; null without rpb
  std::int64_t bias_rows, bias_width;
  std::int64_t dim, dim_v, heads_per_kv;
  float scale;

  // lse (as the backward uses it) and D of the tile's lanes; 0 for idle ones.
  void row_terms(std::int64_t b, std::int64_t h, const std::int64_t* lead, const TileLanes& tl,
                 const std::uint16_t* const* grads, float* lse, float* delta) const {
    // D: bf16 pair products summed in float32 per lane (VDPBF16PS), then
    // across each lane's 16 partial sums through a transpose.
    const std::uint16_t* outs[kTile];
    lane_tokens<Rank>(args.out, b, lead, tl.grp, tl.first, layout.dilation, h, tl.lanes, outs);
    __m512 dots[kTile];
    for (int l = 0; l < kTile; ++l) {
      dots[l] = _mm512_setzero_ps();
      if (!outs[l]) continue;
      for (std::int64_t i = 0; i < dim_v; i += kChannels) {
        dots[l] = _mm512_dpbf16_ps(dots[l], (__m512bh)_mm512_loadu_si512(outs[l] + i),
                                   (__m512bh)_mm512_loadu_si512(grads[l] + i));
      }
    }
    transpose16(dots);
    __m512 sum = dots[0];
    for (int i = 1; i < kTile; ++i) sum = _mm512_add_ps(sum, dots[i]);
    _mm512_store_ps(delta, sum);
    std::int64_t c[Rank];
    for (int a = 0; a < Rank - 1; ++a) c[a] = lead[a];
    c[Rank - 1] = tl.grp + tl.first * layout.dilation;
    const std::int64_t step = layout.dilation * args.lse.strides[Rank];
    const float* lse_in = static_cast<const float*>(args.lse.data) +
                          row_offset<Rank>(args.lse, b, c, 0) + h * args.lse.strides[Rank + 1];
    const float* dlse_in = nullptr;
    std::int64_t dlse_step = 0;
    if (args.dlse) {
      dlse_step = layout.dilation * args.dlse->strides[Rank];
      dlse_in = static_cast<const float*>(args.dlse->data) + row_offset<Rank>(*args.dlse, b, c, 0) +
                h * args.dlse->strides[Rank + 1];
    }
    for (int l = 0; l < kTile; ++l) {
      if (!outs[l]) {
        lse[l] = delta[l] = 0.0f;
        continue;
      }
      lse[l] = detail::backward_lse(lse_in[l * step]);
      if (dlse_in) delta[l] -= dlse_in[l * dlse_step];
    }
  }

  // S^T = K . Q^T and dP^T = V . dO^T.
  void score_products(const TileShape<Rank>& t, Scratch& s) const {
    key_operands<Rank>(args.k, false, keys_extent, layout, t, s.edges.data(), s.scores.data(),
                       s.products);
    key_products(s.products.data(), static_cast<std::int64_t>(s.products.size()),
                 s.queries.data(), dim);
    key_operands<Rank>(args.v, true, values_extent, layout, t, s.edges.data(), s.dprobs.data(),
                       s.products);
    key_products(s.products.data(), static_cast<std::int64_t>(s.products.size()),
                 s.grads.data(), dim_v);
  }

  // P and scale dS lane-wise down the keys, masked to each lane's window: in
  // bf16 rows for dk and dv, in key pairs for dq; dS into the rpb gradient.
  void probabilities(const TileShape<Rank>& t, const float* lse, const float* delta,
                     const __mmask16* holds, float* bias_grad, Scratch& s) const {
    const __m512 scale_v = _mm512_set1_ps(scale), log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 lse_log2e = _mm512_mul_ps(_mm512_load_ps(lse), log2e);
    const __m512 delta_v = _mm512_load_ps(delta);
    const __m512i interleave = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
        23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const std::int64_t kernel = g.axes[Rank - 1].kernel;
    // Lane l's rpb index along the last axis is j - (first + l) + kernel - 1
    // (the forward's reversed rows); its gradient goes to the same place.
    const std::int64_t reversed = kBiasPad + 2 * kernel - 2 - (t.lanes.union_lo - t.lanes.first + kernel - 1);
    for (std::int64_t w = 0; w < t.window; ++w) {
      const float* row_scores = s.scores.data() + w * t.row_floats();
      const float* row_dprobs = s.dprobs.data() + w * t.row_floats();
      std::uint16_t* p_rows = s.prob_rows.data() + w * t.key_rows() * kTile;
      std::uint16_t* ds_rows = s.dscore_rows.data() + w * t.key_rows() * kTile;
      std::uint32_t* ds_pairs = s.dscore_pairs.data() + w * t.row_pairs();
      const std::int64_t bias_row = t.rows[w].bias_row;
      const float* bias_of = bias ? bias + (t.h * bias_rows + bias_row) * bias_width + reversed : nullptr;
      float* bias_grad_of = bias_grad ? bias_grad + bias_row * bias_width + reversed : nullptr;
      for (std::int64_t i = 0; i < t.key_rows(); i += 2) {
        __m512 ds[2];
        for (int e = 0; e < 2; ++e) {
          const std::int64_t j = i + e;
          if (j >= t.keys) {
            ds[e] = _mm512_setzero_ps();
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(p_rows + j * kTile), _mm256_setzero_si256());
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(ds_rows + j * kTile), _mm256_setzero_si256());
            continue;
          }
          __m512 x = _mm512_mul_ps(_mm512_loadu_ps(row_scores + j * kTile), scale_v);
          if (bias_of) x = _mm512_add_ps(x, _mm512_loadu_ps(bias_of - j));
          const __m512 p = exp2_masked(holds[j], _mm512_fmsub_ps(x, log2e, lse_log2e));
          const __m512 dp = _mm512_sub_ps(_mm512_loadu_ps(row_dprobs + j * kTile), delta_v);
          const __m512 d = _mm512_maskz_mul_ps(holds[j], p, dp);
          if (bias_grad_of) {
            float* at = bias_grad_of - j;
            _mm512_storeu_ps(at, _mm512_add_ps(_mm512_loadu_ps(at), d));
          }
          ds[e] = _mm512_mul_ps(d, scale_v);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(p_rows + j * kTile),
                              (__m256i)_mm512_cvtneps_pbh(p));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(ds_rows + j * kTile),
                              (__m256i)_mm512_cvtneps_pbh(ds[e]));
        }
        const __m512i pair = (__m512i)_mm512_cvtne2ps_pbh(ds[1], ds[0]);
        _mm512_storeu_si512(ds_pairs + i / 2 * kTile, _mm512_permutexvar_epi16(interleave, pair));
      }
    }
  }

  // dq = (K^T . (scale dS)^T)^T, 48 channels at a time, plus the left-out
  // values of k; written to the lanes' dq tokens.
  void query_grads(const TileShape<Rank>& t, const __mmask16* holds, Scratch& s) const {
    const std::int64_t kt_stride = layout.vt_width * 2;  // bytes between K^T channels
    for (std::int64_t c0 = 0; c0 < dim; c0 += 3 * kTile) {
      const int blocks = static_cast<int>(std::min<std::int64_t>(3, (dim - c0) / kTile));
      for (int i = 0; i < blocks; ++i) zero_accumulator(i);
      for (std::int64_t w = 0; w < t.window; ++w) {
        const std::uint16_t* kt_row =
            s.keys_t.data() + t.rows[w].vt_row * dim * layout.vt_width + t.column;
        for (std::int64_t pt = 0; pt < t.pair_tiles; ++pt) {
          _tile_loadd(2, s.dscore_pairs.data() + w * t.row_pairs() + pt * kKeyPairs * kTile, 64);
          for (int i = 0; i < blocks; ++i) {
            accumulate_pairs(i, kt_row + (c0 + i * kTile) * layout.vt_width + pt * 2 * kKeyPairs,
                             kt_stride);
          }
        }
      }
      for (int i = 0; i < blocks; ++i) {
        store_accumulator(i, s.dq.data() + (c0 + i * kTile) * kTile, 64);
      }
    }
    if (!s.left_keys.empty()) {
      for (std::int64_t w = 0; w < t.window; ++w) {
        const std::int64_t r = t.rows[w].vt_row;
        for (std::int64_t e = s.left_keys_start[r]; e < s.left_keys_start[r + 1]; ++e) {
          const LeftOut& f = s.left_keys[e];
          add_left_out(f.at - t.column, t.keys, holds, f.value,
                       s.dscore_rows.data() + w * t.key_rows() * kTile, s.dq.data() + f.channel * kTile);
        }
      }
    }
    std::uint16_t* tokens[kTile];
    lane_tokens<Rank>(args.dq, t.b, t.lead, t.lanes.grp, t.lanes.first, layout.dilation, t.h,
                      t.lanes.lanes, tokens);
    for (std::int64_t c = 0; c < dim; c += kTile) {
      __m512 r[kTile];
      for (int i = 0; i < kTile; ++i) r[i] = _mm512_loadu_ps(s.dq.data() + (c + i) * kTile);
      transpose16(r);
      for (int l = 0; l < kTile; ++l) {
        if (tokens[l]) _mm256_storeu_si256(reinterpret_cast<__m256i*>(tokens[l] + c), to_bf16(r[l]));
      }
    }
  }

  // dk += (scale dS)^T . Q and dv += P^T . dO, 16 keys by 32 channels at a
  // time (the 32 channels of q or dout in tmm7 and tmm3 for all the keys),
  // plus the left-out values of q and dout.
  void key_grads(const TileShape<Rank>& t, const __mmask16* holds, const Stripe& stripe,
                 Scratch& s) const {
    for (const auto& [rows_of, pairs, acc, width, left_out] :
         {std::tuple{s.dscore_rows.data(), s.query_pairs.data(), s.dk.data(), dim, &s.left_queries},
          std::tuple{s.prob_rows.data(), s.grad_pairs.data(), s.dv.data(), dim_v, &s.left_grads}}) {
      for (std::int64_t c = 0; c < width; c += 2 * kTile) {
        _tile_loadd(7, pairs + c / kTile * (kTile / 2) * 32, 64);
        _tile_loadd(3, pairs + (c / kTile + 1) * (kTile / 2) * 32, 64);
        for (std::int64_t w = 0; w < t.window; ++w) {
          if (!stripe.owns(t.rows[w].vt_row)) continue;
          float* keys_acc = acc + (t.rows[w].vt_row * layout.vt_width + t.column) * width + c;
          for (std::int64_t kt = 0; kt < t.key_tiles; ++kt) {
            _tile_loadd(6, rows_of + (w * t.key_rows() + kt * kTile) * kTile, 2 * kTile);
            accumulate_block(keys_acc + kt * kTile * width, width * 4);
          }
        }
      }
      for (const LeftOut& f : *left_out) {
        for (std::int64_t w = 0; w < t.window; ++w) {
          if (!stripe.owns(t.rows[w].vt_row)) continue;
          const std::int64_t first_column = t.rows[w].vt_row * layout.vt_width + t.column;
          for (std::int64_t j = 0; j < t.keys; ++j) {
            if (!((holds[j] >> f.at) & 1u)) continue;
            const std::uint16_t weight = rows_of[(w * t.key_rows() + j) * kTile + f.at];
            acc[(first_column + j) * width + f.channel] +=
                detail::to_float(detail::BFloat16{weight}) * f.value;
          }
        }
      }
    }
  }

  // One tile of 16 queries of head h: their dq and rpb gradient (into
  // `bias_grad`, their row's partial of head h) if the stripe owns their
  // row, and their contributions to the dk and dv of its key rows.
  void tile(std::int64_t b, std::int64_t h, std::int64_t row, const TileLanes& tl,
            const Stripe& stripe, float* bias_grad, Scratch& s) const {
    const bool owned = stripe.owns(row);
    const TileShape<Rank> t(g, layout, windows, b, h, heads_per_kv, row, tl);
    reserve(s.scores, t.window * t.row_floats());
    reserve(s.dprobs, t.window * t.row_floats());
    reserve(s.prob_rows, t.window * t.key_rows() * kTile);
    reserve(s.dscore_rows, t.window * t.key_rows() * kTile);
    reserve(s.dscore_pairs, t.window * t.row_pairs());
    reserve(s.edges, t.window * t.key_tiles * kTile * std::max(dim, dim_v));
    reserve(s.masks, t.keys);

    // The B operands from q and dout, and the row terms.
    const std::uint16_t* tokens[kTile];
    lane_tokens<Rank>(args.q, b, t.lead, tl.grp, tl.first, layout.dilation, h, tl.lanes, tokens);
    pack_lanes(tokens, dim, s.queries.data(), s.query_pairs.data(), s.left_queries);
    lane_tokens<Rank>(args.dout, b, t.lead, tl.grp, tl.first, layout.dilation, h, tl.lanes, tokens);
    pack_lanes(tokens, dim_v, s.grads.data(), s.grad_pairs.data(), s.left_grads);
    alignas(64) float lse[kTile], delta[kTile];
    row_terms(b, h, t.lead, tl, tokens, lse, delta);

    score_products(t, s);
    window_masks(tl, s.masks.data());
    probabilities(t, lse, delta, s.masks.data(), owned ? bias_grad : nullptr, s);
    if (owned) query_grads(t, s.masks.data(), s);
    key_grads(t, s.masks.data(), stripe, s);
  }

  // dk and dv of one row from the accumulators, in bf16.
  void store_keys(std::int64_t b, std::int64_t hk, std::int64_t row, const Scratch& s) const {
    std::int64_t lead[Rank > 1 ? Rank - 1 : 1] = {};
    row_coords<Rank>(g, row, lead);
    for (std::int64_t x = 0; x < layout.extent; ++x) {
      const std::int64_t column =
          row * layout.vt_width + layout.group_column[x % layout.dilation] + x / layout.dilation;
      for (const auto& [grad, acc, width] :
           {std::tuple{&args.dk, s.dk.data(), dim}, std::tuple{&args.dv, s.dv.data(), dim_v}}) {
        auto* token = static_cast<std::uint16_t*>(grad->data) + token_offset<Rank>(*grad, b, lead, x, hk);
        const float* from = acc + column * width;
        for (std::int64_t c = 0; c < width; c += kTile) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(token + c), to_bf16(_mm512_loadu_ps(from + c)));
        }
      }
    }
  }

  // Every query head of kv head hk at batch b, for the rows of `stripe`.
  // bias_grads: the (batch, kv head)'s rpb partials, [head of the group][block
  // of rows], blocks `block` rows tall.
  void item(std::int64_t b, std::int64_t hk, const Stripe& stripe, float* bias_grads,
            std::int64_t block, Scratch& s) const {
    const std::int64_t rows = layout.rows, width = layout.vt_width;
    // The query rows to compute: the stripe's and those whose windows reach
    // into it; the key rows their windows read.
    std::vector<std::int64_t>& queries = s.query_rows;
    queries.clear();
    std::int64_t keys_lo = rows, keys_hi = 0;
    for (std::int64_t r = 0; r < rows; ++r) {
      const WindowRow* window = windows.rows(r);
      bool reaches = stripe.owns(r);
      for (std::int64_t w = 0; w < windows.count(r) && !reaches; ++w) {
        reaches = stripe.owns(window[w].vt_row);
      }
      if (!reaches) continue;
      queries.push_back(r);
      for (std::int64_t w = 0; w < windows.count(r); ++w) {
        keys_lo = std::min(keys_lo, window[w].vt_row);
        keys_hi = std::max(keys_hi, window[w].vt_row + 1);
      }
    }
    reserve(s.keys_t, rows * dim * width);
    reserve(s.dk, rows * width * dim);
    reserve(s.dv, rows * width * dim_v);
    std::fill(s.dk.begin() + stripe.first * width * dim, s.dk.begin() + stripe.end * width * dim,
              0.0f);
    std::fill(s.dv.begin() + stripe.first * width * dim_v,
              s.dv.begin() + stripe.end * width * dim_v, 0.0f);
    s.left_keys.clear();
    s.left_keys_start.assign(rows + 1, 0);
    for (std::int64_t r = keys_lo; r < keys_hi; ++r) {
      std::int64_t lead[Rank > 1 ? Rank - 1 : 1] = {};
      row_coords<Rank>(g, r, lead);
      transpose_keys<Rank>(args.k, layout, b, lead, hk, s.keys_t.data() + r * dim * width,
                           s.left_keys);
      s.left_keys_start[r + 1] = static_cast<std::int64_t>(s.left_keys.size());
    }
    for (std::int64_t r = keys_hi; r < rows; ++r) s.left_keys_start[r + 1] = s.left_keys_start[r];
    for (std::int64_t h = hk * heads_per_kv; h < (hk + 1) * heads_per_kv; ++h) {
      for (const std::int64_t r : queries) {
        const std::int64_t blocks = (rows + block - 1) / block;
        float* bias_grad = bias_grads ? bias_grads + ((h - hk * heads_per_kv) * blocks + r / block) *
                                                         bias_rows * bias_width
                                      : nullptr;
        for (const TileLanes& tl : layout.tiles_of_row) tile(b, h, r, tl, stripe, bias_grad, s);
      }
    }
    for (std::int64_t r = stripe.first; r < stripe.end; ++r) store_keys(b, hk, r, s);
  }
};

template <int Rank>
void backward(const detail::BackwardArgs& args) {
  const Geometry<Rank> g(args.q, args.params);
  const Layout<Rank> layout(g);
  const std::int64_t kv_heads = args.k.shape[Rank + 1], heads_per_kv = g.heads / kv_heads;
  const std::int64_t dim = args.q.shape[Rank + 2], dim_v = args.v.shape[Rank + 2];

  // rpb rows reversed and padded as in the forward; the gradient in the same
  // layout, one partial per (batch, head, block of rows), summed in that order.
  const std::int64_t kernel = g.axes[Rank - 1].kernel, span = 2 * kernel - 1;
  const std::int64_t bias_width = span + 2 * kBiasPad;
  std::int64_t bias_rows = 1;
  std::vector<float> bias;
  const BiasBuffer<Rank, float> bias_layout(args.params, g.heads);
  if (args.rpb) {
    const std::vector<float> rpb = bias_layout.template load_from<detail::BFloat16>(*args.rpb);
    bias_rows = bias_layout.strides[0] / span;
    bias.assign(g.heads * bias_rows * bias_width, 0.0f);
    for (std::int64_t r = 0; r < g.heads * bias_rows; ++r) {
      for (std::int64_t i = 0; i < span; ++i) {
        bias[r * bias_width + kBiasPad + span - 1 - i] = rpb[r * span + i];
      }
    }
  }
  const std::int64_t rows = layout.rows, pairs = g.batch * kv_heads;
  const RowCuts cuts(args);
  const std::int64_t partial_size = bias_rows * bias_width;  // of one head and block of rows
  std::vector<float> partials(args.rpb ? pairs * heads_per_kv * cuts.blocks * partial_size : 0,
                              0.0f);

  const WindowTable<Rank> windows(g, args.k, args.v, args.params, layout.rows);
  const Backward<Rank> bw{args,       g,          layout,        windows,
                          Extent(args.k), Extent(args.v),
                          args.rpb ? bias.data() : nullptr, bias_rows, bias_width,
                          dim,        dim_v,      heads_per_kv,  static_cast<float>(args.scale)};
  parallel_for(pairs * cuts.stripes, 1, [&](std::int64_t begin, std::int64_t end) {
    Scratch& s = scratch();
    reserve(s.queries, dim / 2 * kTile);
    reserve(s.grads, dim_v / 2 * kTile);
    reserve(s.query_pairs, dim * kTile);
    reserve(s.grad_pairs, dim_v * kTile);
    reserve(s.dq, dim * kTile);
    const TileConfig config = backward_config();
    _tile_loadconfig(&config);
    for (std::int64_t item = begin; item < end; ++item) {
      const std::int64_t pair = item / cuts.stripes, cut = item % cuts.stripes;
      const Stripe stripe{cuts.first_row(cut, rows), cuts.first_row(cut + 1, rows)};
      bw.item(pair / kv_heads, pair % kv_heads, stripe,
              args.rpb ? partials.data() + pair * heads_per_kv * cuts.blocks * partial_size
                       : nullptr,
              cuts.block, s);
    }
    _tile_release();
  });

  if (args.rpb) {
    // Summed by (batch, kv head), head, block of rows: the same order
    // whatever the stripes.
    std::vector<float> grad(bias_layout.size, 0.0f);
    for (std::int64_t pair = 0; pair < pairs; ++pair) {
      for (std::int64_t hg = 0; hg < heads_per_kv; ++hg) {
        float* to = grad.data() + ((pair % kv_heads) * heads_per_kv + hg) * bias_rows * span;
        for (std::int64_t blk = 0; blk < cuts.blocks; ++blk) {
          const float* partial =
              partials.data() + ((pair * heads_per_kv + hg) * cuts.blocks + blk) * partial_size;
          for (std::int64_t br = 0; br < bias_rows; ++br) {
            const float* from = partial + br * bias_width + kBiasPad;
            for (std::int64_t i = 0; i < span; ++i) to[br * span + i] += from[span - 1 - i];
          }
        }
      }
    }
    bias_layout.template store_to<detail::BFloat16>(grad, *args.drpb);
  }
}

}  // namespace

void na_backward(const detail::BackwardArgs& args) {
  detail::dispatch_rank(args.params.rank, "na_backward", [&](auto rank) {
    backward<decltype(rank)::value>(args);
  });
}

}  // namespace libna::cpu::amx

LIBNA_AMX_END
