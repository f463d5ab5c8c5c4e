// Memory a thread keeps between calls: a fresh allocation each call would be
// mapped (and page-faulted) anew.
// Included inside the per-instruction-set namespace and target region of
// fast_kernels_impl.h (LIBNA_SIMD_NS), like every header of the vectorised
// kernels.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace libna::cpu::LIBNA_SIMD_NS {

// Scratch memory of the calling thread, kept between calls: a fresh
// allocation of this size would be mapped (and page-faulted) anew each call.
inline float* workspace(std::int64_t size) {
  thread_local std::vector<float> buffer;
  if (static_cast<std::int64_t>(buffer.size()) < size) {
    buffer = std::vector<float>();  // release first: never hold both
    buffer.resize(size);
  }
  return buffer.data();
}

// Uninitialised float memory owned by one thread's scratch, grown on demand
// and kept between calls (for the same reason as workspace()).
class GrowingBuffer {
 public:
  float* reserve(std::int64_t size) {
    if (size > size_) {
      data_.reset();  // release first: never hold both
      data_.reset(new float[size]);
      size_ = size;
    }
    return data_.get();
  }

 private:
  std::unique_ptr<float[]> data_;
  std::int64_t size_ = 0;
};

// The calling thread's Scratch of one type, kept across calls (its row caches
// stay allocated) and shared by every loop that runs on that type.
template <typename Scratch>
Scratch& thread_scratch() {
  thread_local Scratch scratch;
  return scratch;
}

}  // namespace libna::cpu::LIBNA_SIMD_NS
