// The plans: each op validated once (checks.h), its outputs described, and
// the runner that calls its backend entries (routing.h) on the caller's
// outputs.
#include <array>
#include <cmath>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "backend.h"
#include "checks.h"
#include "libna/na.h"
#include "routing.h"

namespace libna {

using namespace detail;

std::string op_name(const NaParams& params, const char* suffix) {
  return "na" + std::to_string(params.rank) + "d" + suffix;
}

namespace {

// ---- plans ----------------------------------------------------------------------

double resolve_scale(const NaParams& params, const TensorView& q) {
  return params.scale ? *params.scale : 1.0 / std::sqrt(static_cast<double>(q.shape[q.ndim - 1]));
}

using Last = Plan::Output::Last;

// A plan's inputs in the op's documented order, each with its name (for
// Plan::run's messages); an absent optional one is nullopt.
struct Inputs {
  std::vector<std::string> names;
  std::vector<std::optional<TensorView>> views;

  Inputs() {
    names.reserve(kMostInputs);
    views.reserve(kMostInputs);
  }
  static constexpr std::size_t kMostInputs = 10;  // na_backward's (merges may add more)

  Inputs& add(std::string name, const TensorView* t) {
    names.push_back(std::move(name));
    views.push_back(t ? std::optional<TensorView>(*t) : std::nullopt);
    return *this;
  }
  Inputs& add(std::string name, const TensorView& t) { return add(std::move(name), &t); }
  bool has(int i) const { return views[i].has_value(); }
};

// The plan of `op` on `inputs`. The inputs are taken by reference and moved
// from only here, after every argument of the call is evaluated: the
// outputs are often built from them in the same call (an argument moved
// from in place would be read moved-from under some evaluation orders).
Plan plan_of(std::string op, Inputs&& inputs, std::vector<Plan::Output> outputs,
             Plan::Runner runner, std::shared_ptr<const void> state) {
  return Plan(std::move(op), std::move(inputs.views), std::move(inputs.names),
              std::move(outputs), runner, std::move(state));
}

// Output `name`: input `like`'s shape with its last dimension changed by
// `last` (see Plan::Output), of `dtype`, on the inputs' device.
Plan::Output output(std::string name, const Inputs& inputs, int like, DType dtype,
                    Last last = Last::same, std::int64_t last_value = 0, bool wanted = true) {
  TensorView spec = inputs.has(like) ? *inputs.views[like] : TensorView{};
  if (last == Last::drop) spec = spec.with_last_dim(-1);
  if (last == Last::input) {
    const TensorView& from = *inputs.views[last_value];
    spec = spec.with_last_dim(from.shape[from.ndim - 1]);
  }
  if (last == Last::constant) spec = spec.with_last_dim(last_value);
  spec.data = nullptr;
  spec.dtype = dtype;
  for (int i = 0; i < spec.ndim; ++i) spec.strides[i] = 0;
  Plan::Output o{std::move(name), spec, wanted};
  o.like = like;
  o.last = last;
  o.last_value = last_value;
  return o;
}

// The gradient of optional input `like`: produced exactly when it is given.
Plan::Output optional_output(std::string name, const Inputs& inputs, int like, DType dtype) {
  return output(std::move(name), inputs, like, dtype, Last::same, 0, inputs.has(like));
}

// A backend call's arguments as planned (run fills in the outputs and the
// stream), with copies of the optional inputs that its pointers refer to, so
// that they stay valid for as long as the plan.
template <typename Args>
struct Planned {
  Args args;
  std::array<TensorView, 2> held{};

