// Tensor-core fused forward for float16 and bfloat16 on sm_80+:
// mma.sync.aligned.m16n8k16 with float32 accumulators, an online softmax in
// registers (FlashAttention-2 style), and lse in the SIMT kernel's meaning
// (natural log of the sum of exp(logit)), so either backward (SIMT, or
// tc_backward.cuh) consumes it unchanged.
//
// The tile schedule is the SIMT kernels' (tiling.h): a block owns a
// multi-dimensional tile of 64 queries of one dilation group, four warps of
// 16 query rows each, and visits the key tiles (64 slots) of the union of
// their neighbourhoods; unreachable tiles are never visited, and only tiles
// that make_tile does not mark "full" test each (query, key) pair.
// Per key tile: K and V go to shared memory as padded [key][dim] rows;
// S = Q K^T (Q in A fragments, K through ldmatrix), scale, rpb and mask in
// float32, online softmax, P (from S's accumulators, never stored) times V
// (ldmatrix.trans). Every fragment index comes from cuda/mma_layout.h,
// which tests/cpp/test_mma_layout.cpp checks on a simulated warp.
#pragma once

#include <cstdint>
#include <type_traits>

#include "fused.cuh"
#include "mma_layout.h"

namespace libna::LIBNA_CUDA_IMPL {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Two elements in one 32-bit register, `lo` in the low half.
template <typename T>
__device__ __forceinline__ std::uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    return bits32(__floats2half2_rn(lo, hi));
  } else {
    return bits32(__floats2bfloat162_rn(lo, hi));
  }
}

// d += a b for one m16n8k16 tile (fragments as in mma_layout.h).
template <typename T>
__device__ __forceinline__ void mma_16816(float* d, const std::uint32_t* a,
                                          const std::uint32_t* b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#elif defined(LIBNA_CUDA_EMULATOR)
  emulator::mma_m16n8k16<std::is_same_v<T, __half> ? emulator::Operand::f16
                                                    : emulator::Operand::bf16>(d, a, b);
#endif
}

// ldmatrix.m8n8.x4 (.trans when Trans) from the shared-memory row `row`.
template <bool Trans>
__device__ __forceinline__ void ldmatrix_x4(std::uint32_t* r, const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address)
                 : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address)
                 : "memory");
  }
#elif defined(LIBNA_CUDA_EMULATOR)
  emulator::ldmatrix_x4(r, row, Trans);
#endif
}

// Element (row half r, column `column`) of the m16n8 C tiles `acc`, from
// the lane of the caller's quad that holds it (every lane of the warp
// calls; `column` the same in all).
template <int Tiles>
__device__ __forceinline__ float quad_cell(const float (&acc)[Tiles][4], int column, int r,
                                           int lane) {
  const int n = column / mma::kN, odd = column & 1;
  float mine = 0.f;  // the holder's element, selected without indexing registers at run time
  #pragma unroll
  for (int m = 0; m < Tiles; ++m) {
    if (m == n) mine = odd ? acc[m][2 * r + 1] : acc[m][2 * r];
  }
  const int holder = (column % mma::kN) / 2;  // its thread_in_group (mma::c_cell)
  return __shfl_xor_sync(0xffffffffu, mine, mma::thread_in_group(lane) ^ holder);
}

// acc (C fragments over head dims) += w x[d], row half r, for the caller's
// dims d < dim where x[d] (row `row` of `x`, from global memory) is an inf or
// a NaN: the terms of x's elements that stage_rows staged as zeros.
template <typename T, int DimTiles>
__device__ __forceinline__ void add_non_finite_terms(float (&acc)[DimTiles][4], int r, int lane,
                                                     float w, const View& x, std::int64_t row,
                                                     int dim) {
  // One element at a time (a rare path: the kernels' registers are spent on
  // the accumulators), added to acc by an unrolled select, not by indexing
  // registers at run time.
  #pragma unroll 1
  for (int n = 0; n < DimTiles; ++n) {
    #pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int d = mma::kN * n + mma::c_cell(lane, 2 * r + j).col;
      const float value = d < dim ? load<T>(x.data, row + d * x.d) : 0.f;
      if (is_finite(value)) continue;
      #pragma unroll
      for (int m = 0; m < DimTiles; ++m) {
        if (m == n) acc[m][2 * r + j] += w * value;
      }
    }
  }
}

