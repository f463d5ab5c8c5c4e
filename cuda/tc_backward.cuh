// Tensor-core fused backward for float16 and bfloat16 on sm_80+: the SIMT
// backward's two kernels (fused.cuh) with their products on
// mma.sync.aligned.m16n8k16, float32 accumulation, and the same semantics:
// probabilities recomputed from the forward's lse (natural log), row terms
// D_i = dout_i . out_i written by the query side and read by the key side,
// dq, dk and dv each written once by one thread (deterministic), the rpb
// gradient as float32 atomics from the query side.
//
//   dq (query side): a block owns the forward's tile of 64 queries, four warps
//     of 16 query rows with Q and dO in A fragments, and visits key tiles of
//     the union of their neighbourhoods (K and V in shared memory):
//     S = Q K^T, dP = dO V^T, P = exp(scale S + rpb - lse), dS = P (dP - D),
//     dQ += dS K.
//   dk/dv (key side): a block owns 64 keys, four warps of 16 key rows (K and
//     V in shared memory for the whole block), and visits the query tiles
//     that see them, of every query head of their kv head (Q, dO, lse and D
//     in shared memory). It computes the transposed products directly, so
//     that P^T and dS^T are accumulators that feed the next products from
//     registers: S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q.
//
// Scores are in log2 units as in the forward. dS (like P in the forward) is
// rounded to the input type for its product. The tile schedule is tiling.h's;
// only tiles that make_tile does not mark "full" test each pair. Every
// fragment index comes from cuda/mma_layout.h, which
// tests/cpp/test_mma_layout.cpp checks on a simulated warp.
#pragma once

#include "tc_forward.cuh"

namespace libna::LIBNA_CUDA_IMPL {

// An A fragment (k chunk `chunk`) from C fragments `acc` (mma::p_source).
template <typename T, int Tiles>
__device__ __forceinline__ void a_from_accumulators(const float (&acc)[Tiles][4], int chunk,
                                                    std::uint32_t* a) {
  #pragma unroll
  for (int reg = 0; reg < 4; ++reg) {
    const mma::Source lo = mma::p_source(chunk, 2 * reg), hi = mma::p_source(chunk, 2 * reg + 1);
    a[reg] = pack2<T>(acc[lo.tile][lo.index], acc[hi.tile][hi.index]);
  }
}

// Both score-like products of a warp's 16 rows (m tile `warp` of the
// [row][dim] rows a and c) against all `Tiles` n-tiles of the [col][dim]
// rows b and d, over Bucket dims: s = A B^T and dp = C D^T (dq: S = Q K^T,
// dP = dO V^T; dk/dv: S^T = K Q^T, dP^T = V dO^T). Accumulators start at zero.
template <typename T, int Bucket, int Tiles>
__device__ __forceinline__ void row_products(float (&s)[Tiles][4], const T* a, const T* b,
                                             float (&dp)[Tiles][4], const T* c, const T* d,
                                             int lane, int warp) {
  zero(s);
  zero(dp);
  #pragma unroll
  for (int chunk = 0; chunk < Bucket / mma::kK; ++chunk) {
    const mma::Cell a_cell = mma::a_ldmatrix_cell(lane, warp, chunk);
    const int a_offset = mma::smem_offset(a_cell.row, a_cell.col, Bucket);
    std::uint32_t a_frag[4], c_frag[4];
    ldmatrix_x4<false>(a_frag, &a[a_offset]);
    ldmatrix_x4<false>(c_frag, &c[a_offset]);
    #pragma unroll
    for (int pair = 0; pair < Tiles / 2; ++pair) {
      const mma::Cell cell = mma::b_ldmatrix_cell(lane, pair, chunk);
      const int offset = mma::smem_offset(cell.row, cell.col, Bucket);
      std::uint32_t b_frag[4], d_frag[4];
      ldmatrix_x4<false>(b_frag, &b[offset]);
      ldmatrix_x4<false>(d_frag, &d[offset]);
      mma_16816<T>(s[2 * pair], a_frag, b_frag);
      mma_16816<T>(s[2 * pair + 1], a_frag, b_frag + 2);
      mma_16816<T>(dp[2 * pair], c_frag, d_frag);
      mma_16816<T>(dp[2 * pair + 1], c_frag, d_frag + 2);
    }
  }
}

// acc[n-tiles 2 * pair, 2 * pair + 1] += a B for every pair of n-tiles of
// `Bucket` head dims, B taken from `rows` (shared memory, [k][dim]) through
// ldmatrix.trans at k chunk `chunk`.
template <typename T, int Bucket>
__device__ __forceinline__ void mma_rows_trans(float (&acc)[Bucket / mma::kN][4],
                                               const std::uint32_t* a, const T* rows, int lane,
                                               int chunk) {
  #pragma unroll
  for (int pair = 0; pair < Bucket / mma::kN / 2; ++pair) {
    const mma::Cell cell = mma::b_trans_ldmatrix_cell(lane, chunk, pair);
    std::uint32_t b[4];
    ldmatrix_x4<true>(b, &rows[mma::smem_offset(cell.row, cell.col, Bucket)]);
    mma_16816<T>(acc[2 * pair], a, b);
    mma_16816<T>(acc[2 * pair + 1], a, b + 2);
  }
}

// Stores C fragments (16 rows x Bucket dims, scaled by `scale`) of row half
// `half` into the row at `row` of `view`, dims below `dim`.
template <typename T, int Bucket>
__device__ __forceinline__ void store_rows(const float (&acc)[Bucket / mma::kN][4], int lane,
                                           int half, const View& view, std::int64_t row,
                                           int dim, float scale) {
  #pragma unroll
  for (int n = 0; n < Bucket / mma::kN; ++n) {
    #pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int d = mma::kN * n + mma::c_cell(lane, 2 * half + j).col;
      if (d < dim) store<T>(view.data, row + d * view.d, acc[n][2 * half + j] * scale);
    }
  }
}

