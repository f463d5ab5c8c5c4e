"""libna's operators as differentiable PyTorch custom ops.

Each operator is one rank-generic ``torch.library.custom_op`` in the
``libna`` namespace, with a fake (meta) implementation for tracing and an
autograd formula, so that ``torch.compile(fullgraph=True)`` traces through
them without graph breaks:

================================  =============================================
``libna::na_forward``             fused NA (+ additional keys): (out, lse)
``libna::na_backward``            its gradients: (dq, dk, dv, drpb, dxk, dxv)
``libna::merge_attentions``       exact lse merge of partial attentions
``libna::merge_attentions_backward``  its gradients: (douts, dlses)
``libna::na_qk``                  unfused scores q.k (+ rpb)
``libna::na_qk_backward``         (dq, dk, drpb)
``libna::na_av``                  unfused weighted sum attn.v
``libna::na_av_backward``         (dattn, dv)
================================  =============================================

Per-axis arguments are ``List[int]`` / ``List[bool]`` whose length is the
spatial rank; ``scale`` is a plain float, resolved by the Python wrappers
(default ``D ** -0.5``) before the op is called. A missing rpb (or
additional-key) gradient is returned as an empty tensor (custom ops cannot
return None). With additional keys, one backward call gives the gradients of
both parts from the merged out and lse.

The fused op saves q, k, v, out and lse (and rpb) for its backward, never the
attention matrix. The gradient of lse is supported too: the fused backward
takes it (dlse) into its row terms, D_i = dout_i . out_i - dlse_i.

The wrappers (``na``, ``na_qk``, ``na_av`` and ``na{1,2,3}d*``) normalise the
arguments, apply autocast (inside ``torch.autocast`` floating inputs other
than float64 are cast to the autocast dtype) and check that all tensors share
one dtype (TypeError otherwise) before calling the ops. Tensors on CUDA go to
libna's CUDA backend on the caller's current stream.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode

from .. import _ops
from .._frameworks import call_torch_cpu
from .._public import public

__all__ = [
    "na", "na_qk", "na_av", "merge_attentions",
    "na1d", "na2d", "na3d",
    "na_qkvpacked", "na1d_qkvpacked", "na2d_qkvpacked", "na3d_qkvpacked",
    "na1d_qk", "na2d_qk", "na3d_qk",
    "na1d_av", "na2d_av", "na3d_av",
]


# --------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------


def _hint(size) -> int:
    """A size as an int; a symbolic one (torch.compile(dynamic=True)) as its
    example value, which validation reads without adding guards."""
    if isinstance(size, int):
        return size
    hint = getattr(size.node, "hint", None)
    return int(size) if hint is None else int(hint)


def _spec(t: Optional[Tensor]):
    """What libna's core plans on: (shape, dtype name, device type, index).
    Meta tensors (shape-only) are planned as CPU ones; the real call checks
    the device."""
    if t is None:
        return None
    device = "cuda" if t.device.type == "cuda" else "cpu"
    return (tuple(_hint(s) for s in t.shape), str(t.dtype).rsplit(".", 1)[-1], device,
            t.device.index or 0)


def _planned(op: str, tensors, kernel_size=(), stride=(), dilation=(), is_causal=(),
             scale=None, want_lse=False) -> list:
    """Empty outputs of `op` for a fake kernel. libna's core validates the
    call (as the real op would) and gives each output's dtype and shape rule:
    an input's shape with its last dimension kept, dropped, taken from
    another input or set, so that symbolic sizes carry through. An unwanted
    optional output is an empty tensor, as the real op returns."""
    plan = _ops._C.plan(op, [_spec(t) for t in tensors], len(kernel_size), list(kernel_size),
                        list(stride), list(dilation), list(is_causal), scale, want_lse)
    outputs = []
    for entry in plan:
        if entry is None:
            outputs.append(tensors[0].new_empty(0))
            continue
        _, dtype, like, last, value = entry
        shape = list(tensors[like].shape)
        if last == "drop":
            shape.pop()
        elif last == "input":
            shape[-1] = tensors[value].shape[-1]
        elif last == "constant":
            shape[-1] = value
        outputs.append(tensors[like].new_empty(shape, dtype=getattr(torch, dtype)))
    return outputs


@torch.library.custom_op("libna::na_forward", mutates_args=())
def na_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rpb: Optional[Tensor],
    kernel_size: List[int],
    stride: List[int],
    dilation: List[int],
    is_causal: List[bool],
    scale: float,
    additional_keys: Optional[Tensor] = None,
    additional_values: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Fused neighborhood attention (plus additional keys): (out, lse)."""
    return _na_forward_impl(q, k, v, rpb, kernel_size, stride, dilation, is_causal, scale,
                            additional_keys, additional_values)


