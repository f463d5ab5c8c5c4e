"""NATTEN's functional API (0.14 to 0.17) on libna's PyTorch ops.

Unfused ops, heads-first (``[B, heads, *spatial, D]``), as NATTEN had them:

* 0.17: ``na{1,2,3}d_qk(query, key, kernel_size, dilation=1,
  additional_keys=None, is_causal=False, rpb=None)`` and
  ``na{1,2,3}d_av(attn, value, kernel_size, dilation=1,
  additional_values=None, is_causal=False)``;
* 0.14 to 0.16: ``natten{1,2,3}dqkrpb(query, key, rpb, kernel_size,
  dilation)``, ``natten{1,2,3}dqk(query, key, kernel_size, dilation)`` and
  ``natten{1,2,3}dav(attn, value, kernel_size, dilation)``. The 3D ones also
  take 0.14's separate depth arguments, ``natten3dqkrpb(query, key, rpb,
  kernel_size_d, kernel_size, dilation_d, dilation)`` and
  ``natten3dav(attn, value, kernel_size_d, kernel_size, dilation_d,
  dilation)``.

``attn`` is ``[B, heads, *spatial, prod(kernel_size) + N]``: the
neighbourhood's slots in row-major order of the per-axis window positions
(slots a causal window does not fill hold ``-inf``), then one slot per
additional key (``additional_keys`` / ``additional_values``:
``[B, heads, N, D]``). rpb is ``[heads, 2*kernel_size-1 per axis]``; the bias
of a key is indexed by its offset from the query, plus ``kernel_size - 1``.

Fused, heads-last (``[B, *spatial, heads, D]``):
``na{1,2,3}d(query, key, value, kernel_size, dilation=1, is_causal=False,
rpb=None, scale=None, additional_keys=None, additional_values=None,
xformers_kwargs=None)``; additional keys are ``[B, N, heads, D]``. As in
NATTEN, ``scale`` defaults to ``D ** -0.5`` (and so does ``scale=0``).

Everything is differentiable and runs under ``torch.compile``: the
neighbourhood parts are libna's custom ops (``libna.torch``), the additional
keys plain matmuls. Unlike NATTEN 0.17, the fused ops also run on the CPU,
accept rpb in the backward, and the additional keys of the fused ops need no
xFormers; even kernel sizes work everywhere.
"""

import math

import torch
from torch import Tensor

from .._public import public
from ..torch import ops

__all__ = [
    "na1d_qk", "na2d_qk", "na3d_qk", "na1d_av", "na2d_av", "na3d_av",
    "na1d", "na2d", "na3d",
    "natten1dqkrpb", "natten2dqkrpb", "natten3dqkrpb",
    "natten1dqk", "natten2dqk", "natten3dqk",
    "natten1dav", "natten2dav", "natten3dav",
]


def _fail_type(name: str, signature: str, arg: str, value, expected: str):
    shown = (f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor)
             else repr(value))
    raise TypeError(f"[natten.functional.{name}] {arg}={shown} must be {expected}; "
                    f"expected {name}{signature}")


def _tensor(name, signature, arg, value, optional=False):
    if value is None and optional:
        return None
    if not isinstance(value, Tensor):
        _fail_type(name, signature, arg, value,
                   "a torch.Tensor" + (" or None" if optional else ""))
    return value


def _per_axis_arg(name, signature, arg, value, rank, boolean=False):
    """NATTEN's int-or-tuple argument; a tensor here means the positional
    arguments are mixed up (an rpb where a kernel size belongs, say)."""
    if isinstance(value, Tensor):
        _fail_type(name, signature, arg, value,
                   "a bool or a tuple of bools" if boolean else "an int or a tuple of ints")
    return ops._per_axis(f"natten.functional.{name}", arg, value, rank, boolean=boolean)


def _check_heads_first(name, signature, arg, x, rank):
    if x.dim() != rank + 3:
        raise ValueError(
            f"[natten.functional.{name}] {arg} has shape {tuple(x.shape)}; expected "
            f"{rank + 3} dimensions, [batch, heads, {rank} spatial axes, dim] "
            f"(NATTEN's unfused ops are heads-first); signature {name}{signature}")


