// The CUDA backend's kernels run under the CUDA emulator, through libna's
// public C++ API (a libna built with LIBNA_CUDA_EMULATOR=ON):
//   (a) the emulator's correct self-test kernels give their known answers,
//   (b) na_forward and na_backward on CPU tensors routed to the emulated
//       CUDA backend (SIMT kernels for float32 and on sm_75, tensor cores for
//       bfloat16 on sm_80) equal the CPU backend's on the same data.
// scripts/check_build.py runs it under AddressSanitizer and under
// ThreadSanitizer, where every thread of a block is a fiber of its own and a
// shared- or global-memory access not ordered by a barrier or an atomic is a
// reported data race.
//
//   test_cuda_emulator              (a) and (b); exits non-zero on a failure
//   test_cuda_emulator race KERNEL  runs the racy self-test KERNEL (a
//                                   ThreadSanitizer build must report it)
#include <libna/libna.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace {

int g_passed = 0, g_failed = 0;

void report(bool ok, const std::string& what, int line) {
  if (ok) {
    ++g_passed;
  } else if (++g_failed <= 30) {
    std::printf("FAILED line %d: %s\n", line, what.c_str());
  }
}
#define CHECK(cond, what) report(static_cast<bool>(cond), what, __LINE__)

using libna::DType;
using libna::NaParams;
using libna::TensorView;
using i64 = std::int64_t;

// ---- (a) self-test kernels ---------------------------------------------------------
void test_self_test_kernels() {
  const int threads = 64, blocks = 2;
  const auto neighbour = libna::cuda_emulator_self_test("neighbour_read");
  const auto overwrite = libna::cuda_emulator_self_test("overwrite_after_read");
  const auto warp = libna::cuda_emulator_self_test("warp_sum");
  for (int b = 0; b < blocks; ++b) {
    for (int t = 0; t < threads; ++t) {
      const float next = static_cast<float>((t + 1) % threads + 1);
      const std::string at = " at block " + std::to_string(b) + " thread " + std::to_string(t);
      CHECK(neighbour[b * threads + t] == next, "neighbour_read" + at);
      CHECK(overwrite[b * threads + t] == 2 * next, "overwrite_after_read" + at);
      CHECK(warp[b * threads + t] == 32 * 33 / 2, "warp_sum" + at);
    }
  }
  CHECK(libna::cuda_emulator_self_test("atomic_count") == std::vector<float>{64.f},
        "atomic_count: 64 threads add 1");
  std::printf("self_test_kernels: %s\n", g_failed ? "FAILED" : "ok");
}

// ---- (b) the CUDA backend against the CPU backend ------------------------------------
// bfloat16 holds the upper 16 bits of a float32: values with at most 8
// significant bits (multiples of 1/16 below 8 here) convert exactly.
std::uint16_t to_bf16(float x) {
  std::uint32_t bits;
  std::memcpy(&bits, &x, 4);
  return static_cast<std::uint16_t>(bits >> 16);
}
float from_bf16(std::uint16_t h) {
  const std::uint32_t bits = static_cast<std::uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &bits, 4);
  return x;
}

// A tensor of `shape` in `dtype` (float32 or bfloat16), read back as float.
struct Tensor {
  TensorView layout;  // without data
  std::vector<float> f32;
  std::vector<std::uint16_t> bf16;

  Tensor(DType dtype, std::initializer_list<i64> shape, std::mt19937* random = nullptr)
      : layout(TensorView::contiguous(nullptr, dtype, shape)), f32(layout.numel(), 0.f) {
    std::uniform_int_distribution<int> sixteenths(-32, 32);
    if (random != nullptr) {
      for (float& x : f32) x = sixteenths(*random) / 16.f;
    }
    if (dtype == DType::bfloat16) {
      bf16.resize(f32.size());
      std::transform(f32.begin(), f32.end(), bf16.begin(), to_bf16);
    }
  }
  TensorView view() {
    TensorView v = layout;
    v.data = layout.dtype == DType::bfloat16 ? static_cast<void*>(bf16.data()) : f32.data();
    return v;
  }
  std::vector<float> values() const {
    if (layout.dtype != DType::bfloat16) return f32;
    std::vector<float> v(bf16.size());
    std::transform(bf16.begin(), bf16.end(), v.begin(), from_bf16);
    return v;
  }
};

struct Outputs {
  std::vector<std::vector<float>> tensors;  // out, lse, dq, dk, dv, drpb
};

