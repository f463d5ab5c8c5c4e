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
  const TensorView* lse;  // optional
  int rank;
  double scale;
  void* stream;
};

struct AdditionalBackwardArgs {
  TensorView q, k, v;
  TensorView out, dout, lse;  // of the merged attention
  TensorView dq, dk, dv;
  int rank;
  double scale;
  void* stream;
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

}  // namespace libna::detail

namespace libna::cpu {
void na_forward(const detail::ForwardArgs& args);
void na_qk(const detail::QkArgs& args);
void na_av(const detail::AvArgs& args);
void na_backward(const detail::BackwardArgs& args);
void na_qk_backward(const detail::QkBackwardArgs& args);
void na_av_backward(const detail::AvBackwardArgs& args);
void na_additional_forward(const detail::AdditionalArgs& args);
void na_additional_backward(const detail::AdditionalBackwardArgs& args);
void merge_attentions(const detail::MergeArgs& args);
void merge_attentions_backward(const detail::MergeBackwardArgs& args);
// "avx2" or "portable": the vectorised kernels this process runs (LIBNA_CPU_KERNELS).
std::string kernel_set_name();
std::string simd_level();
}  // namespace libna::cpu

// Implemented in cuda/; a build without CUDA links cuda/no_cuda.cpp, which
// provides the same symbols and throws "built without CUDA".
namespace libna::cuda {
bool compiled();
std::vector<std::string> architectures();
void na_forward(const detail::ForwardArgs& args);
void na_qk(const detail::QkArgs& args);
void na_av(const detail::AvArgs& args);
void na_backward(const detail::BackwardArgs& args);
void na_qk_backward(const detail::QkBackwardArgs& args);
void na_av_backward(const detail::AvBackwardArgs& args);
void na_additional_forward(const detail::AdditionalArgs& args);
void na_additional_backward(const detail::AdditionalBackwardArgs& args);
void merge_attentions(const detail::MergeArgs& args);
void merge_attentions_backward(const detail::MergeBackwardArgs& args);
}  // namespace libna::cuda