template <typename T, int Bucket>
__global__ void __launch_bounds__(tiling::kThreads, 1)
    tc_dq_kernel(const FusedParams p, const unsigned vector_loads) {
#if LIBNA_TENSOR_CORES
  constexpr int kRows = tiling::tc_forward_queries();
  constexpr int kKeys = tiling::tc_dq_keys(Bucket);
  constexpr int kDimChunks = Bucket / mma::kK;  // 16-dim chunks of a row
  constexpr int kKeyChunks = kKeys / mma::kK;   // k steps of dS K
  constexpr int kKeyTiles = kKeys / mma::kN;    // n tiles of S and dP
  constexpr int kDimTiles = Bucket / mma::kN;   // n tiles of dQ
  static_assert(kRows == tiling::kThreads / mma::kWarpSize * mma::kM);
  LIBNA_SHARED(kt, TcKeyTile<T, Bucket, kKeys>);
  LIBNA_SHARED(rows, OwnedQuery[kRows]);
  // Q and dO stay in shared memory, read into A fragments per tile: held in
  // registers next to the dq accumulators they made ptxas spill (bucket 128).
  LIBNA_SHARED(q_rows, T[kRows * mma::smem_row_stride(Bucket)]);
  LIBNA_SHARED(dout_rows, T[kRows * mma::smem_row_stride(Bucket)]);

  const tiling::Block blk = tiling::make_block(p.plan, blockIdx.x);
  if (blk.empty) return;
  const int h = blockIdx.y;
  const std::int64_t b = blockIdx.z;
  const int hk = h / (p.heads / p.heads_kv);
  const int lane = threadIdx.x % mma::kWarpSize;
  const int warp = threadIdx.x / mma::kWarpSize;
  if (threadIdx.x < kRows) rows[threadIdx.x].init(p.plan, blk, threadIdx.x);
  __syncthreads();
  const auto row_coords = [&](int j, std::int64_t* c) {
    #pragma unroll
    for (int a = 0; a < kAxes; ++a) c[a] = rows[j].coord[a];
    return rows[j].valid;
  };
  stage_rows<T, Bucket, kRows>(row_coords, b, h, p.q, p.dim, vector_loads & kVectorQ, q_rows);
  stage_rows<T, Bucket, kRows>(row_coords, b, h, p.dout, p.dim_v, vector_loads & kVectorDout,
                               dout_rows);
  kt.non_finite.clear_next(-1);
  __syncthreads();
  const int slot[2] = {mma::row_slot(warp, lane, 0), mma::row_slot(warp, lane, 1)};

  // The row terms D over the cells of the lane's A fragments (a quad holds
  // all of a row's dims).
  float term[2] = {0.f, 0.f};
  #pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (!rows[slot[r]].valid) continue;
    const std::int64_t o_row = p.out.row(b, rows[slot[r]].coord, h);
    #pragma unroll
    for (int c = 0; c < kDimChunks; ++c) {
      #pragma unroll
      for (int i = 0; i < 8; ++i) {
        const mma::Cell cell = mma::a_cell(lane, i);
        const int d = mma::kK * c + cell.col;
        if (cell.row >> 3 == r && d < p.dim_v) {
          term[r] += to_float(dout_rows[mma::smem_offset(slot[r], d, Bucket)]) *
                     load<T>(p.out.data, o_row + d * p.out.d);
        }
      }
    }
  }
  float lse_log2[2];
  #pragma unroll
  for (int r = 0; r < 2; ++r) {
    term[r] = quad_sum(term[r]);
    const OwnedQuery& q = rows[slot[r]];
    if (q.valid && p.dlse.data != nullptr) {
      term[r] -= *global_element<const float>(p.dlse.data, p.dlse.row(b, q.coord, h), false);
    }
    lse_log2[r] =
        q.valid ? backward_lse(*global_element<const float>(p.lse.data, p.lse.row(b, q.coord, h),
                                                            false)) * kLog2e
                : 0.f;
    if (q.valid && mma::thread_in_group(lane) == 0) {
      *global_element<float>(p.row_term, row_term_index(p, b, h, q.coord), true) = term[r];
    }
  }

  float dq[kDimTiles][4];
  zero(dq);
  const float scale_log2 = p.scale * kLog2e;

  for (int t = 0; t < blk.num_tiles; ++t) {
    const tiling::Tile tile = tiling::make_tile(p.plan, blk, t);
    // K's infs and NaNs are staged as zeros (a masked dS of zero must not
    // meet them in dS K): their terms of S and of dQ are added below.
    load_tc_key_tile<Sanitized::k>(p, blk, tile, t, b, hk, vector_loads, kt);
    const bool non_finite_k = kt.non_finite.any(t);
    const auto k_row = [&](int key) {
      std::int64_t c[kAxes];
      full_coords(p.plan, blk, kt.pos[key], c);
      return p.k.row(b, c, hk);
    };

    float s[kKeyTiles][4], dp[kKeyTiles][4];  // S = Q K^T, dP = dO V^T
    row_products<T, Bucket>(s, q_rows, kt.k, dp, dout_rows, kt.v, lane, warp);
    if (non_finite_k) {
      #pragma unroll
      for (int n = 0; n < kKeyTiles; ++n) {
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int key = mma::kN * n + mma::c_cell(lane, i).col;
          if (kt.non_finite.test(t, key)) {
            s[n][i] += non_finite_dot<T, Bucket>(q_rows, slot[mma::c_half(i)], p.k, k_row(key),
                                                 p.dim);
          }
        }
      }
    }

    // dS = P (dP - D) in place of dP; zero outside the neighbourhood.
    #pragma unroll
    for (int n = 0; n < kKeyTiles; ++n) {
      #pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = mma::c_half(i), key = mma::kN * n + mma::c_cell(lane, i).col;
        const OwnedQuery& q = rows[slot[r]];
        float ds = 0.f;
        if (q.valid && kt.valid[key] && (tile.full || q.sees(kt.pos[key]))) {
          float x = s[n][i] * scale_log2;
          if (p.rpb.data) x += bias_at<T>(p, h, q.pos, kt.pos[key]) * kLog2e;
          ds = exp2f(x - lse_log2[r]) * (dp[n][i] - term[r]);
          if (p.bias_grad) add_bias_grad(p, h, q.pos, kt.pos[key], ds);
        }
        dp[n][i] = ds;
      }
    }

    #pragma unroll
    for (int c = 0; c < kKeyChunks; ++c) {
      std::uint32_t ds_frag[4];
      a_from_accumulators<T>(dp, c, ds_frag);
      mma_rows_trans<T, Bucket>(dq, ds_frag, kt.k, lane, c);
    }
    if (non_finite_k) {
      for (int key = 0; key < kKeys; ++key) {
        if (!kt.non_finite.test(t, key)) continue;
        #pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float ds = quad_cell(dp, key, r, lane);
          const OwnedQuery& q = rows[slot[r]];
          if (q.valid && (tile.full || q.sees(kt.pos[key]))) {
            add_non_finite_terms<T>(dq, r, lane, ds, p.k, k_row(key), p.dim);
          }
        }
      }
    }
    __syncthreads();  // the next tile overwrites kt
  }

  #pragma unroll
  for (int r = 0; r < 2; ++r) {
    const OwnedQuery& q = rows[slot[r]];
    if (q.valid) store_rows<T, Bucket>(dq, lane, r, p.dq, p.dq.row(b, q.coord, h), p.dim, p.scale);
  }
