"""Pure-NumPy reference implementation of libna's neighborhood attention (NA).

This module is the independent float64 test oracle for libna and the fallback
used when the compiled extension is missing.  It deliberately imports nothing
from the rest of libna (and never imports torch): keep it that way.

Semantics (the same as NATTEN 0.21 ``na1d`` / ``na2d`` / ``na3d``)
------------------------------------------------------------------
Per spatial axis of length ``L`` with kernel ``k`` (``k >= 2``, even allowed),
dilation ``d``, stride ``s`` and query index ``i``:

* the axis is split into ``d`` interleaved groups.  The query belongs to group
  ``g = i % d`` and sits at group position ``i' = i // d`` of a sequence of
  length ``L_g = ceil((L - g) / d)``; it only sees keys of its own group (group
  position ``j'`` is full-axis index ``g + j' * d``);
* non-causal: ``leader = min((i' // s) * s + s // 2, L_g - 1)`` and the window
  is the group positions ``[lo, lo + k)`` with
  ``lo = clamp(leader - k // 2, 0, L_g - k)`` (shifted at the borders, never
  padded, so ``k == L`` is full self-attention);
* causal: ``leader = min((i' // s) * s + s - 1, L_g - 1)`` and the window is the
  group positions ``lo .. i'`` (inclusive) with ``lo = max(0, leader - k + 1)``
  (at most ``k`` entries);
* a query attends to the cartesian product of its per-axis windows, in
  row-major order of the per-axis window offsets ``a = j' - lo``.

``out = softmax(scale * q.k + bias) @ v`` over that set; ``scale`` defaults to
``D ** -0.5``.  The relative positional bias ``rpb`` has shape
``[heads, 2*k_1 - 1, ..., 2*k_n - 1]`` and contributes
``rpb[h, ..., (j' - i') + k - 1, ...]`` (group coordinates); it is only defined
for stride 1 and non-causal axes.  Grouped-query attention: query head ``h``
reads kv head ``h // (heads // heads_kv)``.  ``lse`` is the natural-log
logsumexp of the logits over the window, shape ``[B, *spatial, heads]``.

``additional_keys`` / ``additional_values`` (``[B, N, heads_kv, D]`` /
``[..., D_v]``, both or neither) are N more keys that every query attends to,
in the same softmax as its window.  ``merge_attentions(outs, lses)`` combines
attentions over disjoint key sets exactly from their lse.

Layout is heads-last: ``q [B, *spatial, heads, D]``,
``k [B, *spatial, heads_kv, D]``, ``v [B, *spatial, heads_kv, D_v]``.

Everything is computed in float64; outputs come back in the input dtype
(float16 / float32 / float64, or ``ml_dtypes.bfloat16``).  ``lse`` is float32,
or float64 for float64 inputs.  Bad input raises ``TypeError`` / ``ValueError``
with a message naming the argument, the value and what was expected.  Inputs
are never written to.
"""

from __future__ import annotations

import itertools
import math
import numbers

import numpy as np

__all__ = [
    "window",
    "neighborhood",
    "na1d",
    "na2d",
    "na3d",
    "na1d_qk",
    "na2d_qk",
    "na3d_qk",
    "na1d_av",
    "na2d_av",
    "na3d_av",
    "na1d_backward",
    "na2d_backward",
    "na3d_backward",
    "na1d_qk_backward",
    "na2d_qk_backward",
    "na3d_qk_backward",
    "na1d_av_backward",
    "na2d_av_backward",
    "na3d_av_backward",
    "merge_attentions",
    "merge_attentions_backward",
]

_FLOAT_DTYPE_NAMES = ("float16", "float32", "float64", "bfloat16")


# --------------------------------------------------------------------------
# Argument validation helpers
# --------------------------------------------------------------------------


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_bool(x) -> bool:
    return isinstance(x, (bool, np.bool_))


def _per_axis(fn, name, value, n, is_elem, elem_desc, convert):
    """Normalise an int/bool-or-tuple per-axis argument to a tuple of length n."""
    if isinstance(value, (tuple, list)):
        if len(value) != n:
            raise ValueError(
                f"[{fn}] {name}={value!r} must be a single {elem_desc} or a "
                f"tuple/list of {n} {elem_desc}s (one per spatial axis); got "
                f"length {len(value)}."
            )
        for item in value:
            if not is_elem(item):
                raise TypeError(
                    f"[{fn}] {name}={value!r} must contain only {elem_desc}s; "
                    f"element {item!r} has type {type(item).__name__}."
                )
        return tuple(convert(item) for item in value)
    if is_elem(value):
        return (convert(value),) * n
    raise TypeError(
        f"[{fn}] {name}={value!r} must be a {elem_desc} or a tuple/list of {n} "
        f"{elem_desc}s; got type {type(value).__name__}."
    )


def _per_axis_int(fn, name, value, n):
    return _per_axis(fn, name, value, n, _is_int, "int", int)


def _per_axis_bool(fn, name, value, n):
    return _per_axis(fn, name, value, n, _is_bool, "bool", bool)


def _as_array(fn, name, x) -> np.ndarray:
    """Accept numpy arrays and array-likes exposing __array__ / __dlpack__.

    Python lists/tuples, scalars (python or numpy), strings and None are
    rejected with TypeError.
    """
    if isinstance(x, np.ndarray):
        arr = x
    elif x is None or isinstance(
        x, (str, bytes, list, tuple, numbers.Number, np.generic, dict, set)
    ):
        raise TypeError(
            f"[{fn}] {name} must be an array (numpy array or an object with "
            f"__array__ / __dlpack__); got {type(x).__name__}."
        )
    elif hasattr(x, "__array__") or hasattr(x, "__dlpack__"):
        try:
            arr = np.asarray(x) if hasattr(x, "__array__") else np.from_dlpack(x)
        except Exception as error:  # e.g. a tensor on a device NumPy cannot read
            raise TypeError(
                f"[{fn}] {name} ({type(x).__module__}.{type(x).__qualname__}) could not be "
                f"read as a NumPy array: {error}"
            ) from error
    else:
        raise TypeError(
            f"[{fn}] {name} must be an array (numpy array or an object with "
            f"__array__ / __dlpack__); got {type(x).__name__}."
        )
    if not isinstance(arr, np.ndarray):  # pragma: no cover - defensive
        raise TypeError(f"[{fn}] {name} could not be converted to a numpy array.")
    if arr.dtype.name not in _FLOAT_DTYPE_NAMES:
        raise TypeError(
            f"[{fn}] {name} has dtype {arr.dtype.name}; expected one of "
            f"float16, float32, float64, bfloat16."
        )
    return arr


