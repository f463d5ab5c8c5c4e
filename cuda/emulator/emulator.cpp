// The host emulation of the CUDA execution model (see emulator.h): the
// block scheduler, barriers and warp exchanges, shared memory, global
// bounds, and the few runtime calls the backend makes (fibers in fibers.cpp,
// the matrix instructions in warp_matrix.cpp, their shared state in internal.h).
#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/thread_pool.h"
#include "internal.h"
#include "libna/na.h"
#include "numeric.h"

// ---- 16-bit floats ------------------------------------------------------------------
float __half2float(__half x) { return libna::detail::to_float(libna::detail::Half{x.bits}); }
__half __float2half_rn(float x) { return {libna::detail::to_half(x).bits}; }
float __bfloat162float(__nv_bfloat16 x) {
  return libna::detail::to_float(libna::detail::BFloat16{x.bits});
}
__nv_bfloat16 __float2bfloat16_rn(float x) { return {libna::detail::to_bfloat16(x).bits}; }

namespace libna::emulator {

bool checks_enabled = false;
thread_local Block* this_block = nullptr;

std::string describe(const Block& b, const Fiber* f) {
  std::ostringstream s;
  s << "block (" << b.block_idx.x << ", " << b.block_idx.y << ", " << b.block_idx.z << ")";
  if (f != nullptr) s << ", thread " << f->thread_idx.x << " (warp " << f->warp << ", lane " << f->lane << ")";
  return s.str();
}

namespace {

// ---- synchronisation -----------------------------------------------------------------
// Arrives at `barrier` and waits until all of its expected threads have;
// for the race detector, what each did before is ordered before what any
// does after.
void arrive_and_wait(Barrier& barrier, const char* where) {
  const char* sync;
  {
    Bookkeeping bookkeeping;
    sync = &barrier.sync[barrier.generation & 1];
  }
  release(sync);
  {
    Bookkeeping bookkeeping;
    Block& b = *this_block;
    Fiber& f = me();
    const std::uint64_t generation = barrier.generation;
    f.where = where;
    if (++barrier.arrived == barrier.expected) {
      barrier.arrived = 0;
      ++barrier.generation;
      if (b.checks) {  // checks: let the others go first, in a random order
        f.state = Fiber::State::ready;
        switch_to_scheduler(b, f);
      }
    } else {
      f.state = Fiber::State::waiting;
      f.waiting_on = &barrier;
      f.wait_generation = generation;
      switch_to_scheduler(b, f);
    }
  }
  acquire(sync);
}

void release_if_complete(Barrier& barrier) {
  if (barrier.arrived > 0 && barrier.arrived == barrier.expected) {
    barrier.arrived = 0;
    ++barrier.generation;
  }
}

// Runs the kernel as fiber f's thread; returns what stopped it, if anything.
std::string run_thread(Block& b, const Fiber& f) {
  try {
    b.body(b.context);
  } catch (const KernelError& e) {
    return e.message + " (" + describe(b, &f) + ")";
  } catch (const std::exception& e) {
    return std::string(e.what()) + " (" + describe(b, &f) + ")";
  } catch (...) {
    return "unknown exception (" + describe(b, &f) + ")";
  }
  return {};
}

}  // namespace

void fiber_main(void* arg) {
  Fiber& f = *static_cast<Fiber*>(arg);
  Block& b = [] () -> Block& {
    Bookkeeping bookkeeping;  // set by the scheduler
    return *this_block;
  }();
  asan_finish(nullptr, &b.scheduler_stack, &b.scheduler_stack_size);
  acquire(&b.body);  // the launch's arguments and the block's set-up
  {
    std::string error = run_thread(b, f);
    release(&b.fibers);  // what it wrote, for the scheduler and the host
    Bookkeeping bookkeeping;
    if (!error.empty() && b.error.empty()) b.error = std::move(error);
    f.state = Fiber::State::done;
    --b.live;
    --b.barrier.expected;
    release_if_complete(b.barrier);
    --b.warps[f.warp].live;
  }  // nothing of the fiber's frame outlives it: it is never resumed
  switch_to_scheduler(b, f);
  __builtin_trap();
}

namespace {

bool runnable(const Fiber& f) {
  switch (f.state) {
    case Fiber::State::ready: return true;
    case Fiber::State::waiting: return f.waiting_on->generation != f.wait_generation;
    case Fiber::State::done: return false;
  }
  return false;
}

std::string deadlock_report(const Block& b) {
  std::ostringstream s;
  s << "deadlock in " << describe(b, nullptr) << ": " << b.live << " of " << b.fibers.size()
    << " threads wait and none can go on;";
  int shown = 0;
  for (const Fiber& f : b.fibers) {
    if (f.state != Fiber::State::waiting) continue;
    if (shown++ < 4) s << " thread " << f.thread_idx.x << " at " << f.where << ";";
  }
  const auto finished = std::count_if(b.fibers.begin(), b.fibers.end(), [](const Fiber& f) {
    return f.state == Fiber::State::done;
  });
  s << " " << finished << " threads have returned (a barrier or warp operation that not every "
                          "thread of the block or warp reaches)";
  return s.str();
}

// Verifies the guard zones after each shared variable.
void check_shared_guards(Block& b) {
  for (std::size_t i = 0; i < b.shared.size(); ++i) {
    const SharedVariable& v = b.shared[i];
    const unsigned char* guard = b.arena.data() + v.offset + v.bytes;
#if defined(LIBNA_EMULATOR_ASAN)
    ASAN_UNPOISON_MEMORY_REGION(guard, kGuardBytes);
#endif
    for (std::size_t j = 0; j < kGuardBytes; ++j) {
      if (guard[j] != kGuardByte) {
        fail("out-of-bounds write to shared memory: byte " + std::to_string(v.bytes + j) +
             " of shared variable #" + std::to_string(i) + " (" + std::to_string(v.bytes) +
             " bytes) in " + describe(b, nullptr));
      }
    }
  }
}

void run_block(Block& b) {
  const unsigned threads = b.block_dim.x * b.block_dim.y * b.block_dim.z;
  b.fibers.resize(threads);
  b.warps.resize((threads + kWarpSize - 1) / kWarpSize);
  for (unsigned w = 0; w < b.warps.size(); ++w) {
    Warp& warp = b.warps[w];
    warp.live = static_cast<int>(std::min<unsigned>(kWarpSize, threads - w * kWarpSize));
    warp.barrier = Barrier{warp.live, 0, 0, {}};
  }
  b.barrier = Barrier{static_cast<int>(threads), 0, 0, {}};
  b.live = static_cast<int>(threads);
  b.shared.clear();
  b.arena_used = 0;
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = b.fibers[t];
    f.stack = fiber_stack(t);
    f.thread_idx = dim3(t % b.block_dim.x, (t / b.block_dim.x) % b.block_dim.y,
                        t / (b.block_dim.x * b.block_dim.y));
    f.warp = static_cast<int>(t / kWarpSize);
    f.lane = static_cast<int>(t % kWarpSize);
    f.state = Fiber::State::ready;
    f.shared_declarations = 0;
    f.where = "";
#if defined(LIBNA_EMULATOR_TSAN)
    if (f.tsan_fiber == nullptr) f.tsan_fiber = __tsan_create_fiber(0);
#endif
    prepare(f);
  }
  release(&b.body);  // the launch's arguments and the set-up, to the fibers
  std::vector<std::size_t> order(threads);
  for (unsigned t = 0; t < threads; ++t) order[t] = t;
  while (b.live > 0 && b.error.empty()) {
    if (b.checks) std::shuffle(order.begin(), order.end(), b.random);
    bool progressed = false;
    for (std::size_t t : order) {
      Fiber& f = b.fibers[t];
      if (!runnable(f)) continue;
      f.state = Fiber::State::ready;
      switch_to_fiber(b, f);
      progressed = true;
      if (!b.error.empty()) break;
    }
    if (!progressed && b.error.empty()) b.error = deadlock_report(b);
  }
  acquire(&b.fibers);  // what the block's threads did
  for (unsigned t = 0; t < threads; ++t) forget_frames(b.fibers[t]);
  if (b.error.empty()) {
    try {
      check_shared_guards(b);
    } catch (const KernelError& e) {
      b.error = e.message;
    }
  }
#if defined(LIBNA_EMULATOR_ASAN)
  ASAN_UNPOISON_MEMORY_REGION(b.arena.data(), b.arena.size());
#endif
}

// ---- global buffers -------------------------------------------------------------------
struct Range {
  std::uintptr_t begin, end;
};
std::mutex globals_mutex;
std::vector<Range> call_tensors;           // this call's (begin_call forgets them)
std::map<std::uintptr_t, std::size_t> workspaces;  // cudaMallocAsync'ed: begin -> bytes

bool inside(std::uintptr_t p, std::size_t bytes) {
  for (const Range& r : call_tensors) {
    if (p >= r.begin && p + bytes <= r.end) return true;
  }
  auto it = workspaces.upper_bound(p);
  if (it == workspaces.begin()) return false;
  --it;
  return p + bytes <= it->first + it->second;
}

std::atomic<unsigned> launches{0};
std::vector<std::string> launch_log;  // kernel names, until taken

}  // namespace

