// The fused forward for bfloat16 inputs on CPUs with AMX (Intel Xeon from
// Sapphire Rapids on): q.k and P.V as tile products (TDPBF16PS, 16x16 fp32
// accumulators over 32 bf16 products each), the softmax in AVX-512.
//
// One work item is a tile of 16 queries: consecutive positions of one
// dilation group along the last spatial axis, at one position of the leading
// axes, for one head. Its 16 queries share their window along the leading
// axes (the window rows) and together read a run of key columns along the
// last (the union of their windows, at most 16 + kernel + stride). For each
// window row and each 16 keys of that run, one tile product gives
// S^T = K . Q^T, keys by queries: a query is a lane of a 16-float vector, so
// the softmax runs down the keys with lane-wise max and sum, masking the keys
// outside each query's own window. P^T, rounded to bf16 in key pairs, is the
// B operand of O^T = V^T . P^T, whose A operand is V transposed
// ([channel][key], packed once per call); the 16 x dim_v result is
// transposed into the output rows, each scaled by 1/sum.
//
// What differs from the float32 kernels: P is rounded to bf16 before P.V (as
// FlashAttention and NATTEN's GPU kernels do), so outputs are within bf16's
// precision of the exact result but not the float32 kernels' bits. Keys
// outside a query's window enter the products with P = 0, which is exact
// unless a value is not finite (0 * inf is NaN): such values stay out of
// V^T and are added to the outputs of the queries that attend to them
// afterwards, so that a NaN or inf reaches those and no others.
//
// Used when all of these hold (runs() checks them, backend.cpp asks): the
// CPU has AMX-TILE, AMX-BF16 and AVX512-BF16 and the kernel set is avx512,
// the OS grants the tile state (arch_prctl), LIBNA_CPU_AMX is not 0, the
// inputs are bfloat16, the head dim is a multiple of 32 and v's of 16, and
// q, k, v and out have unit channel stride.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

#include "backend.h"
#include "cpu/amx.h"
#include "cpu/amx_tiles.h"
#include "cpu/environment.h"
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"
#include "dispatch.h"
#include "libna/window.h"
#include "numeric.h"

#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace libna::cpu::amx {

namespace {

// Whether this CPU and OS run tile products: the CPUID bits, and the Linux
// permission to use the tile data state (granted once per process).
bool cpu_has_amx() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
      !__builtin_cpu_supports("avx512vl") || !__builtin_cpu_supports("avx512dq")) {
    return false;
  }
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  const bool amx_bf16 = (edx >> 22) & 1u, amx_tile = (edx >> 24) & 1u;
  __cpuid_count(7, 1, eax, ebx, ecx, edx);
  const bool avx512_bf16 = (eax >> 5) & 1u;
  if (!amx_bf16 || !amx_tile || !avx512_bf16) return false;
  constexpr long kRequestPermission = 0x1023;  // ARCH_REQ_XCOMP_PERM
  constexpr long kTileData = 18;               // XFEATURE_XTILEDATA
  return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
#else
  return false;
#endif
}

}  // namespace

bool available() {
  static const bool usable = cpu_has_amx();
  return usable && environment().amx != 0;
}

bool runs(const detail::ForwardArgs& args) {
  if (args.q.dtype != DType::bfloat16) return false;
  const int rank = args.params.rank;
  const std::int64_t dim = args.q.shape[rank + 2], dim_v = args.v.shape[rank + 2];
  if (dim % 32 != 0 || dim_v % 16 != 0 || dim == 0 || dim_v == 0) return false;
  for (const TensorView* t : {&args.q, &args.k, &args.v, &args.out}) {
    if (t->strides[rank + 2] != 1) return false;
  }
  // The rpb's reversed rows (below) cover the window of a non-causal query
  // without stride along the last axis, the only windows rpb is defined for.
  const int last = rank - 1;
  if (args.rpb && (args.params.is_causal[last] || args.params.stride[last] != 1)) return false;
  return true;
}

}  // namespace libna::cpu::amx

LIBNA_AMX_BEGIN

