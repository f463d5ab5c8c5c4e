// Routing a validated call to the backend of its device: the one place
// that picks a backend from the table in backend.h, and the checks that it
// can serve a request, made while planning (before any output is allocated).
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "backend.h"

namespace libna::detail {

// The backend that runs tensors on `device`: CUDA for CUDA tensors, the CUDA
// emulator for CPU tensors while set_cuda_emulator is on, else the CPU.
const Backend& backend_for(const Device& device, const std::string& op);

template <typename Args>
using Entry = void (*)(const Args&);

// The name of the op that `args` belong to, for "not implemented" errors.
inline std::string op_of(const ForwardArgs& a) { return op_name(a.params); }
inline std::string op_of(const QkArgs& a) { return op_name(a.params, "_qk"); }
inline std::string op_of(const AvArgs& a) { return op_name(a.params, "_av"); }
inline std::string op_of(const BackwardArgs& a) { return op_name(a.params, "_backward"); }
inline std::string op_of(const QkBackwardArgs& a) { return op_name(a.params, "_qk_backward"); }
inline std::string op_of(const AvBackwardArgs& a) { return op_name(a.params, "_av_backward"); }
inline std::string op_of(const AdditionalArgs& a) {
  return "na" + std::to_string(a.rank) + "d (additional_keys)";
}
inline std::string op_of(const AdditionalBackwardArgs& a) {
  return "na" + std::to_string(a.rank) + "d_backward (additional_keys)";
}
inline std::string op_of(const MergeArgs&) { return "merge_attentions"; }
inline std::string op_of(const MergeBackwardArgs&) { return "merge_attentions_backward"; }

// Runs `entry` of the backend of `device` on validated `args`.
template <typename Args>
void run(Entry<Args> Backend::*entry, const Device& device, const Args& args) {
  const Backend& backend = backend_for(device, op_of(args));
  const Entry<Args> f = backend.*entry;
  if (f == nullptr) {
    throw std::runtime_error("[" + op_of(args) + "] is not implemented on the " + backend.name +
                             " backend yet; run it on CPU arrays");
  }
  f(args);
}

// That the backend which will run `entry` on tensors like q can: it has
// the op, runs q's dtype and, for a fused op (head dims dim, dim_v), those
// head dims. Checked with the arguments, before any output is allocated.
// `feature` names what the entry serves when it is a part of the op
// ("additional keys").
template <typename Args>
void check_backend(const std::string& op, Entry<Args> Backend::*entry,
                   const TensorView& q, std::int64_t dim = 0, std::int64_t dim_v = 0,
                   const char* feature = nullptr) {
  const Backend& backend = backend_for(q.device, op);
  if (backend.*entry == nullptr) {
    throw std::runtime_error("[" + op + "] " +
                             (feature ? std::string(feature) + " are" : std::string("is")) +
                             " not implemented on the " + backend.name +
                             " backend yet; run it on CPU arrays");
  }
  const BackendLimits& limits = backend.limits;
  if (q.dtype == DType::float64 && !limits.float64) {
    throw dtype_error("[" + op + "] float64 is not supported by the " + backend.family +
                      " backend; use float32, float16 or bfloat16 (float64 runs on the CPU "
                      "backend)");
  }
  if (limits.max_fused_head_dim > 0 && std::max(dim, dim_v) > limits.max_fused_head_dim) {
    throw std::invalid_argument("[" + op + "] head dims up to " +
                                std::to_string(limits.max_fused_head_dim) +
                                " are supported by the " + backend.family +
                                " backend, got head_dim=" + std::to_string(dim) +
                                ", head_dim_v=" + std::to_string(dim_v));
  }
}

}  // namespace libna::detail
