// Shared pieces of the CUDA backend: strided views padded to three spatial
// axes, the kernel parameter structs (plain pointers, strides and sizes),
// element conversions, and the launchers that each generated translation
// unit instantiates.
//
// Every op runs as a rank-3 problem: missing axes get length 1, kernel 1 and
// stride 0 in every view, so one kernel instance serves ranks 1, 2 and 3.
// This trades a little integer work on the padded axes for a third of the
// compile time and binary size (CI builds these kernels on two cores).
//
// The same source is compiled twice: by nvcc for the GPU, and with
// LIBNA_CUDA_EMULATOR by the host compiler, against cuda/emulator's
// cuda_runtime.h, cuda_fp16.h and cuda_bf16.h, to run under the host
// emulation of the CUDA execution model (cuda/emulator/emulator.h). The two
// builds live in different namespaces so that one library can hold both.
// What the kernels need beyond the CUDA language is spelled through the few
// macros and functions below (launch, LIBNA_SHARED, LIBNA_TENSOR_CORES), so
// that each has its GPU meaning and its emulated one in one place.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <utility>

#include "tiling.h"

#if defined(LIBNA_CUDA_EMULATOR)
#define LIBNA_CUDA_BACKEND cuda_emulator
#define LIBNA_CUDA_BACKEND_NAME "cuda-emulator"
#define LIBNA_CUDA_IMPL emulated_cuda_impl
#else
#define LIBNA_CUDA_BACKEND cuda
#define LIBNA_CUDA_BACKEND_NAME "cuda"
#define LIBNA_CUDA_IMPL cuda_impl
#endif

// Whether this compilation holds the tensor-core (sm_80+) kernel bodies: the
// device pass for sm_80 and up, and the emulator (which decides at run time,
// from the emulated architecture, whether they run).
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(LIBNA_CUDA_EMULATOR)
#define LIBNA_TENSOR_CORES 1
#else
#define LIBNA_TENSOR_CORES 0
#endif

// A __shared__ variable `name` of type `...` (arrays included), one per
// block, 16-byte aligned (for 16-byte vector stores and ldmatrix rows):
// LIBNA_SHARED(tile, float[32][64]);
#if defined(LIBNA_CUDA_EMULATOR)
#define LIBNA_SHARED(name, ...) \
  auto& name = ::libna::emulator::shared<typename ::libna::emulator::Identity<__VA_ARGS__>::type>()
#else
#define LIBNA_SHARED(name, ...) \
  __shared__ alignas(16) typename ::libna::LIBNA_CUDA_IMPL::Identity<__VA_ARGS__>::type name
#endif

namespace libna::LIBNA_CUDA_IMPL {

template <typename T>
struct Identity {
  using type = T;
};

// kernel<<<grid, block, 0, stream>>>(args...); `name` names the kernel in
// the emulator's launch log and errors.
template <typename... Params, typename... Args>
void launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block,
            cudaStream_t stream, Args&&... args) {
#if defined(LIBNA_CUDA_EMULATOR)
  emulator::launch(name, grid, block, [&] { kernel(args...); });
  (void)stream;
#else
  (void)name;
  kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
#endif
}

