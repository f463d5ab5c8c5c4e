// Fibers: each emulated thread runs on a stack of its own, switched to and
// from the block scheduler (x86-64: a few instructions; elsewhere ucontext),
// with the annotations AddressSanitizer and ThreadSanitizer need to follow.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <new>
#include <vector>

#include "internal.h"

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
namespace {

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

}  // namespace

void* fiber_stack(std::size_t i) { return stack_pool.get(i); }

namespace {

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
}  // namespace

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

namespace {
#if !defined(__x86_64__)
void fiber_trampoline(unsigned hi, unsigned lo) {
  fiber_main(reinterpret_cast<void*>((static_cast<std::uintptr_t>(hi) << 32) | lo));
}
#endif
}  // namespace

// AddressSanitizer poisons the redzones of a frame on entry and clears them
// on return. The frames a fiber is in when it stops for good (done, or left
// waiting after an error) never return: their poison would stay on the stack
// and fault the next fiber that runs on it (prepare's writes first). On
// x86-64 they lie between the fiber's last saved stack pointer and the top;
// elsewhere the whole stack is cleared.
void forget_frames(const Fiber& f) {
#if defined(LIBNA_EMULATOR_ASAN)
  const long page = sysconf(_SC_PAGESIZE);
  auto* const bottom = static_cast<char*>(f.stack) + page;  // above the guard page
  auto* const top = static_cast<char*>(f.stack) + kStackBytes;
  char* from = bottom;
#if defined(__x86_64__)
  if (f.sp != nullptr) from = std::max(bottom, static_cast<char*>(f.sp));
#endif
  ASAN_UNPOISON_MEMORY_REGION(from, static_cast<std::size_t>(top - from));
#else
  (void)f;
#endif
}

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

}  // namespace libna::emulator