def _one_framework(fn, **named):
    """All given arrays come from one library (non-arrays are left to _as_array)."""
    libraries = {name: type(x).__module__.split(".", 1)[0] for name, x in named.items()
                 if hasattr(x, "__array__") or hasattr(x, "__dlpack__")}
    if len(set(libraries.values())) > 1:
        listing = ", ".join(f"{name}: {lib}" for name, lib in libraries.items())
        raise TypeError(f"[{fn}] all arrays must come from one framework, got {listing}.")


def _same_dtype(fn, arrays):
    """arrays: list of (name, array); all must share one dtype."""
    ref_name, ref = arrays[0]
    for name, arr in arrays[1:]:
        if arr.dtype != ref.dtype:
            raise TypeError(
                f"[{fn}] {name} has dtype {arr.dtype.name} but {ref_name} has "
                f"dtype {ref.dtype.name}; all inputs must share one dtype."
            )


def _check_rank(fn, name, arr, ndim, layout):
    if arr.ndim != ndim:
        raise ValueError(
            f"[{fn}] {name} has shape {tuple(arr.shape)} (rank {arr.ndim}); "
            f"expected rank {ndim}: {layout}."
        )
    if arr.size == 0:
        raise ValueError(
            f"[{fn}] {name} has shape {tuple(arr.shape)} with a zero-size "
            f"dimension; every dimension must be >= 1."
        )


def _check_params(fn, spatial, kernel_size, stride, dilation, is_causal, n,
                  *, with_stride=True):
    ks = _per_axis_int(fn, "kernel_size", kernel_size, n)
    st = _per_axis_int(fn, "stride", stride, n) if with_stride else (1,) * n
    dil = _per_axis_int(fn, "dilation", dilation, n)
    causal = _per_axis_bool(fn, "is_causal", is_causal, n)
    spatial = tuple(int(x) for x in spatial)
    if any(d < 1 for d in dil):
        raise ValueError(f"[{fn}] dilation={dil} must be >= 1 along every axis.")
    if any(k < 2 for k in ks):
        raise ValueError(f"[{fn}] kernel_size={ks} must be >= 2 along every axis.")
    if any(k > L for k, L in zip(ks, spatial)):
        raise ValueError(
            f"[{fn}] kernel_size={ks} must be <= the spatial extent {spatial} "
            f"along every axis."
        )
    if any(k * d > L for k, d, L in zip(ks, dil, spatial)):
        prod = tuple(k * d for k, d in zip(ks, dil))
        raise ValueError(
            f"[{fn}] kernel_size * dilation = {prod} (kernel_size={ks}, "
            f"dilation={dil}) must be <= the spatial extent {spatial} along "
            f"every axis."
        )
    if with_stride:
        if any(s < 1 for s in st):
            raise ValueError(f"[{fn}] stride={st} must be >= 1 along every axis.")
        if any(s > k for s, k in zip(st, ks)):
            raise ValueError(
                f"[{fn}] stride={st} must be <= kernel_size={ks} along every axis."
            )
    return ks, st, dil, causal


def _check_scale(fn, scale, head_dim):
    if scale is None:
        return float(head_dim) ** -0.5
    if _is_bool(scale) or not isinstance(scale, numbers.Real):
        raise TypeError(
            f"[{fn}] scale={scale!r} must be a real number (int or float) or "
            f"None; got type {type(scale).__name__}."
        )
    try:
        value = float(scale)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise ValueError(f"[{fn}] scale={scale!r} must be finite.")
    return value


def _check_rpb(fn, rpb, heads, ks, st, causal, dtype):
    """Validate rpb; returns float64 array or None."""
    if rpb is None:
        return None
    arr = _as_array(fn, "rpb", rpb)
    if arr.dtype != dtype:
        raise TypeError(
            f"[{fn}] rpb has dtype {arr.dtype.name} but q has dtype "
            f"{np.dtype(dtype).name}; all inputs must share one dtype."
        )
    if any(causal):
        raise ValueError(
            f"[{fn}] rpb is not supported with is_causal={causal}; relative "
            f"positional bias needs every axis non-causal."
        )
    if any(s != 1 for s in st):
        raise ValueError(
            f"[{fn}] rpb is not supported with stride={st}; relative "
            f"positional bias needs stride 1 along every axis."
        )
    expected = (heads,) + tuple(2 * k - 1 for k in ks)
    if tuple(arr.shape) != expected:
        raise ValueError(
            f"[{fn}] rpb has shape {tuple(arr.shape)}; expected {expected} "
            f"= [heads, 2*kernel_size-1 per axis] for kernel_size={ks}."
        )
    return np.asarray(arr, dtype=np.float64)


def _layout(n, what):
    sp = ", ".join(f"X{a + 1}" for a in range(n)) if n > 1 else "L"
    return f"[B, {sp}, {what}]"


