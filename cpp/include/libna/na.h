// libna's operators. Each one validates its arguments (throwing
// std::invalid_argument, or libna::dtype_error for element-type problems,
// with the op name and offending values in the message) and then runs on
// the device that holds the tensors.
//
// Layout is heads-last: q [B, *spatial, heads, D], k [B, *spatial, heads_kv, D],
// v [B, *spatial, heads_kv, D_v]. Outputs are allocated by the caller.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "libna/export.h"
#include "libna/tensor.h"
#include "libna/window.h"

namespace libna {

struct NaParams {
  int rank = 2;  // number of spatial axes: 1, 2 or 3
  std::array<std::int64_t, kMaxSpatialRank> kernel_size{};
  std::array<std::int64_t, kMaxSpatialRank> stride{1, 1, 1};
  std::array<std::int64_t, kMaxSpatialRank> dilation{1, 1, 1};
  std::array<bool, kMaxSpatialRank> is_causal{};
  std::optional<double> scale;  // softmax scale; default head_dim^-0.5

  // Per-axis neighbourhood parameters for spatial extents `spatial`.
  AxisParams axis(int a, std::int64_t length) const {
    return AxisParams{length, kernel_size[a], stride[a], dilation[a], is_causal[a]};
  }
  // Number of attention slots per query: prod(kernel_size).
  std::int64_t window_size() const {
    std::int64_t n = 1;
    for (int a = 0; a < rank; ++a) n *= kernel_size[a];
    return n;
  }
};

// Element type of lse for inputs of `input` type: float32, float64 for float64.
inline DType lse_dtype(DType input) {
  return input == DType::float64 ? DType::float64 : DType::float32;
}

// "na2d" etc.: the name used in error messages.
LIBNA_API std::string op_name(const NaParams& params, const char* suffix = "");

// ---- fused attention --------------------------------------------------------
// out = softmax(scale * q.k + rpb) . v over each query's neighbourhood.
// rpb: optional [heads, 2k_1-1, ..., 2k_n-1] (non-causal, stride 1 only).
// lse: optional [B, *spatial, heads], float32 (float64 for float64 inputs).
// additional_keys [B, N, heads_kv, D] and additional_values [B, N, heads_kv,
// D_v] (optional, both or neither): N keys every query attends to besides its
// neighbourhood, in the same softmax (on CPU tensors only so far). Without
// lse, they need an lse workspace: allocated here for CPU tensors (the plan
// names it, for callers that allocate their own).
LIBNA_API void na_forward(const TensorView& q, const TensorView& k,
                          const TensorView& v, const TensorView* rpb,
                          const TensorView& out, const TensorView* lse,
                          const NaParams& params, void* stream = nullptr,
                          const TensorView* additional_keys = nullptr,
                          const TensorView* additional_values = nullptr);

// Checks the inputs of na_forward without running it (nothing is read from
// the data pointers), so that callers can validate before they allocate.
LIBNA_API void check_na_forward(const TensorView& q, const TensorView& k,
                                const TensorView& v, const TensorView* rpb,
                                const NaParams& params);

// ---- unfused attention (stride 1) ------------------------------------------
// attn [B, *spatial, heads, prod(kernel_size)] = q.k (+ rpb), unscaled. Slot t
// is the row-major index of the per-axis window positions; slots that a causal
// window does not fill are set to -inf.
LIBNA_API void na_qk(const TensorView& q, const TensorView& k,
                     const TensorView* rpb, const TensorView& attn,
                     const NaParams& params, void* stream = nullptr);
LIBNA_API void check_na_qk(const TensorView& q, const TensorView& k,
                           const TensorView* rpb, const NaParams& params);

// out [B, *spatial, heads, D_v] = attn . v with attn in the na_qk slot layout;
// slots outside a causal window are ignored.
LIBNA_API void na_av(const TensorView& attn, const TensorView& v,
                     const TensorView& out, const NaParams& params,
                     void* stream = nullptr);
LIBNA_API void check_na_av(const TensorView& attn, const TensorView& v,
                           const NaParams& params);

// ---- gradients ---------------------------------------------------------------
// Fused backward of na_forward, FlashAttention-2 style: the probabilities are
// recomputed from lse (as returned by na_forward), with the row term
// D_i = dout_i . out_i - dlse_i (dlse: the optional gradient of lse, when the
// forward's lse feeds the loss); no score tensor is materialised. dq, dk, dv
// have the shapes of q, k, v (dk/dv sum over the query heads of each kv
// head); drpb, given exactly when rpb is, has rpb's shape and sums over batch
// and queries. With the forward's additional keys/values, their gradients
// d_additional_keys/values (given exactly when they are) come from the same
// out and lse, and dq holds both parts' share.
LIBNA_API void na_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                           const TensorView* rpb, const TensorView& out,
                           const TensorView& dout, const TensorView& lse,
                           const TensorView& dq, const TensorView& dk, const TensorView& dv,
                           const TensorView* drpb, const NaParams& params,
                           void* stream = nullptr, const TensorView* dlse = nullptr,
                           const TensorView* additional_keys = nullptr,
                           const TensorView* additional_values = nullptr,
                           const TensorView* d_additional_keys = nullptr,
                           const TensorView* d_additional_values = nullptr);