  // A pointer to a copy of *t that lives as long as the plan; nullptr for none.
  const TensorView* hold(const TensorView* t, std::size_t slot) {
    if (t == nullptr) return nullptr;
    held[slot] = *t;
    return &held[slot];
  }
};

// Output i when the plan produces it, else nullptr.
const TensorView* produced(const Plan& plan, const std::vector<TensorView>& outputs, int i) {
  return plan.outputs()[i].wanted ? &outputs[i] : nullptr;
}

template <typename Args>
using Fill = void (*)(Args& args, const Plan& plan, const std::vector<TensorView>& outputs);

// The runner of a plan that is one backend call: the planned arguments with
// the outputs (by `fill`) and the stream, on the device of the first input.
template <typename Args, Entry<Args> detail::Backend::*entry, Fill<Args> fill>
void run_planned(const Plan& plan, const std::vector<TensorView>& outputs, void* stream) {
  Args args = plan.state<Planned<Args>>().args;
  fill(args, plan, outputs);
  args.stream = stream;
  run(entry, plan.inputs()[0]->device, args);
}

template <typename Args>
std::shared_ptr<Planned<Args>> planned(Args args) {
  return std::make_shared<Planned<Args>>(Planned<Args>{std::move(args)});
}

}  // namespace

Plan::Plan(std::string op, std::vector<std::optional<TensorView>> inputs,
           std::vector<std::string> input_names, std::vector<Output> outputs, Runner runner,
           std::shared_ptr<const void> state)
    : op_(std::move(op)), inputs_(std::move(inputs)), input_names_(std::move(input_names)),
      outputs_(std::move(outputs)), runner_(runner), state_(std::move(state)) {}

void Plan::run(const std::vector<TensorView>& outputs, void* stream) const {
  auto fail = [&](const std::string& message) {
    throw std::invalid_argument("[" + op_ + "] " + message);
  };
  if (outputs.size() != outputs_.size()) {
    fail("expected " + std::to_string(outputs_.size()) + " outputs, got " +
         std::to_string(outputs.size()));
  }
  for (std::size_t i = 0; i < outputs.size(); ++i) {
    const Output& o = outputs_[i];
    if (!o.wanted) continue;
    const TensorView& t = outputs[i];
    bool ok = t.ndim == o.spec.ndim;
    for (int d = 0; ok && d < t.ndim; ++d) ok = t.shape[d] == o.spec.shape[d];
    if (!ok) fail("output " + o.name + " must have shape " + shape_str(o.spec) + ", got " +
                  shape_str(t));
    if (t.dtype != o.spec.dtype) {
      throw dtype_error("[" + op_ + "] output " + o.name + " must have dtype " +
                        dtype_name(o.spec.dtype) + ", got " + dtype_name(t.dtype));
    }
    if (t.device != o.spec.device) {
      fail("output " + o.name + " is on " + device_name(t.device) + " but the inputs are on " +
           device_name(o.spec.device));
    }
    if (t.data == nullptr) {
      fail("output " + o.name + " has no data" +
           (o.workspace ? " (a workspace: allocate it, its contents are not a result)" : ""));
    }
  }
  for (std::size_t i = 0; i < inputs_.size(); ++i) {
    if (inputs_[i] && inputs_[i]->data == nullptr) fail("input " + input_names_[i] + " has no data");
  }
  runner_(*this, outputs, stream);
}

// ---- fused attention --------------------------------------------------------------

namespace {

// Additional keys of the fused op `c` names (both or neither), whose
// attention merges with the neighbourhood's: additional_values has v's D_v.
void check_additional_pair(const Checker& c, const TensorView& q, const TensorView& v,
                           const TensorView* keys, const TensorView* values) {
  if ((keys == nullptr) != (values == nullptr)) {
    c.fail(std::string(keys ? "additional_keys was given without additional_values"
                            : "additional_values was given without additional_keys") +
           "; pass both or neither");
  }
  if (keys == nullptr) return;
  check_additional(c, q, *keys, *values);
  const int n = c.rank();
  if (values->shape[3] != v.shape[n + 2]) {
    c.fail("additional_values head_dim_v " + std::to_string(values->shape[3]) + " (shape " +
           shape_str(*values) + ") does not match v head_dim_v " +
           std::to_string(v.shape[n + 2]) + " (shape " + shape_str(v) + ")");
  }
  check_backend(c.op(), &detail::Backend::na_additional_forward, q, 0, 0, "additional keys");
}

// A fused op with an optional second part: the neighbourhood's backend call,
// then, when additional keys are planned, theirs on the same outputs (the
// forward merges into the neighbourhood's out and lse, which is then needed:
// a workspace when the caller does not want it; the backward adds its dq).
template <typename Args, typename Extra>
struct Composed {
  Planned<Args> na;
  std::optional<Extra> additional;
};

template <typename Args, Entry<Args> detail::Backend::*entry, Fill<Args> fill, typename Extra,
          Entry<Extra> detail::Backend::*extra_entry, Fill<Extra> extra_fill>
void run_composed(const Plan& plan, const std::vector<TensorView>& outputs, void* stream) {
  const auto& state = plan.state<Composed<Args, Extra>>();
  Args args = state.na.args;
  fill(args, plan, outputs);
  args.stream = stream;
  run(entry, args.q.device, args);
  if (state.additional) {
    Extra extra = *state.additional;
    extra_fill(extra, plan, outputs);
    extra.stream = stream;
    run(extra_entry, extra.q.device, extra);
  }
}

// Outputs: out, lse (for the fused forward and the additional keys alone).
template <typename Args>
void fill_out_and_lse(Args& args, const Plan& plan, const std::vector<TensorView>& outputs) {
  args.out = outputs[0];
  args.lse = produced(plan, outputs, 1);
}
void fill_merged_additional(detail::AdditionalArgs& args, const Plan&,
                            const std::vector<TensorView>& outputs) {
  args.out = outputs[0];
  args.lse = &outputs[1];
}
using ForwardState = Composed<detail::ForwardArgs, detail::AdditionalArgs>;
constexpr Plan::Runner run_forward =
    run_composed<detail::ForwardArgs, &detail::Backend::na_forward, fill_out_and_lse,
                 detail::AdditionalArgs, &detail::Backend::na_additional_forward,
                 fill_merged_additional>;

// Outputs: dq, dk, dv, drpb, d(additional_keys), d(additional_values).
void fill_backward(detail::BackwardArgs& args, const Plan& plan,
                   const std::vector<TensorView>& outputs) {
  args.dq = outputs[0];
  args.dk = outputs[1];
  args.dv = outputs[2];
  args.drpb = produced(plan, outputs, 3);
}
void fill_accumulated_additional(detail::AdditionalBackwardArgs& args, const Plan&,
                                 const std::vector<TensorView>& outputs) {
  args.dq = outputs[0];
  args.dk = outputs[4];
  args.dv = outputs[5];
}
using BackwardState = Composed<detail::BackwardArgs, detail::AdditionalBackwardArgs>;
constexpr Plan::Runner run_backward =
    run_composed<detail::BackwardArgs, &detail::Backend::na_backward, fill_backward,
                 detail::AdditionalBackwardArgs, &detail::Backend::na_additional_backward,
                 fill_accumulated_additional>;

}  // namespace

Plan plan_na_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                     const TensorView* rpb, const NaParams& params, bool with_lse,
                     const TensorView* additional_keys, const TensorView* additional_values) {
  Checker c(params, "");
  check_forward_inputs(c, q, k, v, rpb, params.scale);
  const int n = params.rank;
  check_backend(c.op(), &detail::Backend::na_forward, q, q.shape[n + 2], v.shape[n + 2]);
  check_additional_pair(c, q, v, additional_keys, additional_values);
  const double scale = resolve_scale(params, q);
  auto state = std::make_shared<ForwardState>();
  state->na.args = detail::ForwardArgs{q, k, v, state->na.hold(rpb, 0), {}, nullptr, params,
                                       scale, nullptr};
  const bool additional = additional_keys != nullptr;
  if (additional) {
    state->additional = detail::AdditionalArgs{
        q, *additional_keys, *additional_values, {}, nullptr, n, scale, nullptr, true};
  }
  Inputs inputs;
  inputs.add("q", q).add("k", k).add("v", v).add("rpb", rpb);
  inputs.add("additional_keys", additional_keys).add("additional_values", additional_values);
  std::vector<Plan::Output> outputs{
      output("out", inputs, 0, q.dtype, Last::input, 2),
      output("lse", inputs, 0, lse_dtype(q.dtype), Last::drop, 0, with_lse || additional)};
  outputs[1].workspace = !with_lse && additional;
  return plan_of(c.op(), std::move(inputs), std::move(outputs),
              run_forward, state);
}