def _na_forward_impl(q, k, v, rpb, kernel_size, stride, dilation, is_causal, scale,
                     additional_keys=None, additional_values=None):
    rank = len(kernel_size)
    return _ops.na_normalized(f"na{rank}d", rank, q, k, v, rpb, additional_keys,
                              additional_values, tuple(kernel_size), tuple(stride),
                              tuple(dilation), tuple(is_causal), float(scale), True)


@na_forward.register_fake
def _(q, k, v, rpb, kernel_size, stride, dilation, is_causal, scale, additional_keys=None,
      additional_values=None):
    out, lse = _planned("na", [q, k, v, rpb, additional_keys, additional_values], kernel_size,
                        stride, dilation, is_causal, scale, want_lse=True)
    return out, lse


@torch.library.custom_op("libna::na_backward", mutates_args=())
def na_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    dout: Tensor,
    lse: Tensor,
    rpb: Optional[Tensor],
    kernel_size: List[int],
    stride: List[int],
    dilation: List[int],
    is_causal: List[bool],
    scale: float,
    additional_keys: Optional[Tensor] = None,
    additional_values: Optional[Tensor] = None,
    dlse: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of na_forward: (dq, dk, dv, drpb, d_additional_keys,
    d_additional_values); the optional ones are empty when not given. dlse
    (optional) is the gradient of lse."""
    grads = list(_ops.na_backward(
        len(kernel_size), q, k, v, out, dout, lse, tuple(kernel_size), stride=tuple(stride),
        dilation=tuple(dilation), is_causal=tuple(is_causal), scale=float(scale), rpb=rpb,
        additional_keys=additional_keys, additional_values=additional_values, dlse=dlse))
    if rpb is None:
        grads.insert(3, q.new_empty(0))
    if additional_keys is None:
        grads += [q.new_empty(0), q.new_empty(0)]
    return tuple(grads)


@na_backward.register_fake
def _(q, k, v, out, dout, lse, rpb, kernel_size, stride, dilation, is_causal, scale,
      additional_keys=None, additional_values=None, dlse=None):
    return tuple(_planned("na_backward", [q, k, v, rpb, out, dout, lse, dlse, additional_keys,
                                          additional_values], kernel_size, stride, dilation,
                          is_causal, scale))


@torch.library.custom_op("libna::merge_attentions", mutates_args=())
def merge_attentions_op(outs: List[Tensor], lses: List[Tensor]) -> Tuple[Tensor, Tensor]:
    """Exact merge of partial attentions from their lse: (out, lse)."""
    return _ops.merge_attentions(list(outs), list(lses))


@merge_attentions_op.register_fake
def _(outs, lses):
    return tuple(_planned("merge_attentions", [*outs, *lses]))


@torch.library.custom_op("libna::merge_attentions_backward", mutates_args=())
def merge_attentions_backward(
    outs: List[Tensor], lses: List[Tensor], out: Tensor, lse: Tensor, dout: Tensor,
    dlse: Optional[Tensor],
) -> Tuple[List[Tensor], List[Tensor]]:
    """Gradients of merge_attentions: (douts, dlses)."""
    return _ops.merge_attentions_backward(list(outs), list(lses), out, lse, dout, dlse)


@merge_attentions_backward.register_fake
def _(outs, lses, out, lse, dout, dlse):
    grads = _planned("merge_attentions_backward", [*outs, *lses, out, lse, dout, dlse])
    return grads[:len(outs)], grads[len(outs):]


@torch.library.custom_op("libna::na_qk", mutates_args=())
def na_qk_op(
    q: Tensor,
    k: Tensor,
    rpb: Optional[Tensor],
    kernel_size: List[int],
    dilation: List[int],
    is_causal: List[bool],
) -> Tensor:
    """Unfused scores q.k (+ rpb), unscaled: [B, *spatial, heads, prod(kernel_size)]."""
    return _ops.na_qk(len(kernel_size), q, k, tuple(kernel_size), dilation=tuple(dilation),
                      is_causal=tuple(is_causal), rpb=rpb)


@na_qk_op.register_fake
def _(q, k, rpb, kernel_size, dilation, is_causal):
    return _planned("na_qk", [q, k, rpb], kernel_size, dilation=dilation,
                    is_causal=is_causal)[0]


@torch.library.custom_op("libna::na_qk_backward", mutates_args=())
def na_qk_backward(
    dattn: Tensor,
    q: Tensor,
    k: Tensor,
    rpb: Optional[Tensor],
    kernel_size: List[int],
    dilation: List[int],
    is_causal: List[bool],
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of na_qk: (dq, dk, drpb); drpb is empty without rpb."""
    grads = _ops.na_qk_backward(len(kernel_size), dattn, q, k, tuple(kernel_size),
                                dilation=tuple(dilation), is_causal=tuple(is_causal), rpb=rpb)
    if rpb is None:
        return (*grads, q.new_empty(0))
    return tuple(grads)