namespace libna::cpu::amx {

namespace {

// Every tile this kernel uses is 16 rows of 64 bytes (full_tiles). For
// S^T: tmm0, tmm4 and tmm5 accumulate, tmm1, tmm3 and tmm7 hold keys, tmm2
// Q^T. For O^T: tmm4..7 accumulate (64 output channels), tmm1 and tmm3 hold
// V^T, tmm2 and tmm0 P^T.
// The probabilities of key i of a run of `keys` for the 16 lanes, from its
// logits: exp(logit - shift) where the window holds the key, else 0 (and 0
// past the run's end). A function, not a lambda, so that it is compiled with
// this unit's target and returns its vector in a register.
inline __m512 probability(const float* logits, const __mmask16* holds, std::int64_t keys,
                          std::int64_t i, __m512 log2e, __m512 shift_log2e) {
  if (i >= keys) return _mm512_setzero_ps();
  const __m512 logit = _mm512_loadu_ps(logits + i * kTile);
  return exp2_masked(holds[i], _mm512_fmsub_ps(logit, log2e, shift_log2e));
}

// A value of v that is not finite, left out of V^T (a zero there) and added
// to the outputs of the queries that attend to it (Forward::add_non_finite):
// in a tile product it would meet the zero probabilities of the queries that
// do not, and 0 * inf is NaN.
struct NonFinite {
  std::int64_t item;    // its (batch, kv head, row), as pack_values numbers them
  std::int64_t column;  // its V^T column
  std::int64_t channel;
  float value;
};

// The non-finite values of v, by item: all[start[i] .. start[i + 1]) are
// item i's (start is empty when v is finite).
struct NonFiniteValues {
  std::vector<NonFinite> all;
  std::vector<std::int64_t> start;
};

// V^T of every (batch, kv head, row): [dim_v][vt_width] bf16, non-finite
// values zero and listed in `non_finite`. Sixteen tokens of a dilation group
// at a time go through a transpose of 16 x 16 channel pairs; the rest, and
// blocks that hold a non-finite value, one value at a time.
template <int Rank>
void pack_values(const TensorView& v, const Layout<Rank>& layout, std::uint16_t* vt,
                 NonFiniteValues& non_finite) {
  const std::int64_t kv_heads = v.shape[Rank + 1], dim_v = v.shape[Rank + 2];
  const std::int64_t width = layout.vt_width, items = layout.g.batch * kv_heads * layout.rows;
  const auto* data = static_cast<const std::uint16_t*>(v.data);
  std::mutex found_lock;
  std::vector<NonFinite>& found = non_finite.all;
  found.clear();
  non_finite.start.clear();
  // Channel 2p of 16 tokens, then channel 2p + 1, from their 16 channel pairs.
  const __m512i split = _mm512_set_epi16(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1,
                                         30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i exponent = _mm512_set1_epi16(0x7f80);
  parallel_for(items, 1, [&](std::int64_t begin, std::int64_t end) {
    std::vector<NonFinite> mine;
    for (std::int64_t item = begin; item < end; ++item) {
      const std::int64_t row = item % layout.rows, bh = item / layout.rows;
      const std::int64_t b = bh / kv_heads, h = bh % kv_heads;
      std::int64_t lead[Rank > 1 ? Rank - 1 : 1] = {};
      row_coords<Rank>(layout.g, row, lead);
      std::uint16_t* out = vt + item * dim_v * width;
      auto one_at_a_time = [&](std::int64_t x, std::int64_t c0, std::int64_t c1) {
        const std::int64_t column = layout.group_column[x % layout.dilation] + x / layout.dilation;
        const std::uint16_t* token = data + token_offset<Rank>(v, b, lead, x, h);
        for (std::int64_t c = c0; c < c1; ++c) {
          const std::uint16_t value = token[c];
          if (finite(value)) {
            out[c * width + column] = value;
          } else {
            out[c * width + column] = 0;
            mine.push_back({item, column, c, detail::to_float(detail::BFloat16{value})});
          }
        }
      };
      for (std::int64_t grp = 0; grp < layout.dilation; ++grp) {
        const std::int64_t len = layout.group_len[grp], column0 = layout.group_column[grp];
        for (std::int64_t c = 0; c < dim_v; ++c) {  // the zero columns after the group
          std::memset(out + c * width + column0 + len, 0, sizeof(std::uint16_t) * 2 * kKeyPairs);
        }
        std::int64_t i = 0;
        for (; i + kTile <= len; i += kTile) {
          const std::uint16_t* tokens[kTile];
          for (int t = 0; t < kTile; ++t) {
            tokens[t] = data + token_offset<Rank>(v, b, lead, grp + (i + t) * layout.dilation, h);
          }
          std::int64_t c = 0;
          for (; c + 2 * kTile <= dim_v; c += 2 * kTile) {
            __m512 r[kTile];
            __mmask32 bad = 0;
            for (int t = 0; t < kTile; ++t) {
              r[t] = _mm512_loadu_ps(tokens[t] + c);
              bad |= _mm512_cmpeq_epi16_mask(_mm512_and_si512(_mm512_castps_si512(r[t]), exponent),
                                             exponent);
            }
            if (bad) {
              for (int t = 0; t < kTile; ++t) {
                one_at_a_time(grp + (i + t) * layout.dilation, c, c + 2 * kTile);
              }
              continue;
            }
            transpose16(r);
            for (int p = 0; p < kTile; ++p) {
              const __m512i halves = _mm512_permutexvar_epi16(split, _mm512_castps_si512(r[p]));
              std::uint16_t* at = out + (c + 2 * p) * width + column0 + i;
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(at), _mm512_castsi512_si256(halves));
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(at + width),
                                  _mm512_extracti64x4_epi64(halves, 1));
            }
          }
          if (c < dim_v) {
            for (int t = 0; t < kTile; ++t) {
              one_at_a_time(grp + (i + t) * layout.dilation, c, dim_v);
            }
          }
        }
        for (; i < len; ++i) one_at_a_time(grp + i * layout.dilation, 0, dim_v);
      }
    }
    if (!mine.empty()) {
      const std::lock_guard<std::mutex> guard(found_lock);
      found.insert(found.end(), mine.begin(), mine.end());
    }
  });
  if (found.empty()) return;
  std::sort(found.begin(), found.end(), [](const NonFinite& x, const NonFinite& y) {
    return x.item != y.item ? x.item < y.item : x.column != y.column ? x.column < y.column
                                                                     : x.channel < y.channel;
  });
  non_finite.start.assign(items + 1, 0);
  for (const NonFinite& f : found) ++non_finite.start[f.item + 1];
  for (std::int64_t i = 0; i < items; ++i) non_finite.start[i + 1] += non_finite.start[i];
}

// O^T channels [16 t, 16 t + 16) += V^T . P^T, P^T in tmm2 (odd = 0) or tmm0.
inline void accumulate_output(int t, int odd, const void* a, std::int64_t stride) {
  switch (t + 4 * odd) {
    case 0: LIBNA_TILE_PRODUCT(4, 1, 2, a, stride); break;
    case 1: LIBNA_TILE_PRODUCT(5, 3, 2, a, stride); break;
    case 2: LIBNA_TILE_PRODUCT(6, 1, 2, a, stride); break;
    case 3: LIBNA_TILE_PRODUCT(7, 3, 2, a, stride); break;
    case 4: LIBNA_TILE_PRODUCT(4, 1, 0, a, stride); break;
    case 5: LIBNA_TILE_PRODUCT(5, 3, 0, a, stride); break;
    case 6: LIBNA_TILE_PRODUCT(6, 1, 0, a, stride); break;
    default: LIBNA_TILE_PRODUCT(7, 3, 0, a, stride); break;
  }
}

inline void store_output(int tile, float* o) {
  switch (tile) {
    case 0: _tile_stored(4, o, 64); break;
    case 1: _tile_stored(5, o, 64); break;
    case 2: _tile_stored(6, o, 64); break;
    default: _tile_stored(7, o, 64); break;
  }
}

// The scratch of one thread, kept between calls (see thread_scratch.h).
struct Scratch {
  std::vector<float> scores;             // S^T, then the logits: [window row][key][lane]
  std::vector<std::uint32_t> probs;      // P^T in key pairs: [window row][key / 2][lane]
  std::vector<std::uint32_t> queries;    // Q^T in channel pairs: [dim / 2][lane]
  std::vector<float> output;             // O^T: [dim_v][lane]
  std::vector<std::uint16_t> edge_keys;  // per key tile: copies of 16 keys at k's end
  std::vector<KeyTile> key_tiles;        // the S^T products of a tile
  std::vector<__mmask16> masks;          // per key of the run: the lanes whose window holds it
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// One call's forward: its inputs, layout and tables, and the work of a tile.
template <int Rank>
struct Forward {
  const detail::ForwardArgs& args;
  const Geometry<Rank>& g;
  const Layout<Rank>& layout;
  const std::uint16_t* vt;
  const WindowTable<Rank>& windows;
  const NonFiniteValues& non_finite;
  Extent keys_extent;  // k's element offsets
  const float* bias;  // reversed rpb rows, [head][rpb row][bias_width]; null without rpb
  std::int64_t bias_rows, bias_width;
  std::int64_t dim, dim_v, heads_per_kv;
  float scale;

