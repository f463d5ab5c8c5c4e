// The vectorised kernels (fused forward and backward, unfused qk and av), compiled once per
// instruction set by fast_kernels_{avx2,portable}.cpp with LIBNA_SIMD_NS and
// LIBNA_SIMD_TARGET defined. Used for float32/float16/bfloat16; float64 keeps
// the scalar kernels (kernels.h, backward.h) for gradient checking.
#include "cpu/fast_forward_impl.h"
#include "cpu/fast_backward_impl.h"
#include "cpu/fast_unfused_impl.h"

namespace libna::cpu::LIBNA_SIMD_NS {

#define LIBNA_FAST_INSTANCES(Rank)                                              \
  template void na_forward<Rank, detail::Half>(const detail::ForwardArgs&);      \
  template void na_forward<Rank, detail::BFloat16>(const detail::ForwardArgs&);  \
  template void na_forward<Rank, float>(const detail::ForwardArgs&);             \
  template void na_backward<Rank, detail::Half>(const detail::BackwardArgs&);    \
  template void na_backward<Rank, detail::BFloat16>(const detail::BackwardArgs&);\
  template void na_backward<Rank, float>(const detail::BackwardArgs&);          \
  template void na_qk<Rank, detail::Half>(const detail::QkArgs&);              \
  template void na_qk<Rank, detail::BFloat16>(const detail::QkArgs&);          \
  template void na_qk<Rank, float>(const detail::QkArgs&);                     \
  template void na_av<Rank, detail::Half>(const detail::AvArgs&);              \
  template void na_av<Rank, detail::BFloat16>(const detail::AvArgs&);          \
  template void na_av<Rank, float>(const detail::AvArgs&);

LIBNA_FAST_INSTANCES(1)
LIBNA_FAST_INSTANCES(2)
LIBNA_FAST_INSTANCES(3)
#undef LIBNA_FAST_INSTANCES

}  // namespace libna::cpu::LIBNA_SIMD_NS