#else
  (void)p;
  (void)vector_loads;
#endif
}

// The key side's shared memory: the block's keys (K, V rows and their
// windows) and one query tile (Q, dO rows, positions, lse, D).
template <typename T, int Bucket, int Keys, int Queries>
struct TcKeySide {
  alignas(16) T k[Keys * mma::smem_row_stride(Bucket)];
  alignas(16) T v[Keys * mma::smem_row_stride(Bucket)];
  alignas(16) T q[Queries * mma::smem_row_stride(Bucket)];
  alignas(16) T dout[Queries * mma::smem_row_stride(Bucket)];
  OwnedKey key[Keys];
  int query_pos[Queries][kAxes];
  float lse[Queries], term[Queries];
  bool query_valid[Queries];
  // The queries whose Q (dO) row holds an inf or a NaN, staged as zeros.
  RowBits<Queries> non_finite_q, non_finite_dout;
};

template <typename T, int Bucket>
__global__ void __launch_bounds__(tiling::kThreads, 1)
    tc_dkdv_kernel(const FusedParams p, const unsigned vector_loads) {
#if LIBNA_TENSOR_CORES
  constexpr int kKeys = tiling::tc_dkdv_keys();
  constexpr int kQueries = tiling::tc_dkdv_queries(Bucket);
  constexpr int kQueryChunks = kQueries / mma::kK;  // k steps of P^T dO and dS^T Q
  constexpr int kQueryTiles = kQueries / mma::kN;   // n tiles of S^T and dP^T
  constexpr int kDimTiles = Bucket / mma::kN;       // n tiles of dK and dV
  static_assert(kKeys == tiling::kThreads / mma::kWarpSize * mma::kM);
  LIBNA_SHARED(sm, TcKeySide<T, Bucket, kKeys, kQueries>);

  const tiling::Block blk = tiling::make_block(p.plan, blockIdx.x);
  if (blk.empty) return;
  const int hk = blockIdx.y;
  const std::int64_t b = blockIdx.z;
  const int lane = threadIdx.x % mma::kWarpSize;
  const int warp = threadIdx.x / mma::kWarpSize;
  if (threadIdx.x < kKeys) sm.key[threadIdx.x].init(p.plan, blk, threadIdx.x);
  sm.non_finite_q.clear_next(-1);
  sm.non_finite_dout.clear_next(-1);
  __syncthreads();
  const auto key_coords = [&](int j, std::int64_t* c) {
    #pragma unroll
    for (int a = 0; a < kAxes; ++a) c[a] = sm.key[j].coord[a];
    return sm.key[j].valid;
  };
  stage_rows<T, Bucket, kKeys>(key_coords, b, hk, p.k, p.dim, vector_loads & kVectorK, sm.k);
  stage_rows<T, Bucket, kKeys>(key_coords, b, hk, p.v, p.dim_v, vector_loads & kVectorV, sm.v);
  // (made visible by the barriers of the first query tile's load)
  const int slot[2] = {mma::row_slot(warp, lane, 0), mma::row_slot(warp, lane, 1)};

  float dk[kDimTiles][4], dv[kDimTiles][4];
  zero(dk);
  zero(dv);
  const float scale_log2 = p.scale * kLog2e;
  const auto query_coords = [&](int j, std::int64_t* c) {
    if (sm.query_valid[j]) full_coords(p.plan, blk, sm.query_pos[j], c);
    return sm.query_valid[j];
  };

  const int group = p.heads / p.heads_kv;
  int visit = 0;  // query tiles visited (their parity picks the RowBits word set)
  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    for (int t = 0; t < blk.num_tiles; ++t, ++visit) {
      const tiling::Tile tile = tiling::make_tile(p.plan, blk, t);
      load_query_slots<kQueries>(p, blk, tile, b, h, sm.query_pos, sm.query_valid, sm.lse,
                                 sm.term);
      // Infs and NaNs of Q and dO are staged as zeros (a masked P^T or dS^T
      // of zero must not meet them in P^T dO and dS^T Q): their terms of
      // S^T, dP^T, dV and dK are added below.
      stage_rows<T, Bucket, kQueries>(query_coords, b, h, p.q, p.dim, vector_loads & kVectorQ,
                                      sm.q, sm.non_finite_q.of_tile(visit));
      stage_rows<T, Bucket, kQueries>(query_coords, b, h, p.dout, p.dim_v,
                                      vector_loads & kVectorDout, sm.dout,
                                      sm.non_finite_dout.of_tile(visit));
      __syncthreads();
      sm.non_finite_q.clear_next(visit);
      sm.non_finite_dout.clear_next(visit);
      const bool non_finite = sm.non_finite_q.any(visit) || sm.non_finite_dout.any(visit);
      const auto query_row = [&](const View& x, int j) {
        std::int64_t c[kAxes];
        full_coords(p.plan, blk, sm.query_pos[j], c);
        return x.row(b, c, h);
      };

      float s[kQueryTiles][4], dp[kQueryTiles][4];  // S^T = K Q^T, dP^T = V dO^T
      row_products<T, Bucket>(s, sm.k, sm.q, dp, sm.v, sm.dout, lane, warp);
      if (non_finite) {
        #pragma unroll
        for (int n = 0; n < kQueryTiles; ++n) {
          #pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int j = mma::kN * n + mma::c_cell(lane, i).col, row = slot[mma::c_half(i)];
            if (sm.non_finite_q.test(visit, j)) {
              s[n][i] += non_finite_dot<T, Bucket>(sm.k, row, p.q, query_row(p.q, j), p.dim);
            }
            if (sm.non_finite_dout.test(visit, j)) {
              dp[n][i] += non_finite_dot<T, Bucket>(sm.v, row, p.dout, query_row(p.dout, j),
                                                    p.dim_v);
            }
          }
        }
      }

      // P^T in place of S^T, dS^T in place of dP^T; zero outside the
      // neighbourhood. Rows are keys, columns queries.
      #pragma unroll
      for (int n = 0; n < kQueryTiles; ++n) {
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
          const OwnedKey& key = sm.key[slot[mma::c_half(i)]];
          const int j = mma::kN * n + mma::c_cell(lane, i).col;
          float prob = 0.f, ds = 0.f;  // lse and D of invalid query slots are never read
          if (key.valid && sm.query_valid[j] && (tile.full || key.seen_by(sm.query_pos[j]))) {
            float x = s[n][i] * scale_log2;
            if (p.rpb.data) x += bias_at<T>(p, h, sm.query_pos[j], key.pos) * kLog2e;
            prob = exp2f(x - sm.lse[j] * kLog2e);
            ds = prob * (dp[n][i] - sm.term[j]);
          }
          s[n][i] = prob;
          dp[n][i] = ds;
        }
      }

      #pragma unroll
      for (int c = 0; c < kQueryChunks; ++c) {
        std::uint32_t p_frag[4], ds_frag[4];
        a_from_accumulators<T>(s, c, p_frag);
        a_from_accumulators<T>(dp, c, ds_frag);
        mma_rows_trans<T, Bucket>(dv, p_frag, sm.dout, lane, c);
        mma_rows_trans<T, Bucket>(dk, ds_frag, sm.q, lane, c);
      }
      if (non_finite) {
        for (int j = 0; j < kQueries; ++j) {
          const bool bad_q = sm.non_finite_q.test(visit, j);
          const bool bad_dout = sm.non_finite_dout.test(visit, j);
          if (!bad_q && !bad_dout) continue;
          #pragma unroll
          for (int r = 0; r < 2; ++r) {
            const float prob = quad_cell(s, j, r, lane), ds = quad_cell(dp, j, r, lane);
            const OwnedKey& key = sm.key[slot[r]];
            if (!(key.valid && sm.query_valid[j] &&
                  (tile.full || key.seen_by(sm.query_pos[j])))) {
              continue;
            }
            if (bad_dout) {
              add_non_finite_terms<T>(dv, r, lane, prob, p.dout, query_row(p.dout, j), p.dim_v);
            }
            if (bad_q) add_non_finite_terms<T>(dk, r, lane, ds, p.q, query_row(p.q, j), p.dim);
          }
        }
      }
      __syncthreads();  // the next tile overwrites the query tile
    }
  }

  #pragma unroll
  for (int r = 0; r < 2; ++r) {
    const OwnedKey& key = sm.key[slot[r]];
    if (!key.valid) continue;
    store_rows<T, Bucket>(dk, lane, r, p.dk, p.dk.row(b, key.coord, hk), p.dim, p.scale);
    store_rows<T, Bucket>(dv, lane, r, p.dv, p.dv.row(b, key.coord, hk), p.dim_v, 1.f);
  }