  // O^T[channel][lane] += p * value for each non-finite value of v in the
  // tile's window and each lane that attends to it (p: its probability as
  // the products used it, rounded to bf16), as the products would have added
  // it without the zero probabilities of the other lanes.
  void add_non_finite(const TileShape<Rank>& t, const __mmask16* holds, Scratch& s) const {
    const std::int64_t union_lo = t.lanes.union_lo, union_hi = t.lanes.union_hi;
    const std::int64_t first_column = layout.group_column[t.lanes.grp];
    for (std::int64_t w = 0; w < t.window; ++w) {
      const std::int64_t item =
          (t.b * args.v.shape[Rank + 1] + t.hk) * layout.rows + t.rows[w].vt_row;
      for (std::int64_t e = non_finite.start[item]; e < non_finite.start[item + 1]; ++e) {
        const NonFinite& f = non_finite.all[e];
        const std::int64_t j = f.column - first_column;
        if (j < union_lo || j >= union_hi) continue;
        const std::int64_t i = j - union_lo;
        for (int l = 0; l < kTile; ++l) {
          if (!((holds[i] >> l) & 1u)) continue;
          const std::uint32_t pair = s.probs[w * t.row_pairs() + (i / 2) * kTile + l];
          const auto bits = static_cast<std::uint16_t>(i % 2 ? pair >> 16 : pair & 0xffffu);
          s.output[f.channel * kTile + l] += detail::to_float(detail::BFloat16{bits}) * f.value;
        }
      }
    }
  }