def _check_additional(name, signature, arg, extra, x):
    """additional keys / values [B, heads, N, D] matching x [B, heads, ..., D]
    in batch and heads (and dim for keys)."""
    if extra.dim() != 4 or extra.shape[0] != x.shape[0] or extra.shape[1] != x.shape[1]:
        raise ValueError(
            f"[natten.functional.{name}] {arg} has shape {tuple(extra.shape)}; expected "
            f"[batch={x.shape[0]}, heads={x.shape[1]}, tokens, dim] (heads-first, like the "
            f"other inputs); signature {name}{signature}")


def _heads_last(x: Tensor) -> Tensor:
    return x.movedim(1, -2)


def _heads_first(x: Tensor) -> Tensor:
    return x.movedim(-2, 1)


def _qk(rank, name, signature, query, key, kernel_size, dilation, additional_keys, is_causal,
        rpb):
    query = _tensor(name, signature, "query", query)
    key = _tensor(name, signature, "key", key)
    rpb = _tensor(name, signature, "rpb", rpb, optional=True)
    additional_keys = _tensor(name, signature, "additional_keys", additional_keys,
                              optional=True)
    kernel_size = _per_axis_arg(name, signature, "kernel_size", kernel_size, rank)
    dilation = _per_axis_arg(name, signature, "dilation", dilation, rank)
    is_causal = _per_axis_arg(name, signature, "is_causal", is_causal, rank, boolean=True)
    _check_heads_first(name, signature, "query", query, rank)
    _check_heads_first(name, signature, "key", key, rank)
    if rpb is not None and rpb.is_floating_point() and rpb.dtype != key.dtype:
        rpb = rpb.to(key.dtype)  # NATTEN casts the bias to the key's dtype
    attn = _heads_first(ops.na_qk(rank, _heads_last(query), _heads_last(key), kernel_size,
                                  dilation=dilation, is_causal=is_causal, rpb=rpb))
    if additional_keys is None:
        return attn
    _check_additional(name, signature, "additional_keys", additional_keys, query)
    if additional_keys.shape[-1] != query.shape[-1]:
        raise ValueError(
            f"[natten.functional.{name}] additional_keys has dim {additional_keys.shape[-1]} "
            f"but query has dim {query.shape[-1]}; they must match")
    batch, heads = query.shape[:2]
    extra = torch.matmul(query.reshape(batch, heads, -1, query.shape[-1]),
                         additional_keys.to(query.dtype).transpose(-2, -1))
    extra = extra.reshape(*query.shape[:-1], additional_keys.shape[2])
    return torch.cat([attn, extra.to(attn.dtype)], dim=-1)


def _av(rank, name, signature, attn, value, kernel_size, dilation, additional_values,
        is_causal):
    attn = _tensor(name, signature, "attn", attn)
    value = _tensor(name, signature, "value", value)
    additional_values = _tensor(name, signature, "additional_values", additional_values,
                                optional=True)
    kernel_size = _per_axis_arg(name, signature, "kernel_size", kernel_size, rank)
    dilation = _per_axis_arg(name, signature, "dilation", dilation, rank)
    is_causal = _per_axis_arg(name, signature, "is_causal", is_causal, rank, boolean=True)
    _check_heads_first(name, signature, "attn", attn, rank)
    _check_heads_first(name, signature, "value", value, rank)
    attn = attn.to(value.dtype)  # as NATTEN does (softmax in float32 under autocast)
    slots = math.prod(kernel_size)
    extra_slots = 0 if additional_values is None else additional_values.shape[-2]
    if attn.shape[-1] != slots + extra_slots:
        raise ValueError(
            f"[natten.functional.{name}] attn has {attn.shape[-1]} weights per token; expected "
            f"prod(kernel_size={tuple(kernel_size)}) = {slots}"
            + (f" plus {extra_slots} for additional_values" if extra_slots else
               " (pass additional_values for the weights beyond those)"))
    attn_na, attn_extra = attn.split([slots, extra_slots], dim=-1)
    out = _heads_first(ops.na_av(rank, _heads_last(attn_na), _heads_last(value), kernel_size,
                                 dilation=dilation, is_causal=is_causal))
    if additional_values is None:
        return out
    _check_additional(name, signature, "additional_values", additional_values, attn)
    if additional_values.shape[-1] != value.shape[-1]:
        raise ValueError(
            f"[natten.functional.{name}] additional_values has dim "
            f"{additional_values.shape[-1]} but value has dim {value.shape[-1]}; they must match")
    batch, heads = attn.shape[:2]
    extra = torch.matmul(attn_extra.reshape(batch, heads, -1, extra_slots),
                         additional_values.to(value.dtype))
    return out + extra.reshape(out.shape)