LIBNA_API void check_na_backward(const TensorView& q, const TensorView& k,
                                 const TensorView& v, const TensorView* rpb,
                                 const TensorView& out, const TensorView& dout,
                                 const TensorView& lse, const NaParams& params);

// Backward of na_qk: dq, dk (and drpb, when given) from dattn.
LIBNA_API void na_qk_backward(const TensorView& dattn, const TensorView& q,
                              const TensorView& k, const TensorView& dq, const TensorView& dk,
                              const TensorView* drpb, const NaParams& params,
                              void* stream = nullptr);
LIBNA_API void check_na_qk_backward(const TensorView& dattn, const TensorView& q,
                                    const TensorView& k, const TensorView* drpb,
                                    const NaParams& params);

// Backward of na_av: dattn (zero in slots outside a causal window) and dv.
LIBNA_API void na_av_backward(const TensorView& dout, const TensorView& attn,
                              const TensorView& v, const TensorView& dattn,
                              const TensorView& dv, const NaParams& params,
                              void* stream = nullptr);
LIBNA_API void check_na_av_backward(const TensorView& dout, const TensorView& attn,
                                    const TensorView& v, const NaParams& params);

// ---- composition: additional keys and merging ------------------------------
// na_forward / na_backward with additional keys are composed of these (the
// additional part merged into the neighbourhood's out and lse row by row;
// its dq added to the neighbourhood's); they are also ops of their own.

// Dense attention of every query over N additional keys shared by all query
// positions of a batch entry: out = softmax(scale * q.k) . v over the N keys.
// q [B, *spatial, heads, D], additional_keys [B, N, heads_kv, D],
// additional_values [B, N, heads_kv, D_v]; out [B, *spatial, heads, D_v];
// lse (optional) as for na_forward. Only params.rank and params.scale are used
// (errors are reported as na{rank}d's).
LIBNA_API void na_additional_forward(const TensorView& q, const TensorView& additional_keys,
                                     const TensorView& additional_values,
                                     const TensorView& out, const TensorView* lse,
                                     const NaParams& params, void* stream = nullptr);
LIBNA_API void check_na_additional_forward(const TensorView& q,
                                           const TensorView& additional_keys,
                                           const TensorView& additional_values,
                                           const NaParams& params);

// Gradients of the additional-key part, FlashAttention-2 style from the out,
// dout and lse of the whole (merged) attention: dq is this part's share of
// the query gradient; dk/dv (the shapes of additional_keys/values) sum over
// the query heads of each kv head.
LIBNA_API void na_additional_backward(const TensorView& q, const TensorView& additional_keys,
                                      const TensorView& additional_values,
                                      const TensorView& out, const TensorView& dout,
                                      const TensorView& lse, const TensorView& dq,
                                      const TensorView& dk, const TensorView& dv,
                                      const NaParams& params, void* stream = nullptr);
