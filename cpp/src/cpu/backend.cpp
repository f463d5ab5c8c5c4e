// CPU backend entry points: dispatch rank and dtype once, to the kernels
// instantiated per rank in the generated cpu_rank*.cpp files.
#include "backend.h"
#include "cpu/amx.h"
#include "cpu/environment.h"
#include "dispatch.h"

#include <stdexcept>
#include <string>
#include <type_traits>

namespace libna::cpu {

// The kernel templates of every op: the scalar ones in this namespace
// (cpu_rank*.cpp) and the vectorised ones (fast_kernels_impl.h) once per
// instruction set.
#define LIBNA_DECLARE_KERNELS                                  \
  template <int Rank, typename T>                              \
  void na_forward(const detail::ForwardArgs&);                 \
  template <int Rank, typename T>                              \
  void na_backward(const detail::BackwardArgs&);               \
  template <int Rank, typename T>                              \
  void na_qk(const detail::QkArgs&);                           \
  template <int Rank, typename T>                              \
  void na_av(const detail::AvArgs&);                           \
  template <int Rank, typename T>                              \
  void na_qk_backward(const detail::QkBackwardArgs&);          \
  template <int Rank, typename T>                              \
  void na_av_backward(const detail::AvBackwardArgs&);

LIBNA_DECLARE_KERNELS
namespace portable {
LIBNA_DECLARE_KERNELS
}  // namespace portable
#if defined(LIBNA_HAVE_X86_KERNELS)
namespace avx2 {
LIBNA_DECLARE_KERNELS
}  // namespace avx2
namespace avx512 {
LIBNA_DECLARE_KERNELS
}  // namespace avx512
#endif
#undef LIBNA_DECLARE_KERNELS

namespace {

enum class KernelSet { portable, avx2, avx512 };

// Whether this CPU runs a kernel set (and this build has it).
bool cpu_runs(KernelSet set) {
#if defined(LIBNA_HAVE_X86_KERNELS)
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c");
  static const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                             __builtin_cpu_supports("avx512vl") &&
                             __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512dq");
  switch (set) {
    case KernelSet::portable: return true;
    case KernelSet::avx2: return avx2;
    case KernelSet::avx512: return avx512;
  }
  return false;
#else
  return set == KernelSet::portable;
#endif
}

struct NamedSet {
  const char* name;
  KernelSet set;
  const char* needs;  // what a CPU must have to run it
};
constexpr NamedSet kSets[] = {{"portable", KernelSet::portable, ""},
                              {"avx2", KernelSet::avx2, "AVX2, FMA or F16C"},
                              {"avx512", KernelSet::avx512, "AVX-512 F, VL, BW or DQ"}};

// The kernel set that LIBNA_CPU_KERNELS names (auto or unset: the fastest this
// CPU runs), or the message that refuses it. Kept rather than thrown at once
// so that every call refuses a bad value alike.
struct KernelChoice {
  KernelSet set = KernelSet::portable;
  std::string error;
};

KernelChoice choose_kernel_set() {
  const std::string& value = cpu_kernels_variable();
  std::string choices = "auto";
  KernelSet fastest = KernelSet::portable;
  for (const NamedSet& s : kSets) {
    if (!cpu_runs(s.set)) continue;
    choices += std::string(", ") + s.name;
    fastest = s.set;
  }
  if (value.empty() || value == "auto") return {fastest, ""};
  for (const NamedSet& s : kSets) {
    if (value != s.name) continue;
    if (cpu_runs(s.set)) return {s.set, ""};
#if defined(LIBNA_HAVE_X86_KERNELS)
    const std::string why = std::string("this CPU lacks ") + s.needs;
#else
    const std::string why = "this build is not for x86-64 and has no " + value + " kernels";
#endif
    return {KernelSet::portable, "LIBNA_CPU_KERNELS=" + value + " cannot run here (" + why +
                                     "); choose one of " + choices};
  }
  return {KernelSet::portable,
          "LIBNA_CPU_KERNELS='" + value + "' is not a kernel set; choose one of " + choices};
}

// Read once: the forward and the backward of a step must run the same kernels.
KernelSet kernel_set() {
  static const KernelChoice choice = choose_kernel_set();
  if (!choice.error.empty()) throw std::invalid_argument(choice.error);
  return choice.set;
}
}  // namespace

// The vectorised kernel of `op` in the kernel set `kernels`.
#if defined(LIBNA_HAVE_X86_KERNELS)
#define LIBNA_VECTORISED(op, R, T, args, kernels)                 \
  (kernels == KernelSet::avx512 ? avx512::op<R, T>(args)          \
   : kernels == KernelSet::avx2 ? avx2::op<R, T>(args)            \
                                : portable::op<R, T>(args))
#else
#define LIBNA_VECTORISED(op, R, T, args, kernels) portable::op<R, T>(args)
#endif

// Dispatches rank and dtype to the scalar kernels for float64 (gradient
// checking) and to the vectorised ones for float32/float16/bfloat16. A bad
// LIBNA_CPU_KERNELS is refused whatever the dtype, so that it never goes unseen.
#define LIBNA_DISPATCH_FAST(op, args, dtype)                          \
  detail::dispatch_rank(args.params.rank, #op, [&](auto rank) {         \
    [[maybe_unused]] const KernelSet kernels = kernel_set();            \
    detail::dispatch_float_types(dtype, #op, [&](auto tag) {            \
      constexpr int R = decltype(rank)::value;                          \
      using T = typename decltype(tag)::type;                           \
      if constexpr (std::is_same_v<T, double>) {                        \
        op<R, T>(args);                                                 \
      } else {                                                          \
        LIBNA_VECTORISED(op, R, T, args, kernels);                      \
      }                                                                 \
    });                                                                 \
  })