@na_qk_backward.register_fake
def _(dattn, q, k, rpb, kernel_size, dilation, is_causal):
    return tuple(_planned("na_qk_backward", [dattn, q, k, rpb], kernel_size, dilation=dilation,
                          is_causal=is_causal))


@torch.library.custom_op("libna::na_av", mutates_args=())
def na_av_op(
    attn: Tensor,
    v: Tensor,
    kernel_size: List[int],
    dilation: List[int],
    is_causal: List[bool],
) -> Tensor:
    """Unfused weighted sum attn.v: [B, *spatial, heads, D_v]."""
    return _ops.na_av(len(kernel_size), attn, v, tuple(kernel_size), dilation=tuple(dilation),
                      is_causal=tuple(is_causal))


@na_av_op.register_fake
def _(attn, v, kernel_size, dilation, is_causal):
    return _planned("na_av", [attn, v], kernel_size, dilation=dilation,
                    is_causal=is_causal)[0]


@torch.library.custom_op("libna::na_av_backward", mutates_args=())
def na_av_backward(
    dout: Tensor,
    attn: Tensor,
    v: Tensor,
    kernel_size: List[int],
    dilation: List[int],
    is_causal: List[bool],
) -> Tuple[Tensor, Tensor]:
    """Gradients of na_av: (dattn, dv)."""
    return tuple(_ops.na_av_backward(len(kernel_size), dout, attn, v, tuple(kernel_size),
                                     dilation=tuple(dilation), is_causal=tuple(is_causal)))


@na_av_backward.register_fake
def _(dout, attn, v, kernel_size, dilation, is_causal):
    return tuple(_planned("na_av_backward", [dout, attn, v], kernel_size, dilation=dilation,
                          is_causal=is_causal))


# --------------------------------------------------------------------------
# Autograd formulas
# --------------------------------------------------------------------------


def _na_forward_setup(ctx, inputs, output):
    q, k, v, rpb, kernel_size, stride, dilation, is_causal, scale, xk, xv = inputs
    _save_forward(ctx, q, k, v, rpb, xk, xv, output,
                  (len(kernel_size), kernel_size, stride, dilation, is_causal, scale))


def _save_forward(ctx, q, k, v, rpb, xk, xv, output, params):
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, rpb, xk, xv)
    ctx.params = params  # (rank, kernel_size, stride, dilation, is_causal, scale)
    # An unused output (usually lse) gets None rather than a tensor of zeros,
    # so that its gradient costs nothing when it does not flow.
    ctx.set_materialize_grads(False)


def _direct_backward(q, k, v, out, dout, lse, rpb, xk, xv, dlse) -> bool:
    """Whether a backward may call the core directly: no graph of it is
    wanted (create_graph needs the libna::na_backward op, whose formula
    refuses a double backward with a clear error) and its tensors are plain
    CPU ones."""
    return (not torch.is_grad_enabled()
            and _plain_cpu((q, k, v, out, dout), (rpb, xk, xv), (lse, dlse)))


def _op_backward(params, q, k, v, out, dout, lse, rpb, xk, xv, dlse):
    """(dq, dk, dv, drpb, dxk, dxv) through the libna::na_backward op."""
    _, kernel_size, stride, dilation, is_causal, scale = params
    return na_backward(q, k, v, out, dout, lse, rpb, kernel_size, stride, dilation, is_causal,
                       scale, xk, xv, dlse)


def _core_backward(params, q, k, v, out, dout, lse, rpb, xk, xv, dlse, into=()):
    """(dq, dk, dv, drpb, dxk, dxv) from the core directly (see
    _direct_backward), the first ones written into `into` where given."""
    rank, kernel_size, stride, dilation, is_causal, scale = params
    return _profiled("libna::na_backward", call_torch_cpu, "na_backward",
                     (q, k, v, rpb, out, dout, lse, dlse, xk, xv), rank, kernel_size, stride,
                     dilation, is_causal, scale, False, into)


