// Fused neighbourhood attention kernels: forward with an online softmax, and
// a FlashAttention-2 style backward (probabilities recomputed from lse, row
// terms D_i = dout_i . out_i).
//
// SIMT kernels with float32 accumulation. A block owns a tile of positions
// of one dilation group (tiling.h) and streams tiles of the other kind
// through shared memory; only tiles that tiling::make_tile does not mark
// "full" test each (query, key) pair against the window.
//   forward, dq: a query is held by adjacent threads ("lanes": bucket/32 of
//     them with 32 head dims each in the forward, bucket/16 with 16 dims in
//     dq, which keeps three rows in registers); its score for a key is a
//     partial dot product reduced with warp shuffles over those lanes.
//   dk/dv: a key is held by bucket/16 threads, 16 dims each, and gathers
//     over the queries that see it (all query heads of its kv head), so dk
//     and dv are written once, by one thread each: deterministic.
// The rpb gradient is the one reduction across blocks: float32 atomics into
// a zeroed workspace (summation order, and so the last bits, may vary).
#pragma once

#include <cmath>
#include <stdexcept>
#include <string>

#include "common.cuh"

namespace libna::LIBNA_CUDA_IMPL {

constexpr float kNegInf = -INFINITY;

// Neither an inf nor a NaN (a comparison both are false for).
__device__ __forceinline__ bool is_finite(float x) { return fabsf(x) <= 3.40282347e+38f; }

// Every fused kernel is declared __launch_bounds__(kThreads, 1): without the
// explicit minimum of one block per SM, ptxas capped the bfloat16 dq kernel
// on sm_80 at 128 registers and spilled (tests/test_cuda_build.py caught it).

// Full-axis coordinates of group positions `pos` of the block's group.
__device__ __forceinline__ void full_coords(const tiling::Plan& plan, const tiling::Block& blk,
                                            const int* pos, std::int64_t* c) {
  #pragma unroll
  for (int a = 0; a < kAxes; ++a) c[a] = tiling::full_index(blk.group[a], pos[a], plan.axis[a].p);
}

// The thread's owned query: its slot in the block's query tile, its group
// positions, full coordinates and window per axis. Invalid slots (past the
// tile's edge) see nothing.
struct OwnedQuery {
  bool valid;
  int pos[kAxes], lo[kAxes], hi[kAxes];
  std::int64_t coord[kAxes];

  __device__ void init(const tiling::Plan& plan, const tiling::Block& blk, int slot) {
    int extent[kAxes];
    tiling::tile_extents(plan, true, extent);
    valid = tiling::slot_position(slot, extent, blk.own_lo, blk.own_hi, pos);
    #pragma unroll
    for (int a = 0; a < kAxes; ++a) {
      if (valid) {
        tiling::window_in_group(pos[a], blk.len_g[a], plan.axis[a].p, &lo[a], &hi[a]);
        coord[a] = tiling::full_index(blk.group[a], pos[a], plan.axis[a].p);
      } else {
        lo[a] = hi[a] = 0;
        coord[a] = 0;
      }
    }
  }
  __device__ bool sees(const int* key) const {
    return valid && lo[0] <= key[0] && key[0] < hi[0] && lo[1] <= key[1] && key[1] < hi[1] &&
           lo[2] <= key[2] && key[2] < hi[2];
  }
};

// An owned key of a key-owning block (dk/dv): its slot's group positions,
// full coordinates, and per axis the run [run_lo, run_hi) of the queries that
// see it. Invalid slots are seen by nothing.
struct OwnedKey {
  bool valid;
  int pos[kAxes], run_lo[kAxes], run_hi[kAxes];
  std::int64_t coord[kAxes];