void check_na_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView* rpb, const NaParams& params) {
  plan_na_forward(q, k, v, rpb, params, false);
}

namespace {

// Runs `plan`, allocating on the host each workspace output the caller left
// without data (CPU tensors only: elsewhere the caller must allocate it).
void run_with_workspace(const Plan& plan, std::vector<TensorView> outputs, void* stream) {
  std::vector<std::vector<double>> workspaces;
  for (std::size_t i = 0; i < outputs.size(); ++i) {
    const Plan::Output& o = plan.outputs()[i];
    if (!o.workspace || outputs[i].data != nullptr) continue;
    if (o.spec.device.type != DeviceType::cpu) {
      throw std::invalid_argument("[" + plan.op() + "] output " + o.name +
                                  " is needed as a workspace on " + device_name(o.spec.device) +
                                  "; pass it (or use the plan to allocate it)");
    }
    TensorView t = o.spec;
    std::int64_t count = 1;
    for (int d = t.ndim - 1; d >= 0; --d) {
      t.strides[d] = count;
      count *= t.shape[d];
    }
    workspaces.emplace_back(static_cast<std::size_t>(count * dtype_size(t.dtype) / sizeof(double) + 1));
    t.data = workspaces.back().data();
    outputs[i] = t;
  }
  plan.run(outputs, stream);
}

}  // namespace

