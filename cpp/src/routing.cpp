// The backend of each call, and the process-wide switch to the CUDA
// emulator (set_cuda_emulator) that backend_for consults.
#include "routing.h"

#include <atomic>

namespace libna {
namespace {

std::atomic<int> emulated_arch{0};
std::atomic<bool> emulator_checks{false};

}  // namespace

namespace detail {

const Backend& backend_for(const Device& device, const std::string& op) {
  if (device.type == DeviceType::cuda) {
    if (const Backend* cuda = cuda::backend()) return *cuda;
    throw std::runtime_error("[" + op + "] got CUDA tensors, but libna was built without CUDA "
                             "(rebuild with a CUDA compiler and LIBNA_CUDA=ON)");
  }
  if (emulated_arch.load(std::memory_order_relaxed) != 0) {
    if (const Backend* emulator = cuda_emulator::backend()) return *emulator;
  }
  return cpu::backend();
}

}  // namespace detail

void set_cuda_emulator(int arch, bool checks) {
  if (arch != 0 && cuda_emulator::backend() == nullptr) {
    throw std::runtime_error(
        "libna was built without the CUDA emulator; rebuild with "
        "-C cmake.define.LIBNA_CUDA_EMULATOR=ON (pip) or -DLIBNA_CUDA_EMULATOR=ON (CMake)");
  }
  if (arch != 0 && arch != 75 && arch != 80 && arch != 86 && arch != 89 && arch != 90) {
    throw std::invalid_argument("[cuda_emulator] arch=" + std::to_string(arch) +
                                " is not supported; expected one of 75, 80, 86, 89, 90 "
                                "(75 runs the SIMT kernels only, 80 and up also the tensor-core "
                                "kernels), or 0 to turn the emulator off");
  }
  emulated_arch.store(arch, std::memory_order_relaxed);
  emulator_checks.store(arch != 0 && checks, std::memory_order_relaxed);
}

int cuda_emulator_arch() { return emulated_arch.load(std::memory_order_relaxed); }
std::vector<std::string> cuda_emulator_launches() { return cuda_emulator::take_launch_log(); }
std::vector<float> cuda_emulator_self_test(const std::string& kernel) {
  if (cuda_emulator::backend() == nullptr) {
    throw std::runtime_error("[cuda_emulator_self_test] libna was built without the CUDA emulator");
  }
  return cuda_emulator::self_test(kernel);
}
bool cuda_emulator_checks() { return emulator_checks.load(std::memory_order_relaxed); }

}  // namespace libna
