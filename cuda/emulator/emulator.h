// The CUDA execution model on the host, enough for libna's kernels (cuda/)
// and no more: the kernels' own source, compiled by the host compiler with
// LIBNA_CUDA_EMULATOR, against this header (which cuda_runtime.h,
// cuda_fp16.h and cuda_bf16.h in this directory stand for).
//
//   - A launch runs every block of the grid; the threads of a block are
//     fibers on one OS thread (blocks spread over libna's CPU thread pool),
//     switched only at synchronisation points: __syncthreads is a real
//     barrier of the block's live threads (threads that have returned no
//     longer count, as on Volta and later), and a warp operation (shuffle,
//     mma.sync, ldmatrix) is an exchange among the 32 threads of its warp.
//   - __shared__ variables (LIBNA_SHARED in common.cuh) are allocated per
//     block from an arena, filled with NaN bytes (uninitialised shared memory
//     is garbage on a GPU), each followed by a guard zone that is checked
//     when the block ends (and poisoned under AddressSanitizer).
//   - mma.sync m16n8k16 (f16/bf16 in, f32 accumulate) and ldmatrix.x4
//     (.trans) exchange the warp's registers by the PTX ISA's fragment
//     layouts, written here from the ISA independently of
//     cuda/mma_layout.h (which the kernels use), so that a fragment index
//     the kernels get wrong gives wrong numbers.
//   - Checks (set_cuda_emulator(arch, checks=true)): the threads of a block
//     run in a random order between synchronisation points, so a missing
//     barrier changes results; global loads and stores (common.cuh's
//     load/store, atomicAdd) must fall inside a tensor of the call or a
//     workspace; ldmatrix rows must lie inside a shared variable.
//   - Race detection (a ThreadSanitizer build): each thread is a fiber the
//     detector tells apart, ordered with the others only by barriers, warp
//     operations and atomics, so that an unordered conflicting access to
//     shared or global memory is reported as a data race (emulator.cpp).
// Errors (a bounds violation, a deadlock such as a __syncthreads some
// threads never reach, a warp operation with exited lanes) stop the launch
// and throw std::runtime_error naming the kernel's block and thread.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if !defined(LIBNA_CUDA_EMULATOR)
#error "cuda/emulator/emulator.h is for LIBNA_CUDA_EMULATOR builds only"
#endif

// ---- the CUDA language ------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

// 16-bit floats: storage only; arithmetic goes through float, as the kernels do.
struct __half {
  std::uint16_t bits;
};
struct __nv_bfloat16 {
  std::uint16_t bits;
};
struct __half2 {
  __half x, y;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

float __half2float(__half x);
__half __float2half_rn(float x);
float __bfloat162float(__nv_bfloat16 x);
__nv_bfloat16 __float2bfloat16_rn(float x);
inline __half2 __floats2half2_rn(float lo, float hi) {
  return {__float2half_rn(lo), __float2half_rn(hi)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}

namespace libna::emulator {

template <typename T>
struct Identity {
  using type = T;
};

// The calling thread's indices (valid inside a kernel).
const dim3& thread_idx();
const dim3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

void sync_block();
// One exchange among the 32 threads of the caller's warp: each deposits
// `bytes` (at most 64) and, once all have, reads any lane's deposit through
// the returned pointer (lane-major, 64 bytes apart), valid until the warp's
// next exchange.
const unsigned char* warp_exchange(unsigned mask, const void* deposit, std::size_t bytes);
int lane_id();

template <typename T>
T shfl_xor(unsigned mask, T x, int offset) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  const unsigned char* all = warp_exchange(mask, &x, sizeof(T));
  T y;
  std::memcpy(&y, all + 64 * (lane_id() ^ (offset & 31)), sizeof(T));
  return y;
}

float atomic_add(float* address, float value);
unsigned atomic_or(unsigned* address, unsigned value);

// Global accesses: checked against the call's tensors and workspaces when
// checks are on.
void check_global(const void* address, std::size_t bytes, bool write);
extern bool checks_enabled;  // set for the duration of a checked launch

// __shared__ storage of the calling block: the caller's n-th LIBNA_SHARED
// declaration maps to the block's n-th variable.
void* shared_storage(std::size_t bytes, std::size_t alignment);
template <typename T>
T& shared() {
  static_assert(std::is_trivially_default_constructible_v<T> &&
                std::is_trivially_destructible_v<T>);
  return *static_cast<T*>(shared_storage(sizeof(T), alignof(T)));
}

enum class Operand { f16, bf16 };
// d (four f32 accumulators of the calling lane) += A B, m16n8k16, the lane's
// A and B fragments in a (four registers) and b (two).
void mma_m16n8k16(Operand type, float* d, const std::uint32_t* a, const std::uint32_t* b);
template <Operand Type>
void mma_m16n8k16(float* d, const std::uint32_t* a, const std::uint32_t* b) {
  mma_m16n8k16(Type, d, a, b);
}
// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16 with the lane's row address.
void ldmatrix_x4(std::uint32_t* r, const void* row, bool trans);

// Runs body() as every thread of every block of the grid of kernel `name`.
void launch(const char* name, dim3 grid, dim3 block, void (*body)(void*), void* context);
template <typename Body>
void launch(const char* name, dim3 grid, dim3 block, Body&& body) {
  launch(name, grid, block,
         [](void* f) { (*static_cast<std::remove_reference_t<Body>*>(f))(); },
         const_cast<void*>(static_cast<const void*>(&body)));
}

// The tensors of the current call (backend.cu registers each view it makes),
// for the bounds checks; begin_call forgets the previous call's.
void begin_call();
void register_global(const void* lowest, const void* end);

// The compute capability the emulator presents (set_cuda_emulator's arch).
int architecture();

}  // namespace libna::emulator

#define threadIdx (::libna::emulator::thread_idx())
#define blockIdx (::libna::emulator::block_idx())
#define blockDim (::libna::emulator::block_dim())
#define gridDim (::libna::emulator::grid_dim())

inline void __syncthreads() { ::libna::emulator::sync_block(); }
template <typename T>
T __shfl_xor_sync(unsigned mask, T x, int offset) {
  return ::libna::emulator::shfl_xor(mask, x, offset);
}
inline float atomicAdd(float* address, float value) {
  return ::libna::emulator::atomic_add(address, value);
}
inline unsigned atomicOr(unsigned* address, unsigned value) {
  return ::libna::emulator::atomic_or(address, value);
}

// ---- the runtime API ----------------------------------------------------------------
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2 };
struct CUstream_st;
using cudaStream_t = CUstream_st*;

struct cudaFuncAttributes {
  int binaryVersion;
  int ptxVersion;
};

const char* cudaGetErrorString(cudaError_t error);
inline cudaError_t cudaGetLastError() { return cudaSuccess; }  // launches throw instead
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
// Workspaces: host memory, registered for the bounds checks while allocated.
cudaError_t cudaMallocAsync(void** pointer, std::size_t bytes, cudaStream_t stream);
cudaError_t cudaFreeAsync(void* pointer, cudaStream_t stream);
cudaError_t cudaMemsetAsync(void* pointer, int value, std::size_t bytes, cudaStream_t stream);
// Every kernel has code for the emulated architecture.
template <typename Kernel>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, Kernel) {
  attributes->binaryVersion = attributes->ptxVersion = ::libna::emulator::architecture();
  return cudaSuccess;
}