void na_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                const TensorView* rpb, const TensorView& out, const TensorView* lse,
                const NaParams& params, void* stream, const TensorView* additional_keys,
                const TensorView* additional_values) {
  const Plan plan = plan_na_forward(q, k, v, rpb, params, lse != nullptr, additional_keys,
                                    additional_values);
  run_with_workspace(plan, {out, lse ? *lse : TensorView{}}, stream);
}

Plan plan_na_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView* rpb, const TensorView& out, const TensorView& dout,
                      const TensorView& lse, const NaParams& params, const TensorView* dlse,
                      const TensorView* additional_keys, const TensorView* additional_values) {
  Checker c(params, "_backward");
  check_forward_inputs(c, q, k, v, rpb, params.scale);
  const int n = params.rank;
  const TensorView out_shape = q.with_last_dim(v.shape[n + 2]);
  check_input_like(c, "out", out, out_shape, q.dtype, q);
  check_input_like(c, "dout", dout, out_shape, q.dtype, q);
  check_input_like(c, "lse", lse, q.with_last_dim(-1), lse_dtype(q.dtype), q);
  if (dlse != nullptr) check_input_like(c, "dlse", *dlse, q.with_last_dim(-1), lse_dtype(q.dtype), q);
  check_backend(c.op(), &detail::Backend::na_backward, q, q.shape[n + 2], v.shape[n + 2]);
  check_additional_pair(c, q, v, additional_keys, additional_values);
  if (additional_keys != nullptr) {
    check_backend(c.op(), &detail::Backend::na_additional_backward, q, 0, 0, "additional keys");
  }
  const double scale = resolve_scale(params, q);
  auto state = std::make_shared<BackwardState>();
  const TensorView* held_dlse = state->na.hold(dlse, 1);
  state->na.args = detail::BackwardArgs{q,  k,  v,  state->na.hold(rpb, 0), out, dout, lse,
                                        held_dlse, {}, {}, {}, nullptr, params, scale, nullptr};
  if (additional_keys != nullptr) {
    state->additional = detail::AdditionalBackwardArgs{
        q, *additional_keys, *additional_values, out, dout, lse, held_dlse, {}, {}, {}, n,
        scale, nullptr, true};
  }
  Inputs inputs;
  inputs.add("q", q).add("k", k).add("v", v).add("rpb", rpb).add("out", out).add("dout", dout);
  inputs.add("lse", lse).add("dlse", dlse);
  inputs.add("additional_keys", additional_keys).add("additional_values", additional_values);
  return plan_of(c.op(), std::move(inputs),
              {output("dq", inputs, 0, q.dtype), output("dk", inputs, 1, q.dtype),
               output("dv", inputs, 2, q.dtype), optional_output("drpb", inputs, 3, q.dtype),
               optional_output("d(additional_keys)", inputs, 8, q.dtype),
               optional_output("d(additional_values)", inputs, 9, q.dtype)},
              run_backward, state);
}

void check_na_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                       const TensorView* rpb, const TensorView& out, const TensorView& dout,
                       const TensorView& lse, const NaParams& params) {
  plan_na_backward(q, k, v, rpb, out, dout, lse, params);
}