def _fused(rank, name, signature, query, key, value, kernel_size, dilation, is_causal, rpb,
           scale, additional_keys, additional_values, xformers_kwargs):
    for arg, x in (("query", query), ("key", key), ("value", value)):
        _tensor(name, signature, arg, x)
    rpb = _tensor(name, signature, "rpb", rpb, optional=True)
    kernel_size = _per_axis_arg(name, signature, "kernel_size", kernel_size, rank)
    dilation = _per_axis_arg(name, signature, "dilation", dilation, rank)
    is_causal = _per_axis_arg(name, signature, "is_causal", is_causal, rank, boolean=True)
    if xformers_kwargs:
        raise TypeError(
            f"[natten.functional.{name}] xformers_kwargs={xformers_kwargs!r} cannot be "
            "honoured: libna attends to additional keys itself, without xFormers; pass "
            f"xformers_kwargs=None; expected {name}{signature}")
    if (additional_keys is None) != (additional_values is None):
        raise ValueError(
            f"[natten.functional.{name}] additional_keys and additional_values must be given "
            "together (both tensors or both None)")
    if rpb is not None and rpb.is_floating_point() and rpb.dtype != query.dtype:
        rpb = rpb.to(query.dtype)
    # NATTEN 0.17: `scale = scale or query.shape[-1] ** -0.5`.
    scale = scale or query.shape[-1] ** -0.5
    return ops.na(rank, query, key, value, kernel_size, dilation=dilation, is_causal=is_causal,
                  scale=scale, rpb=rpb, additional_keys=additional_keys,
                  additional_values=additional_values)


def _define(rank):
    qk_sig = "(query, key, kernel_size, dilation=1, additional_keys=None, is_causal=False, rpb=None)"
    av_sig = "(attn, value, kernel_size, dilation=1, additional_values=None, is_causal=False)"
    fused_sig = ("(query, key, value, kernel_size, dilation=1, is_causal=False, rpb=None, "
                 "scale=None, additional_keys=None, additional_values=None, "
                 "xformers_kwargs=None)")
    qk_name, av_name, fused_name = f"na{rank}d_qk", f"na{rank}d_av", f"na{rank}d"

    def na_qk(query, key, kernel_size, dilation=1, additional_keys=None, is_causal=False,
              rpb=None):
        return _qk(rank, qk_name, qk_sig, query, key, kernel_size, dilation, additional_keys,
                   is_causal, rpb)

    def na_av(attn, value, kernel_size, dilation=1, additional_values=None, is_causal=False):
        return _av(rank, av_name, av_sig, attn, value, kernel_size, dilation, additional_values,
                   is_causal)

    def na(query, key, value, kernel_size, dilation=1, is_causal=False, rpb=None, scale=None,
           additional_keys=None, additional_values=None, xformers_kwargs=None):
        return _fused(rank, fused_name, fused_sig, query, key, value, kernel_size, dilation,
                      is_causal, rpb, scale, additional_keys, additional_values,
                      xformers_kwargs)

    spatial = {1: "L", 2: "H, W", 3: "T, H, W"}[rank]
    na_qk.__doc__ = (f"NATTEN 0.17 ``{qk_name}``: query, key [B, heads, {spatial}, D] -> "
                     f"attn [B, heads, {spatial}, prod(kernel_size) + N] (not scaled).")
    na_av.__doc__ = (f"NATTEN 0.17 ``{av_name}``: attn [B, heads, {spatial}, "
                     f"prod(kernel_size) + N], value [B, heads, {spatial}, D] -> "
                     f"[B, heads, {spatial}, D].")
    na.__doc__ = (f"NATTEN 0.17 ``{fused_name}``: query, key, value [B, {spatial}, heads, D] "
                  f"-> [B, {spatial}, heads, D] (fused, heads-last).")
    out = []
    for fn, name in ((na_qk, qk_name), (na_av, av_name), (na, fused_name)):
        fn.__name__ = fn.__qualname__ = name
        out.append(public(fn, name, f"natten.functional.{name}"))
    return out


na1d_qk, na1d_av, na1d = _define(1)
na2d_qk, na2d_av, na2d = _define(2)
na3d_qk, na3d_av, na3d = _define(3)


# --------------------------------------------------------------------------
# NATTEN 0.14 to 0.16 names
# --------------------------------------------------------------------------