  // Q^T in channel pairs (the B operand of S^T = K . Q^T); idle lanes zero.
  void transpose_queries(const TileShape<Rank>& t, Scratch& s) const {
    const std::uint16_t* queries[kTile];
    lane_tokens<Rank>(args.q, t.b, t.lead, t.lanes.grp, t.lanes.first, layout.dilation, t.h,
                      t.lanes.lanes, queries);
    for (std::int64_t c = 0; c < dim; c += kChannels) {
      __m512 r[kTile];
      for (int l = 0; l < kTile; ++l) {
        r[l] = queries[l] ? _mm512_loadu_ps(queries[l] + c) : _mm512_setzero_ps();
      }
      transpose16(r);
      for (int p = 0; p < kTile; ++p) _mm512_storeu_ps(s.queries.data() + (c / 2 + p) * kTile, r[p]);
    }
  }

  // S^T, 16 keys by 16 queries per product, three products in flight (a
  // tile product's result is ready some 16 cycles after it starts).
  void score_products(const TileShape<Rank>& t, Scratch& s) const {
    key_operands<Rank>(args.k, false, keys_extent, layout, t, s.edge_keys.data(), s.scores.data(),
                       s.key_tiles);
    const std::uint32_t* qt = s.queries.data();
    const std::int64_t products = static_cast<std::int64_t>(s.key_tiles.size());
    for (std::int64_t i = 0; i < products; i += 3) {
      const KeyTile* kt = s.key_tiles.data() + i;
      const std::int64_t n = std::min<std::int64_t>(3, products - i);
      _tile_zero(0);
      if (n > 1) _tile_zero(4);
      if (n > 2) _tile_zero(5);
      for (std::int64_t c = 0; c < dim; c += kChannels) {
        _tile_loadd(2, qt + (c / 2) * kTile, 64);
        LIBNA_TILE_PRODUCT(0, 1, 2, kt[0].keys + c, kt[0].stride);
        if (n > 1) LIBNA_TILE_PRODUCT(4, 3, 2, kt[1].keys + c, kt[1].stride);
        if (n > 2) LIBNA_TILE_PRODUCT(5, 7, 2, kt[2].keys + c, kt[2].stride);
      }
      _tile_stored(0, kt[0].scores, 64);
      if (n > 1) _tile_stored(4, kt[1].scores, 64);
      if (n > 2) _tile_stored(5, kt[2].scores, 64);
    }
  }

