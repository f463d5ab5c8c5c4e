// Host memory for outputs, with a cache of large freed blocks (na.h,
// host_allocate): a fresh block of megabytes costs a page fault per page on
// first touch, which a kept block of the same size does not.
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <new>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

#include "cpu/environment.h"
#include "cpu/tuning.h"
#include "libna/na.h"

namespace libna {
namespace {

constexpr std::size_t kAlignment = 64;
constexpr std::size_t kGranule = std::size_t{64} << 10;

// What a request of `bytes` allocates: cached sizes are rounded up, so that
// requests a few bytes apart share blocks.
std::size_t block_size(std::size_t bytes) {
  if (bytes < cpu::tuning::kHostCachedFrom) return bytes == 0 ? 1 : bytes;
  return (bytes + kGranule - 1) / kGranule * kGranule;
}

void* new_block(std::size_t size) { return ::operator new(size, std::align_val_t{kAlignment}); }
void delete_block(void* data) { ::operator delete(data, std::align_val_t{kAlignment}); }

struct Block {
  void* data;
  std::size_t size;
};

class HostCache;
HostCache& cache();

class HostCache {
 public:
  HostCache() {
#if defined(__unix__) || defined(__APPLE__)
    // fork() copies the cache with its lock; a child forked while another
    // thread held it would wait on it forever. The forking thread takes it
    // around fork(), so that no other thread is inside, and both sides let
    // it go.
    pthread_atfork([] { cache().mutex_.lock(); }, [] { cache().mutex_.unlock(); },
                   [] { cache().mutex_.unlock(); });
#endif
  }

  void* take(std::size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = kept_.rbegin(); it != kept_.rend(); ++it) {  // the most recent first
      if (it->size != size) continue;
      void* data = it->data;
      bytes_ -= size;
      kept_.erase(std::next(it).base());
      ++reused_;
      return data;
    }
    return nullptr;
  }

  // Keeps the block, dropping the oldest kept ones to stay within the limit;
  // false (the caller frees it) when the block alone exceeds the limit.
  bool keep(void* data, std::size_t size) {
    const auto limit = static_cast<std::size_t>(cpu::environment().host_cache_bytes);
    if (size > limit) return false;
    std::deque<Block> dropped;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (bytes_ + size > limit) {
        dropped.push_back(kept_.front());
        bytes_ -= kept_.front().size;
        kept_.pop_front();
      }
      kept_.push_back({data, size});
      bytes_ += size;
    }
    for (const Block& b : dropped) delete_block(b.data);  // outside the lock
    return true;
  }

  void empty() {
    std::deque<Block> dropped;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      dropped.swap(kept_);
      bytes_ = 0;
    }
    for (const Block& b : dropped) delete_block(b.data);
  }

  HostCacheInfo info() {
    HostCacheInfo result;
    result.limit = static_cast<std::size_t>(cpu::environment().host_cache_bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    result.blocks = kept_.size();
    result.bytes = bytes_;
    result.reused = reused_;
    return result;
  }

 private:
  std::mutex mutex_;
  std::deque<Block> kept_;  // the oldest first
  std::size_t bytes_ = 0;
  std::uint64_t reused_ = 0;
};

// Never destroyed: blocks may be freed by other libraries' destructors at exit
// (a framework's tensors), after this file's statics would be gone.
HostCache& cache() {
  static HostCache* const instance = new HostCache;
  return *instance;
}

}  // namespace

void* host_allocate(std::size_t bytes) {
  const std::size_t size = block_size(bytes);
  if (size >= cpu::tuning::kHostCachedFrom) {
    if (void* data = cache().take(size)) return data;
  }
  return new_block(size);
}

void host_free(void* data, std::size_t bytes) noexcept {
  if (data == nullptr) return;
  const std::size_t size = block_size(bytes);
  try {
    if (size >= cpu::tuning::kHostCachedFrom && cache().keep(data, size)) return;
  } catch (...) {  // (the limit's first read, or the queue, out of memory): free it
  }
  delete_block(data);
}

HostCacheInfo host_cache_info() { return cache().info(); }

void empty_host_cache() { cache().empty(); }

}  // namespace libna
