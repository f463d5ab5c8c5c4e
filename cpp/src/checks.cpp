// The checks of checks.h.
#include "checks.h"

namespace libna::detail {

// `t` (an output, or an input such as dout whose shape follows from the
// others) has exactly the expected shape, dtype and device.
void check_like(const Checker& c, const char* role, const char* name, const TensorView& t,
                const TensorView& expected_shape, DType dtype, const TensorView& like) {
  const std::string what = std::string(role) + name;
  bool ok = t.ndim == expected_shape.ndim;
  for (int i = 0; ok && i < t.ndim; ++i) ok = t.shape[i] == expected_shape.shape[i];
  if (!ok) {
    c.fail(what + " must have shape " + shape_str(expected_shape) + ", got " + shape_str(t));
  }
  if (t.dtype != dtype) {
    throw dtype_error("[" + c.op() + "] " + what + " must have dtype " + dtype_name(dtype) +
                      ", got " + dtype_name(t.dtype));
  }
  if (t.device != like.device) {
    c.fail(what + " is on " + device_name(t.device) + " but the inputs are on " +
           device_name(like.device));
  }
}

void check_input_like(const Checker& c, const char* name, const TensorView& t,
                      const TensorView& expected_shape, DType dtype, const TensorView& like) {
  check_like(c, "", name, t, expected_shape, dtype, like);
}

// q/k (and v) agree in batch, spatial extents and head dims; heads divide.
void check_qkv(const Checker& c, const TensorView& q, const TensorView& k, const TensorView* v) {
  const int n = c.rank();
  c.attention_tensor("q", q, "heads, head_dim");
  c.attention_tensor("k", k, "heads_kv, head_dim");
  c.same_dtype_and_device("q", q, "k", k);
  c.same_dims("q", q, "k", k, 0, n + 1, "batch and spatial");
  if (k.shape[n + 2] != q.shape[n + 2]) {
    c.fail("k head_dim " + std::to_string(k.shape[n + 2]) + " (shape " + shape_str(k) +
           ") does not match q head_dim " + std::to_string(q.shape[n + 2]) + " (shape " +
           shape_str(q) + ")");
  }
  const std::int64_t heads = q.shape[n + 1], heads_kv = k.shape[n + 1];
  if (heads % heads_kv != 0) {
    c.fail("q has " + std::to_string(heads) + " heads, which is not a multiple of the " +
           std::to_string(heads_kv) + " heads of k and v (grouped-query attention needs heads "
           "divisible by heads_kv)");
  }
  if (v != nullptr) {
    c.attention_tensor("v", *v, "heads_kv, head_dim_v");
    c.same_dtype_and_device("q", q, "v", *v);
    c.same_dims("k", k, "v", *v, 0, n + 2, "batch, spatial and heads");
  }
  c.window_params(q);
}

void check_forward_inputs(const Checker& c, const TensorView& q, const TensorView& k,
                          const TensorView& v, const TensorView* rpb,
                          const std::optional<double>& scale) {
  c.rank_is_valid();
  check_qkv(c, q, k, &v);
  if (rpb != nullptr) c.rpb(*rpb, q);
  c.scale(scale);
}

void check_av_inputs(const Checker& c, const TensorView& attn, const TensorView& v) {
  const NaParams& params = c.params();
  c.rank_is_valid();
  c.stride_is_one();
  const int n = params.rank;
  c.attention_tensor("attn", attn, "heads, prod(kernel_size)");
  c.attention_tensor("v", v, "heads_kv, head_dim_v");
  c.same_dtype_and_device("attn", attn, "v", v);
  c.same_dims("attn", attn, "v", v, 0, n + 1, "batch and spatial");
  const std::int64_t heads = attn.shape[n + 1], heads_kv = v.shape[n + 1];
  if (heads % heads_kv != 0) {
    c.fail("attn has " + std::to_string(heads) + " heads, which is not a multiple of the " +
           std::to_string(heads_kv) + " heads of v");
  }
  c.window_params(v);
  if (attn.shape[n + 2] != params.window_size()) {
    c.fail("attn last dimension must be prod(kernel_size) = " +
           std::to_string(params.window_size()) + ", got shape " + shape_str(attn));
  }
}

void check_additional(const Checker& c, const TensorView& q, const TensorView& keys,
                      const TensorView& values) {
  c.attention_tensor("q", q, "heads, head_dim");
  const int n = c.rank();
  auto check_one = [&](const char* name, const TensorView& t, const char* last) {
    if (t.ndim != 4) {
      c.fail(std::string(name) + " must have 4 dimensions [batch, num_additional, heads_kv, " +
             last + "], got " + std::to_string(t.ndim) + " with shape " + shape_str(t));
    }
    c.nonempty(name, t);
    c.same_dtype_and_device("q", q, name, t);
    if (t.shape[0] != q.shape[0]) {
      c.fail(std::string(name) + " has batch " + std::to_string(t.shape[0]) + " (shape " +
             shape_str(t) + ") but q has batch " + std::to_string(q.shape[0]) + " (shape " +
             shape_str(q) + ")");
    }
  };
  check_one("additional_keys", keys, "head_dim");
  check_one("additional_values", values, "head_dim_v");
  c.same_dims("additional_keys", keys, "additional_values", values, 0, 3,
              "batch, num_additional and heads_kv");
  if (keys.shape[3] != q.shape[n + 2]) {
    c.fail("additional_keys head_dim " + std::to_string(keys.shape[3]) + " (shape " +
           shape_str(keys) + ") does not match q head_dim " + std::to_string(q.shape[n + 2]) +
           " (shape " + shape_str(q) + ")");
  }
  const std::int64_t heads = q.shape[n + 1], heads_kv = keys.shape[2];
  if (heads % heads_kv != 0) {
    c.fail("q has " + std::to_string(heads) + " heads, which is not a multiple of the " +
           std::to_string(heads_kv) + " heads of additional_keys and additional_values");
  }
}

[[noreturn]] void merge_fail(const char* op, const std::string& message) {
  throw std::invalid_argument(std::string("[") + op + "] " + message);
}

// `t` has exactly the shape, dtype and device of `like` (dtype `dtype`).
void merge_like(const char* op, const std::string& name, const TensorView& t,
                const TensorView& shape_of, DType dtype, const TensorView& like) {
  bool ok = t.ndim == shape_of.ndim;
  for (int i = 0; ok && i < t.ndim; ++i) ok = t.shape[i] == shape_of.shape[i];
  if (!ok) {
    merge_fail(op, name + " must have shape " + shape_str(shape_of) + ", got " + shape_str(t));
  }
  if (t.dtype != dtype) {
    throw dtype_error(std::string("[") + op + "] " + name + " has dtype " +
                      dtype_name(t.dtype) + "; expected " + dtype_name(dtype));
  }
  if (t.device != like.device) {
    merge_fail(op, name + " is on " + device_name(t.device) + " but outs[0] is on " +
                       device_name(like.device));
  }
}

void check_merge_inputs(const char* op, const std::vector<TensorView>& outs,
                        const std::vector<TensorView>& lses) {
  if (outs.empty()) merge_fail(op, "outs is empty; expected at least one partial attention");
  if (outs.size() != lses.size()) {
    merge_fail(op, "got " + std::to_string(outs.size()) + " outs but " +
                       std::to_string(lses.size()) + " lses; expected one lse per out");
  }
  const TensorView& first = outs[0];
  if (first.ndim < 2) {
    merge_fail(op, "outs[0] must have at least 2 dimensions [..., head_dim_v], got shape " +
                       shape_str(first));
  }
  for (int i = 0; i < first.ndim; ++i) {
    if (first.shape[i] <= 0) {
      merge_fail(op, "outs[0] has a zero-size dimension: shape " + shape_str(first));
    }
  }
  for (std::size_t i = 0; i < outs.size(); ++i) {
    const std::string idx = "[" + std::to_string(i) + "]";
    merge_like(op, "outs" + idx, outs[i], first, first.dtype, first);
    merge_like(op, "lses" + idx, lses[i], first.with_last_dim(-1), lse_dtype(first.dtype), first);
  }
}

}  // namespace libna::detail