// The terms of the dot product of shared row `a_row` of `a` (staged whole)
// and row `row` of x that staging x left out: a[d] x[d] where x[d] is an inf
// or a NaN, d < dim.
template <typename T, int Bucket>
__device__ __forceinline__ float non_finite_dot(const T* a, int a_row, const View& x,
                                                std::int64_t row, int dim) {
  float sum = 0.f;
  for (int d = 0; d < dim; ++d) {
    const float value = load<T>(x.data, row + d * x.d);
    if (!is_finite(value)) sum += to_float(a[mma::smem_offset(a_row, d, Bucket)]) * value;
  }
  return sum;
}

// Max and sum over the four lanes of a quad (one C fragment row).
__device__ __forceinline__ float quad_max(float x) {
  #pragma unroll
  for (int step = 0; step < mma::kQuadSteps; ++step) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, mma::quad_offset(step)));
  }
  return x;
}
__device__ __forceinline__ float quad_sum(float x) {
  #pragma unroll
  for (int step = 0; step < mma::kQuadSteps; ++step) {
    x += __shfl_xor_sync(0xffffffffu, x, mma::quad_offset(step));
  }
  return x;
}

// Which rows (of K, V, and in the backward Q and dO) may be read as 16-byte
// vectors: unit head-dim stride, a head dim that is a multiple of 8, and
// 16-byte aligned rows.
enum : unsigned { kVectorK = 1, kVectorV = 2, kVectorQ = 4, kVectorDout = 8 };

inline bool rows_are_16_byte_aligned(const View& v, int dim, std::size_t element) {
  const std::int64_t align = 16 / static_cast<std::int64_t>(element);
  bool ok = v.d == 1 && dim % align == 0 && reinterpret_cast<std::uintptr_t>(v.data) % 16 == 0 &&
            v.b % align == 0 && v.h % align == 0;
  for (int a = 0; a < kAxes; ++a) ok = ok && v.s[a] % align == 0;
  return ok;
}
template <typename T>
unsigned vector_load_flags(const FusedParams& p) {
  const auto flag = [](const View& v, int dim, unsigned bit) {
    return v.data && rows_are_16_byte_aligned(v, dim, sizeof(T)) ? bit : 0u;
  };
  return flag(p.k, p.dim, kVectorK) | flag(p.v, p.dim_v, kVectorV) | flag(p.q, p.dim, kVectorQ) |
         flag(p.dout, p.dim_v, kVectorDout);
}

// Zeroed m16n8 accumulators.
template <int Tiles>
__device__ __forceinline__ void zero(float (&acc)[Tiles][4]) {
  #pragma unroll
  for (int n = 0; n < Tiles; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
}

// Eight elements d0 .. d0 + 7 of a row (zero past `dim`).
template <typename T>
__device__ __forceinline__ uint4 load_8(const View& v, std::int64_t row, int d0, int dim,
                                        bool vector) {
  if (vector) {
    return d0 < dim ? *global_element<const uint4>(static_cast<const T*>(v.data) + row + d0, 0, false)
                    : uint4{0u, 0u, 0u, 0u};
  }
  std::uint32_t x[4];
  #pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int d = d0 + 2 * i;
    x[i] = pack2<T>(d < dim ? load<T>(v.data, row + d * v.d) : 0.f,
                    d + 1 < dim ? load<T>(v.data, row + (d + 1) * v.d) : 0.f);
  }
  return uint4{x[0], x[1], x[2], x[3]};
}

// Replaces each inf or NaN (all exponent bits set) among the eight 16-bit
// floats in x by zero; returns whether there was one.
template <typename T>
__device__ __forceinline__ bool zero_non_finite(uint4& x) {
  constexpr std::uint32_t kExponent = std::is_same_v<T, __half> ? 0x7c00u : 0x7f80u;
  std::uint32_t* const words[4] = {&x.x, &x.y, &x.z, &x.w};
  bool found = false;
  #pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int shift = 16 * (i & 1);
    if ((*words[i / 2] >> shift & kExponent) == kExponent) {
      *words[i / 2] &= ~(0xffffu << shift);
      found = true;
    }
  }
  return found;
}