void na_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                 const TensorView* rpb, const TensorView& out, const TensorView& dout,
                 const TensorView& lse, const TensorView& dq, const TensorView& dk,
                 const TensorView& dv, const TensorView* drpb, const NaParams& params,
                 void* stream, const TensorView* dlse, const TensorView* additional_keys,
                 const TensorView* additional_values, const TensorView* d_additional_keys,
                 const TensorView* d_additional_values) {
  Plan plan = plan_na_backward(q, k, v, rpb, out, dout, lse, params, dlse, additional_keys,
                               additional_values);
  Checker c(params, "_backward");
  if ((rpb == nullptr) != (drpb == nullptr)) c.fail("drpb must be given exactly when rpb is");
  if ((additional_keys == nullptr) != (d_additional_keys == nullptr) ||
      (additional_values == nullptr) != (d_additional_values == nullptr)) {
    c.fail("d_additional_keys and d_additional_values must be given exactly when "
           "additional_keys and additional_values are");
  }
  auto or_none = [](const TensorView* t) { return t ? *t : TensorView{}; };
  plan.run({dq, dk, dv, or_none(drpb), or_none(d_additional_keys), or_none(d_additional_values)},
           stream);
}

// ---- unfused attention --------------------------------------------------------------

namespace {

void fill_qk(detail::QkArgs& args, const Plan&, const std::vector<TensorView>& outputs) {
  args.attn = outputs[0];
}

void fill_av(detail::AvArgs& args, const Plan&, const std::vector<TensorView>& outputs) {
  args.out = outputs[0];
}

void fill_qk_backward(detail::QkBackwardArgs& args, const Plan& plan,
                      const std::vector<TensorView>& outputs) {
  args.dq = outputs[0];
  args.dk = outputs[1];
  args.drpb = produced(plan, outputs, 2);
}

void fill_av_backward(detail::AvBackwardArgs& args, const Plan&,
                      const std::vector<TensorView>& outputs) {
  args.dattn = outputs[0];
  args.dv = outputs[1];
}

}  // namespace

Plan plan_na_qk(const TensorView& q, const TensorView& k, const TensorView* rpb,
                const NaParams& params) {
  Checker c(params, "_qk");
  c.rank_is_valid();
  c.stride_is_one();
  check_qkv(c, q, k, nullptr);
  if (rpb != nullptr) c.rpb(*rpb, q);
  check_backend(c.op(), &detail::Backend::na_qk, q);
  auto state = std::make_shared<Planned<detail::QkArgs>>();
  state->args = detail::QkArgs{q, k, state->hold(rpb, 0), {}, params, nullptr};
  Inputs inputs;
  inputs.add("q", q).add("k", k).add("rpb", rpb);
  return plan_of(c.op(), std::move(inputs),
              {output("attn", inputs, 0, q.dtype, Last::constant, params.window_size())},
              run_planned<detail::QkArgs, &detail::Backend::na_qk, fill_qk>, state);
}

void check_na_qk(const TensorView& q, const TensorView& k, const TensorView* rpb,
                 const NaParams& params) {
  plan_na_qk(q, k, rpb, params);
}

void na_qk(const TensorView& q, const TensorView& k, const TensorView* rpb,
           const TensorView& attn, const NaParams& params, void* stream) {
  plan_na_qk(q, k, rpb, params).run({attn}, stream);
}

Plan plan_na_av(const TensorView& attn, const TensorView& v, const NaParams& params) {
  Checker c(params, "_av");
  check_av_inputs(c, attn, v);
  check_backend(c.op(), &detail::Backend::na_av, attn);
  Inputs inputs;
  inputs.add("attn", attn).add("v", v);
  return plan_of(c.op(), std::move(inputs),
              {output("out", inputs, 0, attn.dtype, Last::input, 1)},
              run_planned<detail::AvArgs, &detail::Backend::na_av, fill_av>,
              planned(detail::AvArgs{attn, v, {}, params, nullptr}));
}

void check_na_av(const TensorView& attn, const TensorView& v, const NaParams& params) {
  plan_na_av(attn, v, params);
}

void na_av(const TensorView& attn, const TensorView& v, const TensorView& out,
           const NaParams& params, void* stream) {
  plan_na_av(attn, v, params).run({out}, stream);
}