def _define_legacy(rank):
    qkrpb_name, qk_name, av_name = f"natten{rank}dqkrpb", f"natten{rank}dqk", f"natten{rank}dav"
    qkrpb_sig = "(query, key, rpb, kernel_size, dilation)"
    qk_sig = "(query, key, kernel_size, dilation)"
    av_sig = "(attn, value, kernel_size, dilation)"

    def qkrpb(query, key, rpb, kernel_size, dilation):
        return _qk(rank, qkrpb_name, qkrpb_sig, query, key, kernel_size, dilation, None, False,
                   rpb)

    def qk(query, key, kernel_size, dilation):
        return _qk(rank, qk_name, qk_sig, query, key, kernel_size, dilation, None, False, None)

    def av(attn, value, kernel_size, dilation):
        return _av(rank, av_name, av_sig, attn, value, kernel_size, dilation, None, False)

    spatial = {1: "L", 2: "H, W", 3: "T, H, W"}[rank]
    qkrpb.__doc__ = (f"NATTEN 0.14-0.16 ``{qkrpb_name}``: scores q.k + rpb, "
                     f"[B, heads, {spatial}, prod(kernel_size)] (rpb may be None).")
    qk.__doc__ = f"NATTEN 0.14-0.16 ``{qk_name}``: scores q.k (no bias)."
    av.__doc__ = f"NATTEN 0.14-0.16 ``{av_name}``: attn . value."
    out = []
    for fn, name in ((qkrpb, qkrpb_name), (qk, qk_name), (av, av_name)):
        fn.__name__ = fn.__qualname__ = name
        out.append(public(fn, name, f"natten.functional.{name}"))
    return out


natten1dqkrpb, natten1dqk, natten1dav = _define_legacy(1)
natten2dqkrpb, natten2dqk, natten2dav = _define_legacy(2)


_3D_QKRPB = ("(query, key, rpb, kernel_size, dilation) or "
             "(query, key, rpb, kernel_size_d, kernel_size, dilation_d, dilation)")
_3D_QK = ("(query, key, kernel_size, dilation) or "
          "(query, key, kernel_size_d, kernel_size, dilation_d, dilation)")
_3D_AV = ("(attn, value, kernel_size, dilation) or "
          "(attn, value, kernel_size_d, kernel_size, dilation_d, dilation)")


def _depth_args(name, signature, args):
    """(kernel_size, dilation) from NATTEN's 3D argument forms: (kernel_size,
    dilation) per axis, or 0.14's (kernel_size_d, kernel_size, dilation_d,
    dilation) with the depth axis apart."""
    if len(args) == 2:
        return args
    if len(args) == 4:
        kd, k, dd, d = (_per_axis_arg(name, signature, arg, value, 1)[0] for arg, value in
                        zip(("kernel_size_d", "kernel_size", "dilation_d", "dilation"), args))
        return (kd, k, k), (dd, d, d)
    raise TypeError(f"[natten.functional.{name}] got {len(args) + 2} positional arguments; "
                    f"expected {name}{signature}")


def natten3dqkrpb(query, key, rpb, *args):
    """NATTEN 0.14-0.16 ``natten3dqkrpb``: query, key [B, heads, T, H, W, D], rpb
    [heads, 2*kT-1, 2*kH-1, 2*kW-1] or None -> scores q.k + rpb."""
    kernel_size, dilation = _depth_args("natten3dqkrpb", _3D_QKRPB, args)
    return _qk(3, "natten3dqkrpb", _3D_QKRPB, query, key, kernel_size, dilation, None, False,
               rpb)


def natten3dqk(query, key, *args):
    """NATTEN 0.14-0.16 ``natten3dqk``: scores q.k (no bias)."""
    kernel_size, dilation = _depth_args("natten3dqk", _3D_QK, args)
    return _qk(3, "natten3dqk", _3D_QK, query, key, kernel_size, dilation, None, False, None)


def natten3dav(attn, value, *args):
    """NATTEN 0.14-0.16 ``natten3dav``: attn . value."""
    kernel_size, dilation = _depth_args("natten3dav", _3D_AV, args)
    return _av(3, "natten3dav", _3D_AV, attn, value, kernel_size, dilation, None, False)


natten3dqkrpb = public(natten3dqkrpb, "natten3dqkrpb", "natten.functional.natten3dqkrpb")
natten3dqk = public(natten3dqk, "natten3dqk", "natten.functional.natten3dqk")
natten3dav = public(natten3dav, "natten3dav", "natten.functional.natten3dav")
