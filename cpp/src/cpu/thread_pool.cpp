#include "thread_pool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif

#include "cpu/tuning.h"
#include "environment.h"
#include "libna/na.h"

namespace libna::cpu {
namespace {

int default_num_threads() { return environment().num_threads; }

// One job at a time: workers take chunks from an atomic counter; the caller
// joins in and then waits for the last chunk to finish.
class Pool {
 public:
  static Pool& instance() {
    static Pool* pool = new Pool();  // never destroyed: workers may outlive statics
    return *pool;
  }

  int num_threads() {
    std::lock_guard<std::mutex> lock(config_mutex_);
    return num_threads_;
  }

  void set_num_threads(int n) {
    std::lock_guard<std::mutex> job_lock(job_mutex_);
    std::lock_guard<std::mutex> lock(config_mutex_);
    stop_workers();
    num_threads_ = n;
  }

  void run(std::int64_t n, std::int64_t grain, RangeFn fn) {
    if (n <= 0) return;
    grain = std::max<std::int64_t>(grain, 1);
    std::unique_lock<std::mutex> job_lock(job_mutex_, std::try_to_lock);
    const int threads = num_threads();
    if (!job_lock.owns_lock() || threads <= 1 || n <= grain) {
      fn(0, n);
      return;
    }
    ensure_workers(threads - 1);
    const std::int64_t chunks = tuning::kChunksPerThread * threads;
    const std::int64_t chunk = std::max<std::int64_t>(grain, (n + chunks - 1) / chunks);
    {
      std::lock_guard<std::mutex> lock(state_mutex_);
      fn_ = &fn;
      total_ = n;
      chunk_ = chunk;
      next_.store(0);
      pending_chunks_ = (n + chunk - 1) / chunk;
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    work();
    std::unique_lock<std::mutex> lock(state_mutex_);
    done_.wait(lock, [&] { return pending_chunks_ == 0 && active_ == 0; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

  // After fork() only the forking thread exists in the child: forget the
  // parent's workers (without joining them) and any job they were running
  // (another thread's call, now gone with its thread: its chunks and its
  // active workers would otherwise be waited for forever), and start anew
  // on demand.
  void forget_workers_after_fork() {
    new (&config_mutex_) std::mutex();
    new (&job_mutex_) std::mutex();
    new (&state_mutex_) std::mutex();
    new (&wake_) std::condition_variable();
    new (&done_) std::condition_variable();
    // Their std::thread handles name threads that do not exist here: leak them.
    new std::vector<std::thread>(std::move(workers_));
    workers_.clear();
    stopping_ = false;
    fn_ = nullptr;
    total_ = 0;
    chunk_ = 1;
    pending_chunks_ = 0;
    active_ = 0;
    next_.store(0);
    new (&error_) std::exception_ptr();  // may hold the gone thread's exception: leak it
  }

 private:
  Pool() : num_threads_(default_num_threads()) {
#if defined(__linux__)
    pthread_atfork(nullptr, nullptr, [] { Pool::instance().forget_workers_after_fork(); });
#endif
  }

  void ensure_workers(int count) {
    if (static_cast<int>(workers_.size()) == count) return;
    stop_workers();
    std::uint64_t generation;
    {
      std::lock_guard<std::mutex> lock(state_mutex_);
      generation = generation_;
    }
    // A worker counts generations from its creation, not from whenever the
    // scheduler first runs it: a job or a stop announced in between is seen.
    for (int i = 0; i < count; ++i) {
      workers_.emplace_back([this, generation] { worker_loop(generation); });
    }
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lock(state_mutex_);
      stopping_ = true;
      ++generation_;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
    std::lock_guard<std::mutex> lock(state_mutex_);
    stopping_ = false;
  }

  void worker_loop(std::uint64_t seen) {
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(state_mutex_);
        wake_.wait(lock, [&] { return stopping_ || generation_ != seen; });
        seen = generation_;
        if (stopping_) return;
      }
      work();
    }
  }

  // Take chunks until none are left. The job stays alive until every thread
  // that entered here has left (active_), so that a late worker can never take
  // a chunk of the next job with the previous job's function.
  void work() {
    const RangeFn* fn;
    std::int64_t total, chunk;
    {
      std::lock_guard<std::mutex> lock(state_mutex_);
      fn = fn_;
      total = total_;
      chunk = chunk_;
      if (fn == nullptr) return;
      ++active_;
    }
    for (;;) {
      const std::int64_t begin = next_.fetch_add(chunk);
      if (begin >= total) {
        std::lock_guard<std::mutex> lock(state_mutex_);
        if (--active_ == 0 && pending_chunks_ == 0) done_.notify_all();
        return;
      }
      std::exception_ptr error;
      try {
        (*fn)(begin, std::min(total, begin + chunk));
      } catch (...) {
        error = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(state_mutex_);
      if (error && !error_) error_ = error;
      if (--pending_chunks_ == 0) done_.notify_all();
    }
  }

  std::mutex config_mutex_;  // guards num_threads_
  std::mutex job_mutex_;     // held by the thread whose job the pool runs
  std::mutex state_mutex_;   // guards the job description below
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  int num_threads_;
  bool stopping_ = false;
  std::uint64_t generation_ = 0;
  const RangeFn* fn_ = nullptr;
  std::int64_t total_ = 0, chunk_ = 1, pending_chunks_ = 0;
  int active_ = 0;
  std::atomic<std::int64_t> next_{0};
  std::exception_ptr error_;
};

}  // namespace

void parallel_for(std::int64_t n, std::int64_t grain, RangeFn fn) {
  Pool::instance().run(n, grain, fn);
}

}  // namespace libna::cpu

namespace libna {

void set_num_threads(int num_threads) {
  if (num_threads < 1 || num_threads > kMaxNumThreads) {
    throw std::invalid_argument("[set_num_threads] num_threads=" + std::to_string(num_threads) +
                                " must be between 1 and " + std::to_string(kMaxNumThreads));
  }
  cpu::Pool::instance().set_num_threads(num_threads);
}

int get_num_threads() { return cpu::Pool::instance().num_threads(); }

}  // namespace libna
