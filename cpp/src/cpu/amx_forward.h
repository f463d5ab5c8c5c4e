// The bfloat16 forward on AMX tiles (amx_forward.cpp), which backend.cpp
// runs instead of the vectorised kernels where it applies.
#pragma once

#include "backend.h"

namespace libna::cpu::amx {

// Whether this CPU and OS run tile products and LIBNA_CPU_AMX allows them.
bool available();
// Whether the AMX forward computes these arguments (see amx_forward.cpp).
bool runs(const detail::ForwardArgs& args);
// Computes the forward of arguments that runs() accepts.
void na_forward(const detail::ForwardArgs& args);

}  // namespace libna::cpu::amx