// The 32 bits of a pair of 16-bit elements (__half2, __nv_bfloat162).
template <typename Pair>
__device__ __forceinline__ std::uint32_t bits32(const Pair& x) {
  static_assert(sizeof(Pair) == sizeof(std::uint32_t));
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

using tiling::kAxes;

// [B, *spatial(3), heads, dim] with element strides; padded axes have stride 0.
struct View {
  void* data;
  std::int64_t b, s[kAxes], h, d;

  __host__ __device__ std::int64_t row(std::int64_t batch, const std::int64_t* c, std::int64_t head) const {
    return batch * b + c[0] * s[0] + c[1] * s[1] + c[2] * s[2] + head * h;
  }
};

// rpb / drpb [heads, 2k-1 per axis].
struct BiasView {
  void* data;
  std::int64_t h, s[kAxes];
};

// The fused forward and backward kernels' parameters.
struct FusedParams {
  tiling::Plan plan;
  int heads, heads_kv, dim, dim_v;
  float scale;
  std::int64_t tokens;  // prod(spatial)
  View q, k, v, out, dout, dq, dk, dv;
  BiasView rpb;      // data null when absent
  View lse;          // [B, *spatial, heads] (d unused); data null when absent
  View dlse;         // backward: lse's gradient, like lse; data null when absent
  float* row_term;   // backward: D_i = dout_i . out_i - dlse_i, [B, heads, tokens]
  float* bias_grad;  // backward with rpb: float32 [heads, prod(2k-1)], zeroed
};

// The unfused kernels' parameters (views not used by an op are left empty).
struct UnfusedParams {
  AxisParams axes[kAxes];
  std::int64_t length[kAxes];
  std::int64_t batch, tokens, slots;
  int heads, heads_kv;
  int dim;  // head dim of q and k (qk, qk_backward) or of v (av, av_backward)
  View q, k, v, out, attn, dout, dattn, dq, dk, dv;
  BiasView rpb;
  float* bias_grad;  // qk_backward with drpb: float32 [heads, prod(2k-1)], zeroed
};

enum class UnfusedOp { qk, av, qk_backward, av_backward };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Element `offset` of a global buffer, through which the emulator checks
// bounds.
template <typename T>
__device__ __forceinline__ T* global_element(const void* base, std::int64_t offset, bool write) {
  T* p = static_cast<T*>(const_cast<void*>(base)) + offset;
#if defined(LIBNA_CUDA_EMULATOR)
  if (emulator::checks_enabled) emulator::check_global(p, sizeof(T), write);
#else
  (void)write;
#endif
  return p;
}

template <typename T>
__device__ __forceinline__ float load(const void* base, std::int64_t offset) {
  return to_float(*global_element<const T>(base, offset, false));
}
template <typename T>
__device__ __forceinline__ void store(void* base, std::int64_t offset, float x) {
  *global_element<T>(base, offset, true) = from_float<T>(x);
}

// The edges of softmax, as cpp/src/numeric.h defines them for every backend
// (README, "Non-finite values"): a query whose logits are all -inf attends to
// nothing (out 0, lse -inf, no gradient); a +inf logit gives lse +inf and a
// NaN output.
// max(a, b), NaN when either is (fmaxf returns the other): a row whose
// logits are all NaN must not pass for one whose keys are all masked.
__device__ __forceinline__ float max_or_nan(float a, float b) { return a > b || a != a ? a : b; }
// lse from the running maximum logit and sum = sum of exp(logit - shift),
// where shift is the maximum, or 0 while every logit is -inf.
__device__ __forceinline__ float softmax_lse(float max_logit, float sum) {
  if (max_logit == INFINITY) return INFINITY;
  return (max_logit == -INFINITY ? 0.f : max_logit) + logf(sum);
}
// The factor that normalises the weighted sum of values: 0 for a query that
// attends to nothing (a NaN sum stays NaN).
__device__ __forceinline__ float softmax_normaliser(float sum) { return sum == 0.f ? 0.f : 1.f / sum; }
// The lse a backward subtracts from a logit to get its probability: a query
// that attends to nothing (lse -inf) gets exp(-inf - +inf) = 0, not NaN.
__device__ __forceinline__ float backward_lse(float lse) { return lse == -INFINITY ? INFINITY : lse; }

// Full-axis coordinates of a token of the padded [L0, L1, L2] grid.
__host__ __device__ __forceinline__ void token_coords(std::int64_t token, const std::int64_t* length,
                                                      std::int64_t* c) {
  c[2] = token % length[2];
  token /= length[2];
  c[1] = token % length[1];
  c[0] = token / length[1];
}

// Row-major offset into the contiguous [prod(2k-1)] bias buffer of one head.
__host__ __device__ __forceinline__ std::int64_t bias_flat(const AxisParams& axis1,
                                                       const AxisParams& axis2, const int* r) {
  return (r[0] * (2 * axis1.kernel - 1) + r[1]) * (2 * axis2.kernel - 1) + r[2];
}
__host__ __device__ __forceinline__ std::int64_t bias_offset(const BiasView& v, const int* r) {
  return r[0] * v.s[0] + r[1] * v.s[1] + r[2] * v.s[2];
}

// Launchers, instantiated per element type: unfused.cu, and the generated
// fused_*.cu files.
template <typename T>
void launch_unfused(UnfusedOp op, const UnfusedParams& p, cudaStream_t stream);
// Stores the float32 [heads, prod(2k-1)] workspace into rpb-shaped `grad`.
template <typename T>
void launch_store_bias_grad(const float* acc, const BiasView& grad, const AxisParams* axes,
                            int heads, cudaStream_t stream);

// `bucket` is tiling::head_dim_bucket(max(dim, dim_v)).
template <typename T>
void launch_fused_forward(const FusedParams& p, int bucket, std::int64_t batch, cudaStream_t stream);
// The tensor-core forward (float16, bfloat16; buckets up to
// tiling::kTcMaxHeadDim; code for sm_80+ on the device): false, having
// launched nothing, where it does not apply (the caller then runs
// launch_fused_forward).
template <typename T>
bool launch_tc_forward(const FusedParams& p, int bucket, std::int64_t batch, cudaStream_t stream);
template <typename T>
void launch_fused_backward(const FusedParams& p, int bucket, std::int64_t batch,
                           cudaStream_t stream);
// The tensor-core backward (dq and dk/dv; same conditions and contract as
// launch_tc_forward, the caller then runs launch_fused_backward).
template <typename T>
bool launch_tc_backward(const FusedParams& p, int bucket, std::int64_t batch,
                        cudaStream_t stream);

}  // namespace libna::LIBNA_CUDA_IMPL