// Copies rows 0 .. Rows - 1 of view x (head `head`) into padded
// shared-memory rows (mma::smem_offset), zero where coords(j, c) says row j
// holds no token, and past the head dim. With `non_finite_rows`, an inf or a
// NaN is staged as zero and its row's bit set there (bit j % 32 of word
// j / 32), so that a masked (zero) factor cannot meet it inside mma.sync;
// the caller adds the terms of those elements for the pairs of the
// neighbourhood only, from global memory. The whole block takes part; no
// barrier.
template <typename T, int Bucket, int Rows, typename Coords>
__device__ __forceinline__ void stage_rows(Coords&& coords, std::int64_t b, int head,
                                           const View& x, int dim, bool vector, T* sx,
                                           unsigned* non_finite_rows = nullptr) {
  constexpr int kPieces = Bucket / 8;  // 16-byte pieces per row
  for (int e = threadIdx.x; e < Rows * kPieces; e += tiling::kThreads) {
    const int j = e / kPieces, d0 = (e % kPieces) * 8;
    uint4 xv{0u, 0u, 0u, 0u};
    std::int64_t c[kAxes];
    if (coords(j, c)) xv = load_8<T>(x, x.row(b, c, head), d0, dim, vector);
    if (non_finite_rows != nullptr && zero_non_finite<T>(xv)) {
      atomicOr(&non_finite_rows[j / 32], 1u << (j % 32));
    }
    *reinterpret_cast<uint4*>(&sx[mma::smem_offset(j, d0, Bucket)]) = xv;
  }
}

// A bit per row of a tile, for two tiles in turn: tile t's bits are set
// while it is staged and read after its barrier, and the other word set is
// cleared meanwhile for tile t + 1 (its readers passed the barrier that ended
// tile t - 1; its writers wait for the one that ends tile t).
template <int Rows>
struct RowBits {
  static constexpr int kWords = (Rows + 31) / 32;
  unsigned bits[2][kWords];

  __device__ __forceinline__ unsigned* of_tile(int t) { return bits[t & 1]; }
  __device__ __forceinline__ bool any(int t) const {
    bool found = false;
    for (int w = 0; w < kWords; ++w) found = found || bits[t & 1][w] != 0u;
    return found;
  }
  __device__ __forceinline__ bool test(int t, int row) const {
    return (bits[t & 1][row / 32] >> (row % 32)) & 1u;
  }
  // Clears the set of tile t + 1 (the whole block calls it; no barrier).
  __device__ __forceinline__ void clear_next(int t) {
    if (threadIdx.x < kWords) bits[(t + 1) & 1][threadIdx.x] = 0u;
  }
};

template <typename T, int Bucket, int Keys>
struct TcKeyTile {
  alignas(16) T k[Keys * mma::smem_row_stride(Bucket)];
  alignas(16) T v[Keys * mma::smem_row_stride(Bucket)];
  int pos[Keys][kAxes];
  bool valid[Keys];
  // The keys whose row of the operand `Sanitized` names holds an inf or a
  // NaN, staged as zeros (load_tc_key_tile).
  RowBits<Keys> non_finite;
};

enum class Sanitized { none, k, v };

// Loads key tile `tile` (the t-th) of kv head `hk`, the rows of K or V
// (`Sanitized`) that hold an inf or a NaN as zeros, marked in kt.non_finite
// (the whole block takes part).
template <Sanitized Operand, typename T, int Bucket, int Keys>
__device__ void load_tc_key_tile(const FusedParams& p, const tiling::Block& blk,
                                 const tiling::Tile& tile, int t, std::int64_t b, int hk,
                                 unsigned vector_loads, TcKeyTile<T, Bucket, Keys>& kt) {
  load_key_slots<Keys>(p, tile, kt.pos, kt.valid);
  const auto coords = [&](int j, std::int64_t* c) {
    if (kt.valid[j]) full_coords(p.plan, blk, kt.pos[j], c);
    return kt.valid[j];
  };
  unsigned* const non_finite = kt.non_finite.of_tile(t);
  stage_rows<T, Bucket, Keys>(coords, b, hk, p.k, p.dim, vector_loads & kVectorK, kt.k,
                              Operand == Sanitized::k ? non_finite : nullptr);
  stage_rows<T, Bucket, Keys>(coords, b, hk, p.v, p.dim_v, vector_loads & kVectorV, kt.v,
                              Operand == Sanitized::v ? non_finite : nullptr);
  __syncthreads();
  kt.non_finite.clear_next(t);
}