  // The logits (scale S^T + rpb) in place of S^T, and each lane's maximum
  // over the keys its window holds.
  __m512 logits(const TileShape<Rank>& t, const __mmask16* holds, Scratch& s) const {
    const __m512 scale_v = _mm512_set1_ps(scale);
    __m512 max_logit = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    const std::int64_t kernel = g.axes[Rank - 1].kernel;
    for (std::int64_t w = 0; w < t.window; ++w) {
      float* row_scores = s.scores.data() + w * t.row_floats();
      if (bias) {
        // Lane l's rpb index along the last axis is j - (first + l) + kernel - 1:
        // a reversed row makes the 16 lanes' biases one load.
        const float* bias_row = bias + (t.h * bias_rows + t.rows[w].bias_row) * bias_width +
                                kBiasPad + 2 * kernel - 2 -
                                (t.lanes.union_lo - t.lanes.first + kernel - 1);
        for (std::int64_t i = 0; i < t.keys; ++i) {
          const __m512 x = _mm512_fmadd_ps(_mm512_loadu_ps(row_scores + i * kTile), scale_v,
                                           _mm512_loadu_ps(bias_row - i));
          _mm512_storeu_ps(row_scores + i * kTile, x);
          max_logit = _mm512_mask_max_ps(max_logit, holds[i], max_logit, x);
        }
      } else {
        for (std::int64_t i = 0; i < t.keys; ++i) {
          const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(row_scores + i * kTile), scale_v);
          _mm512_storeu_ps(row_scores + i * kTile, x);
          max_logit = _mm512_mask_max_ps(max_logit, holds[i], max_logit, x);
        }
      }
    }
    return max_logit;
  }

  // P^T = exp(logit - shift) in bf16 key pairs (shift: the maximum, 0 where
  // it is -inf: a query that attends to nothing); returns each lane's sum of P.
  __m512 probabilities(const TileShape<Rank>& t, const __mmask16* holds, __m512 max_logit,
                       Scratch& s) const {
    const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    const __m512 shift = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(max_logit, neg_inf, _CMP_EQ_OQ),
                                              max_logit, _mm512_setzero_ps());
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 shift_log2e = _mm512_mul_ps(shift, log2e);
    __m512 sum = _mm512_setzero_ps();
    // Lane l of the bf16 pair (p[j], p[j + 1]): interleave two conversions.
    const __m512i interleave = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
        23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (std::int64_t w = 0; w < t.window; ++w) {
      const float* row_scores = s.scores.data() + w * t.row_floats();
      std::uint32_t* row_probs = s.probs.data() + w * t.row_pairs();
      for (std::int64_t i = 0; i < t.key_rows(); i += 2) {
        const __m512 p0 = probability(row_scores, holds, t.keys, i, log2e, shift_log2e);
        const __m512 p1 = probability(row_scores, holds, t.keys, i + 1, log2e, shift_log2e);
        sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
        // P rounds to bf16 here (AVX512-BF16's conversion, nearest even; it
        // flushes subnormal probabilities, below 1e-38, to zero).
        const __m512i pair = (__m512i)_mm512_cvtne2ps_pbh(p1, p0);
        _mm512_storeu_si512(row_probs + i / 2 * kTile, _mm512_permutexvar_epi16(interleave, pair));
      }
    }
    return sum;
  }

