// CPU backend entry points: dispatch rank and dtype once, to the kernels
// instantiated per rank in the generated cpu_rank*.cpp files.
#include "backend.h"
#include "dispatch.h"

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
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}
}  // namespace

// The vectorised kernel of `op` for the instruction set this CPU has.
#if defined(LIBNA_HAVE_AVX2_KERNELS)
#define LIBNA_VECTORISED(op, R, T, args) \
  (cpu_has_avx2_fma() ? avx2::op<R, T>(args) : portable::op<R, T>(args))
#else
#define LIBNA_VECTORISED(op, R, T, args) portable::op<R, T>(args)
#endif

// Dispatches rank and dtype to the scalar kernels for float64 (gradient
// checking) and to the vectorised ones for float32/float16/bfloat16.
#define LIBNA_DISPATCH_FAST(op, args, dtype)                  \
  detail::dispatch_rank(args.params.rank, #op, [&](auto rank) { \
    detail::dispatch_float_types(dtype, #op, [&](auto tag) {    \
      constexpr int R = decltype(rank)::value;                  \
      using T = typename decltype(tag)::type;                   \
      if constexpr (std::is_same_v<T, double>) {                \
        op<R, T>(args);                                         \
      } else {                                                  \
        LIBNA_VECTORISED(op, R, T, args);                       \
      }                                                         \
    });                                                         \
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

std::string simd_level() {
  if (cpu_has_avx2_fma()) return "avx2+fma";
#if defined(__x86_64__) || defined(_M_X64)
  return "sse2";
#elif defined(__aarch64__)
  return "neon";
#else
  return "portable";
#endif
}

}  // namespace libna::cpu
