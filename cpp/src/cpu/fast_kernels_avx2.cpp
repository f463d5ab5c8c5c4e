// The vectorised kernels for x86-64 CPUs with AVX2, FMA and F16C (chosen at
// run time): every function fast_kernels_impl.h defines is compiled for them.
// F16C converts float16 in one instruction (lanes.h: LIBNA_SIMD_F16C).
#define LIBNA_SIMD_NS avx2
#define LIBNA_SIMD_F16C 1
#include <immintrin.h>
#if defined(__clang__)
#define LIBNA_SIMD_BEGIN \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma,f16c\"))), apply_to = function)")
#define LIBNA_SIMD_END _Pragma("clang attribute pop")
#else
#define LIBNA_SIMD_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define LIBNA_SIMD_END _Pragma("GCC pop_options")
#endif
#include "cpu/fast_kernels_impl.h"