// ---- the kernel-side API ---------------------------------------------------------------
// The scheduler sets these up before the block's threads start (ordered
// before them for the race detector).
const dim3& thread_idx() { return me().thread_idx; }
const dim3& block_idx() { return this_block->block_idx; }
const dim3& block_dim() { return this_block->block_dim; }
const dim3& grid_dim() { return this_block->grid_dim; }
int lane_id() { return me().lane; }

void sync_block() { arrive_and_wait(this_block->barrier, "__syncthreads"); }

Warp& enter_warp_operation(unsigned mask, const char* what) {
  Bookkeeping bookkeeping;
  Block& b = *this_block;
  Fiber& f = me();
  Warp& w = b.warps[f.warp];
  if (mask != 0xffffffffu) {
    std::ostringstream s;
    s << what << " with mask 0x" << std::hex << mask
      << ": the emulator (and libna's kernels) use full-warp masks only";
    fail(s.str());
  }
  if (w.live != kWarpSize) {
    fail(std::string(what) + " while " + std::to_string(kWarpSize - w.live) +
         " lanes of the warp have returned (undefined on a GPU)");
  }
  return w;
}

const unsigned char* warp_exchange(unsigned mask, const void* deposit, std::size_t bytes) {
  Warp& w = enter_warp_operation(mask, "warp shuffle");
  int parity, lane;
  {
    Bookkeeping bookkeeping;
    parity = static_cast<int>(w.barrier.generation & 1);
    lane = me().lane;
  }
  // Each lane writes its own slot and, after the exchange, reads any lane's:
  // the barrier orders them (and the slots alternate, so that the next
  // exchange does not overwrite what a slower lane still reads).
  std::memcpy(w.slots[parity][lane], deposit, std::min(bytes, kSlotBytes));
  arrive_and_wait(w.barrier, "a warp shuffle");
  return &w.slots[parity][0][0];
}

