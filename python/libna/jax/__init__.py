"""libna for JAX: neighborhood attention as XLA FFI custom calls (CPU).

    import jax, libna.jax
    out = jax.jit(lambda q, k, v: libna.jax.na2d(q, k, v, 7))(q, k, v)

``na1d / na2d / na3d`` take the arguments of ``libna.na1d`` etc. (including
``additional_keys`` / ``additional_values``) and ``merge_attentions(outs,
lses)`` those of ``libna.merge_attentions``. They work under ``jax.jit``,
``jax.grad`` (a ``custom_vjp`` whose backward is libna's fused backward, also
an FFI call) and ``jax.vmap`` (the handlers take any number of leading vmap
dimensions and run the op once per slice). The custom calls are registered
for the CPU platform; the compiled handlers live in ``libna._jax_ffi``, which
is built when XLA's FFI headers (from jaxlib) are available at build time.
JAX arrays are never written: results go to buffers XLA allocates.

float64 needs ``jax.config.update("jax_enable_x64", True)``.
"""

from __future__ import annotations

import functools

import numpy as np

try:
    import jax
    import jax.numpy as jnp
except ImportError as error:
    raise ImportError(f"libna.jax needs JAX (pip install jax jaxlib): {error}") from error

from .. import _ops
from .._public import public

try:
    from .. import _jax_ffi
except ImportError as error:  # pragma: no cover - depends on how libna was built
    raise ImportError(
        "libna.jax needs libna's XLA FFI module libna._jax_ffi, which this build of libna "
        "does not have (it is built when jaxlib is importable at build time; the default "
        "`pip install` provides it unless LIBNA_JAX=OFF). Without it, libna.na2d etc. "
        "still accept JAX arrays eagerly (not under jax.jit/grad/vmap)."
    ) from error

__all__ = ["na1d", "na2d", "na3d", "merge_attentions"]

for _name, _capsule in _jax_ffi.handlers().items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")


def _call(target, results, *args, **attrs):
    # broadcast_all: under vmap every operand and result gets the same
    # leading dimensions, which the handlers loop over.
    outputs = jax.ffi.ffi_call(target, results, vmap_method="broadcast_all")(*args, **attrs)
    return _varying_like(outputs, args)


def _varying_like(outputs, args):
    """Inside jax.shard_map the outputs of a call vary over the mesh axes
    over which its operands vary (ffi_call types them as invariant, and a
    custom_vjp's backward must return cotangents of its inputs' types)."""
    varying = set()
    for a in args:
        kind = getattr(jax.typeof(a), "manual_axis_type", None)
        varying |= set(kind.varying) if kind is not None else set()
    if not varying:
        return outputs
    axes = tuple(sorted(varying))

    def cast(x):
        kind = getattr(jax.typeof(x), "manual_axis_type", None)
        missing = tuple(a for a in axes if kind is None or a not in kind.varying)
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return type(outputs)(cast(x) for x in outputs) if isinstance(outputs, (tuple, list)) \
        else cast(outputs)


