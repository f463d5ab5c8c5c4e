// The vectorised kernels (fused forward and backward, unfused qk and av and their backward), compiled once per
// instruction set by fast_kernels_{avx2,portable}.cpp with LIBNA_SIMD_NS and
// LIBNA_SIMD_TARGET defined. Used for float32/float16/bfloat16; float64 keeps
// the scalar kernels (kernels.h, backward.h) for gradient checking.
#include "cpu/fast_forward_impl.h"
#include "cpu/fast_backward_impl.h"
#include "cpu/fast_unfused_impl.h"

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
