// Validation: what the arguments of each op must be, with the op name and
// the offending values in every message (std::invalid_argument, or
// dtype_error for element types). The plans in ops.cpp call these once.
#pragma once

#include <cmath>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "libna/na.h"

namespace libna::detail {

inline std::string shape_str(const TensorView& t) {
  std::ostringstream s;
  s << "(";
  for (int i = 0; i < t.ndim; ++i) s << (i ? ", " : "") << t.shape[i];
  s << (t.ndim == 1 ? ",)" : ")");
  return s.str();
}

template <typename T>
std::string tuple_str(const T* values, int n) {
  std::ostringstream s;
  s << "(";
  for (int i = 0; i < n; ++i) s << (i ? ", " : "") << values[i];
  s << (n == 1 ? ",)" : ")");
  return s.str();
}

inline std::string layout(int rank, const char* last) {
  return std::string("[batch, *spatial(") + std::to_string(rank) + "), " + last + "]";
}

// The checks every op shares, failing with the name of the op the user
// called: na{rank}d and `suffix` ("_backward", "_qk", ...).
class Checker {
 public:
  Checker(const NaParams& params, const char* suffix)
      : params_(params), op_(op_name(params, suffix)) {}

  [[noreturn]] void fail(const std::string& message) const {
    throw std::invalid_argument("[" + op_ + "] " + message);
  }
  const std::string& op() const { return op_; }
  const NaParams& params() const { return params_; }
  int rank() const { return params_.rank; }

  void rank_is_valid() const {
    if (params_.rank < 1 || params_.rank > kMaxSpatialRank) {
      fail("spatial rank must be 1, 2 or 3, got " + std::to_string(params_.rank));
    }
  }

  // t has rank + 3 dimensions, none of them empty.
  void attention_tensor(const char* name, const TensorView& t, const char* last) const {
    if (t.ndim != params_.rank + 3) {
      fail(std::string(name) + " must have " + std::to_string(params_.rank + 3) +
           " dimensions " + layout(params_.rank, last) + ", got " + std::to_string(t.ndim) +
           " with shape " + shape_str(t));
    }
    nonempty(name, t);
  }

  void nonempty(const char* name, const TensorView& t) const {
    for (int i = 0; i < t.ndim; ++i) {
      if (t.shape[i] <= 0) {
        fail(std::string(name) + " has a zero-size dimension: shape " + shape_str(t) +
             "; every dimension must be at least 1");
      }
    }
  }

  void same_dtype_and_device(const char* ref_name, const TensorView& ref, const char* name,
                             const TensorView& t) const {
    if (t.dtype != ref.dtype) {
      throw dtype_error("[" + op_ + "] " + name + " has dtype " + dtype_name(t.dtype) +
                        " but " + ref_name + " has dtype " + dtype_name(ref.dtype) +
                        "; all inputs must share one dtype");
    }
    if (t.device != ref.device) {
      fail(std::string(name) + " is on " + device_name(t.device) + " but " + ref_name +
           " is on " + device_name(ref.device) + "; all inputs must be on one device");
    }
  }

  // Dimensions [first, last) of a and b agree.
  void same_dims(const char* a_name, const TensorView& a, const char* b_name,
                 const TensorView& b, int first, int last, const char* what) const {
    for (int i = first; i < last; ++i) {
      if (a.shape[i] != b.shape[i]) {
        fail(std::string(b_name) + " shape " + shape_str(b) + " does not match " + a_name +
             " shape " + shape_str(a) + " in the " + what + " dimensions");
      }
    }
  }

  // kernel, stride, dilation against the spatial extents of `t`.
  void window_params(const TensorView& t) const {
    const int n = params_.rank;
    std::int64_t spatial[kMaxSpatialRank] = {};
    for (int a = 0; a < n; ++a) spatial[a] = t.shape[1 + a];
    const auto& ks = params_.kernel_size;
    const auto& st = params_.stride;
    const auto& dl = params_.dilation;
    for (int a = 0; a < n; ++a) {
      if (ks[a] < 2) {
        fail("kernel_size=" + tuple_str(ks.data(), n) + " must be at least 2 along every axis");
      }
      if (dl[a] < 1) {
        fail("dilation=" + tuple_str(dl.data(), n) + " must be at least 1 along every axis");
      }
      if (ks[a] > spatial[a]) {
        fail("kernel_size=" + tuple_str(ks.data(), n) + " must not exceed the spatial extent " +
             tuple_str(spatial, n) + " along any axis");
      }
      if (dl[a] > spatial[a] / ks[a]) {  // kernel * dilation > extent, without overflow
        fail("kernel_size * dilation = " + tuple_str(ks.data(), n) + " * " +
             tuple_str(dl.data(), n) + " must not exceed the spatial extent " +
             tuple_str(spatial, n) + " along any axis");
      }
      if (st[a] < 1 || st[a] > ks[a]) {
        fail("stride=" + tuple_str(st.data(), n) +
             " must be between 1 and the kernel size " + tuple_str(ks.data(), n) +
             " along every axis");
      }
    }
  }

