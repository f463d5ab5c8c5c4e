// CUDA backend entry points: arguments arrive validated (ops.cpp); here they
// become padded rank-3 kernel parameters, and the dtype is dispatched once.
// Everything runs on the caller's stream and device; no synchronisation. The
// only allocations are the backward's workspaces (row terms, the float32 rpb
// gradient), taken and released in stream order (cudaMallocAsync).
#include <algorithm>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "backend.h"
#include "common.cuh"
#include "dispatch.h"

namespace libna::LIBNA_CUDA_BACKEND {
namespace {

using namespace libna::LIBNA_CUDA_IMPL;

template <typename T>
struct DeviceElement;
template <>
struct DeviceElement<float> { using type = float; };
template <>
struct DeviceElement<detail::Half> { using type = __half; };
template <>
struct DeviceElement<detail::BFloat16> { using type = __nv_bfloat16; };

void check(cudaError_t status, const std::string& op, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error("[" + op + "] CUDA error in " + what + ": " +
                             cudaGetErrorString(status));
  }
}

// Makes the tensors' device current for the call and restores the caller's.
class DeviceGuard {
 public:
  DeviceGuard(int device, const std::string& op) {
    check(cudaGetDevice(&previous_), op, "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), op, "cudaSetDevice");
  }
  ~DeviceGuard() {
    int current = -1;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

// A stream-ordered workspace (none for 0 bytes), released (in stream order) when it goes out of scope.
class Workspace {
 public:
  Workspace(std::size_t bytes, cudaStream_t stream, const std::string& op) : stream_(stream) {
    if (bytes > 0) check(cudaMallocAsync(&ptr_, bytes, stream), op, "cudaMallocAsync");
  }
  ~Workspace() {
    if (ptr_) cudaFreeAsync(ptr_, stream_);
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  float* data() const { return static_cast<float*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

std::int64_t bias_size(const AxisParams* axes, std::int64_t heads) {
  return heads * (2 * axes[0].kernel - 1) * (2 * axes[1].kernel - 1) * (2 * axes[2].kernel - 1);
}

// The float32 accumulator of an rpb gradient (when `drpb` is given): zeroed
// on the stream, then stored into drpb's dtype and strides by finish().
template <typename T>
class BiasGradient {
 public:
  BiasGradient(const TensorView* drpb, const AxisParams* axes, int heads, cudaStream_t stream,
               const std::string& op)
      : drpb_(drpb), axes_(axes), heads_(heads), stream_(stream), op_(op),
        acc_(sizeof(float) * (drpb ? bias_size(axes, heads) : 0), stream, op) {
    if (drpb_) {
      check(cudaMemsetAsync(acc_.data(), 0, sizeof(float) * bias_size(axes, heads), stream), op,
            "cudaMemsetAsync");
    }
  }
  float* data() const { return drpb_ ? acc_.data() : nullptr; }
  void finish(int rank) const;

 private:
  const TensorView* drpb_;
  const AxisParams* axes_;
  int heads_;
  cudaStream_t stream_;
  const std::string& op_;
  Workspace acc_;
};

// [B, *spatial(rank), heads(, dim)] as a padded view; `dims` is rank + 3, or
// rank + 2 for lse.
// The emulator checks global accesses against the tensors of the call.
void register_tensor(const TensorView& t) {
#if defined(LIBNA_CUDA_EMULATOR)
  std::int64_t lowest = 0, highest = 0;
  for (int i = 0; i < t.ndim; ++i) {
    const std::int64_t span = (t.shape[i] - 1) * t.strides[i];
    (span < 0 ? lowest : highest) += span;
  }
  const auto* base = static_cast<const char*>(t.data);
  const auto element = static_cast<std::int64_t>(dtype_size(t.dtype));
  emulator::register_global(base + lowest * element, base + (highest + 1) * element);
#else
  (void)t;
#endif
}

View view_of(const TensorView& t, int rank) {
  register_tensor(t);
  View v{};
  v.data = t.data;
  v.b = t.strides[0];
  for (int a = 0; a < kAxes; ++a) v.s[a] = a < rank ? t.strides[1 + a] : 0;
  v.h = t.strides[rank + 1];
  v.d = t.ndim > rank + 2 ? t.strides[rank + 2] : 0;
  return v;
}

BiasView bias_view_of(const TensorView* t, int rank) {
  BiasView v{};
  if (t == nullptr) return v;
  register_tensor(*t);
  v.data = t->data;
  v.h = t->strides[0];
  for (int a = 0; a < kAxes; ++a) v.s[a] = a < rank ? t->strides[1 + a] : 0;
  return v;
}

template <typename T>
void BiasGradient<T>::finish(int rank) const {
  if (!drpb_) return;
  launch_store_bias_grad<T>(acc_.data(), bias_view_of(drpb_, rank), axes_, heads_, stream_);
  check(cudaGetLastError(), op_, "kernel launch");
}

// Per-axis parameters padded to three axes; `spatial_of` is [B, *spatial, ...].
void padded_axes(const NaParams& params, const TensorView& spatial_of, AxisParams* axes,
                 std::int64_t* length, std::int64_t* tokens) {
  *tokens = 1;
  for (int a = 0; a < kAxes; ++a) {
    axes[a] = a < params.rank ? params.axis(a, spatial_of.shape[1 + a])
                              : AxisParams{1, 1, 1, 1, false};
    length[a] = axes[a].length;
    *tokens *= length[a];
  }
}


// Dispatches the element type to the device type; float64 is refused.
template <typename F>
void dispatch_device_types(DType dtype, const std::string& op, F&& f) {
#if defined(LIBNA_CUDA_EMULATOR)
  emulator::begin_call();
#endif
  detail::dispatch_float_types(dtype, op.c_str(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (std::is_same_v<T, double>) {
      throw dtype_error("[" + op + "] float64 is not supported by the CUDA backend; use "
                        "float32, float16 or bfloat16 (float64 runs on the CPU backend)");
    } else {
      f(detail::TypeTag<typename DeviceElement<T>::type>{});
    }
  });
}

int bucket_for(const std::string& op, std::int64_t dim, std::int64_t dim_v) {
  const int bucket = tiling::head_dim_bucket(std::max(dim, dim_v));
  if (bucket == 0) {
    throw std::invalid_argument("[" + op + "] head dims up to " +
                                std::to_string(tiling::kMaxHeadDim) +
                                " are supported by the CUDA backend, got head_dim=" +
                                std::to_string(dim) + ", head_dim_v=" + std::to_string(dim_v));
  }
  return bucket;
}

FusedParams fused_params(const TensorView& q, const TensorView& k, const TensorView& v,
                         const TensorView* rpb, const NaParams& params, double scale) {
  const int n = params.rank;
  FusedParams p{};
  AxisParams axes[kAxes];
  std::int64_t length[kAxes];
  padded_axes(params, q, axes, length, &p.tokens);
  for (int a = 0; a < kAxes; ++a) p.plan.axis[a].p = axes[a];  // tiled by the launcher
  p.heads = static_cast<int>(q.shape[n + 1]);
  p.heads_kv = static_cast<int>(k.shape[n + 1]);
  p.dim = static_cast<int>(q.shape[n + 2]);
  p.dim_v = static_cast<int>(v.shape[n + 2]);
  p.scale = static_cast<float>(scale);
  p.q = view_of(q, n);
  p.k = view_of(k, n);
  p.v = view_of(v, n);
  p.rpb = bias_view_of(rpb, n);
  return p;
}

void check_launch(const std::string& op) { check(cudaGetLastError(), op, "kernel launch"); }

UnfusedParams unfused_params(const TensorView& like, std::int64_t heads_kv, std::int64_t dim,
                             const NaParams& params) {
  const int n = params.rank;
  UnfusedParams p{};
  padded_axes(params, like, p.axes, p.length, &p.tokens);
  p.batch = like.shape[0];
  p.slots = params.window_size();
  p.heads = static_cast<int>(like.shape[n + 1]);
  p.heads_kv = static_cast<int>(heads_kv);
  p.dim = static_cast<int>(dim);
  return p;
}

}  // namespace

#if !defined(LIBNA_CUDA_EMULATOR)
std::vector<std::string> architectures() {
  std::vector<std::string> archs;
  std::stringstream list(LIBNA_CUDA_ARCHITECTURES);
  for (std::string arch; std::getline(list, arch, ',');) {
    if (!arch.empty()) archs.push_back("sm_" + arch);
  }
  return archs;
}
#endif

void na_forward(const detail::ForwardArgs& args) {
  const std::string op = op_name(args.params);
  const int n = args.params.rank;
  dispatch_device_types(args.q.dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int bucket = bucket_for(op, args.q.shape[n + 2], args.v.shape[n + 2]);
    DeviceGuard guard(args.q.device.index, op);
    FusedParams p = fused_params(args.q, args.k, args.v, args.rpb, args.params, args.scale);
    p.out = view_of(args.out, n);
    if (args.lse) p.lse = view_of(*args.lse, n);
    const auto stream = static_cast<cudaStream_t>(args.stream);
    const std::int64_t batch = args.q.shape[0];
    bool launched = false;
    if constexpr (!std::is_same_v<T, float>) launched = launch_tc_forward<T>(p, bucket, batch, stream);
    if (!launched) launch_fused_forward<T>(p, bucket, batch, stream);
    check_launch(op);
  });
}

void na_backward(const detail::BackwardArgs& args) {
  const std::string op = op_name(args.params, "_backward");
  const int n = args.params.rank;
  dispatch_device_types(args.q.dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int bucket = bucket_for(op, args.q.shape[n + 2], args.v.shape[n + 2]);
    DeviceGuard guard(args.q.device.index, op);
    const auto stream = static_cast<cudaStream_t>(args.stream);
    FusedParams p = fused_params(args.q, args.k, args.v, args.rpb, args.params, args.scale);
    p.out = view_of(args.out, n);
    p.dout = view_of(args.dout, n);
    p.lse = view_of(args.lse, n);
    if (args.dlse) p.dlse = view_of(*args.dlse, n);
    p.dq = view_of(args.dq, n);
    p.dk = view_of(args.dk, n);
    p.dv = view_of(args.dv, n);
    const std::int64_t batch = args.q.shape[0];
    const Workspace row_terms(sizeof(float) * batch * p.heads * p.tokens, stream, op);
    p.row_term = row_terms.data();
    AxisParams axes[kAxes];
    for (int a = 0; a < kAxes; ++a) axes[a] = p.plan.axis[a].p;
    const BiasGradient<T> bias_grad(args.drpb, axes, p.heads, stream, op);
    p.bias_grad = bias_grad.data();
    bool launched = false;
    if constexpr (!std::is_same_v<T, float>) launched = launch_tc_backward<T>(p, bucket, batch, stream);
    if (!launched) launch_fused_backward<T>(p, bucket, batch, stream);
    check_launch(op);
    bias_grad.finish(n);
  });
}

namespace {

// Runs one unfused op: `like` is the tensor whose [B, *spatial, heads] the op
// iterates, `dim` the head dim it sums over; fill(p) sets the views.
template <typename Fill>
void run_unfused(const std::string& op, UnfusedOp kind, const TensorView& like,
                 std::int64_t heads_kv, std::int64_t dim, const TensorView* drpb,
                 const NaParams& params, void* stream_ptr, Fill&& fill) {
  dispatch_device_types(like.dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    DeviceGuard guard(like.device.index, op);
    const auto stream = static_cast<cudaStream_t>(stream_ptr);
    UnfusedParams p = unfused_params(like, heads_kv, dim, params);
    fill(p);
    const BiasGradient<T> bias_grad(drpb, p.axes, p.heads, stream, op);
    p.bias_grad = bias_grad.data();
    launch_unfused<T>(kind, p, stream);
    check_launch(op);
    bias_grad.finish(params.rank);
  });
}

}  // namespace

void na_qk(const detail::QkArgs& a) {
  const int n = a.params.rank;
  run_unfused(op_name(a.params, "_qk"), UnfusedOp::qk, a.q, a.k.shape[n + 1], a.q.shape[n + 2],
              nullptr, a.params, a.stream, [&](UnfusedParams& p) {
                p.q = view_of(a.q, n);
                p.k = view_of(a.k, n);
                p.attn = view_of(a.attn, n);
                p.rpb = bias_view_of(a.rpb, n);
              });
}

void na_av(const detail::AvArgs& a) {
  const int n = a.params.rank;
  run_unfused(op_name(a.params, "_av"), UnfusedOp::av, a.attn, a.v.shape[n + 1],
              a.v.shape[n + 2], nullptr, a.params, a.stream, [&](UnfusedParams& p) {
                p.attn = view_of(a.attn, n);
                p.v = view_of(a.v, n);
                p.out = view_of(a.out, n);
              });
}

void na_qk_backward(const detail::QkBackwardArgs& a) {
  const int n = a.params.rank;
  run_unfused(op_name(a.params, "_qk_backward"), UnfusedOp::qk_backward, a.q, a.k.shape[n + 1],
              a.q.shape[n + 2], a.drpb, a.params, a.stream, [&](UnfusedParams& p) {
                p.q = view_of(a.q, n);
                p.k = view_of(a.k, n);
                p.dattn = view_of(a.dattn, n);
                p.dq = view_of(a.dq, n);
                p.dk = view_of(a.dk, n);
              });
}

void na_av_backward(const detail::AvBackwardArgs& a) {
  const int n = a.params.rank;
  run_unfused(op_name(a.params, "_av_backward"), UnfusedOp::av_backward, a.attn,
              a.v.shape[n + 1], a.v.shape[n + 2], nullptr, a.params, a.stream,
              [&](UnfusedParams& p) {
                p.attn = view_of(a.attn, n);
                p.v = view_of(a.v, n);
                p.dout = view_of(a.dout, n);
                p.dattn = view_of(a.dattn, n);
                p.dv = view_of(a.dv, n);
              });
}

// Composition (additional keys, merging) has CPU kernels only so far: null
// entries, which ops.cpp reports as not implemented on this backend.
const detail::Backend* backend() {
  static const detail::Backend table{
      LIBNA_CUDA_BACKEND_NAME, "CUDA", {false, tiling::kMaxHeadDim}, &na_forward, &na_qk, &na_av,
      &na_backward, &na_qk_backward, &na_av_backward, nullptr, nullptr, nullptr, nullptr};
  return &table;
}

}  // namespace libna::LIBNA_CUDA_BACKEND
