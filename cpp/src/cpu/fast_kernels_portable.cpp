// The vectorised kernels in portable vector code (SSE2 on x86-64, NEON on
// aarch64).
#define LIBNA_SIMD_NS portable
#define LIBNA_SIMD_BEGIN
#define LIBNA_SIMD_END
#include "cpu/fast_kernels_impl.h"
