// Names of dtypes and devices, and the description of this build.
#include <string>

#include "backend.h"
#include "libna/na.h"
#include "libna/tensor.h"

namespace libna {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::float16: return "float16";
    case DType::bfloat16: return "bfloat16";
    case DType::float32: return "float32";
    case DType::float64: return "float64";
  }
  return "unknown";
}

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::float16:
    case DType::bfloat16: return 2;
    case DType::float32: return 4;
    case DType::float64: return 8;
  }
  return 0;
}

std::string device_name(Device device) {
  return device.type == DeviceType::cuda ? "cuda:" + std::to_string(device.index) : "cpu";
}

BuildInfo build_info() {
  BuildInfo info;
  info.version = LIBNA_VERSION_STRING;
  info.backends = {"cpu"};
  if (cuda::backend() != nullptr) info.backends.push_back("cuda");
  if (cuda_emulator::backend() != nullptr) info.backends.push_back("cuda-emulator");
  info.cuda_architectures = cuda::architectures();
  info.cpu_kernels = cpu::kernel_set_name();
  info.simd = cpu::simd_level();
#if defined(__clang__)
  info.compiler = "clang " __clang_version__;
#elif defined(__GNUC__)
  info.compiler = "gcc " __VERSION__;
#elif defined(_MSC_VER)
  info.compiler = "msvc " + std::to_string(_MSC_VER);
#else
  info.compiler = "unknown";
#endif
  return info;
}

}  // namespace libna