  __device__ void init(const tiling::Plan& plan, const tiling::Block& blk, int slot) {
    int extent[kAxes];
    tiling::tile_extents(plan, false, extent);
    valid = tiling::slot_position(slot, extent, blk.own_lo, blk.own_hi, pos);
    #pragma unroll
    for (int a = 0; a < kAxes; ++a) {
      int first = 0, last = -1;
      if (valid) tiling::queries_seeing(pos[a], blk.len_g[a], plan.axis[a].p, &first, &last);
      run_lo[a] = first;
      run_hi[a] = last + 1;
      coord[a] = valid ? tiling::full_index(blk.group[a], pos[a], plan.axis[a].p) : 0;
    }
  }
  __device__ bool seen_by(const int* query) const {
    return valid && run_lo[0] <= query[0] && query[0] < run_hi[0] && run_lo[1] <= query[1] &&
           query[1] < run_hi[1] && run_lo[2] <= query[2] && query[2] < run_hi[2];
  }
};

// Sum over the `Lanes` adjacent threads that hold one row.
template <int Lanes>
__device__ __forceinline__ float lane_sum(float x) {
  #pragma unroll
  for (int offset = Lanes / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

// One key tile in shared memory: positions, validity, and K and V rows as
// float32 (zero outside the tile or the head dims).
template <int Bucket, int Keys>
struct KeyTile {
  float k[Keys][Bucket];
  float v[Keys][Bucket];
  int pos[Keys][kAxes];
  bool valid[Keys];
};

// The positions and validity of the `Keys` slots of key tile `tile` (the
// block's first threads), visible to the whole block on return.
template <int Keys>
__device__ void load_key_slots(const FusedParams& p, const tiling::Tile& tile,
                               int (&pos)[Keys][kAxes], bool (&valid)[Keys]) {
  if (threadIdx.x < Keys) {
    int extent[kAxes];
    tiling::tile_extents(p.plan, false, extent);
    valid[threadIdx.x] =
        tiling::slot_position(threadIdx.x, extent, tile.lo, tile.hi, pos[threadIdx.x]);
  }
  __syncthreads();
}

// Loads key tile `tile` of kv head `hk` (the whole block takes part).
template <typename T, int Bucket, int Keys>
__device__ void load_key_tile(const FusedParams& p, const tiling::Block& blk,
                              const tiling::Tile& tile, std::int64_t b, int hk,
                              KeyTile<Bucket, Keys>& kt) {
  load_key_slots<Keys>(p, tile, kt.pos, kt.valid);
  for (int e = threadIdx.x; e < Keys * Bucket; e += tiling::kThreads) {
    const int j = e / Bucket, d = e % Bucket;
    float kx = 0.f, vx = 0.f;
    if (kt.valid[j]) {
      std::int64_t c[kAxes];
      full_coords(p.plan, blk, kt.pos[j], c);
      if (d < p.dim) kx = load<T>(p.k.data, p.k.row(b, c, hk) + d * p.k.d);
      if (d < p.dim_v) vx = load<T>(p.v.data, p.v.row(b, c, hk) + d * p.v.d);
    }
    kt.k[j][d] = kx;
    kt.v[j][d] = vx;
  }
  __syncthreads();
}

// What a thread of a query-owning block (forward, dq) works on: the block,
// its batch and heads, its lane and its query.
template <int Lanes>
struct QueryThread {
  tiling::Block blk;
  std::int64_t b;
  int h, hk, lane;
  OwnedQuery query;

  // False for a block that owns no queries (the whole block returns).
  __device__ bool init(const FusedParams& p) {
    blk = tiling::make_block(p.plan, blockIdx.x);
    if (blk.empty) return false;
    h = blockIdx.y;
    b = blockIdx.z;
    hk = h / (p.heads / p.heads_kv);
    lane = threadIdx.x % Lanes;
    query.init(p.plan, blk, threadIdx.x / Lanes);
    return true;
  }
  // Element d of the thread's part of a head-dim row: lane, lane + Lanes, ...
  __device__ int dim(int i) const { return lane + Lanes * i; }
  __device__ bool keeps(const tiling::Tile& tile, bool key_valid, const int* key) const {
    return query.valid && key_valid && (tile.full || query.sees(key));
  }
};

// Runs body(tile) for each key tile of the thread's block, with the tile
// loaded into kt (the whole block takes part); kt is reused once body returns.
template <typename T, int Bucket, int Keys, int Lanes, typename Body>
__device__ __forceinline__ void for_each_key_tile(const FusedParams& p,
                                                  const QueryThread<Lanes>& me,
                                                  KeyTile<Bucket, Keys>& kt, Body&& body) {
  for (int t = 0; t < me.blk.num_tiles; ++t) {
    const tiling::Tile tile = tiling::make_tile(p.plan, me.blk, t);
    load_key_tile<T, Bucket, Keys>(p, me.blk, tile, me.b, me.hk, kt);
    body(tile);
    __syncthreads();  // the next tile overwrites kt
  }
}

template <typename T>
__device__ __forceinline__ float bias_at(const FusedParams& p, int h, const int* iq,
                                         const int* jk) {
  int r[kAxes];
  #pragma unroll
  for (int a = 0; a < kAxes; ++a) r[a] = tiling::rpb_index(iq[a], jk[a], p.plan.axis[a].p);
  return load<T>(p.rpb.data, h * p.rpb.h + bias_offset(p.rpb, r));
}

// Adds dlogit to the float32 rpb gradient of head h at the offset of key jk
// from query iq: the one cross-block reduction of the backward.
__device__ __forceinline__ void add_bias_grad(const FusedParams& p, int h, const int* iq,
                                              const int* jk, float dlogit) {
  const AxisParams &a0 = p.plan.axis[0].p, &a1 = p.plan.axis[1].p, &a2 = p.plan.axis[2].p;
  const std::int64_t head_size =
      (2 * a0.kernel - 1) * (2 * a1.kernel - 1) * static_cast<std::int64_t>(2 * a2.kernel - 1);
  int r[kAxes];
  #pragma unroll
  for (int a = 0; a < kAxes; ++a) r[a] = tiling::rpb_index(iq[a], jk[a], p.plan.axis[a].p);
  atomicAdd(p.bias_grad + h * head_size + bias_flat(a1, a2, r), dlogit);
}

template <typename T, int Bucket>
__global__ void __launch_bounds__(tiling::kThreads, 1)
    fused_forward_kernel(const FusedParams p) {
  constexpr int kLanes = tiling::query_lanes(Bucket);
  constexpr int kChunk = Bucket / kLanes;
  constexpr int kKeys = tiling::forward_keys(Bucket);
  LIBNA_SHARED(kt, KeyTile<Bucket, kKeys>);
  QueryThread<kLanes> me;
  if (!me.init(p)) return;
  const OwnedQuery& query = me.query;
  const std::int64_t b = me.b;
  const int h = me.h;

  float q_reg[kChunk], acc[kChunk];
  const std::int64_t q_row = p.q.row(b, query.coord, h);
  #pragma unroll
  for (int i = 0; i < kChunk; ++i) {
    const int d = me.dim(i);
    q_reg[i] = query.valid && d < p.dim ? load<T>(p.q.data, q_row + d * p.q.d) * p.scale : 0.f;
    acc[i] = 0.f;
  }
  float row_max = kNegInf, row_sum = 0.f;

  for_each_key_tile<T>(p, me, kt, [&](const tiling::Tile& tile) {
    float s[kKeys];
    float tile_max = kNegInf;
    static_assert(kKeys <= 32, "kept holds one bit per key");
    std::uint32_t kept = 0;  // the keys in the query's window
    #pragma unroll
    for (int j = 0; j < kKeys; ++j) {
      float dot = 0.f;
      #pragma unroll
      for (int i = 0; i < kChunk; ++i) dot += q_reg[i] * kt.k[j][me.dim(i)];
      dot = lane_sum<kLanes>(dot);
      const bool keep = me.keeps(tile, kt.valid[j], kt.pos[j]);
      if (keep && p.rpb.data) dot += bias_at<T>(p, h, query.pos, kt.pos[j]);
      s[j] = keep ? dot : kNegInf;
      kept |= keep ? 1u << j : 0u;
      tile_max = max_or_nan(tile_max, s[j]);
    }
    const float new_max = max_or_nan(row_max, tile_max);
    if (new_max != kNegInf) {  // some key kept with a logit above -inf, or a NaN
      const float correction = expf(row_max - new_max);
      row_sum *= correction;
      #pragma unroll
      for (int i = 0; i < kChunk; ++i) acc[i] *= correction;
      #pragma unroll
      for (int j = 0; j < kKeys; ++j) {
        const float prob = expf(s[j] - new_max);
        row_sum += prob;
        // A key outside the window adds nothing, even a NaN or inf value
        // (0 * NaN would): non-finite values stay in their neighbourhood.
        if (!(kept >> j & 1u)) continue;
        #pragma unroll
        for (int i = 0; i < kChunk; ++i) acc[i] += prob * kt.v[j][me.dim(i)];
      }
      row_max = new_max;
    }
  });

  if (!query.valid) return;
  const float inv_sum = softmax_normaliser(row_sum);
  const std::int64_t out_row = p.out.row(b, query.coord, h);
  #pragma unroll
  for (int i = 0; i < kChunk; ++i) {
    const int d = me.dim(i);
    if (d < p.dim_v) store<T>(p.out.data, out_row + d * p.out.d, acc[i] * inv_sum);
  }
  if (p.lse.data && me.lane == 0) {
    *global_element<float>(p.lse.data, p.lse.row(b, query.coord, h), true) =
        softmax_lse(row_max, row_sum);
  }
}

// Where the row term D of query c (full coordinates) of head h lives in
// p.row_term ([B, heads, tokens]).
__device__ __forceinline__ std::int64_t row_term_index(const FusedParams& p, std::int64_t b,
                                                       int h, const std::int64_t* c) {
  const std::int64_t token =
      (c[0] * p.plan.axis[1].p.length + c[1]) * p.plan.axis[2].p.length + c[2];
  return (b * p.heads + h) * p.tokens + token;
}

// The group positions, validity, lse and row terms (head h) of the
// `Queries` slots of query tile `tile` of a key-owning block (the block's
// first threads), visible to the whole block on return.
template <int Queries>
__device__ void load_query_slots(const FusedParams& p, const tiling::Block& blk,
                                 const tiling::Tile& tile, std::int64_t b, int h,
                                 int (&pos)[Queries][kAxes], bool (&valid)[Queries],
                                 float (&lse)[Queries], float (&term)[Queries]) {
  if (threadIdx.x < Queries) {
    const int i = threadIdx.x;
    int extent[kAxes];
    tiling::tile_extents(p.plan, true, extent);
    valid[i] = tiling::slot_position(i, extent, tile.lo, tile.hi, pos[i]);
    if (valid[i]) {
      std::int64_t c[kAxes];
      full_coords(p.plan, blk, pos[i], c);
      lse[i] = backward_lse(*global_element<const float>(p.lse.data, p.lse.row(b, c, h), false));
      term[i] = *global_element<const float>(p.row_term, row_term_index(p, b, h, c), false);
    }
  }
  __syncthreads();
}

// Backward, query side: D_i, dq, and the rpb gradient.
template <typename T, int Bucket>
__global__ void __launch_bounds__(tiling::kThreads, 1)
    fused_dq_kernel(const FusedParams p) {
  constexpr int kLanes = tiling::dq_lanes(Bucket);
  constexpr int kChunk = Bucket / kLanes;
  constexpr int kKeys = tiling::forward_keys(Bucket);
  LIBNA_SHARED(kt, KeyTile<Bucket, kKeys>);
  QueryThread<kLanes> me;
  if (!me.init(p)) return;
  const OwnedQuery& query = me.query;
  const std::int64_t b = me.b;
  const int h = me.h;

  float q_reg[kChunk], dout_reg[kChunk], dq_acc[kChunk];
  const std::int64_t q_row = p.q.row(b, query.coord, h);
  const std::int64_t o_row = p.out.row(b, query.coord, h);
  const std::int64_t do_row = p.dout.row(b, query.coord, h);
  float row_term = 0.f;
  #pragma unroll
  for (int i = 0; i < kChunk; ++i) {
    const int d = me.dim(i);
    q_reg[i] = query.valid && d < p.dim ? load<T>(p.q.data, q_row + d * p.q.d) : 0.f;
    dout_reg[i] = query.valid && d < p.dim_v ? load<T>(p.dout.data, do_row + d * p.dout.d) : 0.f;
    if (query.valid && d < p.dim_v) row_term += dout_reg[i] * load<T>(p.out.data, o_row + d * p.out.d);
    dq_acc[i] = 0.f;
  }
  row_term = lane_sum<kLanes>(row_term);
  if (query.valid && p.dlse.data != nullptr) {
    row_term -= *global_element<const float>(p.dlse.data, p.dlse.row(b, query.coord, h), false);
  }
  const float lse =
      query.valid
          ? backward_lse(*global_element<const float>(p.lse.data, p.lse.row(b, query.coord, h), false))
          : 0.f;
  if (query.valid && me.lane == 0) {
    *global_element<float>(p.row_term, row_term_index(p, b, h, query.coord), true) = row_term;
  }

  for_each_key_tile<T>(p, me, kt, [&](const tiling::Tile& tile) {
#pragma unroll 4
    for (int j = 0; j < kKeys; ++j) {
      float qk = 0.f, dprob = 0.f;
      #pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        qk += q_reg[i] * kt.k[j][me.dim(i)];
        dprob += dout_reg[i] * kt.v[j][me.dim(i)];
      }
      qk = lane_sum<kLanes>(qk);
      dprob = lane_sum<kLanes>(dprob);
      const bool keep = me.keeps(tile, kt.valid[j], kt.pos[j]);
      if (!keep) continue;
      float logit = qk * p.scale;
      if (p.rpb.data) logit += bias_at<T>(p, h, query.pos, kt.pos[j]);
      const float dlogit = expf(logit - lse) * (dprob - row_term);
      #pragma unroll
      for (int i = 0; i < kChunk; ++i) dq_acc[i] += dlogit * kt.k[j][me.dim(i)];
      if (p.bias_grad && me.lane == 0) add_bias_grad(p, h, query.pos, kt.pos[j], dlogit);
    }
  });

  if (!query.valid) return;
  const std::int64_t dq_row = p.dq.row(b, query.coord, h);
  #pragma unroll
  for (int i = 0; i < kChunk; ++i) {
    const int d = me.dim(i);
    if (d < p.dim) store<T>(p.dq.data, dq_row + d * p.dq.d, dq_acc[i] * p.scale);
  }
}

// Backward, key side: dk and dv, gathered over the queries (of every query
// head that shares the kv head) that see each key.
template <typename T, int Bucket>
__global__ void __launch_bounds__(tiling::kThreads, 1)
    fused_dkdv_kernel(const FusedParams p) {
  constexpr int kLanes = tiling::key_lanes(Bucket);
  constexpr int kChunk = Bucket / kLanes;
  constexpr int kQueries = tiling::backward_queries(Bucket);
  LIBNA_SHARED(q_tile, float[kQueries][Bucket]);
  LIBNA_SHARED(dout_tile, float[kQueries][Bucket]);
  LIBNA_SHARED(lse_tile, float[kQueries]);
  LIBNA_SHARED(term_tile, float[kQueries]);
  LIBNA_SHARED(query_pos, int[kQueries][kAxes]);
  LIBNA_SHARED(query_valid, bool[kQueries]);

  const tiling::Block blk = tiling::make_block(p.plan, blockIdx.x);
  if (blk.empty) return;
  const int hk = blockIdx.y;
  const std::int64_t b = blockIdx.z;
  const int lane = threadIdx.x % kLanes;
  OwnedKey key;
  key.init(p.plan, blk, threadIdx.x / kLanes);
  const bool valid = key.valid;

  float k_reg[kChunk], v_reg[kChunk], dk_acc[kChunk], dv_acc[kChunk];
  const std::int64_t k_row = p.k.row(b, key.coord, hk), v_row = p.v.row(b, key.coord, hk);
  #pragma unroll
  for (int i = 0; i < kChunk; ++i) {
    const int d = lane + kLanes * i;
    k_reg[i] = valid && d < p.dim ? load<T>(p.k.data, k_row + d * p.k.d) : 0.f;
    v_reg[i] = valid && d < p.dim_v ? load<T>(p.v.data, v_row + d * p.v.d) : 0.f;
    dk_acc[i] = dv_acc[i] = 0.f;
  }

  const int group = p.heads / p.heads_kv;
  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    for (int t = 0; t < blk.num_tiles; ++t) {
      const tiling::Tile tile = tiling::make_tile(p.plan, blk, t);
      load_query_slots<kQueries>(p, blk, tile, b, h, query_pos, query_valid, lse_tile, term_tile);
      for (int e = threadIdx.x; e < kQueries * Bucket; e += tiling::kThreads) {
        const int i = e / Bucket, d = e % Bucket;
        float qx = 0.f, dx = 0.f;
        if (query_valid[i]) {
          std::int64_t c[kAxes];
          full_coords(p.plan, blk, query_pos[i], c);
          if (d < p.dim) qx = load<T>(p.q.data, p.q.row(b, c, h) + d * p.q.d);
          if (d < p.dim_v) dx = load<T>(p.dout.data, p.dout.row(b, c, h) + d * p.dout.d);
        }
        q_tile[i][d] = qx;
        dout_tile[i][d] = dx;
      }
      __syncthreads();
#pragma unroll 4
      for (int i = 0; i < kQueries; ++i) {
        float qk = 0.f, dprob = 0.f;
        #pragma unroll
        for (int c = 0; c < kChunk; ++c) {
          qk += k_reg[c] * q_tile[i][lane + kLanes * c];
          dprob += v_reg[c] * dout_tile[i][lane + kLanes * c];
        }
        qk = lane_sum<kLanes>(qk);
        dprob = lane_sum<kLanes>(dprob);
        const int* iq = query_pos[i];
        if (!(valid && query_valid[i] && (tile.full || key.seen_by(iq)))) continue;
        float logit = qk * p.scale;
        if (p.rpb.data) logit += bias_at<T>(p, h, iq, key.pos);
        const float prob = expf(logit - lse_tile[i]);
        const float dlogit = prob * (dprob - term_tile[i]);
        #pragma unroll
        for (int c = 0; c < kChunk; ++c) {
          dv_acc[c] += prob * dout_tile[i][lane + kLanes * c];
          dk_acc[c] += dlogit * q_tile[i][lane + kLanes * c];
        }
      }
      __syncthreads();
    }
  }

  if (!valid) return;
  const std::int64_t dk_row = p.dk.row(b, key.coord, hk), dv_row = p.dv.row(b, key.coord, hk);
  #pragma unroll
  for (int i = 0; i < kChunk; ++i) {
    const int d = lane + kLanes * i;
    if (d < p.dim) store<T>(p.dk.data, dk_row + d * p.dk.d, dk_acc[i] * p.scale);
    if (d < p.dim_v) store<T>(p.dv.data, dv_row + d * p.dv.d, dv_acc[i]);
  }
}

// ---- launchers ------------------------------------------------------------------

// The plan of a kernel: p.plan's axes, tiled for that kernel's block shape.
inline FusedParams with_plan(const FusedParams& p, int own, int visit, bool own_queries) {
  AxisParams axes[kAxes];
  for (int a = 0; a < kAxes; ++a) axes[a] = p.plan.axis[a].p;
  FusedParams r = p;
  r.plan = tiling::make_plan(axes, kAxes, own, visit, own_queries);
  return r;
}

inline dim3 fused_grid(const FusedParams& p, int heads, std::int64_t batch, const char* op) {
  if (p.plan.blocks > 0x7fffffffLL || heads > 65535 || batch > 65535) {
    throw std::invalid_argument(std::string("[") + op + "] too large for one CUDA launch: " +
                                std::to_string(p.plan.blocks) + " blocks per head, " +
                                std::to_string(heads) + " heads, batch " + std::to_string(batch) +
                                " (limits 2^31-1, 65535, 65535)");
  }
  return dim3(static_cast<unsigned>(p.plan.blocks), static_cast<unsigned>(heads),
              static_cast<unsigned>(batch));
}

template <typename T, int Bucket>
void forward_bucket(const FusedParams& params, std::int64_t batch, cudaStream_t stream) {
  const FusedParams p = with_plan(params, tiling::forward_queries(Bucket),
                                  tiling::forward_keys(Bucket), true);
  launch("fused_forward_kernel", fused_forward_kernel<T, Bucket>, fused_grid(p, p.heads, batch, "na_forward"), tiling::kThreads, stream, p);
}

template <typename T, int Bucket>
void backward_bucket(const FusedParams& params, std::int64_t batch, cudaStream_t stream) {
  const FusedParams pq = with_plan(params, tiling::dq_queries(Bucket),
                                   tiling::forward_keys(Bucket), true);
  launch("fused_dq_kernel", fused_dq_kernel<T, Bucket>, fused_grid(pq, pq.heads, batch, "na_backward"), tiling::kThreads, stream, pq);
  // Stream order makes the row terms written above visible to this kernel.
  const FusedParams pk = with_plan(params, tiling::backward_keys(Bucket),
                                   tiling::backward_queries(Bucket), false);
  launch("fused_dkdv_kernel", fused_dkdv_kernel<T, Bucket>, fused_grid(pk, pk.heads_kv, batch, "na_backward"), tiling::kThreads, stream, pk);
}

template <typename F>
void dispatch_bucket(int bucket, F&& f) {
  switch (bucket) {
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
    case 256: return f(std::integral_constant<int, 256>{});
    default: throw std::logic_error("[libna] internal error: head-dim bucket " + std::to_string(bucket));
  }
}

template <typename T>
void launch_fused_forward(const FusedParams& p, int bucket, std::int64_t batch,
                          cudaStream_t stream) {
  dispatch_bucket(bucket, [&](auto b) { forward_bucket<T, decltype(b)::value>(p, batch, stream); });
}

template <typename T>
void launch_fused_backward(const FusedParams& p, int bucket, std::int64_t batch,
                           cudaStream_t stream) {
  dispatch_bucket(bucket, [&](auto b) { backward_bucket<T, decltype(b)::value>(p, batch, stream); });
}

}  // namespace libna::LIBNA_CUDA_IMPL
