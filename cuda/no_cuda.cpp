// Linked instead of the CUDA backend when libna is built without CUDA: no
// backend table, so CUDA tensors get ops.cpp's "built without CUDA" error.
#include "backend.h"

namespace libna::cuda {
const detail::Backend* backend() { return nullptr; }
std::vector<std::string> architectures() { return {}; }
}  // namespace libna::cuda
