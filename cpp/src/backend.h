// The contract between the validating op layer (ops.cpp) and the backends.
// Arguments arrive validated; backends dispatch rank and dtype once and run.
#pragma once

#include <string>
#include <vector>

#include "libna/na.h"

namespace libna::detail {

struct ForwardArgs {
  TensorView q, k, v;
  const TensorView* rpb;  // optional
  TensorView out;
  const TensorView* lse;  // optional
  NaParams params;
  double scale;
  void* stream;
};

struct QkArgs {
  TensorView q, k;
  const TensorView* rpb;  // optional
  TensorView attn;
  NaParams params;
  void* stream;
};

struct AvArgs {
  TensorView attn, v;
  TensorView out;
  NaParams params;
  void* stream;
};

struct BackwardArgs {
  TensorView q, k, v;
  const TensorView* rpb;  // optional
  TensorView out, dout, lse;
  // optional: the gradient of lse, [B, *spatial, heads] (lse's dtype); the
  // row terms become D_i = dout_i . out_i - dlse_i.
  const TensorView* dlse;
  TensorView dq, dk, dv;
  const TensorView* drpb;  // given exactly when rpb is
  NaParams params;
  double scale;
  void* stream;
};

struct QkBackwardArgs {
  TensorView dattn, q, k;
  TensorView dq, dk;
  const TensorView* drpb;  // optional
  NaParams params;
  void* stream;
};

struct AvBackwardArgs {
  TensorView dout, attn, v;
  TensorView dattn, dv;
  NaParams params;
  void* stream;
};

struct AdditionalArgs {
  TensorView q, k, v;  // k, v: the additional keys and values [B, N, heads_kv, D]
  TensorView out;
  const TensorView* lse;  // optional unless merge
  int rank;
  double scale;
  void* stream;
  // out and lse already hold an attention of the same queries over other
  // keys (the neighbourhood): merge this part into them, row by row, rather
  // than overwrite them.
  bool merge = false;
};

struct AdditionalBackwardArgs {
  TensorView q, k, v;
  TensorView out, dout, lse;  // of the merged attention
  const TensorView* dlse;     // optional, as for BackwardArgs
  TensorView dq, dk, dv;
  int rank;
  double scale;
  void* stream;
  // dq already holds the neighbourhood part's query gradient: add to it.
  bool accumulate_dq = false;
};

struct MergeArgs {
  std::vector<TensorView> outs, lses;
  TensorView out, lse;
  void* stream;
};

struct MergeBackwardArgs {
  std::vector<TensorView> outs, lses;
  TensorView out, lse, dout;
  const TensorView* dlse;  // optional
  std::vector<TensorView> douts, dlses;
  void* stream;
};

// One backend: the entry points of one device's kernels, looked up once per
// call by ops.cpp (backend_for). A null entry is an op the backend does not
// implement; calling it gives one "not implemented on <name>" error.
// Adding a backend: define a Backend in its own directory, return it from a
// function declared below, and name it in backend_for (ops.cpp) and in
// build_info (info.cpp).
// What a backend cannot run, declared to the checks (ops.cpp), so that such
// a request fails before its outputs are allocated.
struct BackendLimits {
  bool float64 = true;                // runs float64
  std::int64_t max_fused_head_dim = 0;  // the fused ops' largest D / D_v; 0: any
};

struct Backend {
  const char* name;    // as build_info()["backends"] lists it
  const char* family;  // what messages call it: "CPU", "CUDA"
  BackendLimits limits;
  void (*na_forward)(const ForwardArgs&);
  void (*na_qk)(const QkArgs&);
  void (*na_av)(const AvArgs&);
  void (*na_backward)(const BackwardArgs&);
  void (*na_qk_backward)(const QkBackwardArgs&);
  void (*na_av_backward)(const AvBackwardArgs&);
  void (*na_additional_forward)(const AdditionalArgs&);
  void (*na_additional_backward)(const AdditionalBackwardArgs&);
  void (*merge_attentions)(const MergeArgs&);
  void (*merge_attentions_backward)(const MergeBackwardArgs&);
};

}  // namespace libna::detail

namespace libna::cpu {
const detail::Backend& backend();
// "avx512", "avx2" or "portable": the vectorised kernels this process runs (LIBNA_CPU_KERNELS).
std::string kernel_set_name();
std::string simd_level();
// Whether bfloat16 calls run on AMX tiles where they apply (cpu/amx.h).
bool amx_in_use();
}  // namespace libna::cpu

// cuda/backend.cu; a build without CUDA links cuda/no_cuda.cpp instead,
// whose backend() is null.
namespace libna::cuda {
const detail::Backend* backend();
std::vector<std::string> architectures();
}  // namespace libna::cuda

// The same cuda/backend.cu compiled for the host, running the kernels under
// cuda/emulator (a build with LIBNA_CUDA_EMULATOR=ON); null otherwise.
// set_cuda_emulator (na.h) routes CPU tensors to it.
namespace libna::cuda_emulator {
const detail::Backend* backend();
// The names of the kernels launched since the last call, in order.
std::vector<std::string> take_launch_log();
// The emulator's self-test kernels (cuda/emulator/self_test.cpp): the output
// of the named one; std::invalid_argument for another name.
std::vector<float> self_test(const std::string& kernel);
}  // namespace libna::cuda_emulator
