// The vectorised kernels for x86-64 CPUs with AVX-512 (F, VL, BW, DQ) as well
// as AVX2, FMA and F16C (chosen at run time): the same source as the AVX2
// set, compiled with 32 vector registers, and the row pairs' 16-lane
// vectors (pair_kernels.h) in one 512-bit register each
// (LIBNA_SIMD_WIDE_REGISTERS).
#define LIBNA_SIMD_NS avx512
#define LIBNA_SIMD_F16C 1
#define LIBNA_SIMD_WIDE_REGISTERS 1
#include <immintrin.h>
#if defined(__clang__)
#define LIBNA_SIMD_BEGIN                                                                        \
  _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c\"))), apply_to = function)")
#define LIBNA_SIMD_END _Pragma("clang attribute pop")
#else
#define LIBNA_SIMD_BEGIN \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c\")")
#define LIBNA_SIMD_END _Pragma("GCC pop_options")
#endif
#include "cpu/fast_kernels_impl.h"