template <typename T, int Bucket>
__global__ void __launch_bounds__(tiling::kThreads, 1)
    tc_forward_kernel(const FusedParams p, const unsigned vector_loads) {
#if LIBNA_TENSOR_CORES
  constexpr int kKeys = tiling::tc_forward_keys(Bucket);
  constexpr int kDimChunks = Bucket / mma::kK;  // k steps of Q K^T
  constexpr int kKeyChunks = kKeys / mma::kK;   // k steps of P V
  constexpr int kKeyTiles = kKeys / mma::kN;    // n tiles of S
  constexpr int kDimTiles = Bucket / mma::kN;   // n tiles of O
  static_assert(tiling::tc_forward_queries() == tiling::kThreads / mma::kWarpSize * mma::kM);
  LIBNA_SHARED(kt, TcKeyTile<T, Bucket, kKeys>);

  const tiling::Block blk = tiling::make_block(p.plan, blockIdx.x);
  if (blk.empty) return;
  const int h = blockIdx.y;
  const std::int64_t b = blockIdx.z;
  const int hk = h / (p.heads / p.heads_kv);
  const int lane = threadIdx.x % mma::kWarpSize;
  const int warp = threadIdx.x / mma::kWarpSize;

  // The thread's two rows of its warp's 16 (C fragment halves 0 and 1).
  OwnedQuery rows[2];
  std::int64_t q_row[2];
  #pragma unroll
  for (int r = 0; r < 2; ++r) {
    rows[r].init(p.plan, blk, mma::row_slot(warp, lane, r));
    q_row[r] = p.q.row(b, rows[r].coord, h);
  }
  std::uint32_t q_frag[kDimChunks][4];
  #pragma unroll
  for (int c = 0; c < kDimChunks; ++c) {
    #pragma unroll
    for (int reg = 0; reg < 4; ++reg) {
      float x[2];
      #pragma unroll
      for (int half = 0; half < 2; ++half) {
        const mma::Cell cell = mma::a_cell(lane, 2 * reg + half);
        const int r = cell.row >> 3, d = mma::kK * c + cell.col;
        x[half] = rows[r].valid && d < p.dim ? load<T>(p.q.data, q_row[r] + d * p.q.d) : 0.f;
      }
      q_frag[c][reg] = pack2<T>(x[0], x[1]);
    }
  }

  float o[kDimTiles][4];
  zero(o);
  float row_max[2] = {kNegInf, kNegInf}, row_sum[2] = {0.f, 0.f};  // log2 units
  const float scale_log2 = p.scale * kLog2e;
  kt.non_finite.clear_next(-1);
  __syncthreads();

  for (int t = 0; t < blk.num_tiles; ++t) {
    const tiling::Tile tile = tiling::make_tile(p.plan, blk, t);
    load_tc_key_tile<Sanitized::v>(p, blk, tile, t, b, hk, vector_loads, kt);

    float s[kKeyTiles][4];
    zero(s);
    #pragma unroll
    for (int c = 0; c < kDimChunks; ++c) {
      #pragma unroll
      for (int pair = 0; pair < kKeyTiles / 2; ++pair) {
        const mma::Cell cell = mma::b_ldmatrix_cell(lane, pair, c);
        std::uint32_t k_frag[4];
        ldmatrix_x4<false>(k_frag, &kt.k[mma::smem_offset(cell.row, cell.col, Bucket)]);
        mma_16816<T>(s[2 * pair], q_frag[c], k_frag);
        mma_16816<T>(s[2 * pair + 1], q_frag[c], k_frag + 2);
      }
    }

    // Logits in log2 units; pairs outside the neighbourhood are -inf.
    float tile_max[2] = {kNegInf, kNegInf};
    #pragma unroll
    for (int n = 0; n < kKeyTiles; ++n) {
      #pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = mma::c_half(i), key = mma::kN * n + mma::c_cell(lane, i).col;
        const OwnedQuery& q = rows[r];
        const bool keep = q.valid && kt.valid[key] && (tile.full || q.sees(kt.pos[key]));
        float x = s[n][i] * scale_log2;
        if (keep && p.rpb.data) x += bias_at<T>(p, h, q.pos, kt.pos[key]) * kLog2e;
        s[n][i] = keep ? x : kNegInf;
        tile_max[r] = fmaxf(tile_max[r], s[n][i]);
      }
    }
    float base[2];
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float new_max = fmaxf(row_max[r], quad_max(tile_max[r]));
      base[r] = new_max == kNegInf ? 0.f : new_max;  // a row with no key yet stays at zero
      const float correction = exp2f(row_max[r] - base[r]);
      row_sum[r] *= correction;
      row_max[r] = new_max;
      #pragma unroll
      for (int n = 0; n < kDimTiles; ++n) {
        o[n][2 * r] *= correction;
        o[n][2 * r + 1] *= correction;
      }
    }
    #pragma unroll
    for (int n = 0; n < kKeyTiles; ++n) {
      #pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[n][i] = exp2f(s[n][i] - base[mma::c_half(i)]);
        row_sum[mma::c_half(i)] += s[n][i];  // this lane's part; summed over the quad at the end
      }
    }

    if (kt.non_finite.any(t)) {
      // The infs and NaNs of V, staged as zeros: their terms of P V for the
      // pairs of the neighbourhood (before the products, while s is live).
      for (int key = 0; key < kKeys; ++key) {
        if (!kt.non_finite.test(t, key)) continue;
        std::int64_t c[kAxes];
        full_coords(p.plan, blk, kt.pos[key], c);
        const std::int64_t v_row = p.v.row(b, c, hk);
        #pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float probability = quad_cell(s, key, r, lane);
          const OwnedQuery& q = rows[r];
          if (q.valid && (tile.full || q.sees(kt.pos[key]))) {
            add_non_finite_terms<T>(o, r, lane, probability, p.v, v_row, p.dim_v);
          }
        }
      }
    }
    #pragma unroll
    for (int c = 0; c < kKeyChunks; ++c) {
      std::uint32_t p_frag[4];
      #pragma unroll
      for (int reg = 0; reg < 4; ++reg) {
        const mma::Source lo = mma::p_source(c, 2 * reg), hi = mma::p_source(c, 2 * reg + 1);
        p_frag[reg] = pack2<T>(s[lo.tile][lo.index], s[hi.tile][hi.index]);
      }
      #pragma unroll
      for (int pair = 0; pair < kDimTiles / 2; ++pair) {
        const mma::Cell cell = mma::b_trans_ldmatrix_cell(lane, c, pair);
        std::uint32_t v_frag[4];
        ldmatrix_x4<true>(v_frag, &kt.v[mma::smem_offset(cell.row, cell.col, Bucket)]);
        mma_16816<T>(o[2 * pair], p_frag, v_frag);
        mma_16816<T>(o[2 * pair + 1], p_frag, v_frag + 2);
      }
    }
    __syncthreads();  // the next tile overwrites kt
  }

  #pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float sum = quad_sum(row_sum[r]);
    if (!rows[r].valid) continue;
    const float inv_sum = softmax_normaliser(sum);
    const std::int64_t out_row = p.out.row(b, rows[r].coord, h);
    #pragma unroll
    for (int n = 0; n < kDimTiles; ++n) {
      #pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int d = mma::kN * n + mma::c_cell(lane, 2 * r + j).col;
        if (d < p.dim_v) store<T>(p.out.data, out_row + d * p.out.d, o[n][2 * r + j] * inv_sum);
      }
    }
    if (p.lse.data && mma::thread_in_group(lane) == 0) {
      *global_element<float>(p.lse.data, p.lse.row(b, rows[r].coord, h), true) =
          row_max[r] == INFINITY ? INFINITY
                                 : ((row_max[r] == kNegInf ? 0.f : row_max[r]) + log2f(sum)) * kLn2;
    }
  }