def _like(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


# params: (kernel_size, stride, dilation, is_causal, scale), all hashable.
def _na_attrs(params):
    kernel_size, stride, dilation, is_causal, scale = params
    return dict(kernel_size=np.array(kernel_size, np.int64), stride=np.array(stride, np.int64),
                dilation=np.array(dilation, np.int64), is_causal=np.array(is_causal, np.int64),
                scale=np.float64(scale))


def _merge_call(outs, lses):
    return _call("libna_merge_attentions", _plan("merge_attentions", [*outs, *lses]),
                 *outs, *lses, parts=np.int64(len(outs)))


def _present(*optional):
    """The optional operands that are given, and a with_* flag for each."""
    return tuple(x for x in optional if x is not None), [np.int64(x is not None) for x in optional]


def _forward(params, q, k, v, rpb, xk, xv):
    """(out, lse) of NA plus, when given, the additional keys, merged (one
    core call)."""
    operands, (with_rpb, with_additional, _) = _present(rpb, xk, xv)
    return _call("libna_na_forward", _plan("na", [q, k, v, rpb, xk, xv], params, want_lse=True),
                 q, k, v, *operands, **_na_attrs(params), with_rpb=with_rpb,
                 with_additional=with_additional)


def _backward(params, residuals, dout, dlse):
    """Cotangents of (q, k, v, rpb, xk, xv): both parts' gradients from the
    merged out and lse; an lse cotangent (dlse) enters the kernels' row terms."""
    q, k, v, rpb, xk, xv, out, lse = residuals
    operands, (with_rpb, with_dlse, with_additional, _) = _present(rpb, dlse, xk, xv)
    results = _plan("na_backward", [q, k, v, rpb, out, dout, lse, dlse, xk, xv], params)
    grads = iter(_call("libna_na_backward", tuple(r for r in results if r is not None), q, k, v,
                       out, dout, lse, *operands, **_na_attrs(params), with_rpb=with_rpb,
                       with_dlse=with_dlse, with_additional=with_additional))
    return tuple(None if r is None else next(grads) for r in results)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _na_with_lse(params, q, k, v, rpb, xk, xv):
    return _forward(params, q, k, v, rpb, xk, xv)


def _na_with_lse_fwd(params, q, k, v, rpb, xk, xv):
    out, lse = _forward(params, q, k, v, rpb, xk, xv)
    return (out, lse), (q, k, v, rpb, xk, xv, out, lse)


def _na_with_lse_bwd(params, residuals, cotangents):
    dout, dlse = cotangents
    return _backward(params, residuals, dout, dlse)


_na_with_lse.defvjp(_na_with_lse_fwd, _na_with_lse_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _na_out(params, q, k, v, rpb, xk, xv):
    return _forward(params, q, k, v, rpb, xk, xv)[0]


def _na_out_fwd(params, q, k, v, rpb, xk, xv):
    out, lse = _forward(params, q, k, v, rpb, xk, xv)
    return out, (q, k, v, rpb, xk, xv, out, lse)


def _na_out_bwd(params, residuals, dout):
    return _backward(params, residuals, dout, None)


_na_out.defvjp(_na_out_fwd, _na_out_bwd)


def _as_jax(op, name, x):
    """A JAX array (tracers included) or a NumPy array; other frameworks are refused."""
    if x is None or isinstance(x, jax.Array):
        return x
    if isinstance(x, np.ndarray):
        return jnp.asarray(x)
    raise TypeError(
        f"[{op}] {name} must be a JAX (or NumPy) array for libna.jax, got "
        f"{type(x).__module__}.{type(x).__qualname__}; use libna.{op} for other frameworks")


def _spec(x):
    """What libna's core plans on: (shape, dtype name, device type, index);
    the handlers run on the CPU."""
    return None if x is None else (tuple(int(d) for d in x.shape), jnp.dtype(x.dtype).name,
                                   "cpu", 0)


def _plan(op, arrays, params=None, want_lse=False):
    """The outputs of libna's op `op` on `arrays` as ShapeDtypeStructs (None
    for an unwanted one): the core validates the call, once, at trace time
    (ValueError / TypeError from the jitted call itself) and gives the
    output shapes, the same rule every front end uses."""
    kernel_size, stride, dilation, is_causal, scale = params or ((), (), (), (), None)
    planned = _ops._C.plan(op, [_spec(x) for x in arrays], len(kernel_size), list(kernel_size),
                           list(stride), list(dilation), [bool(c) for c in is_causal], scale,
                           want_lse)
    return tuple(None if p is None else _like(p[0], jnp.dtype(p[1])) for p in planned)


def na(rank, q, k, v, kernel_size, *, stride=1, dilation=1, is_causal=False, scale=None,
       rpb=None, return_lse=False, additional_keys=None, additional_values=None):
    """Rank-generic neighborhood attention for JAX (see ``na2d``)."""
    op = f"na{rank}d"
    kernel_size = _ops.per_axis(op, "kernel_size", kernel_size, rank)
    stride = _ops.per_axis(op, "stride", stride, rank)
    dilation = _ops.per_axis(op, "dilation", dilation, rank)
    is_causal = _ops.per_axis(op, "is_causal", is_causal, rank, boolean=True)
    scale = _ops.check_scale(op, scale)
    return_lse = _ops.check_flag(op, "return_lse", return_lse)
    _ops.check_additional(op, additional_keys, additional_values)
    named = {"q": q, "k": k, "v": v, "rpb": rpb, "additional_keys": additional_keys,
             "additional_values": additional_values}
    for name in ("q", "k", "v"):
        if named[name] is None:
            raise TypeError(f"[{op}] {name} must be an array, got None")
    named = {name: _as_jax(op, name, x) for name, x in named.items()}
    q = named["q"]
    # Validated here (at trace time) by planning, before any custom_vjp.
    checked = (kernel_size, stride, dilation, is_causal, scale)
    _plan("na", [q, named["k"], named["v"], named["rpb"], named["additional_keys"],
                 named["additional_values"]], checked)
    if scale is None:
        scale = float(q.shape[-1]) ** -0.5
    params = (kernel_size, stride, dilation, tuple(int(c) for c in is_causal), float(scale))
    args = (q, named["k"], named["v"], named["rpb"], named["additional_keys"],
            named["additional_values"])
    if return_lse:
        return _na_with_lse(params, *args)
    return _na_out(params, *args)


@jax.custom_vjp
def _merge(outs, lses):
    return _merge_call(outs, lses)


def _merge_fwd(outs, lses):
    out, lse = _merge_call(outs, lses)
    return (out, lse), (outs, lses, out, lse)


def _merge_bwd(residuals, cotangents):
    outs, lses, out, lse = residuals
    dout, dlse = cotangents
    parts = len(outs)
    results = _plan("merge_attentions_backward", [*outs, *lses, out, lse, dout, dlse])
    grads = _call("libna_merge_attentions_backward", results, *outs, *lses, out, lse, dout,
                  dlse, parts=np.int64(parts))
    return list(grads[:parts]), list(grads[parts:])


_merge.defvjp(_merge_fwd, _merge_bwd)


@public
def merge_attentions(outs, lses):
    """Exact, differentiable merge of attentions of the same queries over
    disjoint key sets from their lse: (out, lse) with lse = logsumexp_i
    lses[i] and out = sum_i exp(lses[i] - lse) * outs[i]."""
    op = "merge_attentions"
    if not isinstance(outs, (list, tuple)) or not isinstance(lses, (list, tuple)):
        raise TypeError(f"[{op}] outs and lses must be lists or tuples of arrays")
    outs = [_as_jax(op, f"outs[{i}]", o) for i, o in enumerate(outs)]
    lses = [_as_jax(op, f"lses[{i}]", x) for i, x in enumerate(lses)]
    _ops.check_parts(op, outs, lses)
    _plan("merge_attentions", [*outs, *lses])
    return _merge(outs, lses)


_DOC = """{rank}D neighborhood attention for JAX (XLA FFI custom call on CPU).

    q: [B, {spatial}, heads, D]; k: [B, {spatial}, heads_kv, D];
    v: [B, {spatial}, heads_kv, D_v]; arguments as for ``libna.na{rank}d``,
    additional_keys / additional_values included. Works under jax.jit,
    jax.grad (libna's fused backward) and jax.vmap.
    """


na1d, na2d, na3d = (_ops.rank_op(rank, na, f"na{rank}d", _DOC) for rank in (1, 2, 3))