#else
  (void)p;
  (void)vector_loads;
#endif
}

template <typename T, int Bucket>
bool tc_backward_bucket(const FusedParams& params, std::int64_t batch, cudaStream_t stream) {
  if (!runs_sm80_code(tc_dq_kernel<T, Bucket>) || !runs_sm80_code(tc_dkdv_kernel<T, Bucket>)) {
    return false;
  }
  const unsigned vector_loads = vector_load_flags<T>(params);
  const FusedParams pq = with_plan(params, tiling::tc_forward_queries(),
                                   tiling::tc_dq_keys(Bucket), true);
  launch("tc_dq_kernel", tc_dq_kernel<T, Bucket>, fused_grid(pq, pq.heads, batch, "na_backward"), tiling::kThreads, stream, pq, vector_loads);
  // Stream order makes the row terms written above visible to this kernel.
  const FusedParams pk = with_plan(params, tiling::tc_dkdv_keys(),
                                   tiling::tc_dkdv_queries(Bucket), false);
  launch("tc_dkdv_kernel", tc_dkdv_kernel<T, Bucket>, fused_grid(pk, pk.heads_kv, batch, "na_backward"), tiling::kThreads, stream, pk, vector_loads);
  return true;
}

template <typename T>
bool launch_tc_backward(const FusedParams& p, int bucket, std::int64_t batch,
                        cudaStream_t stream) {
  return dispatch_tc_bucket(bucket, [&](auto b) {
    return tc_backward_bucket<T, decltype(b)::value>(p, batch, stream);
  });
}

}  // namespace libna::LIBNA_CUDA_IMPL
