// The emulator's state, shared by its parts (internal to cuda/emulator/):
// a block of fibers (one per emulated thread), its warps and barriers, and
// what each part offers the others. emulator.cpp schedules blocks and
// implements the kernel-side API; fibers.cpp switches between fibers;
// warp_matrix.cpp emulates the warp-level matrix instructions.
#pragma once

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

namespace libna::emulator {

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
inline void release(const void* sync) { __tsan_release(const_cast<void*>(sync)); }
inline void acquire(const void* sync) { __tsan_acquire(const_cast<void*>(sync)); }
#else
struct Bookkeeping {
  Bookkeeping() {}  // user-provided: a guard variable is never "unused"
};
inline void release(const void*) {}
inline void acquire(const void*) {}
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

// The block the calling OS thread is running (set by launch).
extern thread_local Block* this_block;

inline Fiber& me() {
  Bookkeeping bookkeeping;  // the scheduler sets `current` at each switch
  return *this_block->current;
}

// "block (x, y, z)", and ", thread t (warp w, lane l)" for a fiber.
std::string describe(const Block& b, const Fiber* f);

// A kernel error: stops the launch (the scheduler abandons the block).
struct KernelError {
  std::string message;
};
[[noreturn]] inline void fail(const std::string& message) {
  throw KernelError{message};
}

// ---- what the parts offer each other -------------------------------------------
// fibers.cpp: the stack of the calling OS thread's i-th fiber (kept across
// blocks); f set up to start in fiber_main(&f) when first switched to; the
// switches between the scheduler and a fiber; AddressSanitizer's end of a
// switch, on arrival; f's stack cleared of the frames it stopped in for good.
void* fiber_stack(std::size_t i);
void prepare(Fiber& f);
void forget_frames(const Fiber& f);
void switch_to_fiber(Block& b, Fiber& f);
void switch_to_scheduler(Block& b, Fiber& f);
void asan_finish(void* fake_stack, const void** bottom, std::size_t* size);
// emulator.cpp: a fiber's life (runs the kernel as its thread); the checks
// at the start of a warp-wide operation, returning the caller's warp.
void fiber_main(void* arg);
Warp& enter_warp_operation(unsigned mask, const char* what);

}  // namespace libna::emulator