void na_forward(const detail::ForwardArgs& args) {
#if defined(LIBNA_HAVE_X86_KERNELS)
  // bfloat16 on AMX tiles where they apply (amx_forward.cpp); the avx512 set
  // chosen, so that LIBNA_CPU_KERNELS=avx2 or portable also turns them off.
  if (amx_in_use() && amx::runs(args)) {
    amx::na_forward(args);
    return;
  }
#endif
  LIBNA_DISPATCH_FAST(na_forward, args, args.q.dtype);
}
void na_qk(const detail::QkArgs& args) { LIBNA_DISPATCH_FAST(na_qk, args, args.q.dtype); }
void na_av(const detail::AvArgs& args) { LIBNA_DISPATCH_FAST(na_av, args, args.attn.dtype); }
void na_backward(const detail::BackwardArgs& args) {
#if defined(LIBNA_HAVE_X86_KERNELS)
  if (amx_in_use() && amx::runs(args)) {  // as the forward
    amx::na_backward(args);
    return;
  }
#endif
  LIBNA_DISPATCH_FAST(na_backward, args, args.q.dtype);
}

void na_qk_backward(const detail::QkBackwardArgs& args) {
  LIBNA_DISPATCH_FAST(na_qk_backward, args, args.q.dtype);
}
void na_av_backward(const detail::AvBackwardArgs& args) {
  LIBNA_DISPATCH_FAST(na_av_backward, args, args.attn.dtype);
}

// additional.cpp: additional keys and values, and merging partial attentions.
void na_additional_forward(const detail::AdditionalArgs& args);
void na_additional_backward(const detail::AdditionalBackwardArgs& args);
void merge_attentions(const detail::MergeArgs& args);
void merge_attentions_backward(const detail::MergeBackwardArgs& args);

const detail::Backend& backend() {
  static const detail::Backend table{
      "cpu",          "CPU",                 {},
      &na_forward,    &na_qk,
      &na_av,         &na_backward,          &na_qk_backward,
      &na_av_backward, &na_additional_forward, &na_additional_backward,
      &merge_attentions, &merge_attentions_backward};
  return table;
}

std::string kernel_set_name() {
  const KernelSet set = kernel_set();
  for (const NamedSet& s : kSets) {
    if (s.set == set) return s.name;
  }
  return "portable";
}

bool amx_in_use() {
#if defined(LIBNA_HAVE_X86_KERNELS)
  return kernel_set() == KernelSet::avx512 && amx::available();
#else
  return false;
#endif
}

std::string simd_level() {
  switch (kernel_set()) {
    case KernelSet::avx512: return "avx512+fma";
    case KernelSet::avx2: return "avx2+fma";
    case KernelSet::portable: break;
  }
#if defined(__x86_64__) || defined(_M_X64)
  return "sse2";
#elif defined(__aarch64__)
  return "neon";
#else
  return "portable";
#endif
}

}  // namespace libna::cpu