def _forward_grads(ctx, dout, dlse):
    """(dq, dk, dv, drpb, dxk, dxv) of a saved forward, None where an input
    was not given or nothing flows back."""
    q, k, v, out, lse, rpb, xk, xv = ctx.saved_tensors
    if dout is None and dlse is None:
        return (None,) * 6
    if dout is None:
        dout = torch.zeros_like(out)
    # d lse / d logits = the softmax probabilities p, so an lse gradient adds
    # p * dlse to the logits' gradient: the kernels take it in their row terms.
    args = (q, k, v, out, dout, lse, rpb, xk, xv, dlse)
    backward = _core_backward if _direct_backward(*args) else _op_backward
    dq, dk, dv, drpb, dxk, dxv = backward(ctx.params, *args)
    return (dq, dk, dv, (drpb if rpb is not None else None), (dxk if xk is not None else None),
            (dxv if xv is not None else None))


def _na_forward_backward(ctx, dout, dlse):
    dq, dk, dv, drpb, dxk, dxv = _forward_grads(ctx, dout, dlse)
    return dq, dk, dv, drpb, None, None, None, None, None, dxk, dxv


na_forward.register_autograd(_na_forward_backward, setup_context=_na_forward_setup)


def _eager_forward(q, k, v, rpb, xk, xv, params):
    """(out, lse) of an eager call (see ``_eager``)."""
    rank, kernel_size, stride, dilation, is_causal, scale = params
    if q.is_cpu and q.dtype in _CORE_DTYPES:  # (all share q's dtype): straight to the core
        return tuple(call_torch_cpu("na", (q, k, v, rpb, xk, xv), rank, kernel_size, stride,
                                    dilation, is_causal, scale, True))
    return _na_forward_impl(q, k, v, rpb, kernel_size, stride, dilation, is_causal, scale, xk,
                            xv)


class _NaForwardEager(torch.autograd.Function):
    """``libna::na_forward`` for plain eager calls: the same outputs and
    autograd formula, run without the custom-op dispatch, which costs more
    than a small call's kernel. torch.compile, fake tensors, modes and
    torch.func go through the custom op (see ``_eager``). The op's parameters
    travel as one tuple: each argument of ``apply`` costs time."""

    # forward(ctx, ...) rather than a separate setup_context: torch binds the
    # arguments of the latter form with inspect on every call (~25 us).
    @staticmethod
    def forward(ctx, q, k, v, rpb, xk, xv, params):
        output = _eager_forward(q, k, v, rpb, xk, xv, params)
        _save_forward(ctx, q, k, v, rpb, xk, xv, output, params)
        return output

    @staticmethod
    def backward(ctx, dout, dlse):
        return (*_forward_grads(ctx, dout, dlse), None)


def _c_apply(function):
    """function.apply without the Python layer in front of it (argument
    binding for setup_context and functorch bookkeeping, ~2 us), for the
    eager paths, where no functorch transform is active (_unmodified); the
    caller unwraps dead functorch wrappers as that layer does. Falls back to
    function.apply where torch's internals differ."""
    apply = torch._C._FunctionBase.__dict__.get("apply")
    return function.apply if apply is None else apply.__get__(None, function)


_unwrap_if_dead = getattr(torch._C._functorch, "unwrap_if_dead", lambda t: t)
_PLAIN = (Tensor, torch.nn.Parameter)
_CORE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _unmodified() -> bool:
    """No torch.compile tracing, torch function or dispatch mode
    (FakeTensorMode...) and no torch.func transform active."""
    return not (torch.compiler.is_compiling()
                or torch._C._is_torch_function_mode_enabled()
                or _current_dispatch_mode() is not None
                or torch._C._functorch.peek_interpreter_stack() is not None)


def _eager(*tensors) -> bool:
    """Whether a call may take the eager path: plain tensors on a device
    libna runs on (meta tensors take the op's fake kernel), outside the modes
    of ``_unmodified``."""
    return (all(t is None or type(t) in _PLAIN for t in tensors)
            and tensors[0].device.type in ("cpu", "cuda")  # not meta, say
            and _unmodified())


