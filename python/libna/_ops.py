"""libna's public operators, written once for every spatial rank.

A call normalises its per-axis arguments, works out which framework its
arrays come from, and hands them to the compiled core, which validates them
(ValueError / TypeError naming the argument) before it allocates outputs
through the caller's framework and runs. When the compiled core cannot be
loaded, the same API runs on the pure-NumPy reference implementation.
"""

from __future__ import annotations

import functools
import numbers

import numpy as np

from . import reference
from ._frameworks import Arrays, call_numpy, plain_numpy, traced_by_jax
from ._public import public

try:
    from . import _C
except ImportError as error:  # pragma: no cover - exercised by the fallback test
    _C = None
    _C_IMPORT_ERROR = error
else:
    _C_IMPORT_ERROR = None


def _is_int(x) -> bool:
    return isinstance(x, (numbers.Integral, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_bool(x) -> bool:
    return isinstance(x, (bool, np.bool_))


_INT64_MAX = 2**63 - 1


def per_axis(op: str, name: str, value, rank: int, *, boolean: bool = False) -> tuple:
    """An int (bool) or a sequence of rank ints (bools) as a rank-tuple."""
    if type(value) is (bool if boolean else int) and (boolean or -_INT64_MAX <= value <= _INT64_MAX):
        return (value,) * rank  # the common case, without the general checks
    check, kind = (_is_bool, "bool") if boolean else (_is_int, "int")
    if check(value):
        values = (value,) * rank
    elif isinstance(value, (tuple, list)) and all(check(x) for x in value):
        if len(value) != rank:
            raise ValueError(
                f"[{op}] {name}={tuple(value)!r} has {len(value)} values; expected one "
                f"{kind} or {rank} (one per spatial axis)"
            )
        values = tuple(value)
    else:
        values = None
    if values is not None:
        if boolean:
            return tuple(bool(x) for x in values)
        values = tuple(int(x) for x in values)
        if any(abs(x) > _INT64_MAX for x in values):
            raise ValueError(f"[{op}] {name}={values!r} is out of range (64-bit integers)")
        return values
    raise TypeError(
        f"[{op}] {name}={value!r} must be an {kind} or a tuple of {rank} {kind}s"
    )


def check_real(op: str, name: str, value):
    """value as a float, or None when None."""
    if value is None:
        return None
    if not isinstance(value, (numbers.Real, np.floating, np.integer)) or isinstance(
        value, (bool, np.bool_)
    ):
        raise TypeError(f"[{op}] {name}={value!r} must be a real number or None")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"[{op}] {name}={value!r} must be a finite number") from None


def check_scale(op: str, scale):
    return check_real(op, "scale", scale)


def check_flag(op: str, name: str, value) -> bool:
    if not _is_bool(value):
        raise TypeError(f"[{op}] {name}={value!r} must be a bool")
    return bool(value)


def check_additional(op: str, additional_keys, additional_values) -> bool:
    """Whether additional keys are given; they come as a pair or not at all."""
    if (additional_keys is None) != (additional_values is None):
        given, missing = (("additional_keys", "additional_values") if additional_values is None
                          else ("additional_values", "additional_keys"))
        raise ValueError(f"[{op}] {given} was given without {missing}; pass both or neither")
    return additional_keys is not None


def common_arguments(rank, kernel_size, stride, dilation, is_causal, scale, return_lse):
    """(kernel_size, stride, dilation, is_causal) as rank-tuples when every
    argument has its most common form (ints in range, a bool, a float or
    None scale, a bool return_lse), which needs no further checks; None
    otherwise (per_axis and the checks below then normalise or explain)."""
    if (type(kernel_size) is int and type(stride) is int and type(dilation) is int
            and type(is_causal) is bool and type(return_lse) is bool
            and (scale is None or type(scale) is float)
            and -_INT64_MAX <= min(kernel_size, stride, dilation)
            and max(kernel_size, stride, dilation) <= _INT64_MAX):
        return (kernel_size,) * rank, (stride,) * rank, (dilation,) * rank, (is_causal,) * rank
    return None


def na(rank, q, k, v, kernel_size, *, stride=1, dilation=1, is_causal=False, scale=None,
       rpb=None, return_lse=False, additional_keys=None, additional_values=None):
    if type(q) is np.ndarray and additional_keys is None and additional_values is None:
        # The most common NumPy call goes straight to the core, which
        # validates the rest (each helper call costs about 0.1 us).
        axes = common_arguments(rank, kernel_size, stride, dilation, is_causal, scale, return_lse)
        if axes is not None and _C is not None and plain_numpy((q, k, v), (rpb,)):
            out, lse = call_numpy("na", (q, k, v, rpb), rank, *axes, scale, return_lse)
            return (out, lse) if return_lse else out
    op = f"na{rank}d"
    if traced_by_jax(q, k, v, rpb, additional_keys, additional_values):
        from . import jax as libna_jax

        return libna_jax.na(rank, q, k, v, kernel_size, stride=stride, dilation=dilation,
                            is_causal=is_causal, scale=scale, rpb=rpb, return_lse=return_lse,
                            additional_keys=additional_keys,
                            additional_values=additional_values)
    if _C is None:
        return getattr(reference, op)(
            q, k, v, kernel_size, stride=stride, dilation=dilation, is_causal=is_causal,
            scale=scale, rpb=rpb, return_lse=return_lse, additional_keys=additional_keys,
            additional_values=additional_values)
    kernel_size = per_axis(op, "kernel_size", kernel_size, rank)
    stride = per_axis(op, "stride", stride, rank)
    dilation = per_axis(op, "dilation", dilation, rank)
    is_causal = per_axis(op, "is_causal", is_causal, rank, boolean=True)
    scale = check_scale(op, scale)
    return_lse = check_flag(op, "return_lse", return_lse)
    check_additional(op, additional_keys, additional_values)
    return na_normalized(op, rank, q, k, v, rpb, additional_keys, additional_values,
                         kernel_size, stride, dilation, is_causal, scale, return_lse)


def na_normalized(op, rank, q, k, v, rpb, additional_keys, additional_values, kernel_size,
                  stride, dilation, is_causal, scale, return_lse):
    """``na`` on arguments already normalised (per-axis tuples, a float or
    None scale, flags as bools): what the front ends call once they have
    checked their own arguments."""
    arrays = Arrays(op, {"q": q, "k": k, "v": v, "rpb": rpb, "additional_keys": additional_keys,
                         "additional_values": additional_values})
    a = arrays.inputs
    out, lse = arrays.call("na", [a["q"], a["k"], a["v"], a["rpb"], a["additional_keys"],
                                  a["additional_values"]], rank, kernel_size, stride, dilation,
                           is_causal, scale, return_lse)
    out = arrays.finish(out, q)
    return (out, arrays.finish(lse, q)) if return_lse else out


def na_qk(rank, q, k, kernel_size, *, dilation=1, is_causal=False, rpb=None):
    op = f"na{rank}d_qk"
    if _C is None:
        return getattr(reference, op)(
            q, k, kernel_size, dilation=dilation, is_causal=is_causal, rpb=rpb)
    kernel_size = per_axis(op, "kernel_size", kernel_size, rank)
    dilation = per_axis(op, "dilation", dilation, rank)
    is_causal = per_axis(op, "is_causal", is_causal, rank, boolean=True)
    arrays = Arrays(op, {"q": q, "k": k, "rpb": rpb})
    a = arrays.inputs
    (attn,) = arrays.call("na_qk", [a["q"], a["k"], a["rpb"]], rank, kernel_size,
                          dilation=dilation, is_causal=is_causal)
    return arrays.finish(attn, q)


def na_av(rank, attn, v, kernel_size, *, dilation=1, is_causal=False):
    op = f"na{rank}d_av"
    if _C is None:
        return getattr(reference, op)(
            attn, v, kernel_size, dilation=dilation, is_causal=is_causal)
    kernel_size = per_axis(op, "kernel_size", kernel_size, rank)
    dilation = per_axis(op, "dilation", dilation, rank)
    is_causal = per_axis(op, "is_causal", is_causal, rank, boolean=True)
    arrays = Arrays(op, {"attn": attn, "v": v})
    a = arrays.inputs
    (out,) = arrays.call("na_av", [a["attn"], a["v"]], rank, kernel_size, dilation=dilation,
                         is_causal=is_causal)
    return arrays.finish(out, attn)


def na_backward(rank, q, k, v, out, dout, lse, kernel_size, *, stride=1, dilation=1,
                is_causal=False, scale=None, rpb=None, additional_keys=None,
                additional_values=None, dlse=None):
    if type(q) is np.ndarray and additional_keys is None and additional_values is None:
        # The common NumPy call goes straight to the core, as na's does.
        axes = common_arguments(rank, kernel_size, stride, dilation, is_causal, scale, False)
        if (axes is not None and _C is not None
                and plain_numpy((q, k, v, out, dout, lse), (rpb, dlse))):
            grads = call_numpy("na_backward", (q, k, v, rpb, out, dout, lse, dlse), rank, *axes,
                               scale)
            return tuple(g for g in grads if g is not None)
    op = f"na{rank}d_backward"
    if _C is None:
        return getattr(reference, op)(
            q, k, v, out, dout, lse, kernel_size, stride=stride, dilation=dilation,
            is_causal=is_causal, scale=scale, rpb=rpb, additional_keys=additional_keys,
            additional_values=additional_values, dlse=dlse)
    kernel_size = per_axis(op, "kernel_size", kernel_size, rank)
    stride = per_axis(op, "stride", stride, rank)
    dilation = per_axis(op, "dilation", dilation, rank)
    is_causal = per_axis(op, "is_causal", is_causal, rank, boolean=True)
    scale = check_scale(op, scale)
    check_additional(op, additional_keys, additional_values)
    arrays = Arrays(op, {"q": q, "k": k, "v": v, "rpb": rpb, "out": out, "dout": dout,
                         "lse": lse, "additional_keys": additional_keys,
                         "additional_values": additional_values, "dlse": dlse},
                    optional=("rpb", "additional_keys", "additional_values", "dlse"))
    a = arrays.inputs
    # One core call: with additional keys, both parts' gradients come from the
    # merged out and lse (FlashAttention-style) and dq holds both shares.
    grads = arrays.call("na_backward", [a["q"], a["k"], a["v"], a["rpb"], a["out"], a["dout"],
                                        a["lse"], a["dlse"], a["additional_keys"],
                                        a["additional_values"]], rank, kernel_size, stride,
                        dilation, is_causal, scale)
    grads = [arrays.finish(g, q) for g in grads if g is not None]
    return tuple(grads)


def na_qk_backward(rank, dattn, q, k, kernel_size, *, dilation=1, is_causal=False, rpb=None):
    op = f"na{rank}d_qk_backward"
    if _C is None:
        return getattr(reference, op)(
            dattn, q, k, kernel_size, dilation=dilation, is_causal=is_causal, rpb=rpb)
    kernel_size = per_axis(op, "kernel_size", kernel_size, rank)
    dilation = per_axis(op, "dilation", dilation, rank)
    is_causal = per_axis(op, "is_causal", is_causal, rank, boolean=True)
    arrays = Arrays(op, {"dattn": dattn, "q": q, "k": k, "rpb": rpb})
    a = arrays.inputs
    grads = arrays.call("na_qk_backward", [a["dattn"], a["q"], a["k"], a["rpb"]], rank,
                        kernel_size, dilation=dilation, is_causal=is_causal)
    grads = tuple(arrays.finish(g, q) for g in grads)
    return grads if rpb is not None else grads[:2]


def na_av_backward(rank, dout, attn, v, kernel_size, *, dilation=1, is_causal=False):
    op = f"na{rank}d_av_backward"
    if _C is None:
        return getattr(reference, op)(
            dout, attn, v, kernel_size, dilation=dilation, is_causal=is_causal)
    kernel_size = per_axis(op, "kernel_size", kernel_size, rank)
    dilation = per_axis(op, "dilation", dilation, rank)
    is_causal = per_axis(op, "is_causal", is_causal, rank, boolean=True)
    arrays = Arrays(op, {"dout": dout, "attn": attn, "v": v})
    a = arrays.inputs
    grads = arrays.call("na_av_backward", [a["dout"], a["attn"], a["v"]], rank, kernel_size,
                        dilation=dilation, is_causal=is_causal)
    return tuple(arrays.finish(g, attn) for g in grads)


def check_parts(op, outs, lses):
    """outs and lses as two equally long lists (any sequence, not an array)."""
    for name, parts in (("outs", outs), ("lses", lses)):
        if not isinstance(parts, (list, tuple)):
            raise TypeError(f"[{op}] {name} must be a list or tuple of arrays, got "
                            f"{type(parts).__module__}.{type(parts).__qualname__}")
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(f"[{op}] outs and lses must be non-empty and of equal length, got "
                         f"{len(outs)} outs and {len(lses)} lses")
    named = {f"outs[{i}]": o for i, o in enumerate(outs)}
    named.update({f"lses[{i}]": x for i, x in enumerate(lses)})
    return named


@public
def merge_attentions(outs, lses):
    """Exact merge of attentions of the same queries over disjoint key sets.

    outs[i] [..., D_v] and lses[i] [...] (as returned with return_lse=True)
    give out = sum_i exp(lses[i] - lse) * outs[i] with lse = logsumexp_i
    lses[i]. Returns (out, lse) in the caller's array type.
    """
    op = "merge_attentions"
    if isinstance(outs, (list, tuple)) and isinstance(lses, (list, tuple)) and traced_by_jax(
            *outs, *lses):
        from . import jax as libna_jax

        return libna_jax.merge_attentions(outs, lses)
    if _C is None:
        return reference.merge_attentions(outs, lses)
    named = check_parts(op, outs, lses)
    arrays = Arrays(op, named, optional=())
    a = arrays.inputs
    out, lse = arrays.call("merge_attentions", [a[f"outs[{i}]"] for i in range(len(outs))] +
                           [a[f"lses[{i}]"] for i in range(len(lses))])
    return arrays.finish(out, outs[0]), arrays.finish(lse, outs[0])


@public
def merge_attentions_backward(outs, lses, out, lse, dout, dlse=None):
    """Gradients of merge_attentions: (douts, dlses), lists like outs and lses.

    Takes the parts, the merged (out, lse), dout and optionally dlse."""
    op = "merge_attentions_backward"
    if _C is None:
        return reference.merge_attentions_backward(outs, lses, out, lse, dout, dlse)
    named = check_parts(op, outs, lses)
    named.update({"out": out, "lse": lse, "dout": dout, "dlse": dlse})
    arrays = Arrays(op, named, optional=("dlse",))
    a = arrays.inputs
    n = len(outs)
    grads = arrays.call("merge_attentions_backward",
                        [a[f"outs[{i}]"] for i in range(n)] + [a[f"lses[{i}]"] for i in range(n)] +
                        [a["out"], a["lse"], a["dout"], a["dlse"]])
    douts, dlses = grads[:n], grads[n:]
    return ([arrays.finish(g, out) for g in douts], [arrays.finish(g, out) for g in dlses])


_SPATIAL = {1: "L", 2: "H, W", 3: "T, H, W"}


def rank_op(rank, impl, name, doc):
    """impl(rank, ...) as the public function `name` of one rank, documented by doc."""
    op = public(functools.partial(impl, rank), name)
    op.__name__ = op.__qualname__ = name
    op.__module__ = impl.__module__
    op.__doc__ = doc.format(rank=rank, spatial=_SPATIAL[rank])
    return op


_NA_DOC = """{rank}D neighborhood attention, fused.

    out = {rank}d-neighborhood softmax(scale * q.k + rpb) . v

    q: [B, {spatial}, heads, D]; k: [B, {spatial}, heads_kv, D];
    v: [B, {spatial}, heads_kv, D_v] (heads divisible by heads_kv).
    kernel_size, stride, dilation: an int or a tuple of {rank} ints;
    is_causal: a bool or a tuple of {rank} bools; scale: default D**-0.5;
    rpb: optional relative positional bias [heads, 2*kernel_size-1 per axis]
    (non-causal, stride 1 only). Returns out [B, {spatial}, heads, D_v] in the
    caller's array type, and with return_lse=True also the log-sum-exp of the
    logits, [B, {spatial}, heads] (float32; float64 for float64 inputs). JAX
    tracers (calls inside jax.jit, jax.grad, jax.vmap) go to libna.jax.

    additional_keys [B, N, heads_kv, D] and additional_values [B, N, heads_kv, D_v]
    (both or neither): N extra keys that every query attends to as well, in
    one softmax with its neighbourhood (cross-attention tokens, registers).
    """

_QK_DOC = """{rank}D neighborhood attention scores (unfused): q.k (+ rpb), not scaled.

    Returns [B, {spatial}, heads, prod(kernel_size)]; slot t is the row-major
    index of the per-axis window positions; slots that a causal window does
    not fill hold -inf.
    """

_AV_DOC = """{rank}D neighborhood attention weighted sum (unfused): attn . v.

    attn: [B, {spatial}, heads, prod(kernel_size)] in the slot layout of
    na{rank}d_qk; v: [B, {spatial}, heads_kv, D_v]. Returns
    [B, {spatial}, heads, D_v].
    """


_BACKWARD_DOC = """Gradients of na{rank}d: (dq, dk, dv), plus drpb when rpb is given.

    Takes the forward's inputs and arguments with its out and lse
    (``na{rank}d(..., return_lse=True)``) and dout, the gradient of out. The
    probabilities are recomputed from lse; dk/dv sum over the query heads of
    each kv head; drpb sums over batch and queries. With additional_keys and
    additional_values (as given to the forward) their gradients follow:
    (dq, dk, dv[, drpb], d_additional_keys, d_additional_values). dlse, the
    gradient of lse ([B, {spatial}, heads], lse's dtype), is optional: give it
    when the forward's lse feeds the loss too.
    """

_QK_BACKWARD_DOC = """Gradients of na{rank}d_qk: (dq, dk), plus drpb when rpb is given.

    dattn has the shape of the scores; unfilled causal slots are ignored.
    """

_AV_BACKWARD_DOC = """Gradients of na{rank}d_av: (dattn, dv); dattn is 0 in the slots
    that a causal window does not fill.
    """


def rank_ops(rank):
    """The public functions of one spatial rank, by name."""
    ops = [
        (na, f"na{rank}d", _NA_DOC),
        (na_qk, f"na{rank}d_qk", _QK_DOC),
        (na_av, f"na{rank}d_av", _AV_DOC),
        (na_backward, f"na{rank}d_backward", _BACKWARD_DOC),
        (na_qk_backward, f"na{rank}d_qk_backward", _QK_BACKWARD_DOC),
        (na_av_backward, f"na{rank}d_av_backward", _AV_BACKWARD_DOC),
    ]
    return {name: rank_op(rank, impl, name, doc) for impl, name, doc in ops}
