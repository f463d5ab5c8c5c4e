// The vectorised kernels for x86-64 CPUs with AVX2 and FMA (chosen at run time).
#define LIBNA_SIMD_NS avx2
#define LIBNA_SIMD_TARGET __attribute__((target("avx2,fma")))
#include "cpu/fast_kernels_impl.h"