LIBNA_API void check_na_additional_backward(const TensorView& q,
                                            const TensorView& additional_keys,
                                            const TensorView& additional_values,
                                            const TensorView& out, const TensorView& dout,
                                            const TensorView& lse, const NaParams& params);

// Exact combination of attentions of the same queries over disjoint key sets
// from their log-sum-exps: lse = log(sum_i exp(lse_i)),
// out = sum_i exp(lse_i - lse) * out_i. outs[i] [..., D_v] share one shape and
// dtype; lses[i] [...] have dtype lse_dtype(outs dtype). A part whose lse is
// -inf (no keys) has weight 0; rows where every part is -inf give out 0.
LIBNA_API void merge_attentions(const std::vector<TensorView>& outs,
                                const std::vector<TensorView>& lses, const TensorView& out,
                                const TensorView& lse, void* stream = nullptr);
LIBNA_API void check_merge_attentions(const std::vector<TensorView>& outs,
                                      const std::vector<TensorView>& lses);

// Gradients of merge_attentions given the merged out, lse and dout (and dlse,
// optional): douts[i] = w_i * dout, dlses[i] = w_i * (dout . (out_i - out) + dlse)
// with w_i = exp(lse_i - lse).
LIBNA_API void merge_attentions_backward(const std::vector<TensorView>& outs,
                                         const std::vector<TensorView>& lses,
                                         const TensorView& out, const TensorView& lse,
                                         const TensorView& dout, const TensorView* dlse,
                                         const std::vector<TensorView>& douts,
                                         const std::vector<TensorView>& dlses,
                                         void* stream = nullptr);
LIBNA_API void check_merge_attentions_backward(const std::vector<TensorView>& outs,
                                               const std::vector<TensorView>& lses,
                                               const TensorView& out, const TensorView& lse,
                                               const TensorView& dout, const TensorView* dlse);

// ---- planned calls -------------------------------------------------------------
// Every op above is plan_<op> + Plan::run. plan_<op> validates a call once
// (the same errors as the op) and says what it will write: the name, shape,
// dtype and device of each output. The inputs' data pointers are not read,
// so front ends plan with data-less views to learn output shapes (the torch
// fake kernels, JAX's abstract evaluation) and plan, allocate and run to
// compute (the Python bindings). run(outputs) checks only that the outputs
// match the plan and that every tensor has data, then runs the backend: the
// inputs are not validated again. A plan holds views, not data: the inputs
// must outlive run.
class LIBNA_API Plan {
 public:
  struct Output {
    std::string name;  // "out", "lse", "dq", ... ("douts[0]" for merge_attentions_backward)
    TensorView spec;   // shape, dtype, device; no data
    bool wanted = true;  // false for an optional output the call does not produce
    // The shape rule: input `like`'s shape with its last dimension kept
    // (same), dropped (drop), taken from input `last_value`'s last dimension
    // (input), or set to `last_value` (constant). Front ends with symbolic
    // shapes (torch.compile) build outputs from it.
    enum class Last { same, drop, input, constant };
    int like = 0;
    Last last = Last::same;
    std::int64_t last_value = 0;
    // Scratch the op needs (e.g. lse when additional keys are merged and the
    // caller did not ask for it): the caller allocates it like any output
    // and passes it to run, but it is not a result.
    bool workspace = false;
  };
  using Runner = void (*)(const Plan& plan, const std::vector<TensorView>& outputs,
                          void* stream);

  // inputs: in the op's documented order, nullopt for an absent optional
  // one, and their names.
  Plan(std::string op, std::vector<std::optional<TensorView>> inputs,
       std::vector<std::string> input_names, std::vector<Output> outputs, Runner runner,
       std::shared_ptr<const void> state);

  const std::string& op() const { return op_; }
  const std::vector<std::optional<TensorView>>& inputs() const { return inputs_; }
  const std::vector<std::string>& input_names() const { return input_names_; }
  const std::vector<Output>& outputs() const { return outputs_; }
  // outputs: one view per entry of outputs(), in order (unwanted ones are
  // ignored and may be default views).
  void run(const std::vector<TensorView>& outputs, void* stream = nullptr) const;

