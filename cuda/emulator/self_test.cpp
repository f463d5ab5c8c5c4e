// Small kernels with known answers, and kernels with known races, written in
// the dialect of cuda/*.cuh (threadIdx, __syncthreads, shared arrays,
// __shfl_xor_sync): the emulator's own tests of its execution model and, in
// a ThreadSanitizer build, of its race detection (a racy kernel must be
// reported, a correct one must not). na.h's cuda_emulator_self_test runs one.
#include <stdexcept>
#include <string>
#include <vector>

#include "backend.h"
#include "emulator.h"

namespace libna::cuda_emulator {
namespace {

using emulator::launch;
using emulator::shared;

constexpr unsigned kBlocks = 2;
constexpr unsigned kThreads = 64;  // two warps

// s[t] = t + 1, then each thread reads its neighbour's s[(t + 1) % 64].
// `synced`: with the barrier that makes the neighbour's write visible;
// without it the read races the write (and, threads running in order until a
// barrier, thread 0 reads the uninitialised NaN of s[1]).
void neighbour_read(float* out, bool synced) {
  auto& s = shared<float[kThreads]>();
  const unsigned t = threadIdx.x;
  s[t] = static_cast<float>(t + 1);
  if (synced) __syncthreads();
  out[blockIdx.x * kThreads + t] = s[(t + 1) % kThreads];
}

// As neighbour_read, then each thread overwrites its own s[t] with twice
// what it read, and after a second barrier returns s[t]. `synced`: a barrier
// between the reads and the overwrites; without it a thread's overwrite
// races its neighbour's read (write after read), which a detector that let a
// slow thread acquire what a fast one did after the first barrier would miss.
void overwrite_after_read(float* out, bool synced) {
  auto& s = shared<float[kThreads]>();
  const unsigned t = threadIdx.x;
  s[t] = static_cast<float>(t + 1);
  __syncthreads();
  const float neighbour = s[(t + 1) % kThreads];
  if (synced) __syncthreads();
  s[t] = 2.f * neighbour;
  __syncthreads();
  out[blockIdx.x * kThreads + t] = s[t];
}

// The sum over the warp's lanes of lane + 1 by a butterfly of shuffles.
void warp_sum(float* out) {
  float x = static_cast<float>(threadIdx.x % 32 + 1);
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  out[blockIdx.x * kThreads + threadIdx.x] = x;
}

// Every thread adds 1 to out[0] with atomicAdd (correct) or with a plain
// read-modify-write (a race on global memory).
void count(float* out, bool atomic) {
  if (atomic) {
    atomicAdd(out, 1.f);
  } else {
    out[0] += 1.f;
  }
}

const std::vector<std::string>& self_test_names() {
  static const std::vector<std::string> names = {
      "neighbour_read", "neighbour_read_racy", "overwrite_after_read", "overwrite_after_read_racy",
      "warp_sum",       "atomic_count",        "count_racy"};
  return names;
}

}  // namespace

std::vector<float> self_test(const std::string& kernel) {
  std::vector<float> out(kBlocks * kThreads, 0.f);
  float* o = out.data();
  emulator::begin_call();
  emulator::register_global(o, o + out.size());
  const dim3 grid(kBlocks), block(kThreads);
  const std::string name = "self_test_" + kernel;
  if (kernel == "neighbour_read" || kernel == "neighbour_read_racy") {
    launch(name.c_str(), grid, block, [&] { neighbour_read(o, kernel == "neighbour_read"); });
  } else if (kernel == "overwrite_after_read" || kernel == "overwrite_after_read_racy") {
    launch(name.c_str(), grid, block,
           [&] { overwrite_after_read(o, kernel == "overwrite_after_read"); });
  } else if (kernel == "warp_sum") {
    launch(name.c_str(), grid, block, [&] { warp_sum(o); });
  } else if (kernel == "atomic_count" || kernel == "count_racy") {
    launch(name.c_str(), dim3(1), block, [&] { count(o, kernel == "atomic_count"); });
    out.resize(1);
  } else {
    std::string names;
    for (const std::string& n : self_test_names()) names += (names.empty() ? "" : ", ") + n;
    throw std::invalid_argument("[cuda_emulator_self_test] kernel='" + kernel +
                                "' is not a self-test kernel; expected one of " + names);
  }
  return out;
}

}  // namespace libna::cuda_emulator
