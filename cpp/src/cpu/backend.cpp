// CPU backend entry points: dispatch rank and dtype once, to the kernels
// instantiated per rank in the generated cpu_rank*.cpp files.
#include "backend.h"
#include "dispatch.h"

#include <type_traits>

namespace libna::cpu {

// The vectorised kernels (fast_{forward,backward}_impl.h), per instruction set.
namespace portable {
template <int Rank, typename T>
void na_forward(const detail::ForwardArgs&);
template <int Rank, typename T>
void na_backward(const detail::BackwardArgs&);
}  // namespace portable
#if defined(LIBNA_HAVE_AVX2_KERNELS)
namespace avx2 {
template <int Rank, typename T>
void na_forward(const detail::ForwardArgs&);
template <int Rank, typename T>
void na_backward(const detail::BackwardArgs&);
}  // namespace avx2
#endif

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

template <int Rank, typename T>
void na_forward(const detail::ForwardArgs&);
template <int Rank, typename T>
void na_qk(const detail::QkArgs&);
template <int Rank, typename T>
void na_av(const detail::AvArgs&);
template <int Rank, typename T>
void na_backward(const detail::BackwardArgs&);
template <int Rank, typename T>
void na_qk_backward(const detail::QkBackwardArgs&);
template <int Rank, typename T>
void na_av_backward(const detail::AvBackwardArgs&);


void na_forward(const detail::ForwardArgs& args) {
  detail::dispatch_rank(args.params.rank, "na_forward", [&](auto rank) {
    detail::dispatch_float_types(args.q.dtype, "na_forward", [&](auto tag) {
      constexpr int R = decltype(rank)::value;
      using T = typename decltype(tag)::type;
      if constexpr (std::is_same_v<T, double>) {
        na_forward<R, T>(args);  // float64 (gradient checking) keeps the scalar kernel
      } else {
#if defined(LIBNA_HAVE_AVX2_KERNELS)
        if (cpu_has_avx2_fma()) return avx2::na_forward<R, T>(args);
#endif
        portable::na_forward<R, T>(args);
      }
    });
  });
}

void na_qk(const detail::QkArgs& args) {
  detail::dispatch_rank(args.params.rank, "na_qk", [&](auto rank) {
    detail::dispatch_float_types(args.q.dtype, "na_qk", [&](auto tag) {
      na_qk<decltype(rank)::value, typename decltype(tag)::type>(args);
    });
  });
}

void na_av(const detail::AvArgs& args) {
  detail::dispatch_rank(args.params.rank, "na_av", [&](auto rank) {
    detail::dispatch_float_types(args.attn.dtype, "na_av", [&](auto tag) {
      na_av<decltype(rank)::value, typename decltype(tag)::type>(args);
    });
  });
}

void na_backward(const detail::BackwardArgs& args) {
  detail::dispatch_rank(args.params.rank, "na_backward", [&](auto rank) {
    detail::dispatch_float_types(args.q.dtype, "na_backward", [&](auto tag) {
      constexpr int R = decltype(rank)::value;
      using T = typename decltype(tag)::type;
      if constexpr (std::is_same_v<T, double>) {
        na_backward<R, T>(args);  // float64 (gradient checking) keeps the scalar kernel
      } else {
#if defined(LIBNA_HAVE_AVX2_KERNELS)
        if (cpu_has_avx2_fma()) return avx2::na_backward<R, T>(args);
#endif
        portable::na_backward<R, T>(args);
      }
    });
  });
}

void na_qk_backward(const detail::QkBackwardArgs& args) {
  detail::dispatch_rank(args.params.rank, "na_qk_backward", [&](auto rank) {
    detail::dispatch_float_types(args.q.dtype, "na_qk_backward", [&](auto tag) {
      na_qk_backward<decltype(rank)::value, typename decltype(tag)::type>(args);
    });
  });
}

void na_av_backward(const detail::AvBackwardArgs& args) {
  detail::dispatch_rank(args.params.rank, "na_av_backward", [&](auto rank) {
    detail::dispatch_float_types(args.attn.dtype, "na_av_backward", [&](auto tag) {
      na_av_backward<decltype(rank)::value, typename decltype(tag)::type>(args);
    });
  });
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
