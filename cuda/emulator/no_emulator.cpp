// Linked when libna is built without the CUDA emulator (LIBNA_CUDA_EMULATOR=OFF):
// no backend table, so set_cuda_emulator refuses to turn it on.
#include "backend.h"

namespace libna::cuda_emulator {
const detail::Backend* backend() { return nullptr; }
std::vector<std::string> take_launch_log() { return {}; }
std::vector<float> self_test(const std::string&) { return {}; }  // unreachable: ops.cpp refuses
}  // namespace libna::cuda_emulator