  // O^T = V^T . P^T, 64 channels at a time.
  void value_products(const TileShape<Rank>& t, Scratch& s) const {
    float* o = s.output.data();
    const std::int64_t vt_stride = layout.vt_width * 2;  // bytes between V^T channels
    const std::uint16_t* vt_head =
        vt + (t.b * args.v.shape[Rank + 1] + t.hk) * layout.rows * dim_v * layout.vt_width;
    for (std::int64_t c0 = 0; c0 < dim_v; c0 += 4 * kTile) {
      const int outputs = static_cast<int>(std::min<std::int64_t>(4, (dim_v - c0) / kTile));
      for (int i = 0; i < outputs; ++i) {
        switch (i) {
          case 0: _tile_zero(4); break;
          case 1: _tile_zero(5); break;
          case 2: _tile_zero(6); break;
          default: _tile_zero(7); break;
        }
      }
      // B operands alternate between tmm2 and tmm0 and A operands between
      // tmm1 and tmm3, so that a load need not wait for the product before.
      std::int64_t step = 0;
      for (std::int64_t w = 0; w < t.window; ++w) {
        const std::uint16_t* vt_row = vt_head + t.rows[w].vt_row * dim_v * layout.vt_width + t.column;
        for (std::int64_t pt = 0; pt < t.pair_tiles; ++pt, ++step) {
          const std::uint32_t* p = s.probs.data() + w * t.row_pairs() + pt * kKeyPairs * kTile;
          if (step % 2 == 0) {
            _tile_loadd(2, p, 64);
          } else {
            _tile_loadd(0, p, 64);
          }
          for (int i = 0; i < outputs; ++i) {
            const std::uint16_t* values =
                vt_row + (c0 + i * kTile) * layout.vt_width + pt * 2 * kKeyPairs;
            accumulate_output(i, step % 2, values, vt_stride);
          }
        }
      }
      for (int i = 0; i < outputs; ++i) store_output(i, o + (c0 + i * kTile) * kTile);
    }
  }

  // The output rows from O^T, each scaled by 1/sum, and lse.
  void store(const TileShape<Rank>& t, __m512 sum, __m512 max_logit, const Scratch& s) const {
    alignas(64) float sums[kTile], maxima[kTile];
    _mm512_storeu_ps(sums, sum);
    _mm512_storeu_ps(maxima, max_logit);
    // 1/sum, 0 for a query that attends to nothing (detail::softmax_normaliser).
    alignas(64) float norms[kTile];
    const __mmask16 attends = _mm512_cmp_ps_mask(sum, _mm512_setzero_ps(), _CMP_NEQ_UQ);
    _mm512_storeu_ps(norms, _mm512_maskz_div_ps(attends, _mm512_set1_ps(1.0f), sum));
    const std::int64_t grp = t.lanes.grp, first = t.lanes.first, dil = layout.dilation;
    std::uint16_t* tokens[kTile];
    lane_tokens<Rank>(args.out, t.b, t.lead, grp, first, dil, t.h, t.lanes.lanes, tokens);
    for (std::int64_t c = 0; c < dim_v; c += kTile) {
      __m512 r[kTile];
      for (int i = 0; i < kTile; ++i) r[i] = _mm512_loadu_ps(s.output.data() + (c + i) * kTile);
      transpose16(r);
      for (int l = 0; l < kTile; ++l) {
        if (tokens[l]) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(tokens[l] + c),
                              to_bf16(_mm512_mul_ps(r[l], _mm512_set1_ps(norms[l]))));
        }
      }
    }
    if (!args.lse) return;
    for (int l = 0; l < kTile; ++l) {
      if (!tokens[l]) continue;
      std::int64_t coords[Rank];
      for (int a = 0; a < Rank - 1; ++a) coords[a] = t.lead[a];
      coords[Rank - 1] = grp + (first + l) * dil;
      float* lse = static_cast<float*>(args.lse->data);
      lse[row_offset<Rank>(*args.lse, t.b, coords, 0) + t.h * args.lse->strides[Rank + 1]] =
          detail::softmax_lse(maxima[l], sums[l]);
    }
  }

  void tile(std::int64_t b, std::int64_t h, std::int64_t row, std::int64_t tile_index,
            Scratch& s) const {
    const TileShape<Rank> t(g, layout, windows, b, h, heads_per_kv, row,
                            layout.tiles_of_row[tile_index]);
    reserve(s.scores, t.window * t.row_floats());
    reserve(s.probs, t.window * t.row_pairs());
    reserve(s.edge_keys, t.window * t.key_tiles * kTile * dim);
    reserve(s.masks, t.keys);
    transpose_queries(t, s);
    score_products(t, s);
    __mmask16* holds = s.masks.data();
    window_masks(t.lanes, holds);
    const __m512 max_logit = logits(t, holds, s);
    const __m512 sum = probabilities(t, holds, max_logit, s);
    value_products(t, s);
    if (!non_finite.start.empty()) add_non_finite(t, holds, s);
    store(t, sum, max_logit, s);
  }
};