// Forward and backward of a 2D problem with rpb, on the backend that
// set_cuda_emulator selects; `poisoned`: a NaN in q, k and v at three
// tokens (the kernels' paths that keep non-finite values local).
Outputs run_problem(DType dtype, bool poisoned) {
  const i64 B = 1, H = 12, W = 20, heads = 2, D = 32;
  NaParams p;
  p.rank = 2;
  p.kernel_size = {5, 9, 0};
  p.dilation = {1, 2, 1};
  std::mt19937 random(7);
  const auto tensor = [&](std::mt19937* values = nullptr) {
    return Tensor(dtype, {B, H, W, heads, D}, values);
  };
  const auto bias = [&](std::mt19937* values = nullptr) {
    return Tensor(dtype, {heads, 2 * 5 - 1, 2 * 9 - 1}, values);
  };
  Tensor q = tensor(&random), k = tensor(&random), v = tensor(&random), rpb = bias(&random),
         dout = tensor(&random);
  if (poisoned) {
    const i64 row = heads * D;  // one token's elements
    for (auto [x, at] : {std::pair{&q, 3 * row + 5}, {&k, 50 * row + 40}, {&v, 130 * row + 7}}) {
      x->f32[at] = NAN;
      if (!x->bf16.empty()) x->bf16[at] = to_bf16(NAN);
    }
  }
  Tensor out = tensor(), lse(DType::float32, {B, H, W, heads}), dq = tensor(), dk = tensor(),
         dv = tensor(), drpb = bias();
  const TensorView rpb_view = rpb.view(), lse_view = lse.view(), drpb_view = drpb.view();
  libna::na_forward(q.view(), k.view(), v.view(), &rpb_view, out.view(), &lse_view, p);
  libna::na_backward(q.view(), k.view(), v.view(), &rpb_view, out.view(), dout.view(), lse_view,
                     dq.view(), dk.view(), dv.view(), &drpb_view, p);
  return {{out.values(), lse.values(), dq.values(), dk.values(), dv.values(), drpb.values()}};
}

void test_cuda_backend() {
  const char* names[] = {"out", "lse", "dq", "dk", "dv", "drpb"};
  struct Case {
    int arch;
    DType dtype;
    const char* kernel;  // the forward kernel a GPU of `arch` runs
  };
  const Case cases[] = {{75, DType::float32, "fused_forward_kernel"},
                        {80, DType::float32, "fused_forward_kernel"},
                        {75, DType::bfloat16, "fused_forward_kernel"},
                        {80, DType::bfloat16, "tc_forward_kernel"}};
  for (const bool poisoned : {false, true})
  for (const Case& c : cases) {
    libna::set_cuda_emulator(0);
    const Outputs cpu = run_problem(c.dtype, poisoned);
    libna::set_cuda_emulator(c.arch);
    libna::cuda_emulator_launches();  // forget earlier launches
    const Outputs emulated = run_problem(c.dtype, poisoned);
    const auto launches = libna::cuda_emulator_launches();
    libna::set_cuda_emulator(0);
    const std::string what = std::string("sm_") + std::to_string(c.arch) +
                             (c.dtype == DType::float32 ? " float32" : " bfloat16") +
                             (poisoned ? " with NaNs" : "");
    CHECK(std::count(launches.begin(), launches.end(), c.kernel) == 1,
          what + ": the forward ran " + c.kernel);
    // float32: both accumulate in float32 in another order; bfloat16: the
    // outputs round to 8 significant bits (lse is float32).
    const double tolerance = c.dtype == DType::float32 ? 1e-4 : 3e-2;
    for (std::size_t i = 0; i < cpu.tensors.size(); ++i) {
      const auto& a = cpu.tensors[i];
      const auto& b = emulated.tensors[i];
      double error = 0, scale = 1;
      std::size_t nan_mismatches = 0;
      for (std::size_t j = 0; j < a.size() && j < b.size(); ++j) {
        if (std::isnan(a[j]) || std::isnan(b[j])) {
          nan_mismatches += std::isnan(a[j]) != std::isnan(b[j]);
          continue;
        }
        error = std::max(error, std::abs(double(a[j]) - b[j]));
        scale = std::max(scale, std::abs(double(a[j])));
      }
      CHECK(nan_mismatches == 0, what + ": " + names[i] + " is NaN at " +
                                     std::to_string(nan_mismatches) +
                                     " other places than the CPU backend's");
      CHECK(a.size() == b.size() && error <= tolerance * scale,
            what + ": " + names[i] + " differs from the CPU backend's by " +
                std::to_string(error) + " (scale " + std::to_string(scale) + ")");
    }
  }
  std::printf("cuda_backend: %s\n", g_failed ? "FAILED" : "ok");
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc == 3 && std::string(argv[1]) == "race") {
      const auto out = libna::cuda_emulator_self_test(argv[2]);
      std::printf("%s: ran, out[0] = %g\n", argv[2], out.empty() ? 0.0 : out[0]);
      return 0;
    }
    if (argc != 1) {
      std::fprintf(stderr, "usage: %s [race KERNEL]\n", argv[0]);
      return 2;
    }
    test_self_test_kernels();
    test_cuda_backend();
  } catch (const std::exception& e) {
    std::printf("FAILED: %s\n", e.what());
    return 1;
  }
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