Plan plan_na_qk_backward(const TensorView& dattn, const TensorView& q, const TensorView& k,
                         const TensorView* rpb, const NaParams& params) {
  Checker c(params, "_qk_backward");
  c.rank_is_valid();
  c.stride_is_one();
  check_qkv(c, q, k, nullptr);
  check_input_like(c, "dattn", dattn, q.with_last_dim(params.window_size()), q.dtype, q);
  if (rpb != nullptr) c.rpb(*rpb, q);
  check_backend(c.op(), &detail::Backend::na_qk_backward, q);
  Inputs inputs;
  inputs.add("dattn", dattn).add("q", q).add("k", k).add("rpb", rpb);
  return plan_of(c.op(), std::move(inputs),
              {output("dq", inputs, 1, q.dtype), output("dk", inputs, 2, q.dtype),
               optional_output("drpb", inputs, 3, q.dtype)},
              run_planned<detail::QkBackwardArgs, &detail::Backend::na_qk_backward,
                          fill_qk_backward>,
              planned(detail::QkBackwardArgs{dattn, q, k, {}, {}, nullptr, params, nullptr}));
}

void check_na_qk_backward(const TensorView& dattn, const TensorView& q, const TensorView& k,
                          const TensorView* drpb, const NaParams& params) {
  plan_na_qk_backward(dattn, q, k, drpb, params);
}

void na_qk_backward(const TensorView& dattn, const TensorView& q, const TensorView& k,
                    const TensorView& dq, const TensorView& dk, const TensorView* drpb,
                    const NaParams& params, void* stream) {
  plan_na_qk_backward(dattn, q, k, drpb, params)
      .run({dq, dk, drpb ? *drpb : TensorView{}}, stream);
}

Plan plan_na_av_backward(const TensorView& dout, const TensorView& attn, const TensorView& v,
                         const NaParams& params) {
  Checker c(params, "_av_backward");
  check_av_inputs(c, attn, v);
  const int n = params.rank;
  check_input_like(c, "dout", dout, attn.with_last_dim(v.shape[n + 2]), attn.dtype, attn);
  check_backend(c.op(), &detail::Backend::na_av_backward, attn);
  Inputs inputs;
  inputs.add("dout", dout).add("attn", attn).add("v", v);
  return plan_of(c.op(), std::move(inputs),
              {output("dattn", inputs, 1, attn.dtype), output("dv", inputs, 2, attn.dtype)},
              run_planned<detail::AvBackwardArgs, &detail::Backend::na_av_backward,
                          fill_av_backward>,
              planned(detail::AvBackwardArgs{dout, attn, v, {}, {}, params, nullptr}));
}

void check_na_av_backward(const TensorView& dout, const TensorView& attn, const TensorView& v,
                          const NaParams& params) {
  plan_na_av_backward(dout, attn, v, params);
}

void na_av_backward(const TensorView& dout, const TensorView& attn, const TensorView& v,
                    const TensorView& dattn, const TensorView& dv, const NaParams& params,
                    void* stream) {
  plan_na_av_backward(dout, attn, v, params).run({dattn, dv}, stream);
}

// ---- composition: additional keys and merging ---------------------------------

namespace {

void fill_additional_backward(detail::AdditionalBackwardArgs& args, const Plan&,
                              const std::vector<TensorView>& outputs) {
  args.dq = outputs[0];
  args.dk = outputs[1];
  args.dv = outputs[2];
}

void fill_merge(detail::MergeArgs& args, const Plan&, const std::vector<TensorView>& outputs) {
  args.out = outputs[0];
  args.lse = outputs[1];
}

void fill_merge_backward(detail::MergeBackwardArgs& args, const Plan&,
                         const std::vector<TensorView>& outputs) {
  const std::size_t n = args.outs.size();
  args.douts.assign(outputs.begin(), outputs.begin() + n);
  args.dlses.assign(outputs.begin() + n, outputs.end());
}

}  // namespace

Plan plan_na_additional_forward(const TensorView& q, const TensorView& additional_keys,
                                const TensorView& additional_values, const NaParams& params,
                                bool with_lse) {
  Checker c(params, "");
  c.rank_is_valid();
  check_additional(c, q, additional_keys, additional_values);
  c.scale(params.scale);
  check_backend(c.op(), &detail::Backend::na_additional_forward, q);
  Inputs inputs;
  inputs.add("q", q).add("additional_keys", additional_keys);
  inputs.add("additional_values", additional_values);
  return plan_of(c.op(), std::move(inputs),
              {output("out", inputs, 0, q.dtype, Last::input, 2),
               output("lse", inputs, 0, lse_dtype(q.dtype), Last::drop, 0, with_lse)},
              run_planned<detail::AdditionalArgs, &detail::Backend::na_additional_forward,
                          fill_out_and_lse>,
              planned(detail::AdditionalArgs{q, additional_keys, additional_values, {}, nullptr,
                                             params.rank, resolve_scale(params, q), nullptr}));
}