template <int Rank>
void forward(const detail::ForwardArgs& args) {
  const Geometry<Rank> g(args.q, args.params);
  const Layout<Rank> layout(g);
  const std::int64_t kv_heads = args.k.shape[Rank + 1];
  const std::int64_t dim = args.q.shape[Rank + 2], dim_v = args.v.shape[Rank + 2];

  thread_local std::vector<std::uint16_t> vt;
  const std::int64_t vt_size = g.batch * kv_heads * layout.rows * dim_v * layout.vt_width;
  if (static_cast<std::int64_t>(vt.size()) < vt_size) {
    vt = std::vector<std::uint16_t>();
    vt.resize(vt_size);
  }
  thread_local NonFiniteValues non_finite;
  pack_values<Rank>(args.v, layout, vt.data(), non_finite);

  // rpb rows along the last axis, reversed and zero-padded, so that the 16
  // lanes' biases for one key are one load (see Forward::tile).
  const std::int64_t kernel = g.axes[Rank - 1].kernel;
  std::vector<float> bias;
  std::int64_t bias_rows = 1;
  const std::int64_t bias_width = 2 * kernel - 1 + 2 * kBiasPad;
  if (args.rpb) {
    const BiasBuffer<Rank, float> buffer(args.params, g.heads);
    const std::vector<float> rpb = buffer.template load_from<detail::BFloat16>(*args.rpb);
    const std::int64_t span = 2 * kernel - 1;
    bias_rows = buffer.strides[0] / span;
    bias.assign(g.heads * bias_rows * bias_width, 0.0f);
    for (std::int64_t r = 0; r < g.heads * bias_rows; ++r) {
      for (std::int64_t i = 0; i < span; ++i) {
        bias[r * bias_width + kBiasPad + span - 1 - i] = rpb[r * span + i];
      }
    }
  }

  const WindowTable<Rank> windows(g, args.k, args.v, args.params, layout.rows);
  const Forward<Rank> f{args,        g,           layout,     vt.data(),
                        windows,     non_finite,  Extent(args.k),
                        args.rpb ? bias.data() : nullptr, bias_rows, bias_width,
                        dim,         dim_v,       g.heads / kv_heads,
                        static_cast<float>(args.scale)};
  const std::int64_t tiles = layout.tiles();
  const std::int64_t items = g.batch * g.heads * layout.rows * tiles;
  parallel_for(items, tiles, [&](std::int64_t begin, std::int64_t end) {
    Scratch& s = scratch();
    reserve(s.queries, dim / 2 * kTile);
    reserve(s.output, dim_v * kTile);
    const TileConfig config = full_tiles();
    _tile_loadconfig(&config);
    for (std::int64_t item = begin; item < end; ++item) {
      const std::int64_t tile = item % tiles, rest = item / tiles;
      const std::int64_t row = rest % layout.rows, bh = rest / layout.rows;
      f.tile(bh / g.heads, bh % g.heads, row, tile, s);
    }
    _tile_release();
  });
}

}  // namespace

void na_forward(const detail::ForwardArgs& args) {
  detail::dispatch_rank(args.params.rank, "na_forward", [&](auto rank) {
    forward<decltype(rank)::value>(args);
  });
}

}  // namespace libna::cpu::amx

LIBNA_AMX_END
