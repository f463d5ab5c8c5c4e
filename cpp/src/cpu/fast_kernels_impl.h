// The vectorised kernels (fused forward and backward, unfused qk and av and
// their backward), compiled once per instruction set by
// fast_kernels_{avx2,portable}.cpp, which define LIBNA_SIMD_NS (the namespace
// of their build) and LIBNA_SIMD_BEGIN / LIBNA_SIMD_END (the pragmas that
// open and close their target region). Used for float32/float16/bfloat16;
// float64 keeps the scalar kernels (kernels.h, backward.h) for gradient
// checking.
//
// Every function of the kernels is compiled inside the target region, not
// only the ones that compute: a 32-byte vector passed by value between an
// AVX function and a non-AVX one travels in a register on one side and in
// memory on the other (GCC compiled such a call at -O2 and the gradients it
// carried came out wrong). The headers shared with the rest of the library
// are included first, outside the region, so that their inline functions and
// templates are never compiled for AVX2: the linker keeps one copy of each,
// and it must run on every CPU. The kernels' own headers (fused_forward.h,
// fused_backward.h, unfused.h and what they include: simd.h, lanes.h and the
// pieces between) are included inside it, and may include only standard
// headers that this list includes first.
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "backend.h"
#include "cpu/backward.h"
#include "cpu/environment.h"
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"
#include "cpu/tuning.h"
#include "libna/window.h"
#include "numeric.h"

LIBNA_SIMD_BEGIN

#include "cpu/fused_forward.h"
#include "cpu/fused_backward.h"
#include "cpu/unfused.h"

namespace libna::cpu::LIBNA_SIMD_NS {

#define LIBNA_FAST_TYPES(op, Args, Rank)                         \
  template void op<Rank, detail::Half>(const detail::Args&);     \
  template void op<Rank, detail::BFloat16>(const detail::Args&); \
  template void op<Rank, float>(const detail::Args&);
#define LIBNA_FAST_INSTANCES(Rank)                         \
  LIBNA_FAST_TYPES(na_forward, ForwardArgs, Rank)          \
  LIBNA_FAST_TYPES(na_backward, BackwardArgs, Rank)        \
  LIBNA_FAST_TYPES(na_qk, QkArgs, Rank)                    \
  LIBNA_FAST_TYPES(na_av, AvArgs, Rank)                    \
  LIBNA_FAST_TYPES(na_qk_backward, QkBackwardArgs, Rank)   \
  LIBNA_FAST_TYPES(na_av_backward, AvBackwardArgs, Rank)

LIBNA_FAST_INSTANCES(1)
LIBNA_FAST_INSTANCES(2)
LIBNA_FAST_INSTANCES(3)
#undef LIBNA_FAST_INSTANCES
#undef LIBNA_FAST_TYPES

}  // namespace libna::cpu::LIBNA_SIMD_NS

LIBNA_SIMD_END
