// Names of dtypes and devices, and the description of this build.
#include <iterator>
#include <string>

#include "backend.h"
#include "libna/na.h"
#include "libna/tensor.h"

namespace libna {

const char* dtype_name(DType dtype) {
  switch (dtype) {
#define LIBNA_DTYPE_NAME(name, bytes) \
  case DType::name: return #name;
    LIBNA_FOR_EACH_DTYPE(LIBNA_DTYPE_NAME)
#undef LIBNA_DTYPE_NAME
  }
  return "unknown";
}

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
#define LIBNA_DTYPE_SIZE(name, bytes) \
  case DType::name: return bytes;
    LIBNA_FOR_EACH_DTYPE(LIBNA_DTYPE_SIZE)
#undef LIBNA_DTYPE_SIZE
  }
  return 0;
}

std::string dtype_names() {
  std::string names;
  const std::size_t n = std::size(kDTypes);
  for (std::size_t i = 0; i < n; ++i) {
    names += i == 0 ? "" : i + 1 == n ? " or " : ", ";
    names += dtype_name(kDTypes[i]);
  }
  return names;
}

std::string device_name(Device device) {
  return device.type == DeviceType::cuda ? "cuda:" + std::to_string(device.index) : "cpu";
}

BuildInfo build_info() {
  BuildInfo info;
  info.version = LIBNA_VERSION_STRING;
  for (const DType dtype : kDTypes) info.dtypes.push_back(dtype_name(dtype));
  info.backends = {"cpu"};
  if (cuda::backend() != nullptr) info.backends.push_back("cuda");
  if (cuda_emulator::backend() != nullptr) info.backends.push_back("cuda-emulator");
  info.cuda_architectures = cuda::architectures();
  info.cpu_kernels = cpu::kernel_set_name();
  info.simd = cpu::simd_level();
  info.cpu_amx = cpu::amx_in_use();
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