  void stride_is_one() const {
    for (int a = 0; a < params_.rank; ++a) {
      if (params_.stride[a] != 1) {
        fail("stride=" + tuple_str(params_.stride.data(), params_.rank) +
             " is not supported here; only stride 1");
      }
    }
  }

  void rpb(const TensorView& rpb, const TensorView& q) const {
    const int n = params_.rank;
    for (int a = 0; a < n; ++a) {
      if (params_.is_causal[a]) {
        fail("rpb (relative positional bias) is only defined for non-causal attention, got "
             "is_causal=" + causal_str());
      }
      if (params_.stride[a] != 1) {
        fail("rpb (relative positional bias) is only defined for stride 1, got stride=" +
             tuple_str(params_.stride.data(), n));
      }
    }
    same_dtype_and_device("q", q, "rpb", rpb);
    bool ok = rpb.ndim == n + 1 && rpb.shape[0] == q.shape[n + 1];
    for (int a = 0; ok && a < n; ++a) ok = rpb.shape[1 + a] == 2 * params_.kernel_size[a] - 1;
    if (!ok) {
      std::int64_t expected[kMaxSpatialRank + 1] = {q.shape[n + 1]};
      for (int a = 0; a < n; ++a) expected[1 + a] = 2 * params_.kernel_size[a] - 1;
      fail("rpb must have shape [heads, 2*kernel_size-1 per axis] = " +
           tuple_str(expected, n + 1) + ", got " + shape_str(rpb));
    }
  }

  void scale(const std::optional<double>& scale) const {
    if (scale && !std::isfinite(*scale)) {
      fail("scale=" + std::to_string(*scale) + " must be a finite number");
    }
  }

  std::string causal_str() const {
    std::ostringstream s;
    s << "(";
    for (int a = 0; a < params_.rank; ++a) {
      s << (a ? ", " : "") << (params_.is_causal[a] ? "True" : "False");
    }
    s << (params_.rank == 1 ? ",)" : ")");
    return s.str();
  }

 private:
  const NaParams& params_;
  std::string op_;
};

// `t` (an output, or an input such as dout whose shape follows from the
// others) has exactly the expected shape, dtype and device; `role` prefixes
// its name in messages ("output ", or "" for an input).
void check_like(const Checker& c, const char* role, const char* name, const TensorView& t,
                const TensorView& expected_shape, DType dtype, const TensorView& like);
void check_input_like(const Checker& c, const char* name, const TensorView& t,
                      const TensorView& expected_shape, DType dtype, const TensorView& like);
// q/k (and v) agree in batch, spatial extents and head dims; heads divide.
void check_qkv(const Checker& c, const TensorView& q, const TensorView& k, const TensorView* v);
// The fused forward's inputs, for the op `c` names (the forward or its backward).
void check_forward_inputs(const Checker& c, const TensorView& q, const TensorView& k,
                          const TensorView& v, const TensorView* rpb,
                          const std::optional<double>& scale);
// The unfused na_av's inputs (and its backward's).
void check_av_inputs(const Checker& c, const TensorView& attn, const TensorView& v);
// q [B, *spatial, heads, D]; additional_keys [B, N, heads_kv, D];
// additional_values [B, N, heads_kv, D_v].
void check_additional(const Checker& c, const TensorView& q, const TensorView& keys,
                      const TensorView& values);

// merge_attentions(_backward), whose messages name the op alone.
[[noreturn]] void merge_fail(const char* op, const std::string& message);
// `t` has exactly the shape of `shape_of`, dtype `dtype` and the device of `like`.
void merge_like(const char* op, const std::string& name, const TensorView& t,
                const TensorView& shape_of, DType dtype, const TensorView& like);
void check_merge_inputs(const char* op, const std::vector<TensorView>& outs,
                        const std::vector<TensorView>& lses);

}  // namespace libna::detail