float atomic_add(float* address, float value) {
  if (checks_enabled) check_global(address, sizeof(float), true);
  auto* word = reinterpret_cast<std::uint32_t*>(address);
  std::uint32_t expected = __atomic_load_n(word, __ATOMIC_RELAXED);
  for (;;) {
    float old;
    std::memcpy(&old, &expected, sizeof(old));
    const float sum = old + value;
    std::uint32_t desired;
    std::memcpy(&desired, &sum, sizeof(desired));
    if (__atomic_compare_exchange_n(word, &expected, desired, true, __ATOMIC_RELAXED,
                                    __ATOMIC_RELAXED)) {
      return old;
    }
  }
}

// The kernels use it on shared memory only (whose bounds the guard zones check).
unsigned atomic_or(unsigned* address, unsigned value) {
  return __atomic_fetch_or(address, value, __ATOMIC_RELAXED);
}

void check_global(const void* address, std::size_t bytes, bool write) {
  const auto p = reinterpret_cast<std::uintptr_t>(address);
  bool ok;
  {
    std::lock_guard<std::mutex> lock(globals_mutex);
    ok = inside(p, bytes);
  }
  if (!ok) {
    std::ostringstream s;
    s << "out-of-bounds global " << (write ? "write" : "read") << " of " << bytes
      << " bytes at " << address << ": not inside any tensor of the call or workspace";
    fail(s.str());
  }
}

void* shared_storage(std::size_t bytes, std::size_t alignment) {
  Bookkeeping bookkeeping;  // the arena's set-up is not the kernel's write
  Block& b = *this_block;
  Fiber& f = me();
  const std::size_t index = f.shared_declarations++;
  if (index < b.shared.size()) {
    if (b.shared[index].bytes != bytes) {
      fail("shared variable #" + std::to_string(index) + " declared with " +
           std::to_string(bytes) + " bytes, but another thread declared it with " +
           std::to_string(b.shared[index].bytes));
    }
    return b.arena.data() + b.shared[index].offset;
  }
  alignment = std::max<std::size_t>(alignment, 16);
  const std::size_t offset = (b.arena_used + alignment - 1) / alignment * alignment;
  const std::size_t end = offset + bytes + kGuardBytes;
  if (offset + bytes > kStaticSharedLimit) {
    fail("the block's static shared memory reaches " + std::to_string(offset + bytes) +
         " bytes, more than the 48 KiB a kernel may declare statically");
  }
  if (b.arena.size() < end) {
    // Variables are never moved once handed out: the arena holds the limit.
    b.arena.resize(kStaticSharedLimit + 16 * kGuardBytes);
  }
  std::memset(b.arena.data() + offset, kUninitialisedByte, bytes);
  std::memset(b.arena.data() + offset + bytes, kGuardByte, kGuardBytes);
#if defined(LIBNA_EMULATOR_ASAN)
  ASAN_POISON_MEMORY_REGION(b.arena.data() + offset + bytes, kGuardBytes);
#endif
  b.shared.push_back({offset, bytes});
  b.arena_used = end;
  return b.arena.data() + offset;
}

