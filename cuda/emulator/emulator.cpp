// The host emulation of the CUDA execution model (see emulator.h): fibers,
// the block scheduler, barriers and warp exchanges, shared memory, the
// warp-level matrix instructions, and the few runtime calls the backend makes.
#include "emulator.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/thread_pool.h"
#include "backend.h"
#include "libna/na.h"
#include "numeric.h"

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define LIBNA_EMULATOR_ASAN 1
#endif
#if __has_feature(thread_sanitizer)
#define LIBNA_EMULATOR_TSAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define LIBNA_EMULATOR_ASAN 1
#endif
#if defined(__SANITIZE_THREAD__)
#define LIBNA_EMULATOR_TSAN 1
#endif
#if defined(LIBNA_EMULATOR_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if defined(LIBNA_EMULATOR_TSAN)
#include <sanitizer/tsan_interface.h>
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

// ---- 16-bit floats ------------------------------------------------------------------
float __half2float(__half x) { return libna::detail::to_float(libna::detail::Half{x.bits}); }
__half __float2half_rn(float x) { return {libna::detail::to_half(x).bits}; }
float __bfloat162float(__nv_bfloat16 x) {
  return libna::detail::to_float(libna::detail::BFloat16{x.bits});
}
__nv_bfloat16 __float2bfloat16_rn(float x) { return {libna::detail::to_bfloat16(x).bits}; }

// ---- fibers ---------------------------------------------------------------------------
// A fiber's context is its saved stack pointer; switch_stack saves the
// callee-saved registers (and the SSE/x87 control words) on the current
// stack, stores its pointer in *from and resumes the stack at `to`. A new
// fiber's stack is laid out as if it had switched away just before entering
// fiber_start, which calls entry(arg) with r13 = entry and r12 = arg.
#if defined(__x86_64__)
extern "C" void libna_emulator_switch(void** from, void* to);
extern "C" void libna_emulator_start();
asm(R"(
.text
.globl libna_emulator_switch
.hidden libna_emulator_switch
.type libna_emulator_switch,@function
libna_emulator_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size libna_emulator_switch,.-libna_emulator_switch

.globl libna_emulator_start
.hidden libna_emulator_start
.type libna_emulator_start,@function
libna_emulator_start:
  movq %r12, %rdi
  callq *%r13
  ud2
.size libna_emulator_start,.-libna_emulator_start
.section .note.GNU-stack,"",@progbits
.text
)");
#endif

