// The CPU backend's worker threads.
#pragma once

#include <cstdint>
#include <functional>

namespace libna::cpu {

// Runs fn(begin, end) over chunks of [0, n) of at least `grain` items on the
// pool (the calling thread takes part). Exceptions thrown by fn are rethrown
// on the calling thread. A call made while the pool is busy (another thread's
// call, or a nested call from inside fn) runs serially instead of waiting.
void parallel_for(std::int64_t n, std::int64_t grain,
                  const std::function<void(std::int64_t, std::int64_t)>& fn);

}  // namespace libna::cpu
