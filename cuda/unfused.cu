// Unfused neighbourhood attention on CUDA: na_qk, na_av and their backward.
// Simple kernels, one thread per output element with float32 accumulation;
// the slot layout and its inverse come from tiling.h (slot_key,
// key_queries, slot_in_window), shared with the host tests. Every output
// element is written by exactly one thread (deterministic), except the rpb
// gradient: float32 atomics into a zeroed workspace.
#include <algorithm>

#include "common.cuh"

namespace libna::LIBNA_CUDA_IMPL {
namespace {

constexpr float kNegInf = -INFINITY;
constexpr int kBlock = 256;

// Grid-stride index over `total` elements.
#define LIBNA_FOR_EACH(idx, total)                                                   \
  for (std::int64_t idx = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; \
       idx < (total); idx += static_cast<std::int64_t>(gridDim.x) * blockDim.x)

// Splits a row index [b, token, head] (head fastest) into its parts.
struct RowIndex {
  std::int64_t b, c[kAxes];
  int h;
  __device__ RowIndex(std::int64_t row, int heads, const UnfusedParams& p) {
    h = static_cast<int>(row % heads);
    row /= heads;
    token_coords(row % p.tokens, p.length, c);
    b = row / p.tokens;
  }
};

__device__ __forceinline__ std::int64_t slot_stride(const UnfusedParams& p, int a) {
  std::int64_t s = 1;
  for (int i = a + 1; i < kAxes; ++i) s *= p.axes[i].kernel;
  return s;
}

template <typename T>
__global__ void qk_kernel(const UnfusedParams p) {
  LIBNA_FOR_EACH(idx, p.batch * p.tokens * p.heads * p.slots) {
    const std::int64_t slot = idx % p.slots;
    const RowIndex r(idx / p.slots, p.heads, p);
    const int hk = r.h / (p.heads / p.heads_kv);
    std::int64_t key[kAxes];
    int bias[kAxes];
    float s = kNegInf;
    if (tiling::slot_key(p.axes, r.c, slot, key, bias)) {
      const std::int64_t q_row = p.q.row(r.b, r.c, r.h), k_row = p.k.row(r.b, key, hk);
      s = 0.f;
      for (int d = 0; d < p.dim; ++d) {
        s += load<T>(p.q.data, q_row + d * p.q.d) * load<T>(p.k.data, k_row + d * p.k.d);
      }
      if (p.rpb.data) s += load<T>(p.rpb.data, r.h * p.rpb.h + bias_offset(p.rpb, bias));
    }
    store<T>(p.attn.data, p.attn.row(r.b, r.c, r.h) + slot * p.attn.d, s);
  }
}

// out[q, h, d] = sum over the slots of q's window of weight[q, h, slot] *
// x[key, hk, d]: na_av (attn, v -> out) and the dq of na_qk (dattn, k -> dq).
template <typename T>
__global__ void slot_gather_kernel(const UnfusedParams p, View weight, View x, View out) {
  LIBNA_FOR_EACH(idx, p.batch * p.tokens * p.heads * p.dim) {
    const int d = static_cast<int>(idx % p.dim);
    const RowIndex r(idx / p.dim, p.heads, p);
    const int hk = r.h / (p.heads / p.heads_kv);
    const std::int64_t w_row = weight.row(r.b, r.c, r.h);
    float acc = 0.f;
    for (std::int64_t slot = 0; slot < p.slots; ++slot) {
      std::int64_t key[kAxes];
      if (!tiling::slot_key(p.axes, r.c, slot, key, nullptr)) continue;
      acc += load<T>(weight.data, w_row + slot * weight.d) *
             load<T>(x.data, x.row(r.b, key, hk) + d * x.d);
    }
    store<T>(out.data, out.row(r.b, r.c, r.h) + d * out.d, acc);
  }
}

// Sum over the query heads of kv head hk and the queries that see `key` of
// weight(query, head, slot of key) * x[query, head, d].
template <typename T>
__device__ float gather_queries(const UnfusedParams& p, std::int64_t b, const std::int64_t* key, int hk,
                                int d, const View& weight, const View& x) {
  std::int64_t first[kAxes], count[kAxes];
  #pragma unroll
  for (int a = 0; a < kAxes; ++a) tiling::key_queries(key[a], p.axes[a], &first[a], &count[a]);
  const int group = p.heads / p.heads_kv;
  float acc = 0.f;
  std::int64_t q[kAxes];
  for (std::int64_t t0 = 0; t0 < count[0]; ++t0) {
    q[0] = first[0] + t0 * p.axes[0].dilation;
    const std::int64_t s0 = tiling::slot_in_window(q[0], key[0], p.axes[0]) * slot_stride(p, 0);
    for (std::int64_t t1 = 0; t1 < count[1]; ++t1) {
      q[1] = first[1] + t1 * p.axes[1].dilation;
      const std::int64_t s1 = s0 + tiling::slot_in_window(q[1], key[1], p.axes[1]) * slot_stride(p, 1);
      for (std::int64_t t2 = 0; t2 < count[2]; ++t2) {
        q[2] = first[2] + t2 * p.axes[2].dilation;
        const std::int64_t slot = s1 + tiling::slot_in_window(q[2], key[2], p.axes[2]);
        for (int h = hk * group; h < (hk + 1) * group; ++h) {
          acc += load<T>(weight.data, weight.row(b, q, h) + slot * weight.d) *
                 load<T>(x.data, x.row(b, q, h) + d * x.d);
        }
      }
    }
  }
  return acc;
}

// dk[key, hk, d] (qk backward) or dv[key, hk, d] (av backward).
template <typename T>
__global__ void key_grad_kernel(const UnfusedParams p, View weight, View x, View grad) {
  LIBNA_FOR_EACH(idx, p.batch * p.tokens * p.heads_kv * p.dim) {
    const int d = static_cast<int>(idx % p.dim);
    const RowIndex r(idx / p.dim, p.heads_kv, p);
    store<T>(grad.data, grad.row(r.b, r.c, r.h) + d * grad.d,
             gather_queries<T>(p, r.b, r.c, r.h, d, weight, x));
  }
}

// The rpb gradient of na_qk: dattn summed per (head, offset).
template <typename T>
__global__ void qk_bias_grad_kernel(const UnfusedParams p) {
  const std::int64_t per_head = (2 * p.axes[0].kernel - 1) * (2 * p.axes[1].kernel - 1) *
                             (2 * p.axes[2].kernel - 1);
  LIBNA_FOR_EACH(idx, p.batch * p.tokens * p.heads * p.slots) {
    const std::int64_t slot = idx % p.slots;
    const RowIndex r(idx / p.slots, p.heads, p);
    std::int64_t key[kAxes];
    int bias[kAxes];
    if (!tiling::slot_key(p.axes, r.c, slot, key, bias)) continue;
    atomicAdd(p.bias_grad + r.h * per_head + bias_flat(p.axes[1], p.axes[2], bias),
              load<T>(p.dattn.data, p.dattn.row(r.b, r.c, r.h) + slot * p.dattn.d));
  }
}

// dattn of na_av: dout . v[key], zero in empty causal slots.
template <typename T>
__global__ void av_dattn_kernel(const UnfusedParams p) {
  LIBNA_FOR_EACH(idx, p.batch * p.tokens * p.heads * p.slots) {
    const std::int64_t slot = idx % p.slots;
    const RowIndex r(idx / p.slots, p.heads, p);
    const int hk = r.h / (p.heads / p.heads_kv);
    std::int64_t key[kAxes];
    float s = 0.f;
    if (tiling::slot_key(p.axes, r.c, slot, key, nullptr)) {
      const std::int64_t o_row = p.dout.row(r.b, r.c, r.h), v_row = p.v.row(r.b, key, hk);
      for (int d = 0; d < p.dim; ++d) {
        s += load<T>(p.dout.data, o_row + d * p.dout.d) * load<T>(p.v.data, v_row + d * p.v.d);
      }
    }
    store<T>(p.dattn.data, p.dattn.row(r.b, r.c, r.h) + slot * p.dattn.d, s);
  }
}

unsigned grid_for(std::int64_t total) {
  return static_cast<unsigned>(std::min<std::int64_t>((total + kBlock - 1) / kBlock, 1LL << 20));
}

}  // namespace

template <typename T>
__global__ void store_bias_grad_kernel(const float* acc, BiasView grad, AxisParams a0,
                                       AxisParams a1, AxisParams a2, int heads) {
  const std::int64_t w1 = 2 * a1.kernel - 1, w2 = 2 * a2.kernel - 1;
  const std::int64_t per_head = (2 * a0.kernel - 1) * w1 * w2;
  LIBNA_FOR_EACH(idx, heads * per_head) {
    std::int64_t i = idx % per_head;
    const std::int64_t h = idx / per_head;
    int r[kAxes];
    r[2] = static_cast<int>(i % w2);
    i /= w2;
    r[1] = static_cast<int>(i % w1);
    r[0] = static_cast<int>(i / w1);
    store<T>(grad.data, h * grad.h + bias_offset(grad, r), acc[idx]);
  }
}

template <typename T>
void launch_store_bias_grad(const float* acc, const BiasView& grad, const AxisParams* axes,
                            int heads, cudaStream_t stream) {
  const std::int64_t total = heads * (2 * axes[0].kernel - 1) * (2 * axes[1].kernel - 1) *
                          (2 * axes[2].kernel - 1);
  launch("store_bias_grad_kernel", store_bias_grad_kernel<T>, grid_for(total), kBlock, stream, acc, grad, axes[0], axes[1], axes[2], heads);
}

template <typename T>
void launch_unfused(UnfusedOp op, const UnfusedParams& p, cudaStream_t stream) {
  const std::int64_t rows = p.batch * p.tokens;
  switch (op) {
    case UnfusedOp::qk:
      launch("qk_kernel", qk_kernel<T>, grid_for(rows * p.heads * p.slots), kBlock, stream, p);
      break;
    case UnfusedOp::av:
      launch("slot_gather_kernel", slot_gather_kernel<T>, grid_for(rows * p.heads * p.dim), kBlock, stream, p, p.attn, p.v, p.out);
      break;
    case UnfusedOp::qk_backward:  // p.dim: head dim of q and k
      launch("slot_gather_kernel", slot_gather_kernel<T>, grid_for(rows * p.heads * p.dim), kBlock, stream, p, p.dattn, p.k, p.dq);
      launch("key_grad_kernel", key_grad_kernel<T>, grid_for(rows * p.heads_kv * p.dim), kBlock, stream, p, p.dattn, p.q, p.dk);
      if (p.bias_grad) {
        launch("qk_bias_grad_kernel", qk_bias_grad_kernel<T>, grid_for(rows * p.heads * p.slots), kBlock, stream, p);
      }
      break;
    case UnfusedOp::av_backward:  // p.dim: head dim of v
      launch("av_dattn_kernel", av_dattn_kernel<T>, grid_for(rows * p.heads * p.slots), kBlock, stream, p);
      launch("key_grad_kernel", key_grad_kernel<T>, grid_for(rows * p.heads_kv * p.dim), kBlock, stream, p, p.attn, p.dout, p.dv);
      break;
  }
}

#define LIBNA_INSTANTIATE_UNFUSED(T)                                                      \
  template void launch_unfused<T>(UnfusedOp, const UnfusedParams&, cudaStream_t);         \
  template void launch_store_bias_grad<T>(const float*, const BiasView&, const AxisParams*, \
                                          int, cudaStream_t);
LIBNA_INSTANTIATE_UNFUSED(float)
LIBNA_INSTANTIATE_UNFUSED(__half)
LIBNA_INSTANTIATE_UNFUSED(__nv_bfloat16)

}  // namespace libna::LIBNA_CUDA_IMPL