def _check_qkv(fn, n, q, k, v):
    """Common checks for q/k/v (any of k or v may be None). Returns arrays."""
    arrays = [("q", q)]
    if k is not None:
        arrays.append(("k", k))
    if v is not None:
        arrays.append(("v", v))
    _same_dtype(fn, arrays)
    _check_rank(fn, "q", q, n + 3, _layout(n, "heads, head_dim"))
    if k is not None:
        _check_rank(fn, "k", k, n + 3, _layout(n, "heads_kv, head_dim"))
    if v is not None:
        _check_rank(fn, "v", v, n + 3, _layout(n, "heads_kv, head_dim_v"))
    lead = tuple(q.shape[: n + 1])
    for name, arr in arrays[1:]:
        if tuple(arr.shape[: n + 1]) != lead:
            raise ValueError(
                f"[{fn}] {name} has shape {tuple(arr.shape)} but q has shape "
                f"{tuple(q.shape)}; batch and spatial dimensions "
                f"{lead} must match."
            )
    if k is not None:
        if k.shape[-1] != q.shape[-1]:
            raise ValueError(
                f"[{fn}] k has head_dim {k.shape[-1]} (shape {tuple(k.shape)}) "
                f"but q has head_dim {q.shape[-1]} (shape {tuple(q.shape)}); "
                f"they must match."
            )
    if k is not None and v is not None:
        if k.shape[-2] != v.shape[-2]:
            raise ValueError(
                f"[{fn}] v has {v.shape[-2]} heads (shape {tuple(v.shape)}) but "
                f"k has {k.shape[-2]} heads (shape {tuple(k.shape)}); they must "
                f"match."
            )
    kv = k if k is not None else v
    if kv is not None:
        heads, heads_kv = q.shape[-2], kv.shape[-2]
        if heads % heads_kv != 0:
            raise ValueError(
                f"[{fn}] q has {heads} heads, which is not divisible by the "
                f"{heads_kv} kv heads of {'k' if k is not None else 'v'}; "
                f"heads must be a multiple of heads_kv."
            )


def _check_like(fn, name, arr, shape, dtype, what):
    if arr.dtype != dtype:
        raise TypeError(
            f"[{fn}] {name} has dtype {arr.dtype.name}; expected "
            f"{np.dtype(dtype).name} to match the other inputs."
        )
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(
            f"[{fn}] {name} has shape {tuple(arr.shape)}; expected "
            f"{tuple(shape)} ({what})."
        )


