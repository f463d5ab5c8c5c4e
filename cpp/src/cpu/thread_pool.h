// The CPU backend's worker threads.
#pragma once

#include <cstdint>
#include <type_traits>

namespace libna::cpu {

// A reference to a callable fn(begin, end) that lives for the whole call it
// is passed to, as parallel_for's loop body does on its caller's stack (a
// std::function would copy a capturing lambda to the heap on every call).
class RangeFn {
 public:
  template <typename Fn, typename = std::enable_if_t<!std::is_same_v<std::decay_t<Fn>, RangeFn>>>
  RangeFn(const Fn& fn)  // NOLINT(google-explicit-constructor): lambdas convert implicitly
      : fn_(&fn), call_([](const void* f, std::int64_t begin, std::int64_t end) {
          (*static_cast<const Fn*>(f))(begin, end);
        }) {}
  void operator()(std::int64_t begin, std::int64_t end) const { call_(fn_, begin, end); }

 private:
  const void* fn_;
  void (*call_)(const void* fn, std::int64_t begin, std::int64_t end);
};

// Runs fn(begin, end) over chunks of [0, n) of at least `grain` items on the
// pool (the calling thread takes part). Exceptions thrown by fn are rethrown
// on the calling thread. A call made while the pool is busy (another thread's
// call, or a nested call from inside fn) runs serially instead of waiting.
void parallel_for(std::int64_t n, std::int64_t grain, RangeFn fn);

}  // namespace libna::cpu