void begin_call() {
  std::lock_guard<std::mutex> lock(globals_mutex);
  call_tensors.clear();
}

void register_global(const void* lowest, const void* end) {
  std::lock_guard<std::mutex> lock(globals_mutex);
  call_tensors.push_back(
      {reinterpret_cast<std::uintptr_t>(lowest), reinterpret_cast<std::uintptr_t>(end)});
}

int architecture() { return cuda_emulator_arch(); }



void launch(const char* name, dim3 grid, dim3 block, void (*body)(void*), void* context) {
  {
    std::lock_guard<std::mutex> lock(globals_mutex);
    launch_log.push_back(name);
  }
  const std::int64_t blocks = static_cast<std::int64_t>(grid.x) * grid.y * grid.z;
  if (block.x * block.y * block.z == 0 || block.x * block.y * block.z > 1024) {
    throw std::runtime_error("[cuda emulator] invalid block size " + std::to_string(block.x) +
                             " x " + std::to_string(block.y) + " x " + std::to_string(block.z));
  }
  const bool checks = cuda_emulator_checks();
  checks_enabled = checks;
  const unsigned seed = launches.fetch_add(1);
  std::mutex error_mutex;
  std::string error;
  cpu::parallel_for(blocks, 1, [&](std::int64_t begin, std::int64_t end) {
    thread_local Block b;
    b.block_dim = block;
    b.grid_dim = grid;
    b.body = body;
    b.context = context;
    b.checks = checks;
    b.error.clear();
#if defined(LIBNA_EMULATOR_TSAN)
    if (b.scheduler_tsan_fiber == nullptr) b.scheduler_tsan_fiber = __tsan_get_current_fiber();
#endif
    this_block = &b;
    for (std::int64_t i = begin; i < end; ++i) {
      b.block_idx = dim3(static_cast<unsigned>(i % grid.x),
                         static_cast<unsigned>((i / grid.x) % grid.y),
                         static_cast<unsigned>(i / (static_cast<std::int64_t>(grid.x) * grid.y)));
      b.random.seed(seed * 1000003ull + static_cast<unsigned long long>(i));
      run_block(b);
      if (!b.error.empty()) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (error.empty()) error = b.error;
        break;
      }
    }
    this_block = nullptr;
  });
  checks_enabled = false;
  if (!error.empty()) throw std::runtime_error(std::string("[cuda emulator] ") + name + ": " + error);
}

}  // namespace libna::emulator

namespace libna::cuda_emulator {
std::vector<std::string> take_launch_log() {
  std::lock_guard<std::mutex> lock(emulator::globals_mutex);
  std::vector<std::string> log;
  log.swap(emulator::launch_log);
  return log;
}
}  // namespace libna::cuda_emulator

// ---- the runtime API ---------------------------------------------------------------------
const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
  }
  return "unknown error";
}

cudaError_t cudaMallocAsync(void** pointer, std::size_t bytes, cudaStream_t) {
  void* p = ::operator new(bytes, std::nothrow);
  if (p == nullptr) return cudaErrorMemoryAllocation;
  std::memset(p, libna::emulator::kUninitialisedByte, bytes);
  {
    std::lock_guard<std::mutex> lock(libna::emulator::globals_mutex);
    libna::emulator::workspaces[reinterpret_cast<std::uintptr_t>(p)] = bytes;
  }
  *pointer = p;
  return cudaSuccess;
}

cudaError_t cudaFreeAsync(void* pointer, cudaStream_t) {
  if (pointer == nullptr) return cudaSuccess;
  {
    std::lock_guard<std::mutex> lock(libna::emulator::globals_mutex);
    if (libna::emulator::workspaces.erase(reinterpret_cast<std::uintptr_t>(pointer)) == 0) {
      return cudaErrorInvalidValue;
    }
  }
  ::operator delete(pointer);
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* pointer, int value, std::size_t bytes, cudaStream_t) {
  std::memset(pointer, value, bytes);
  return cudaSuccess;
}