void check_na_additional_forward(const TensorView& q, const TensorView& additional_keys,
                                 const TensorView& additional_values, const NaParams& params) {
  plan_na_additional_forward(q, additional_keys, additional_values, params, false);
}

void na_additional_forward(const TensorView& q, const TensorView& additional_keys,
                           const TensorView& additional_values, const TensorView& out,
                           const TensorView* lse, const NaParams& params, void* stream) {
  plan_na_additional_forward(q, additional_keys, additional_values, params, lse != nullptr)
      .run({out, lse ? *lse : TensorView{}}, stream);
}

Plan plan_na_additional_backward(const TensorView& q, const TensorView& additional_keys,
                                 const TensorView& additional_values, const TensorView& out,
                                 const TensorView& dout, const TensorView& lse,
                                 const NaParams& params, const TensorView* dlse) {
  Checker c(params, "_backward");
  c.rank_is_valid();
  check_additional(c, q, additional_keys, additional_values);
  c.scale(params.scale);
  const TensorView out_shape = q.with_last_dim(additional_values.shape[3]);
  check_input_like(c, "out", out, out_shape, q.dtype, q);
  check_input_like(c, "dout", dout, out_shape, q.dtype, q);
  check_input_like(c, "lse", lse, q.with_last_dim(-1), lse_dtype(q.dtype), q);
  if (dlse != nullptr) check_input_like(c, "dlse", *dlse, q.with_last_dim(-1), lse_dtype(q.dtype), q);
  check_backend(c.op(), &detail::Backend::na_additional_backward, q);
  auto state = std::make_shared<Planned<detail::AdditionalBackwardArgs>>();
  state->args = detail::AdditionalBackwardArgs{
      q,  additional_keys, additional_values, out, dout, lse, state->hold(dlse, 0), {}, {}, {},
      params.rank, resolve_scale(params, q), nullptr};
  Inputs inputs;
  inputs.add("q", q).add("additional_keys", additional_keys);
  inputs.add("additional_values", additional_values).add("out", out).add("dout", dout);
  inputs.add("lse", lse).add("dlse", dlse);
  return plan_of(c.op(), std::move(inputs),
              {output("dq", inputs, 0, q.dtype),
               output("d(additional_keys)", inputs, 1, q.dtype),
               output("d(additional_values)", inputs, 2, q.dtype)},
              run_planned<detail::AdditionalBackwardArgs,
                          &detail::Backend::na_additional_backward, fill_additional_backward>,
              state);
}

void check_na_additional_backward(const TensorView& q, const TensorView& additional_keys,
                                  const TensorView& additional_values, const TensorView& out,
                                  const TensorView& dout, const TensorView& lse,
                                  const NaParams& params) {
  plan_na_additional_backward(q, additional_keys, additional_values, out, dout, lse, params);
}

void na_additional_backward(const TensorView& q, const TensorView& additional_keys,
                            const TensorView& additional_values, const TensorView& out,
                            const TensorView& dout, const TensorView& lse, const TensorView& dq,
                            const TensorView& dk, const TensorView& dv, const NaParams& params,
                            void* stream) {
  plan_na_additional_backward(q, additional_keys, additional_values, out, dout, lse, params)
      .run({dq, dk, dv}, stream);
}

namespace {

// The inputs of a merge: outs[0..n), lses[0..n).
Inputs merge_inputs(const std::vector<TensorView>& outs, const std::vector<TensorView>& lses) {
  Inputs inputs;
  for (std::size_t i = 0; i < outs.size(); ++i) inputs.add("outs[" + std::to_string(i) + "]", outs[i]);
  for (std::size_t i = 0; i < lses.size(); ++i) inputs.add("lses[" + std::to_string(i) + "]", lses[i]);
  return inputs;
}

}  // namespace