def _lse_dtype(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def _f64(arr):
    return np.asarray(arr, dtype=np.float64)


# --------------------------------------------------------------------------
# Window logic (one axis)
# --------------------------------------------------------------------------


def _axis_window(i, length, k, s, d, causal):
    """Window of query i along one axis.

    Returns (full_idx, offsets, rel, lo) where full_idx are the full-axis key
    indices in window order, offsets the window offsets a = j' - lo (the slot
    coordinate), rel = (j' - i') + k - 1 (the rpb coordinate) and lo the window
    start in group coordinates.
    """
    g = i % d
    ip = i // d
    lg = (length - g + d - 1) // d
    if causal:
        leader = min((ip // s) * s + s - 1, lg - 1)
        lo = max(0, leader - k + 1)
        hi = ip + 1
    else:
        leader = min((ip // s) * s + s // 2, lg - 1)
        lo = min(max(leader - k // 2, 0), lg - k)
        hi = lo + k
    group_pos = list(range(lo, hi))
    full_idx = [g + jp * d for jp in group_pos]
    offsets = [jp - lo for jp in group_pos]
    rel = [jp - ip + k - 1 for jp in group_pos]
    return full_idx, offsets, rel, lo


def _axis_plans(spatial, ks, st, dil, causal):
    """plans[axis][i] = (full_idx, offsets, rel) as int arrays."""
    plans = []
    for L, k, s, d, c in zip(spatial, ks, st, dil, causal):
        axis = []
        for i in range(L):
            full_idx, offsets, rel, _ = _axis_window(i, L, k, s, d, c)
            axis.append(
                (np.array(full_idx, dtype=np.intp),
                 np.array(offsets, dtype=np.intp),
                 np.array(rel, dtype=np.intp))
            )
        plans.append(axis)
    return plans


def _query_windows(plans, pos, ks):
    """For query position pos: (index tuple for key gather, flat slot indices,
    index tuple for rpb gather)."""
    per_axis = [plans[a][i] for a, i in enumerate(pos)]
    key_ix = np.ix_(*[p[0] for p in per_axis])
    off_grid = np.meshgrid(*[p[1] for p in per_axis], indexing="ij")
    slots = np.ravel_multi_index(off_grid, ks).reshape(-1)
    rel_ix = np.ix_(*[p[2] for p in per_axis])
    return key_ix, slots, rel_ix


def window(i, length, kernel_size, stride=1, dilation=1, is_causal=False):
    """Window of query ``i`` along one axis of length ``length``.

    Returns ``(keys, lo)``: ``keys`` the full-axis key indices in window order
    (slot order), ``lo`` the window start in group coordinates (so key
    ``keys[a]`` sits at group position ``lo + a``).
    """
    fn = "window"
    for name, val in (("i", i), ("length", length)):
        if not _is_int(val):
            raise TypeError(f"[{fn}] {name}={val!r} must be an int.")
    length = int(length)
    if length < 1:
        raise ValueError(f"[{fn}] length={length} must be >= 1.")
    ks, st, dil, causal = _check_params(
        fn, (length,), kernel_size, stride, dilation, is_causal, 1
    )
    i = int(i)
    if not 0 <= i < length:
        raise ValueError(f"[{fn}] i={i} must be in [0, {length}).")
    full_idx, _, _, lo = _axis_window(i, length, ks[0], st[0], dil[0], causal[0])
    return full_idx, lo


def neighborhood(query_index, spatial_shape, kernel_size, stride=1, dilation=1,
                 is_causal=False):
    """Key index tuples attended by query ``query_index``, in row-major slot
    order (cartesian product of the per-axis windows)."""
    fn = "neighborhood"
    if not isinstance(spatial_shape, (tuple, list)) or not all(
        _is_int(x) for x in spatial_shape
    ):
        raise TypeError(f"[{fn}] spatial_shape={spatial_shape!r} must be a tuple of ints.")
    if not isinstance(query_index, (tuple, list)) or not all(
        _is_int(x) for x in query_index
    ):
        raise TypeError(f"[{fn}] query_index={query_index!r} must be a tuple of ints.")
    n = len(spatial_shape)
    if n < 1 or len(query_index) != n:
        raise ValueError(
            f"[{fn}] query_index={tuple(query_index)} and spatial_shape="
            f"{tuple(spatial_shape)} must have the same non-zero length."
        )
    spatial = tuple(int(x) for x in spatial_shape)
    if any(x < 1 for x in spatial):
        raise ValueError(f"[{fn}] spatial_shape={spatial} must be >= 1 along every axis.")
    ks, st, dil, causal = _check_params(
        fn, spatial, kernel_size, stride, dilation, is_causal, n
    )
    q_idx = tuple(int(x) for x in query_index)
    if any(not 0 <= i < L for i, L in zip(q_idx, spatial)):
        raise ValueError(f"[{fn}] query_index={q_idx} is outside spatial_shape={spatial}.")
    per_axis = [
        _axis_window(i, L, k, s, d, c)[0]
        for i, L, k, s, d, c in zip(q_idx, spatial, ks, st, dil, causal)
    ]
    return [tuple(t) for t in itertools.product(*per_axis)]


# --------------------------------------------------------------------------
# Float64 kernels (inputs already validated and converted)
# --------------------------------------------------------------------------


def _head_map(heads, heads_kv):
    return np.arange(heads) // (heads // heads_kv)


def _softmax_rows(logits):
    """Row softmax over the last axis plus logsumexp, with the library's edge
    cases: a row of -inf logits attends to nothing (p = 0, lse = -inf); a +inf
    logit gives lse = +inf and NaN probabilities; a NaN logit gives NaN."""
    m = logits.max(axis=-1, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(logits - m_safe)
        ssum = e.sum(axis=-1, keepdims=True)
        with np.errstate(divide="ignore"):
            lse = (np.log(ssum) + m_safe)[..., 0]
        p = e / np.where(ssum == 0, 1.0, ssum)
    return p, lse


def _gather_kv(arr, key_ix, head_map):
    """arr [B, *spatial, Hkv, D] -> [B, n_keys, H, D] for one query window."""
    b = arr.shape[0]
    g = arr[(slice(None),) + key_ix]
    g = g.reshape(b, -1, arr.shape[-2], arr.shape[-1])
    return g[:, :, head_map, :]


def _fused_logits(qq, kk, rpb, key_ix, rel_ix, head_map, scale, heads):
    kg = _gather_kv(kk, key_ix, head_map)  # [B, n, H, D]
    logits = scale * np.einsum("bhd,bnhd->bhn", qq, kg)
    if rpb is not None:
        logits = logits + rpb[(slice(None),) + rel_ix].reshape(heads, -1)[None]
    return logits, kg


def _fused_forward(q, k, v, ks, st, dil, causal, scale, rpb, extra=None):
    """extra: None or (additional_keys, additional_values) [B, N, Hkv, D/Dv],
    keys that every query sees besides its window, in the same softmax."""
    b, spatial, heads = q.shape[0], q.shape[1:-2], q.shape[-2]
    dv_dim = v.shape[-1]
    hmap = _head_map(heads, k.shape[-2])
    plans = _axis_plans(spatial, ks, st, dil, causal)
    out = np.empty((b,) + spatial + (heads, dv_dim))
    lse = np.empty((b,) + spatial + (heads,))
    for pos in np.ndindex(*spatial):
        key_ix, _, rel_ix = _query_windows(plans, pos, ks)
        sel = (slice(None),) + pos
        logits, _ = _fused_logits(q[sel], k, rpb, key_ix, rel_ix, hmap, scale, heads)
        vg = _gather_kv(v, key_ix, hmap)
        if extra is not None:
            xk, xv = extra[0][:, :, hmap, :], extra[1][:, :, hmap, :]  # [B, N, H, D]
            logits = np.concatenate(
                [logits, scale * np.einsum("bhd,bnhd->bhn", q[sel], xk)], axis=-1)
            vg = np.concatenate([vg, xv], axis=1)
        p, lse[sel] = _softmax_rows(logits)
        out[sel] = np.einsum("bhn,bnhe->bhe", p, vg)
    return out, lse


def _reduce_heads(g, heads_kv):
    """[B, n, H, D] -> [B, n, Hkv, D] summing the query heads of each kv head."""
    b, n, heads, d = g.shape
    return g.reshape(b, n, heads_kv, heads // heads_kv, d).sum(axis=3)


def _scatter_kv(dst, key_ix, g, heads_kv):
    """dst[B, *spatial, Hkv, D] += g[B, n, H, D] at the window keys."""
    red = _reduce_heads(g, heads_kv)
    sel = (slice(None),) + key_ix
    dst[sel] += red.reshape(dst[sel].shape)


def _fused_backward(q, k, v, dout, ks, st, dil, causal, scale, rpb, extra=None, dlse=None):
    """Gradients recomputed from scratch; with extra = (additional_keys,
    additional_values) also their gradients (dq, dk, dv, drpb, dxk, dxv).
    dlse, the gradient of lse (whose derivative in the logits is p), adds
    p * dlse to the logits' gradient."""
    b, spatial, heads = q.shape[0], q.shape[1:-2], q.shape[-2]
    heads_kv = k.shape[-2]
    hmap = _head_map(heads, heads_kv)
    plans = _axis_plans(spatial, ks, st, dil, causal)
    dq = np.zeros_like(q)
    dk = np.zeros_like(k)
    dv = np.zeros_like(v)
    drpb = None if rpb is None else np.zeros_like(rpb)
    dxk = dxv = None
    if extra is not None:
        xk, xv = extra[0][:, :, hmap, :], extra[1][:, :, hmap, :]  # [B, N, H, D]
        dxk, dxv = np.zeros_like(extra[0]), np.zeros_like(extra[1])
    for pos in np.ndindex(*spatial):
        key_ix, _, rel_ix = _query_windows(plans, pos, ks)
        sel = (slice(None),) + pos
        qq = q[sel]  # [B, H, D]
        logits, kg = _fused_logits(qq, k, rpb, key_ix, rel_ix, hmap, scale, heads)
        n_window = logits.shape[-1]
        vg = _gather_kv(v, key_ix, hmap)  # [B, n, H, Dv]
        if extra is not None:
            logits = np.concatenate([logits, scale * np.einsum("bhd,bnhd->bhn", qq, xk)], -1)
            kg = np.concatenate([kg, xk], axis=1)
            vg = np.concatenate([vg, xv], axis=1)
        p, _ = _softmax_rows(logits)  # [B, H, n]
        do = dout[sel]  # [B, H, Dv]
        dp = np.einsum("bhe,bnhe->bhn", do, vg)
        ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True))  # d logits
        if dlse is not None:
            ds = ds + p * dlse[sel][..., None]
        dq[sel] = scale * np.einsum("bhn,bnhd->bhd", ds, kg)
        # out = sum_n p * v  ->  dv; logits = scale * q.k  ->  dk
        pv = np.einsum("bhn,bhe->bnhe", p, do)
        dsq = scale * np.einsum("bhn,bhd->bnhd", ds, qq)
        _scatter_kv(dv, key_ix, pv[:, :n_window], heads_kv)
        _scatter_kv(dk, key_ix, dsq[:, :n_window], heads_kv)
        if extra is not None:
            dxv += _reduce_heads(pv[:, n_window:], heads_kv)
            dxk += _reduce_heads(dsq[:, n_window:], heads_kv)
        if drpb is not None:
            rsel = (slice(None),) + rel_ix
            drpb[rsel] += ds[..., :n_window].sum(axis=0).reshape(drpb[rsel].shape)
    return dq, dk, dv, drpb, dxk, dxv


def _qk_forward(q, k, ks, dil, causal, rpb):
    b, spatial, heads = q.shape[0], q.shape[1:-2], q.shape[-2]
    kk = int(np.prod(ks))
    hmap = _head_map(heads, k.shape[-2])
    plans = _axis_plans(spatial, ks, (1,) * len(ks), dil, causal)
    scores = np.full((b,) + spatial + (heads, kk), -np.inf)
    for pos in np.ndindex(*spatial):
        key_ix, slots, rel_ix = _query_windows(plans, pos, ks)
        sel = (slice(None),) + pos
        logits, _ = _fused_logits(q[sel], k, rpb, key_ix, rel_ix, hmap, 1.0, heads)
        scores[sel][..., slots] = logits
    return scores


def _qk_backward(dattn, q, k, ks, dil, causal, rpb):
    b, spatial, heads = q.shape[0], q.shape[1:-2], q.shape[-2]
    heads_kv = k.shape[-2]
    hmap = _head_map(heads, heads_kv)
    plans = _axis_plans(spatial, ks, (1,) * len(ks), dil, causal)
    dq = np.zeros_like(q)
    dk = np.zeros_like(k)
    drpb = None if rpb is None else np.zeros_like(rpb)
    for pos in np.ndindex(*spatial):
        key_ix, slots, rel_ix = _query_windows(plans, pos, ks)
        sel = (slice(None),) + pos
        ds = dattn[sel][..., slots]  # [B, H, n]  (filled slots only)
        kg = _gather_kv(k, key_ix, hmap)
        dq[sel] = np.einsum("bhn,bnhd->bhd", ds, kg)
        _scatter_kv(dk, key_ix, np.einsum("bhn,bhd->bnhd", ds, q[sel]), heads_kv)
        if drpb is not None:
            rsel = (slice(None),) + rel_ix
            drpb[rsel] += ds.sum(axis=0).reshape(drpb[rsel].shape)
    return dq, dk, drpb


def _av_forward(attn, v, ks, dil, causal):
    b, spatial, heads = attn.shape[0], attn.shape[1:-2], attn.shape[-2]
    hmap = _head_map(heads, v.shape[-2])
    plans = _axis_plans(spatial, ks, (1,) * len(ks), dil, causal)
    out = np.empty((b,) + spatial + (heads, v.shape[-1]))
    for pos in np.ndindex(*spatial):
        key_ix, slots, _ = _query_windows(plans, pos, ks)
        sel = (slice(None),) + pos
        a = attn[sel][..., slots]  # [B, H, n]
        out[sel] = np.einsum("bhn,bnhe->bhe", a, _gather_kv(v, key_ix, hmap))
    return out


def _av_backward(dout, attn, v, ks, dil, causal):
    b, spatial, heads = attn.shape[0], attn.shape[1:-2], attn.shape[-2]
    heads_kv = v.shape[-2]
    hmap = _head_map(heads, heads_kv)
    plans = _axis_plans(spatial, ks, (1,) * len(ks), dil, causal)
    dattn = np.zeros(attn.shape)
    dv = np.zeros_like(v)
    for pos in np.ndindex(*spatial):
        key_ix, slots, _ = _query_windows(plans, pos, ks)
        sel = (slice(None),) + pos
        a = attn[sel][..., slots]  # [B, H, n]
        do = dout[sel]  # [B, H, Dv]
        vg = _gather_kv(v, key_ix, hmap)
        dattn[sel][..., slots] = np.einsum("bhe,bnhe->bhn", do, vg)
        _scatter_kv(dv, key_ix, np.einsum("bhn,bhe->bnhe", a, do), heads_kv)
    return dattn, dv


# --------------------------------------------------------------------------
# Generic entry points (validation + dtype handling)
# --------------------------------------------------------------------------


def _check_additional(fn, q, additional_keys, additional_values):
    """Validate the additional keys/values; returns float64 (keys, values) or None."""
    if additional_keys is None and additional_values is None:
        return None
    if additional_keys is None or additional_values is None:
        given = "additional_keys" if additional_values is None else "additional_values"
        missing = "additional_values" if additional_values is None else "additional_keys"
        raise ValueError(f"[{fn}] {given} was given without {missing}; pass both or neither.")
    xk = _as_array(fn, "additional_keys", additional_keys)
    xv = _as_array(fn, "additional_values", additional_values)
    _same_dtype(fn, [("q", q), ("additional_keys", xk), ("additional_values", xv)])
    for name, arr, last in (("additional_keys", xk, "head_dim"),
                            ("additional_values", xv, "head_dim_v")):
        _check_rank(fn, name, arr, 4, f"[B, N, heads_kv, {last}]")
        if arr.shape[0] != q.shape[0]:
            raise ValueError(
                f"[{fn}] {name} has batch {arr.shape[0]} (shape {tuple(arr.shape)}) but q "
                f"has batch {q.shape[0]} (shape {tuple(q.shape)}); they must match.")
    if tuple(xk.shape[:3]) != tuple(xv.shape[:3]):
        raise ValueError(
            f"[{fn}] additional_values has shape {tuple(xv.shape)} but additional_keys has "
            f"shape {tuple(xk.shape)}; batch, N and heads_kv must match.")
    if xk.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"[{fn}] additional_keys has head_dim {xk.shape[-1]} but q has head_dim "
            f"{q.shape[-1]}; they must match.")
    if q.shape[-2] % xk.shape[-2] != 0:
        raise ValueError(
            f"[{fn}] q has {q.shape[-2]} heads, which is not divisible by the "
            f"{xk.shape[-2]} heads of additional_keys; heads must be a multiple of heads_kv.")
    return _f64(xk), _f64(xv)


def _merge_parts(fn, outs, lses):
    for name, parts in (("outs", outs), ("lses", lses)):
        if not isinstance(parts, (list, tuple)):
            raise TypeError(f"[{fn}] {name} must be a list or tuple of arrays; got "
                            f"{type(parts).__name__}.")
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(f"[{fn}] outs and lses must be non-empty and of equal length; got "
                         f"{len(outs)} and {len(lses)}.")
    _one_framework(fn, **{f"outs[{i}]": o for i, o in enumerate(outs)},
                   **{f"lses[{i}]": x for i, x in enumerate(lses)})
    outs = [_as_array(fn, f"outs[{i}]", o) for i, o in enumerate(outs)]
    lses = [np.asarray(_as_array(fn, f"lses[{i}]", x)) for i, x in enumerate(lses)]
    _same_dtype(fn, [(f"outs[{i}]", o) for i, o in enumerate(outs)])
    for i, (o, x) in enumerate(zip(outs, lses)):
        if o.shape != outs[0].shape or x.shape != o.shape[:-1]:
            raise ValueError(
                f"[{fn}] outs[{i}] has shape {o.shape} and lses[{i}] has shape {x.shape}; "
                f"expected {outs[0].shape} and {outs[0].shape[:-1]}.")
    return outs, lses


def merge_attentions(outs, lses):
    """Merge attentions of the same queries over disjoint key sets from their
    log-sum-exps: (out, lse)."""
    fn = "merge_attentions"
    outs, lses = _merge_parts(fn, outs, lses)
    stacked_lse = np.stack([_f64(x) for x in lses])  # [parts, ...]
    m = stacked_lse.max(axis=0)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        lse = np.log(np.exp(stacked_lse - m_safe).sum(axis=0)) + m_safe
    w = np.where(np.isfinite(lse), np.exp(stacked_lse - np.where(np.isfinite(lse), lse, 0.0)),
                 0.0)
    out = (w[..., None] * np.stack([_f64(o) for o in outs])).sum(axis=0)
    return out.astype(outs[0].dtype), lse.astype(_lse_dtype(outs[0].dtype))


def merge_attentions_backward(outs, lses, out, lse, dout, dlse=None):
    """Gradients of :func:`merge_attentions`: (douts, dlses). The merge is
    recomputed from outs and lses; out and lse are only checked."""
    fn = "merge_attentions_backward"
    outs, lses = _merge_parts(fn, outs, lses)
    dout = _f64(_as_array(fn, "dout", dout))
    dlse = 0.0 if dlse is None else _f64(_as_array(fn, "dlse", dlse))
    merged, total = merge_attentions(outs, lses)
    total = _f64(total)
    merged = _f64(merged)
    douts, dlses = [], []
    for o, x in zip(outs, lses):
        w = np.where(np.isfinite(total), np.exp(_f64(x) - np.where(np.isfinite(total), total, 0)),
                     0.0)
        douts.append((w[..., None] * dout).astype(o.dtype))
        dlses.append((w * ((dout * (_f64(o) - merged)).sum(-1) + dlse)).astype(x.dtype))
    return douts, dlses


def _na_fused(n, fn, q, k, v, kernel_size, stride, dilation, is_causal, scale,
              rpb, return_lse, additional_keys=None, additional_values=None):
    _one_framework(fn, q=q, k=k, v=v, rpb=rpb, additional_keys=additional_keys,
                   additional_values=additional_values)
    q = _as_array(fn, "q", q)
    k = _as_array(fn, "k", k)
    v = _as_array(fn, "v", v)
    _check_qkv(fn, n, q, k, v)
    ks, st, dil, causal = _check_params(
        fn, q.shape[1:-2], kernel_size, stride, dilation, is_causal, n
    )
    scale_f = _check_scale(fn, scale, q.shape[-1])
    if not _is_bool(return_lse):
        raise TypeError(f"[{fn}] return_lse={return_lse!r} must be a bool.")
    rpb64 = _check_rpb(fn, rpb, q.shape[-2], ks, st, causal, q.dtype)
    extra = _check_additional(fn, q, additional_keys, additional_values)
    out, lse = _fused_forward(_f64(q), _f64(k), _f64(v), ks, st, dil, causal,
                              scale_f, rpb64, extra)
    out = out.astype(q.dtype)
    if return_lse:
        return out, lse.astype(_lse_dtype(q.dtype))
    return out


def _na_fused_backward(n, fn, q, k, v, out, dout, lse, kernel_size, stride,
                       dilation, is_causal, scale, rpb, additional_keys=None,
                       additional_values=None, dlse=None):
    _one_framework(fn, q=q, k=k, v=v, out=out, dout=dout, lse=lse, rpb=rpb,
                   additional_keys=additional_keys, additional_values=additional_values,
                   dlse=dlse)
    q = _as_array(fn, "q", q)
    k = _as_array(fn, "k", k)
    v = _as_array(fn, "v", v)
    out = _as_array(fn, "out", out)
    dout = _as_array(fn, "dout", dout)
    lse = _as_array(fn, "lse", lse)
    _check_qkv(fn, n, q, k, v)
    out_shape = tuple(q.shape[:-1]) + (v.shape[-1],)
    _check_like(fn, "out", out, out_shape, q.dtype, "[B, *spatial, heads, head_dim_v]")
    _check_like(fn, "dout", dout, out_shape, q.dtype, "[B, *spatial, heads, head_dim_v]")
    if tuple(lse.shape) != tuple(q.shape[:-1]):
        raise ValueError(
            f"[{fn}] lse has shape {tuple(lse.shape)}; expected "
            f"{tuple(q.shape[:-1])} ([B, *spatial, heads])."
        )
    if dlse is not None:
        dlse = _as_array(fn, "dlse", dlse)
        if tuple(dlse.shape) != tuple(q.shape[:-1]):
            raise ValueError(
                f"[{fn}] dlse has shape {tuple(dlse.shape)}; expected "
                f"{tuple(q.shape[:-1])} ([B, *spatial, heads], like lse)."
            )
    ks, st, dil, causal = _check_params(
        fn, q.shape[1:-2], kernel_size, stride, dilation, is_causal, n
    )
    scale_f = _check_scale(fn, scale, q.shape[-1])
    rpb64 = _check_rpb(fn, rpb, q.shape[-2], ks, st, causal, q.dtype)
    extra = _check_additional(fn, q, additional_keys, additional_values)
    dq, dk, dv, drpb, dxk, dxv = _fused_backward(
        _f64(q), _f64(k), _f64(v), _f64(dout), ks, st, dil, causal, scale_f, rpb64, extra,
        None if dlse is None else _f64(dlse)
    )
    res = (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype))
    if rpb64 is not None:
        res = res + (drpb.astype(q.dtype),)
    if extra is not None:
        res = res + (dxk.astype(q.dtype), dxv.astype(q.dtype))
    return res


def _na_qk(n, fn, q, k, kernel_size, dilation, is_causal, rpb):
    _one_framework(fn, q=q, k=k, rpb=rpb)
    q = _as_array(fn, "q", q)
    k = _as_array(fn, "k", k)
    _check_qkv(fn, n, q, k, None)
    ks, st, dil, causal = _check_params(
        fn, q.shape[1:-2], kernel_size, 1, dilation, is_causal, n, with_stride=False
    )
    rpb64 = _check_rpb(fn, rpb, q.shape[-2], ks, st, causal, q.dtype)
    return _qk_forward(_f64(q), _f64(k), ks, dil, causal, rpb64).astype(q.dtype)


def _check_attn(fn, name, attn, n, ks, ref_shape, dtype):
    """attn/dattn must be [B, *spatial, heads, prod(ks)]."""
    expected = tuple(ref_shape) + (int(np.prod(ks)),)
    _check_like(fn, name, attn, expected, dtype,
                f"[B, *spatial, heads, prod(kernel_size)={expected[-1]}]")


def _na_qk_backward(n, fn, dattn, q, k, kernel_size, dilation, is_causal, rpb):
    _one_framework(fn, dattn=dattn, q=q, k=k, rpb=rpb)
    dattn = _as_array(fn, "dattn", dattn)
    q = _as_array(fn, "q", q)
    k = _as_array(fn, "k", k)
    _check_qkv(fn, n, q, k, None)
    ks, st, dil, causal = _check_params(
        fn, q.shape[1:-2], kernel_size, 1, dilation, is_causal, n, with_stride=False
    )
    _check_attn(fn, "dattn", dattn, n, ks, q.shape[:-1], q.dtype)
    rpb64 = _check_rpb(fn, rpb, q.shape[-2], ks, st, causal, q.dtype)
    dq, dk, drpb = _qk_backward(_f64(dattn), _f64(q), _f64(k), ks, dil, causal, rpb64)
    res = (dq.astype(q.dtype), dk.astype(k.dtype))
    if rpb64 is not None:
        res = res + (drpb.astype(q.dtype),)
    return res


def _check_attn_v(fn, n, attn, v):
    _same_dtype(fn, [("attn", attn), ("v", v)])
    _check_rank(fn, "attn", attn, n + 3, _layout(n, "heads, prod(kernel_size)"))
    _check_rank(fn, "v", v, n + 3, _layout(n, "heads_kv, head_dim_v"))
    if tuple(v.shape[: n + 1]) != tuple(attn.shape[: n + 1]):
        raise ValueError(
            f"[{fn}] v has shape {tuple(v.shape)} but attn has shape "
            f"{tuple(attn.shape)}; batch and spatial dimensions must match."
        )
    heads, heads_kv = attn.shape[-2], v.shape[-2]
    if heads % heads_kv != 0:
        raise ValueError(
            f"[{fn}] attn has {heads} heads, which is not divisible by the "
            f"{heads_kv} kv heads of v; heads must be a multiple of heads_kv."
        )


def _na_av(n, fn, attn, v, kernel_size, dilation, is_causal):
    _one_framework(fn, attn=attn, v=v)
    attn = _as_array(fn, "attn", attn)
    v = _as_array(fn, "v", v)
    _check_attn_v(fn, n, attn, v)
    ks, _, dil, causal = _check_params(
        fn, v.shape[1:-2], kernel_size, 1, dilation, is_causal, n, with_stride=False
    )
    _check_attn(fn, "attn", attn, n, ks, attn.shape[:-1], v.dtype)
    return _av_forward(_f64(attn), _f64(v), ks, dil, causal).astype(v.dtype)


def _na_av_backward(n, fn, dout, attn, v, kernel_size, dilation, is_causal):
    _one_framework(fn, dout=dout, attn=attn, v=v)
    dout = _as_array(fn, "dout", dout)
    attn = _as_array(fn, "attn", attn)
    v = _as_array(fn, "v", v)
    _check_attn_v(fn, n, attn, v)
    ks, _, dil, causal = _check_params(
        fn, v.shape[1:-2], kernel_size, 1, dilation, is_causal, n, with_stride=False
    )
    _check_attn(fn, "attn", attn, n, ks, attn.shape[:-1], v.dtype)
    _check_like(fn, "dout", dout, tuple(attn.shape[:-1]) + (v.shape[-1],), v.dtype,
                "[B, *spatial, heads, head_dim_v]")
    dattn, dv = _av_backward(_f64(dout), _f64(attn), _f64(v), ks, dil, causal)
    return dattn.astype(attn.dtype), dv.astype(v.dtype)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def na1d(q, k, v, kernel_size, *, stride=1, dilation=1, is_causal=False,
         scale=None, rpb=None, return_lse=False, additional_keys=None,
         additional_values=None):
    """1D neighborhood attention. q [B, L, H, D], k [B, L, Hkv, D],
    v [B, L, Hkv, Dv] -> out [B, L, H, Dv] (and lse [B, L, H])."""
    return _na_fused(1, "na1d", q, k, v, kernel_size, stride, dilation,
                     is_causal, scale, rpb, return_lse, additional_keys, additional_values)


def na2d(q, k, v, kernel_size, *, stride=1, dilation=1, is_causal=False,
         scale=None, rpb=None, return_lse=False, additional_keys=None,
         additional_values=None):
    """2D neighborhood attention. q [B, X, Y, H, D], k/v [B, X, Y, Hkv, D/Dv]."""
    return _na_fused(2, "na2d", q, k, v, kernel_size, stride, dilation,
                     is_causal, scale, rpb, return_lse, additional_keys, additional_values)


def na3d(q, k, v, kernel_size, *, stride=1, dilation=1, is_causal=False,
         scale=None, rpb=None, return_lse=False, additional_keys=None,
         additional_values=None):
    """3D neighborhood attention. q [B, X, Y, Z, H, D], k/v [B, X, Y, Z, Hkv, D/Dv]."""
    return _na_fused(3, "na3d", q, k, v, kernel_size, stride, dilation,
                     is_causal, scale, rpb, return_lse, additional_keys, additional_values)


def na1d_qk(q, k, kernel_size, *, dilation=1, is_causal=False, rpb=None):
    """Unscaled 1D scores q.k (+ rpb): [B, L, H, prod(kernel_size)], -inf in
    slots a causal window does not fill."""
    return _na_qk(1, "na1d_qk", q, k, kernel_size, dilation, is_causal, rpb)


def na2d_qk(q, k, kernel_size, *, dilation=1, is_causal=False, rpb=None):
    """Unscaled 2D scores: [B, X, Y, H, prod(kernel_size)]."""
    return _na_qk(2, "na2d_qk", q, k, kernel_size, dilation, is_causal, rpb)


def na3d_qk(q, k, kernel_size, *, dilation=1, is_causal=False, rpb=None):
    """Unscaled 3D scores: [B, X, Y, Z, H, prod(kernel_size)]."""
    return _na_qk(3, "na3d_qk", q, k, kernel_size, dilation, is_causal, rpb)


def na1d_av(attn, v, kernel_size, *, dilation=1, is_causal=False):
    """attn [B, L, H, prod(kernel_size)] applied to v [B, L, Hkv, Dv];
    unfilled (causal) slots are ignored."""
    return _na_av(1, "na1d_av", attn, v, kernel_size, dilation, is_causal)


def na2d_av(attn, v, kernel_size, *, dilation=1, is_causal=False):
    """2D version of :func:`na1d_av`."""
    return _na_av(2, "na2d_av", attn, v, kernel_size, dilation, is_causal)


def na3d_av(attn, v, kernel_size, *, dilation=1, is_causal=False):
    """3D version of :func:`na1d_av`."""
    return _na_av(3, "na3d_av", attn, v, kernel_size, dilation, is_causal)


def na1d_backward(q, k, v, out, dout, lse, kernel_size, *, stride=1, dilation=1,
                  is_causal=False, scale=None, rpb=None, additional_keys=None,
                  additional_values=None, dlse=None):
    """Gradient of :func:`na1d`: (dq, dk, dv) or (dq, dk, dv, drpb)."""
    return _na_fused_backward(1, "na1d_backward", q, k, v, out, dout, lse,
                              kernel_size, stride, dilation, is_causal, scale, rpb,
                              additional_keys, additional_values, dlse)


def na2d_backward(q, k, v, out, dout, lse, kernel_size, *, stride=1, dilation=1,
                  is_causal=False, scale=None, rpb=None, additional_keys=None,
                  additional_values=None, dlse=None):
    """Gradient of :func:`na2d`: (dq, dk, dv) or (dq, dk, dv, drpb)."""
    return _na_fused_backward(2, "na2d_backward", q, k, v, out, dout, lse,
                              kernel_size, stride, dilation, is_causal, scale, rpb,
                              additional_keys, additional_values, dlse)


def na3d_backward(q, k, v, out, dout, lse, kernel_size, *, stride=1, dilation=1,
                  is_causal=False, scale=None, rpb=None, additional_keys=None,
                  additional_values=None, dlse=None):
    """Gradient of :func:`na3d`: (dq, dk, dv) or (dq, dk, dv, drpb)."""
    return _na_fused_backward(3, "na3d_backward", q, k, v, out, dout, lse,
                              kernel_size, stride, dilation, is_causal, scale, rpb,
                              additional_keys, additional_values, dlse)


def na1d_qk_backward(dattn, q, k, kernel_size, *, dilation=1, is_causal=False,
                     rpb=None):
    """Gradient of :func:`na1d_qk`: (dq, dk) or (dq, dk, drpb); unfilled slots
    of dattn are ignored."""
    return _na_qk_backward(1, "na1d_qk_backward", dattn, q, k, kernel_size,
                           dilation, is_causal, rpb)


def na2d_qk_backward(dattn, q, k, kernel_size, *, dilation=1, is_causal=False,
                     rpb=None):
    """Gradient of :func:`na2d_qk`."""
    return _na_qk_backward(2, "na2d_qk_backward", dattn, q, k, kernel_size,
                           dilation, is_causal, rpb)


def na3d_qk_backward(dattn, q, k, kernel_size, *, dilation=1, is_causal=False,
                     rpb=None):
    """Gradient of :func:`na3d_qk`."""
    return _na_qk_backward(3, "na3d_qk_backward", dattn, q, k, kernel_size,
                           dilation, is_causal, rpb)


def na1d_av_backward(dout, attn, v, kernel_size, *, dilation=1, is_causal=False):
    """Gradient of :func:`na1d_av`: (dattn, dv); dattn is 0 in unfilled slots."""
    return _na_av_backward(1, "na1d_av_backward", dout, attn, v, kernel_size,
                           dilation, is_causal)


def na2d_av_backward(dout, attn, v, kernel_size, *, dilation=1, is_causal=False):
    """Gradient of :func:`na2d_av`."""
    return _na_av_backward(2, "na2d_av_backward", dout, attn, v, kernel_size,
                           dilation, is_causal)


def na3d_av_backward(dout, attn, v, kernel_size, *, dilation=1, is_causal=False):
    """Gradient of :func:`na3d_av`."""
    return _na_av_backward(3, "na3d_av_backward", dout, attn, v, kernel_size,
                           dilation, is_causal)
