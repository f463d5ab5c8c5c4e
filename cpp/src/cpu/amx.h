// The bfloat16 forward and backward on AMX tiles (amx_forward.cpp,
// amx_backward.cpp), which backend.cpp runs instead of the vectorised
// kernels where they apply.
#pragma once

#include "backend.h"

namespace libna::cpu::amx {

// Whether this CPU and OS run tile products and LIBNA_CPU_AMX allows them.
bool available();
// Whether the AMX forward computes these arguments (see amx_forward.cpp).
bool runs(const detail::ForwardArgs& args);
// Computes the forward of arguments that runs() accepts.
void na_forward(const detail::ForwardArgs& args);
// Whether the AMX backward computes these arguments (see amx_backward.cpp).
bool runs(const detail::BackwardArgs& args);
// Computes the backward of arguments that runs() accepts.
void na_backward(const detail::BackwardArgs& args);

}  // namespace libna::cpu::amx