Plan plan_merge_attentions(const std::vector<TensorView>& outs,
                           const std::vector<TensorView>& lses) {
  const char* op = "merge_attentions";
  check_merge_inputs(op, outs, lses);
  check_backend(op, &detail::Backend::merge_attentions, outs[0]);
  const TensorView& first = outs[0];
  Inputs inputs = merge_inputs(outs, lses);
  return plan_of(op, std::move(inputs),
              {output("out", inputs, 0, first.dtype),
               output("lse", inputs, 0, lse_dtype(first.dtype), Last::drop)},
              run_planned<detail::MergeArgs, &detail::Backend::merge_attentions, fill_merge>,
              planned(detail::MergeArgs{outs, lses, {}, {}, nullptr}));
}

void check_merge_attentions(const std::vector<TensorView>& outs,
                            const std::vector<TensorView>& lses) {
  plan_merge_attentions(outs, lses);
}

void merge_attentions(const std::vector<TensorView>& outs, const std::vector<TensorView>& lses,
                      const TensorView& out, const TensorView& lse, void* stream) {
  plan_merge_attentions(outs, lses).run({out, lse}, stream);
}

Plan plan_merge_attentions_backward(const std::vector<TensorView>& outs,
                                    const std::vector<TensorView>& lses, const TensorView& out,
                                    const TensorView& lse, const TensorView& dout,
                                    const TensorView* dlse) {
  const char* op = "merge_attentions_backward";
  check_merge_inputs(op, outs, lses);
  const TensorView& first = outs[0];
  const TensorView lse_shape = first.with_last_dim(-1);
  merge_like(op, "out", out, first, first.dtype, first);
  merge_like(op, "lse", lse, lse_shape, lse_dtype(first.dtype), first);
  merge_like(op, "dout", dout, first, first.dtype, first);
  if (dlse != nullptr) merge_like(op, "dlse", *dlse, lse_shape, lse_dtype(first.dtype), first);
  check_backend(op, &detail::Backend::merge_attentions_backward, first);
  Inputs inputs = merge_inputs(outs, lses);
  inputs.add("out", out).add("lse", lse).add("dout", dout).add("dlse", dlse);
  const int parts = static_cast<int>(outs.size());
  std::vector<Plan::Output> outputs;
  for (int i = 0; i < parts; ++i) {
    outputs.push_back(output("douts[" + std::to_string(i) + "]", inputs, i, first.dtype));
  }
  for (int i = 0; i < parts; ++i) {
    outputs.push_back(
        output("dlses[" + std::to_string(i) + "]", inputs, parts + i, lse_dtype(first.dtype)));
  }
  auto state = std::make_shared<Planned<detail::MergeBackwardArgs>>();
  state->args = detail::MergeBackwardArgs{outs, lses, out, lse, dout, state->hold(dlse, 0),
                                          {},   {},   nullptr};
  return plan_of(op, std::move(inputs), std::move(outputs),
              run_planned<detail::MergeBackwardArgs, &detail::Backend::merge_attentions_backward,
                          fill_merge_backward>,
              state);
}

void check_merge_attentions_backward(const std::vector<TensorView>& outs,
                                     const std::vector<TensorView>& lses, const TensorView& out,
                                     const TensorView& lse, const TensorView& dout,
                                     const TensorView* dlse) {
  plan_merge_attentions_backward(outs, lses, out, lse, dout, dlse);
}

void merge_attentions_backward(const std::vector<TensorView>& outs,
                               const std::vector<TensorView>& lses, const TensorView& out,
                               const TensorView& lse, const TensorView& dout,
                               const TensorView* dlse, const std::vector<TensorView>& douts,
                               const std::vector<TensorView>& dlses, void* stream) {
  Plan plan = plan_merge_attentions_backward(outs, lses, out, lse, dout, dlse);
  if (douts.size() != outs.size() || dlses.size() != outs.size()) {
    merge_fail("merge_attentions_backward",
               "expected " + std::to_string(outs.size()) + " douts and dlses, got " +
                   std::to_string(douts.size()) + " and " + std::to_string(dlses.size()));
  }
  std::vector<TensorView> outputs(douts);
  outputs.insert(outputs.end(), dlses.begin(), dlses.end());
  plan.run(outputs, stream);
}

}  // namespace libna