  // For the runners: op-specific state made by the planner.
  template <typename T>
  const T& state() const { return *static_cast<const T*>(state_.get()); }

 private:
  std::string op_;
  std::vector<std::optional<TensorView>> inputs_;
  std::vector<std::string> input_names_;
  std::vector<Output> outputs_;
  Runner runner_;
  std::shared_ptr<const void> state_;
};

// Inputs in order: q, k, v, rpb, additional_keys, additional_values (the
// last three optional). Outputs: out, lse (wanted when with_lse; a workspace
// when only the additional keys need it).
LIBNA_API Plan plan_na_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                               const TensorView* rpb, const NaParams& params, bool with_lse,
                               const TensorView* additional_keys = nullptr,
                               const TensorView* additional_values = nullptr);
// Inputs: q, k, rpb (optional). Outputs: attn.
LIBNA_API Plan plan_na_qk(const TensorView& q, const TensorView& k, const TensorView* rpb,
                          const NaParams& params);
// Inputs: attn, v. Outputs: out.
LIBNA_API Plan plan_na_av(const TensorView& attn, const TensorView& v, const NaParams& params);
// Inputs: q, k, v, rpb (optional), out, dout, lse, dlse (optional: the
// gradient of lse, when the forward's lse feeds the loss; [B, *spatial,
// heads] in lse's dtype), additional_keys, additional_values (optional).
// Outputs: dq, dk, dv, drpb (wanted when rpb is given), d(additional_keys),
// d(additional_values) (wanted when they are given).
LIBNA_API Plan plan_na_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                                const TensorView* rpb, const TensorView& out,
                                const TensorView& dout, const TensorView& lse,
                                const NaParams& params, const TensorView* dlse = nullptr,
                                const TensorView* additional_keys = nullptr,
                                const TensorView* additional_values = nullptr);
// Inputs: dattn, q, k, rpb (optional).
// Outputs: dq, dk, drpb (wanted when rpb, whose shape drpb takes, is given).
LIBNA_API Plan plan_na_qk_backward(const TensorView& dattn, const TensorView& q,
                                   const TensorView& k, const TensorView* rpb,
                                   const NaParams& params);
// Inputs: dout, attn, v. Outputs: dattn, dv.
LIBNA_API Plan plan_na_av_backward(const TensorView& dout, const TensorView& attn,
                                   const TensorView& v, const NaParams& params);
// Inputs: q, additional_keys, additional_values.
// Outputs: out, lse (wanted when with_lse).
LIBNA_API Plan plan_na_additional_forward(const TensorView& q, const TensorView& additional_keys,
                                          const TensorView& additional_values,
                                          const NaParams& params, bool with_lse);
// Inputs: q, additional_keys, additional_values, out, dout, lse, dlse (optional).
// Outputs: dq, d(additional_keys), d(additional_values).
LIBNA_API Plan plan_na_additional_backward(const TensorView& q,
                                           const TensorView& additional_keys,
                                           const TensorView& additional_values,
                                           const TensorView& out, const TensorView& dout,
                                           const TensorView& lse, const NaParams& params,
                                           const TensorView* dlse = nullptr);
// Inputs: outs..., lses.... Outputs: out, lse.
LIBNA_API Plan plan_merge_attentions(const std::vector<TensorView>& outs,
                                     const std::vector<TensorView>& lses);
// Inputs: outs..., lses..., out, lse, dout, dlse (optional).
// Outputs: douts[0..n), then dlses[0..n).
LIBNA_API Plan plan_merge_attentions_backward(const std::vector<TensorView>& outs,
                                              const std::vector<TensorView>& lses,
                                              const TensorView& out, const TensorView& lse,
                                              const TensorView& dout, const TensorView* dlse);

// ---- CPU thread pool --------------------------------------------------------
// Threads used by the CPU backend (1 to kMaxNumThreads); the default comes
// from LIBNA_NUM_THREADS, else the cores this process may run on.
inline constexpr int kMaxNumThreads = 1024;
LIBNA_API void set_num_threads(int num_threads);