def _plain_cpu(required, optional=(), any_dtype=(), autocast_applied=False) -> bool:
    """Whether a call may go straight to the core: the tensors `required`,
    and those of `optional` and `any_dtype` that are not None, are plain,
    dense CPU tensors, those of `required` and `optional` of one of libna's
    dtypes, outside autocast (or, with autocast_applied, after the caller
    applied its casts) and the modes of ``_unmodified``. Anything else takes
    the general path, which casts, explains what is wrong or traces."""
    q = required[0]
    if type(q) not in _PLAIN:
        return False
    dtype = q.dtype
    if dtype not in _CORE_DTYPES or not q.is_cpu or q.layout is not torch.strided:
        return False
    for t in required[1:]:
        if (type(t) not in _PLAIN or t.dtype is not dtype or not t.is_cpu
                or t.layout is not torch.strided):
            return False
    for t in optional:
        if t is not None and (type(t) not in _PLAIN or t.dtype is not dtype or not t.is_cpu
                              or t.layout is not torch.strided):
            return False
    for t in any_dtype:
        if t is not None and (type(t) not in _PLAIN or not t.is_cpu
                              or t.layout is not torch.strided):
            return False
    return (autocast_applied or not torch.is_autocast_enabled("cpu")) and _unmodified()


def _records_grad(tensors) -> bool:
    """Whether autograd records a call on `tensors` (None for an absent one)."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def _profiled(name, fn, *args):
    """fn(*args), recorded as `name` when torch.profiler records: the eager
    paths bypass the dispatcher, which is what the profiler sees, so they
    name themselves as the custom op would be named."""
    if torch.autograd._profiler_enabled():
        with torch.profiler.record_function(name):
            return fn(*args)
    return fn(*args)


def _merge_setup(ctx, inputs, output):
    outs, lses = inputs
    out, lse = output
    ctx.parts = len(outs)
    ctx.save_for_backward(*outs, *lses, out, lse)
    ctx.set_materialize_grads(False)


def _merge_backward(ctx, dout, dlse):
    saved = ctx.saved_tensors
    n = ctx.parts
    outs, lses, (out, lse) = list(saved[:n]), list(saved[n:2 * n]), saved[2 * n:]
    if dout is None and dlse is None:
        return [None] * n, [None] * n
    if dout is None:
        dout = torch.zeros_like(out)
    douts, dlses = merge_attentions_backward(outs, lses, out, lse, dout, dlse)
    return list(douts), list(dlses)


merge_attentions_op.register_autograd(_merge_backward, setup_context=_merge_setup)


def _na_qk_setup(ctx, inputs, output):
    q, k, rpb, kernel_size, dilation, is_causal = inputs
    ctx.save_for_backward(q, k, rpb)
    ctx.params = (kernel_size, dilation, is_causal)


def _na_qk_backward(ctx, dattn):
    q, k, rpb = ctx.saved_tensors
    dq, dk, drpb = na_qk_backward(dattn, q, k, rpb, *ctx.params)
    return dq, dk, (drpb if rpb is not None else None), None, None, None


na_qk_op.register_autograd(_na_qk_backward, setup_context=_na_qk_setup)


def _na_av_setup(ctx, inputs, output):
    attn, v, kernel_size, dilation, is_causal = inputs
    ctx.save_for_backward(attn, v)
    ctx.params = (kernel_size, dilation, is_causal)


def _na_av_backward(ctx, dout):
    attn, v = ctx.saved_tensors
    dattn, dv = na_av_backward(dout, attn, v, *ctx.params)
    return dattn, dv, None, None, None


na_av_op.register_autograd(_na_av_backward, setup_context=_na_av_setup)


def _no_double_backward(op_of_inputs):
    """The autograd formula of a backward op, which libna does not
    differentiate: differentiating through it (a second backward after
    create_graph=True) raises NotImplementedError naming the public op, rather
    than torch's generic error for an op without a formula.
    op_of_inputs(inputs) names the op."""
    def setup_context(ctx, inputs, output):
        ctx.op = op_of_inputs(inputs)

    def backward(ctx, *grads):
        raise NotImplementedError(
            f"[{ctx.op}] double backward (gradients of gradients) is not implemented")

    return backward, setup_context


# kernel_size is the 8th input of na_backward, the 5th of na_qk_backward and
# the 4th of na_av_backward; its length is the spatial rank.
for _op, _op_of_inputs in (
        (na_backward, lambda inputs: f"na{len(inputs[7])}d"),
        (na_qk_backward, lambda inputs: f"na{len(inputs[4])}d_qk"),
        (na_av_backward, lambda inputs: f"na{len(inputs[3])}d_av"),
        (merge_attentions_backward, lambda inputs: "merge_attentions")):
    _backward, _setup_context = _no_double_backward(_op_of_inputs)
    _op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------
# Python wrappers: argument normalisation, autocast, dtype checks
# --------------------------------------------------------------------------


def _autocast(*tensors):
    """Inside torch.autocast, floating tensors other than float64 in the
    autocast dtype (so e.g. an fp32 rpb parameter works with fp16 q)."""
    first = tensors[0]
    if not isinstance(first, Tensor):
        return tensors
    device_type = first.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype)
        if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
        and t.dtype != dtype
        else t
        for t in tensors
    )


def _check_tensors(op: str, named: dict) -> None:
    first = None
    for name, x in named.items():
        if x is None and name in ("rpb", "additional_keys", "additional_values"):
            continue
        if not isinstance(x, Tensor):
            raise TypeError(
                f"[{op}] {name} must be a torch.Tensor, got "
                f"{type(x).__module__}.{type(x).__qualname__}")
        if x.layout != torch.strided:
            raise TypeError(f"[{op}] {name} has layout {x.layout}; expected a dense tensor "
                            "(torch.strided)")
        if first is None:
            first = name
        elif x.dtype != named[first].dtype:
            raise TypeError(
                f"[{op}] {name} has dtype {x.dtype} but {first} has dtype "
                f"{named[first].dtype}; all inputs must share one dtype (or run under "
                "torch.autocast)")
        elif x.device != named[first].device:
            raise ValueError(f"[{op}] {name} is on device {x.device} but {first} is on device "
                             f"{named[first].device}; all inputs must be on one device")


def _static(x):
    """Python ints / bools for symbolic ones (torch.compile(dynamic=True) can
    turn integer arguments symbolic; libna's per-axis arguments are static)."""
    if isinstance(x, (tuple, list)):
        return type(x)(_static(y) for y in x)
    if isinstance(x, (bool, torch.SymBool)):
        return bool(x)
    if isinstance(x, (int, torch.SymInt)):
        return int(x)
    return x


def _per_axis(op, name, value, rank, boolean=False):
    if type(value) is not (bool if boolean else int):  # (a plain one needs no _static)
        value = _static(value)
    return list(_ops.per_axis(op, name, value, rank, boolean=boolean))


def _rank(fn: str, rank) -> int:
    """The spatial rank argument of the rank-generic wrappers."""
    if type(rank) is int and 0 < rank < 4:  # the common case: nothing more to check
        return int(rank)  # (int(): under torch.compile a symbolic int passes this test)
    rank = _static(rank)
    if not _ops._is_int(rank) or rank not in (1, 2, 3):
        raise ValueError(f"[{fn}] rank={rank!r} must be 1, 2 or 3")
    return int(rank)


def _na_arguments(op, rank, kernel_size, stride, dilation, is_causal, scale, return_lse):
    """The fused op's per-axis arguments as lists, scale as a float or None
    and return_lse as a bool (TypeError / ValueError naming a bad one)."""
    axes = _ops.common_arguments(rank, kernel_size, stride, dilation, is_causal, scale, return_lse)
    if axes is not None:  # plain ints and bools: nothing more to check here
        kernel_size, stride, dilation, is_causal = axes
        return (list(kernel_size), list(stride), list(dilation), list(is_causal), scale,
                return_lse)
    return (_per_axis(op, "kernel_size", kernel_size, rank),
            _per_axis(op, "stride", stride, rank),
            _per_axis(op, "dilation", dilation, rank),
            _per_axis(op, "is_causal", is_causal, rank, boolean=True),
            _ops.check_scale(op, scale), _ops.check_flag(op, "return_lse", return_lse))


def na(rank: int, q, k, v, kernel_size, *, stride=1, dilation=1, is_causal=False, scale=None,
       rpb=None, return_lse=False, additional_keys=None, additional_values=None):
    """Rank-generic fused neighborhood attention (see ``na1d``)."""
    rank = _rank("na", rank)
    op = f"na{rank}d"
    kernel_size, stride, dilation, is_causal, scale, return_lse = _na_arguments(
        op, rank, kernel_size, stride, dilation, is_causal, scale, return_lse)
    _ops.check_additional(op, additional_keys, additional_values)
    q, k, v, rpb, xk, xv = tensors = (q, k, v, rpb, additional_keys, additional_values)
    if _plain_cpu((q, k, v), (rpb, xk, xv)):  # the common eager call: checked enough
        eager = True
    else:
        q, k, v, rpb, xk, xv = tensors = _autocast(*tensors)
        _check_tensors(op, {"q": q, "k": k, "v": v, "rpb": rpb, "additional_keys": xk,
                            "additional_values": xv})
        eager = _eager(*tensors)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if not eager:
        out, lse = na_forward(q, k, v, rpb, kernel_size, stride, dilation, is_causal, scale, xk,
                              xv)
    else:
        params = (rank, kernel_size, stride, dilation, is_causal, scale)
        if _records_grad(tensors):
            q, k, v, rpb, xk, xv = [None if t is None else _unwrap_if_dead(t) for t in tensors]
            forward = _NA_FORWARD_APPLY
        else:  # nothing to differentiate: no autograd node (~15 us a call)
            forward = _eager_forward
        out, lse = _profiled("libna::na_forward", forward, q, k, v, rpb, xk, xv, params)
    return (out, lse) if return_lse else out


def na_qkvpacked(rank: int, qkv, kernel_size, *, stride=1, dilation=1, is_causal=False,
                 scale=None, rpb=None, return_lse=False):
    """Rank-generic fused neighborhood attention on packed q, k, v (see
    ``na1d_qkvpacked``)."""
    rank = _rank("na_qkvpacked", rank)
    op = f"na{rank}d_qkvpacked"
    kernel_size, stride, dilation, is_causal, scale, return_lse = _na_arguments(
        op, rank, kernel_size, stride, dilation, is_causal, scale, return_lse)
    if not isinstance(qkv, Tensor):
        raise TypeError(f"[{op}] qkv must be a torch.Tensor, got "
                        f"{type(qkv).__module__}.{type(qkv).__qualname__}")
    if qkv.dim() != rank + 4 or qkv.shape[-3] != 3:
        raise ValueError(f"[{op}] qkv has shape {tuple(qkv.shape)}; expected [B, {rank} spatial "
                         "axes, 3, heads, D] (q, k and v along the third-from-last axis)")
    # Inside autocast, its casts first (recorded; a bf16 projection needs
    # none), so that the gradient of qkv still comes out in one piece.
    if _records_grad((qkv, rpb)):
        qkv, rpb = _autocast(qkv, rpb)
        if _plain_cpu((qkv,), (rpb,), autocast_applied=True):
            if scale is None:
                scale = qkv.shape[-1] ** -0.5
            params = (rank, kernel_size, stride, dilation, is_causal, scale)
            out, lse = _profiled("libna::na_forward", _NA_QKVPACKED_APPLY, _unwrap_if_dead(qkv),
                                 None if rpb is None else _unwrap_if_dead(rpb), params)
            return (out, lse) if return_lse else out
    # Otherwise what it stands for: compiled, traced and no-grad calls lose
    # nothing (no gradient to stack; inductor fuses the stack).
    q, k, v = qkv.unbind(-3)
    return na(rank, q, k, v, kernel_size, stride=stride, dilation=dilation, is_causal=is_causal,
              scale=scale, rpb=rpb, return_lse=return_lse)


class _NaQkvPackedEager(torch.autograd.Function):
    """``na`` on the views of a packed qkv, plain CPU tensors: its backward
    writes dq, dk and dv into one gradient of qkv, with no stack (the
    backward of unbind) copying them there."""

    @staticmethod
    def forward(ctx, qkv, rpb, params):
        q, k, v = qkv.unbind(-3)
        output = _eager_forward(q, k, v, rpb, None, None, params)
        ctx.save_for_backward(qkv, *output, rpb)
        ctx.params = params
        ctx.set_materialize_grads(False)
        return output

    @staticmethod
    def backward(ctx, dout, dlse):
        qkv, out, lse, rpb = ctx.saved_tensors
        if dout is None and dlse is None:
            return None, None, None
        if dout is None:
            dout = torch.zeros_like(out)
        q, k, v = qkv.unbind(-3)
        args = (q, k, v, out, dout, lse, rpb, None, None, dlse)
        if _direct_backward(*args):
            dqkv = torch.empty(qkv.shape, dtype=qkv.dtype)
            drpb = _core_backward(ctx.params, *args, into=dqkv.unbind(-3))[3]
        else:
            dq, dk, dv, drpb, _, _ = _op_backward(ctx.params, *args)
            dqkv = torch.stack((dq, dk, dv), dim=-3)
        return dqkv, (drpb if rpb is not None else None), None


_NA_FORWARD_APPLY = _c_apply(_NaForwardEager)
_NA_QKVPACKED_APPLY = _c_apply(_NaQkvPackedEager)


def na_qk(rank: int, q, k, kernel_size, *, dilation=1, is_causal=False, rpb=None):
    """Rank-generic unfused attention scores (see ``na1d_qk``)."""
    rank = _rank("na_qk", rank)
    op = f"na{rank}d_qk"
    kernel_size = _per_axis(op, "kernel_size", kernel_size, rank)
    dilation = _per_axis(op, "dilation", dilation, rank)
    is_causal = _per_axis(op, "is_causal", is_causal, rank, boolean=True)
    q, k, rpb = _autocast(q, k, rpb)
    _check_tensors(op, {"q": q, "k": k, "rpb": rpb})
    return na_qk_op(q, k, rpb, kernel_size, dilation, is_causal)


def na_av(rank: int, attn, v, kernel_size, *, dilation=1, is_causal=False):
    """Rank-generic unfused weighted sum (see ``na1d_av``)."""
    rank = _rank("na_av", rank)
    op = f"na{rank}d_av"
    kernel_size = _per_axis(op, "kernel_size", kernel_size, rank)
    dilation = _per_axis(op, "dilation", dilation, rank)
    is_causal = _per_axis(op, "is_causal", is_causal, rank, boolean=True)
    attn, v = _autocast(attn, v)
    _check_tensors(op, {"attn": attn, "v": v})
    return na_av_op(attn, v, kernel_size, dilation, is_causal)


_NA_DOC = """{rank}D neighborhood attention, fused and differentiable (torch custom op).

    q: [B, {spatial}, heads, D]; k: [B, {spatial}, heads_kv, D];
    v: [B, {spatial}, heads_kv, D_v]. kernel_size, stride, dilation: an int
    or a tuple of {rank} ints; is_causal: a bool or a tuple of {rank} bools;
    scale: default D**-0.5; rpb: optional [heads, 2*kernel_size-1 per axis]
    (non-causal, stride 1). Returns out [B, {spatial}, heads, D_v], and with
    return_lse=True also lse [B, {spatial}, heads] (float32; float64 for
    float64), which is differentiable as well. additional_keys [B, N, heads_kv, D]
    and additional_values [B, N, heads_kv, D_v] (both or neither) are attended
    by every query too, in the same softmax; they are differentiable.
    """

_QKVPACKED_DOC = """{rank}D neighborhood attention on a packed projection, fused and
    differentiable: qkv [B, {spatial}, 3, heads, D] holds q, k and v along
    its third-from-last axis, as a fused q/k/v Linear layer gives them
    (FlashAttention's qkvpacked layout). The same results as
    na{rank}d(*qkv.unbind(-3), ...); the gradient of qkv comes out in one
    piece (eager CPU calls write dq, dk and dv into it rather than stacking
    three). kernel_size, stride, dilation, is_causal, scale, rpb and
    return_lse: as in na{rank}d.
    """

_QK_DOC = """{rank}D neighborhood attention scores q.k (+ rpb), unscaled,
    differentiable: [B, {spatial}, heads, prod(kernel_size)]; slots that a
    causal window does not fill hold -inf.
    """

_AV_DOC = """{rank}D neighborhood attention weighted sum attn.v, differentiable.

    attn: [B, {spatial}, heads, prod(kernel_size)] in the slot layout of
    na{rank}d_qk; v: [B, {spatial}, heads_kv, D_v]. Returns
    [B, {spatial}, heads, D_v].
    """


@public
def merge_attentions(outs, lses):
    """Exact, differentiable merge of attentions of the same queries over
    disjoint key sets from their lse: (out, lse) with
    lse = logsumexp_i lses[i] and out = sum_i exp(lses[i] - lse) * outs[i]."""
    op = "merge_attentions"
    _ops.check_parts(op, outs, lses)
    outs, lses = list(outs), list(lses)
    _check_tensors(op, {f"outs[{i}]": o for i, o in enumerate(outs)})
    _check_tensors(op, {f"lses[{i}]": x for i, x in enumerate(lses)})
    return merge_attentions_op(outs, lses)


na1d, na2d, na3d = (_ops.rank_op(r, na, f"na{r}d", _NA_DOC) for r in (1, 2, 3))
na1d_qkvpacked, na2d_qkvpacked, na3d_qkvpacked = (
    _ops.rank_op(r, na_qkvpacked, f"na{r}d_qkvpacked", _QKVPACKED_DOC) for r in (1, 2, 3))
na1d_qk, na2d_qk, na3d_qk = (_ops.rank_op(r, na_qk, f"na{r}d_qk", _QK_DOC) for r in (1, 2, 3))
na1d_av, na2d_av, na3d_av = (_ops.rank_op(r, na_av, f"na{r}d_av", _AV_DOC) for r in (1, 2, 3))
# The rank-generic wrappers are public too; the per-rank functions above call
# them unwrapped, so that a call that does not fit names na2d, not na.
na, na_qk, na_av = public(na), public(na_qk), public(na_av)
na_qkvpacked = public(na_qkvpacked)
