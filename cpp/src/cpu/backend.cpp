// CPU backend entry points: dispatch rank and dtype once, to the kernels
// instantiated per rank in the generated cpu_rank*.cpp files.
#include "backend.h"
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
#if defined(LIBNA_HAVE_AVX2_KERNELS)
namespace avx2 {
LIBNA_DECLARE_KERNELS
}  // namespace avx2
#endif
#undef LIBNA_DECLARE_KERNELS

namespace {
bool cpu_has_avx2_fma() {
#if defined(LIBNA_HAVE_AVX2_KERNELS)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
#else
  return false;
#endif
}

enum class KernelSet { portable, avx2 };

// The kernel set that LIBNA_CPU_KERNELS names (auto or unset: the fastest this
// CPU runs), or the message that refuses it. Kept rather than thrown at once
// so that every call refuses a bad value alike.
struct KernelChoice {
  KernelSet set = KernelSet::portable;
  std::string error;
};

KernelChoice choose_kernel_set() {
  const std::string& value = cpu_kernels_variable();
  const std::string choices = cpu_has_avx2_fma() ? "auto, portable, avx2" : "auto, portable";
  if (value.empty() || value == "auto") {
    return {cpu_has_avx2_fma() ? KernelSet::avx2 : KernelSet::portable, ""};
  }
  if (value == "portable") return {KernelSet::portable, ""};
  if (value == "avx2") {
    if (cpu_has_avx2_fma()) return {KernelSet::avx2, ""};
#if defined(LIBNA_HAVE_AVX2_KERNELS)
    const char* why = "this CPU lacks AVX2, FMA or F16C";
#else
    const char* why = "this build is not for x86-64 and has no AVX2 kernels";
#endif
    return {KernelSet::portable,
            std::string("LIBNA_CPU_KERNELS=avx2 cannot run here (") + why + "); choose one of " +
                choices};
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
#if defined(LIBNA_HAVE_AVX2_KERNELS)
#define LIBNA_VECTORISED(op, R, T, args, kernels) \
  (kernels == KernelSet::avx2 ? avx2::op<R, T>(args) : portable::op<R, T>(args))
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

void na_forward(const detail::ForwardArgs& args) { LIBNA_DISPATCH_FAST(na_forward, args, args.q.dtype); }
void na_qk(const detail::QkArgs& args) { LIBNA_DISPATCH_FAST(na_qk, args, args.q.dtype); }
void na_av(const detail::AvArgs& args) { LIBNA_DISPATCH_FAST(na_av, args, args.attn.dtype); }
void na_backward(const detail::BackwardArgs& args) { LIBNA_DISPATCH_FAST(na_backward, args, args.q.dtype); }

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

std::string kernel_set_name() { return kernel_set() == KernelSet::avx2 ? "avx2" : "portable"; }

std::string simd_level() {
  if (kernel_set() == KernelSet::avx2) return "avx2+fma";
#if defined(__x86_64__) || defined(_M_X64)
  return "sse2";
#elif defined(__aarch64__)
  return "neon";
#else
  return "portable";
#endif
}

}  // namespace libna::cpu