#else
  (void)p;
  (void)vector_loads;
#endif
}

// Whether the code of `kernel` that would run on the current device is
// sm_80+ (tensor cores); older GPUs get the kernels' empty stubs.
template <typename Kernel>
bool runs_sm80_code(Kernel kernel) {
  cudaFuncAttributes attributes{};
  if (cudaFuncGetAttributes(&attributes, kernel) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return attributes.binaryVersion >= 80;
}

// f(bucket constant) for the tensor-core buckets (up to tiling::kTcMaxHeadDim);
// false, calling nothing, for the others.
template <typename F>
bool dispatch_tc_bucket(int bucket, F&& f) {
  if (bucket > tiling::kTcMaxHeadDim) return false;
  bool launched = false;
  dispatch_bucket(bucket, [&](auto b) {
    if constexpr (decltype(b)::value <= tiling::kTcMaxHeadDim) launched = f(b);
  });
  return launched;
}

template <typename T, int Bucket>
bool tc_forward_bucket(const FusedParams& params, std::int64_t batch, cudaStream_t stream) {
  if (!runs_sm80_code(tc_forward_kernel<T, Bucket>)) return false;
  const FusedParams p = with_plan(params, tiling::tc_forward_queries(),
                                  tiling::tc_forward_keys(Bucket), true);
  launch("tc_forward_kernel", tc_forward_kernel<T, Bucket>, fused_grid(p, p.heads, batch, "na_forward"), tiling::kThreads, stream, p, vector_load_flags<T>(p));
  return true;
}

template <typename T>
bool launch_tc_forward(const FusedParams& p, int bucket, std::int64_t batch,
                       cudaStream_t stream) {
  return dispatch_tc_bucket(bucket, [&](auto b) {
    return tc_forward_bucket<T, decltype(b)::value>(p, batch, stream);
  });
}

}  // namespace libna::LIBNA_CUDA_IMPL