namespace libna::emulator {

bool checks_enabled = false;

namespace {

constexpr int kWarpSize = 32;
constexpr std::size_t kSlotBytes = 64;        // per lane per warp exchange
constexpr std::size_t kStaticSharedLimit = 48 * 1024;  // static __shared__ per block
constexpr std::size_t kGuardBytes = 64;       // after each shared variable
constexpr unsigned char kGuardByte = 0xa5;
constexpr unsigned char kUninitialisedByte = 0xff;  // NaN in every float type
#if defined(LIBNA_EMULATOR_ASAN) || defined(LIBNA_EMULATOR_TSAN)
constexpr std::size_t kStackBytes = 1024 * 1024;
#else
constexpr std::size_t kStackBytes = 256 * 1024;
#endif

struct Block;

struct Barrier {
  int expected = 0, arrived = 0;
  std::uint64_t generation = 0;
  // ThreadSanitizer: what the threads did before generation g's arrival is
  // released to (and acquired from) sync[g % 2], so that a thread still
  // leaving generation g does not acquire what a faster one did after it.
  char sync[2];
};

// Race detection (a build with -fsanitize=thread, LIBNA_SANITIZE=thread):
// ThreadSanitizer sees each emulated thread as a fiber of its own and the
// block scheduler as another, switched between without synchronisation
// (__tsan_switch_to_fiber_no_sync), so that the kernel's accesses are
// ordered only by what orders them on a GPU: a barrier (__syncthreads, a
// warp operation) or an atomic. An access to shared or global memory by one
// thread that another thread's access (one of them a write) does not
// happen-before or after is reported as a data race, as compute-sanitizer's
// racecheck would. The emulator's own state (scheduling, barrier counts, the
// shared-memory arena's set-up, the warp's matrix product) is shared between
// the fibers by construction, one OS thread running them in turn: Bookkeeping
// hides it from the detector.
#if defined(LIBNA_EMULATOR_TSAN)
extern "C" void AnnotateIgnoreReadsBegin(const char* file, int line);
extern "C" void AnnotateIgnoreReadsEnd(const char* file, int line);
extern "C" void AnnotateIgnoreWritesBegin(const char* file, int line);
extern "C" void AnnotateIgnoreWritesEnd(const char* file, int line);
struct Bookkeeping {
  Bookkeeping() {
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  }
  ~Bookkeeping() {
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
  }
  Bookkeeping(const Bookkeeping&) = delete;
  Bookkeeping& operator=(const Bookkeeping&) = delete;
};
void release(const void* sync) { __tsan_release(const_cast<void*>(sync)); }
void acquire(const void* sync) { __tsan_acquire(const_cast<void*>(sync)); }
#else
struct Bookkeeping {
  Bookkeeping() {}  // user-provided: a guard variable is never "unused"
};
void release(const void*) {}
void acquire(const void*) {}
#endif

struct Fiber {
  void* stack = nullptr;  // mmap'ed, the lowest page a guard
  void* sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t context;
#endif
#if defined(LIBNA_EMULATOR_TSAN)
  void* tsan_fiber = nullptr;
#endif
  dim3 thread_idx;
  int warp = 0, lane = 0;
  enum class State { ready, waiting, done } state = State::ready;
  const Barrier* waiting_on = nullptr;
  std::uint64_t wait_generation = 0;
  std::size_t shared_declarations = 0;  // LIBNA_SHARED declarations passed
  void* fake_stack = nullptr;           // AddressSanitizer's, while switched away
  const char* where = "";               // the synchronisation point it waits at
};

struct Warp {
  Barrier barrier;
  int live = kWarpSize;
  alignas(16) unsigned char slots[2][kWarpSize][kSlotBytes];
  bool computed[2] = {false, false};  // mma: the warp's product, done once
  float product[2][kWarpSize][4];
};

struct SharedVariable {
  std::size_t offset, bytes;
};

// One OS thread's emulated blocks, one at a time.
struct Block {
  dim3 block_idx, block_dim, grid_dim;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  Barrier barrier;
  int live = 0;
  std::vector<unsigned char> arena;
  std::vector<SharedVariable> shared;
  std::size_t arena_used = 0;
  void (*body)(void*) = nullptr;
  void* context = nullptr;
  std::string error;
  bool checks = false;
  std::mt19937_64 random;
  void* scheduler_sp = nullptr;
  const void* scheduler_stack = nullptr;  // AddressSanitizer: the OS thread's stack
  std::size_t scheduler_stack_size = 0;
#if !defined(__x86_64__)
  ucontext_t scheduler_context;
#endif
#if defined(LIBNA_EMULATOR_TSAN)
  void* scheduler_tsan_fiber = nullptr;
#endif
  Fiber* current = nullptr;
};

thread_local Block* this_block = nullptr;

Fiber& me() {
  Bookkeeping bookkeeping;  // the scheduler sets `current` at each switch
  return *this_block->current;
}

std::string describe(const Block& b, const Fiber* f) {
  std::ostringstream s;
  s << "block (" << b.block_idx.x << ", " << b.block_idx.y << ", " << b.block_idx.z << ")";
  if (f != nullptr) s << ", thread " << f->thread_idx.x << " (warp " << f->warp << ", lane " << f->lane << ")";
  return s.str();
}

// A kernel error: stops the launch (the scheduler abandons the block).
struct KernelError {
  std::string message;
};
[[noreturn]] void fail(const std::string& message) {
  throw KernelError{message};
}

// ---- switching ----------------------------------------------------------------------
void* allocate_stack() {
  const long page = sysconf(_SC_PAGESIZE);
  void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  mprotect(p, static_cast<std::size_t>(page), PROT_NONE);  // overflow faults, never corrupts
  return p;
}

// Stacks are kept per OS thread and reused by every block it runs.
struct StackPool {
  std::vector<void*> stacks;
  ~StackPool() {
    for (void* s : stacks) munmap(s, kStackBytes);
  }
  void* get(std::size_t i) {
    while (stacks.size() <= i) stacks.push_back(allocate_stack());
    return stacks[i];
  }
};
thread_local StackPool stack_pool;

void fiber_main(void* arg);

// AddressSanitizer follows the switches between stacks through these
// annotations: each side starts a switch naming the stack it goes to, and
// finishes it on arrival (learning the scheduler's stack on a fiber's side).
void asan_start(void** fake_stack, const void* bottom, std::size_t size) {
#if defined(LIBNA_EMULATOR_ASAN)
  __sanitizer_start_switch_fiber(fake_stack, bottom, size);
#else
  (void)fake_stack, (void)bottom, (void)size;
#endif
}
void asan_finish(void* fake_stack, const void** bottom, std::size_t* size) {
#if defined(LIBNA_EMULATOR_ASAN)
  __sanitizer_finish_switch_fiber(fake_stack, bottom, size);
#else
  (void)fake_stack, (void)bottom, (void)size;
#endif
}

// From the scheduler to fiber f.
void switch_to_fiber(Block& b, Fiber& f) {
  b.current = &f;
  void* fake_stack = nullptr;
  asan_start(&fake_stack, f.stack, kStackBytes);
  // Read as the scheduler (which wrote it), before the race detector sees f run.
  void* const sp = f.sp;
#if defined(LIBNA_EMULATOR_TSAN)
  __tsan_switch_to_fiber(f.tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(__x86_64__)
  libna_emulator_switch(&b.scheduler_sp, sp);
#else
  swapcontext(&b.scheduler_context, &f.context);
#endif
  asan_finish(fake_stack, nullptr, nullptr);
  b.current = nullptr;
}

// From fiber f back to the scheduler (for good when f is done).
void switch_to_scheduler(Block& b, Fiber& f) {
  asan_start(f.state == Fiber::State::done ? nullptr : &f.fake_stack, b.scheduler_stack,
             b.scheduler_stack_size);
#if defined(LIBNA_EMULATOR_TSAN)
  __tsan_switch_to_fiber(b.scheduler_tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(__x86_64__)
  libna_emulator_switch(&f.sp, b.scheduler_sp);
#else
  swapcontext(&f.context, &b.scheduler_context);
#endif
  asan_finish(f.fake_stack, &b.scheduler_stack, &b.scheduler_stack_size);
}

#if !defined(__x86_64__)
void fiber_trampoline(unsigned hi, unsigned lo) {
  fiber_main(reinterpret_cast<void*>((static_cast<std::uintptr_t>(hi) << 32) | lo));
}
#endif

// Sets f up to start in fiber_main(&f) when first switched to.
void prepare(Fiber& f) {
#if defined(__x86_64__)
  auto top = reinterpret_cast<std::uintptr_t>(f.stack) + kStackBytes;
  top &= ~static_cast<std::uintptr_t>(15);
  auto* frame = reinterpret_cast<std::uint64_t*>(top) - 8;
  std::uint32_t control[2] = {0, 0};
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(control[0]), "=m"(control[1]));
  std::memcpy(&frame[0], control, sizeof(control));                    // mxcsr, x87 cw
  frame[1] = 0;                                                         // r15
  frame[2] = 0;                                                         // r14
  frame[3] = reinterpret_cast<std::uint64_t>(&fiber_main);              // r13
  frame[4] = reinterpret_cast<std::uint64_t>(&f);                       // r12
  frame[5] = 0;                                                         // rbx
  frame[6] = 0;                                                         // rbp
  frame[7] = reinterpret_cast<std::uint64_t>(&libna_emulator_start);    // return address
  f.sp = frame;
#else
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack;
  f.context.uc_stack.ss_size = kStackBytes;
  f.context.uc_link = nullptr;
  const auto p = reinterpret_cast<std::uintptr_t>(&f);
  makecontext(&f.context, reinterpret_cast<void (*)()>(&fiber_trampoline), 2,
              static_cast<unsigned>(p >> 32), static_cast<unsigned>(p & 0xffffffffu));
#endif
}

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
    f.stack = stack_pool.get(t);
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

namespace {
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
}  // namespace

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

namespace {

// The register half `half` (0: low) of a 32-bit register as float.
float element(Operand type, std::uint32_t reg, int half) {
  const auto bits = static_cast<std::uint16_t>(half ? reg >> 16 : reg & 0xffffu);
  return type == Operand::f16 ? __half2float(__half{bits}) : __bfloat162float(__nv_bfloat16{bits});
}

struct MmaDeposit {
  std::uint32_t a[4], b[2];
};

}  // namespace

// PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type":
// groupID = lane / 4, threadID_in_group = lane % 4.
//   A (16 x 16): a0..a7 in four registers, low half first; row groupID for
//     a0, a1, a4, a5 and groupID + 8 for a2, a3, a6, a7; column
//     threadID_in_group * 2 + (i % 2), plus 8 for a4..a7.
//   B (16 x 8): b0..b3 in two registers; row (k) threadID_in_group * 2 +
//     (i % 2), plus 8 for b2, b3; column (n) groupID.
//   C, D (16 x 8, f32): c0..c3; row groupID for c0, c1 and groupID + 8 for
//     c2, c3; column threadID_in_group * 2 + (i % 2).
void mma_m16n8k16(Operand type, float* d, const std::uint32_t* a, const std::uint32_t* b) {
  Warp& w = enter_warp_operation(0xffffffffu, "mma.sync");
  MmaDeposit mine;
  std::memcpy(mine.a, a, sizeof(mine.a));
  std::memcpy(mine.b, b, sizeof(mine.b));
  int parity;
  {
    Bookkeeping bookkeeping;
    parity = static_cast<int>(w.barrier.generation & 1);
    if (w.barrier.arrived == 0) w.computed[parity] = false;
  }
  const unsigned char* all = warp_exchange(0xffffffffu, &mine, sizeof(mine));
  Bookkeeping bookkeeping;  // the warp's product, computed once, read by every lane
  if (!w.computed[parity]) {  // the first lane to go on computes the warp's product
    float A[16][16], B[16][8];
    for (int lane = 0; lane < kWarpSize; ++lane) {
      MmaDeposit x;
      std::memcpy(&x, all + kSlotBytes * lane, sizeof(x));
      const int group = lane / 4, in_group = lane % 4;
      for (int i = 0; i < 8; ++i) {
        const int row = group + ((i / 2) % 2 ? 8 : 0);
        const int col = in_group * 2 + i % 2 + (i >= 4 ? 8 : 0);
        A[row][col] = element(type, x.a[i / 2], i % 2);
      }
      for (int i = 0; i < 4; ++i) {
        const int k = in_group * 2 + i % 2 + (i >= 2 ? 8 : 0);
        B[k][group] = element(type, x.b[i / 2], i % 2);
      }
    }
    for (int lane = 0; lane < kWarpSize; ++lane) {
      const int group = lane / 4, in_group = lane % 4;
      for (int i = 0; i < 4; ++i) {
        const int row = group + (i >= 2 ? 8 : 0), col = in_group * 2 + i % 2;
        float sum = 0.f;
        for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
        w.product[parity][lane][i] = sum;
      }
    }
    w.computed[parity] = true;
  }
  for (int i = 0; i < 4; ++i) d[i] += w.product[parity][me().lane][i];
}

// PTX ISA, "ldmatrix": with .x4, lanes 8m .. 8m + 7 give the addresses of
// rows 0..7 of matrix m (8 16-bit elements, 16 contiguous bytes, 16-byte
// aligned, in shared memory). Register m of lane l receives row l / 4,
// elements 2 (l % 4) and 2 (l % 4) + 1 of matrix m (low half first); with
// .trans, element l / 4 of rows 2 (l % 4) and 2 (l % 4) + 1.
void ldmatrix_x4(std::uint32_t* r, const void* row, bool trans) {
  const auto address = reinterpret_cast<std::uintptr_t>(row);
  if (address % 16 != 0) fail("ldmatrix row address not 16-byte aligned");
  {
    Bookkeeping bookkeeping;
    const Block& b = *this_block;
    const auto base = reinterpret_cast<std::uintptr_t>(b.arena.data());
    bool in_shared = false;
    for (const SharedVariable& v : b.shared) {
      if (address >= base + v.offset && address + 16 <= base + v.offset + v.bytes) {
        in_shared = true;
      }
    }
    if (!in_shared) fail("ldmatrix row address outside every shared variable of the block");
  }
  enter_warp_operation(0xffffffffu, "ldmatrix");
  const unsigned char* all = warp_exchange(0xffffffffu, &row, sizeof(row));
  const int lane = lane_id();
  // The lane's reads of the warp's rows are the kernel's shared-memory reads.
  auto row_of = [&](int m, int i) {
    const unsigned char* p;
    std::memcpy(&p, all + kSlotBytes * (8 * m + i), sizeof(p));
    return p;
  };
  for (int m = 0; m < 4; ++m) {
    std::uint16_t half[2];
    for (int h = 0; h < 2; ++h) {
      if (trans) {
        std::memcpy(&half[h], row_of(m, 2 * (lane % 4) + h) + 2 * (lane / 4), 2);
      } else {
        std::memcpy(&half[h], row_of(m, lane / 4) + 2 * (2 * (lane % 4) + h), 2);
      }
    }
    r[m] = static_cast<std::uint32_t>(half[0]) | static_cast<std::uint32_t>(half[1]) << 16;
  }
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