// Testing the CUDA backend without a GPU (a build with LIBNA_CUDA_EMULATOR=ON):
// while `arch` is set (75, 80, 86, 89 or 90; 0 turns it off), calls on CPU
// tensors run the CUDA backend's kernels on the host under an emulation of
// the CUDA execution model, choosing kernels as a GPU of that compute
// capability would (75: SIMT only; 80 and up: tensor cores for float16 and
// bfloat16). `checks` randomises the order in which the threads of a block
// run between barriers and checks shared-memory and global accesses (see
// cuda/emulator/). Process-wide; throws std::runtime_error in a build without
// the emulator and std::invalid_argument for another arch.
LIBNA_API void set_cuda_emulator(int arch, bool checks = false);
LIBNA_API int cuda_emulator_arch();
LIBNA_API bool cuda_emulator_checks();
// The kernels the emulator ran since the previous call, by name, in order.
LIBNA_API std::vector<std::string> cuda_emulator_launches();
// Runs one of the emulator's self-test kernels (cuda/emulator/self_test.cpp;
// two blocks of 64 threads) and returns its output: "neighbour_read",
// "overwrite_after_read", "warp_sum" and "atomic_count" are correct kernels
// with known answers; "neighbour_read_racy", "overwrite_after_read_racy" and
// "count_racy" each lack one barrier or atomic, so that a ThreadSanitizer
// build reports a data race (scripts/check_build.py tsan checks both ways).
// Throws std::runtime_error without the emulator, std::invalid_argument for
// another name.
LIBNA_API std::vector<float> cuda_emulator_self_test(const std::string& kernel);
LIBNA_API int get_num_threads();

// ---- host memory for outputs ---------------------------------------------------
// 64-byte aligned host memory, for outputs that a binding allocates on its
// caller's behalf (libna's Python module does for PyTorch CPU tensors).
// host_free keeps a freed block of 1 MiB or more, up to LIBNA_HOST_CACHE_BYTES
// of them in all (default 256 MiB; 0 keeps none), and host_allocate hands it
// out again for the next request of the same size (rounded up to 64 KiB):
// fresh memory of that size costs a page fault per 4 KiB page on first touch,
// which repeated calls of one shape would otherwise pay every time. Both are
// thread-safe; `bytes` must be the size the block was allocated with.
LIBNA_API void* host_allocate(std::size_t bytes);
LIBNA_API void host_free(void* data, std::size_t bytes) noexcept;
struct HostCacheInfo {
  std::size_t blocks = 0, bytes = 0;  // kept now
  std::size_t limit = 0;              // LIBNA_HOST_CACHE_BYTES
  std::uint64_t reused = 0;           // allocations served from kept blocks, so far
};
LIBNA_API HostCacheInfo host_cache_info();
// Frees the kept blocks (later frees keep blocks again).
LIBNA_API void empty_host_cache();

// libna reads its environment variables (LIBNA_NUM_THREADS,
// LIBNA_CPU_SAVED_PROBS_BYTES, LIBNA_HOST_CACHE_BYTES) once per process and
// uses the default for an invalid value. The first call returns a message for
// each such value (which libna otherwise prints to stderr when it reads them);
// later calls, none.
LIBNA_API std::vector<std::string> environment_warnings();

// ---- build description ------------------------------------------------------
struct BuildInfo {
  std::string version;
  std::vector<std::string> dtypes;          // every DType's name (kDTypes)
  std::vector<std::string> backends;        // "cpu", and "cuda" when compiled
  std::vector<std::string> cuda_architectures;
  std::string cpu_kernels;  // "avx512", "avx2" or "portable" (LIBNA_CPU_KERNELS)
  std::string simd;                         // SIMD level the CPU backend uses
  // Whether the CPU backend computes the bfloat16 forward and backward on AMX
  // tiles: the CPU has AMX-BF16, the kernel set is avx512, LIBNA_CPU_AMX is not 0.
  bool cpu_amx = false;
  std::string compiler;
};
// Throws std::invalid_argument when LIBNA_CPU_KERNELS names kernels that this
// CPU cannot run or that do not exist, as every CPU op then does.
LIBNA_API BuildInfo build_info();

}  // namespace libna
