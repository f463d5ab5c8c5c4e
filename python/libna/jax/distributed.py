"""Context-parallel neighborhood attention for JAX, inside ``jax.shard_map``.

    import libna.jax.distributed as cp
    mesh = jax.make_mesh((4,), ("x",))
    f = jax.shard_map(lambda q, k, v: cp.na2d(q, k, v, 7, axis_name="x", axis=0),
                      mesh=mesh, in_specs=P(None, "x"), out_specs=P(None, "x"))
    out = jax.jit(f)(q, k, v)         # q, k, v sharded along H over mesh axis "x"

``na1d`` / ``na2d`` / ``na3d`` take every keyword of ``libna.jax.na{n}d``
plus ``axis_name`` (the mesh axis that shards spatial axis ``axis``, 0-based
among the spatial axes, in equal blocks in mesh order) and return this
device's block of the single-device result (out, and lse). jit and grad
work; rpb and additional keys/values are replicated (``P()``), and
shard_map sums their gradients over the devices.

Only K and V move, with ``jax.lax.ppermute``. The program is the same on
every device, so each device receives the same number of rows: the most
that any device's windows reach before and after its block (devices at the
border reach further, as windows shift inward there), hop by hop from up to
as many neighbours as that takes. Each device then runs the single-device op
on a slab of one static length that holds its windows and lies inside the
axis, with its queries in place (the slab rule of ``libna.torch.distributed``,
widened to a common length); where the slab starts is picked per device
with ``jax.lax.axis_index``.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from .. import _ops
from .._context import axis_slab
from . import _plan, na as _na

__all__ = ["na", "na1d", "na2d", "na3d", "slab_plan"]


def slab_plan(length: int, peers: int, kernel_size: int, stride: int = 1, dilation: int = 1,
              is_causal: bool = False):
    """(slab length, slab start of each device, rows received before and
    after the block) for ``peers`` equal blocks of an axis of ``length``.

    Every device's slab has one length ``S`` and starts at a multiple of
    ``stride * dilation``, contains the slab of ``axis_slab`` for its block
    and lies inside ``[0, length)``, so it reproduces the global windows."""
    block = length // peers
    chunk = stride * dilation
    slabs = [axis_slab(length, p * block, (p + 1) * block, kernel_size, stride, dilation,
                       is_causal) for p in range(peers)]
    size = max(s.stop - s.start for s in slabs)
    while True:
        last_start = (length - size) // chunk * chunk
        starts = [min(s.start, last_start) for s in slabs]
        if all(a + size >= s.stop for a, s in zip(starts, slabs)):
            break
        size += 1
    before = max(p * block - a for p, a in enumerate(starts))
    after = max(a + size - (p + 1) * block for p, a in enumerate(starts))
    return size, starts, before, after


def _neighbour_rows(x, dim, block, peers, before, after, axis_name):
    """This device's block with ``before`` rows of the blocks before it and
    ``after`` rows of those after it (zeros beyond the axis)."""
    pieces = []
    for hop in range(-(-before // block), 0, -1):           # farthest first
        n = min(block, before - (hop - 1) * block)
        tail = jax.lax.slice_in_dim(x, block - n, block, axis=dim)
        pieces.append(jax.lax.ppermute(tail, axis_name,
                                       [(p, p + hop) for p in range(peers - hop)]))
    pieces.append(x)
    for hop in range(1, -(-after // block) + 1):
        n = min(block, after - (hop - 1) * block)
        head = jax.lax.slice_in_dim(x, 0, n, axis=dim)
        pieces.append(jax.lax.ppermute(head, axis_name, [(p, p - hop) for p in range(hop, peers)]))
    return jnp.concatenate(pieces, axis=dim)


def na(rank, q, k, v, kernel_size, *, axis_name, axis=0, stride=1, dilation=1,
       is_causal=False, scale=None, rpb=None, return_lse=False, additional_keys=None,
       additional_values=None):
    """Rank-generic context-parallel neighborhood attention (see ``na2d``)."""
    op = f"libna.jax.distributed.na{rank}d"
    ks = _ops.per_axis(op, "kernel_size", kernel_size, rank)
    st = _ops.per_axis(op, "stride", stride, rank)
    dil = _ops.per_axis(op, "dilation", dilation, rank)
    causal = _ops.per_axis(op, "is_causal", is_causal, rank, boolean=True)
    if not _ops._is_int(axis) or not 0 <= axis < rank:
        raise ValueError(f"[{op}] axis={axis!r} must be an int in [0, {rank}), 0-based among "
                         "the spatial axes")
    try:
        peers = jax.lax.axis_size(axis_name)
    except NameError as error:
        raise ValueError(f"[{op}] axis_name={axis_name!r} is not an axis of the enclosing "
                         f"shard_map (call this inside jax.shard_map): {error}") from None
    keywords = dict(stride=st, dilation=dil, is_causal=causal, scale=scale,
                    return_lse=return_lse)
    extra = dict(rpb=rpb, additional_keys=additional_keys, additional_values=additional_values)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != rank + 3:
            raise ValueError(f"[{op}] {name} has shape {getattr(x, 'shape', None)}; expected "
                             f"{rank + 3} dimensions [B, {rank} spatial axes, heads, head_dim]")
    dim, block = 1 + axis, q.shape[1 + axis]
    length = block * peers

    def gathered(x):
        if x is None:
            return None
        shape = list(x.shape)
        shape[dim] *= peers
        return jax.ShapeDtypeStruct(tuple(shape), x.dtype)

    specs = {"q": gathered(q), "k": gathered(k), "v": gathered(v), "rpb": rpb,
             "additional_keys": additional_keys, "additional_values": additional_values}
    try:  # the single-device op's checks on the gathered shapes
        checked = (ks, st, dil, causal, scale)
        _plan("na", [specs["q"], specs["k"], specs["v"], rpb, additional_keys,
                     additional_values], checked)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{error} (in {op}: the gathered shape of q is "
                          f"{tuple(specs['q'].shape)}, {peers} blocks of {block} along spatial "
                          f"axis {axis} over mesh axis {axis_name!r})") from None
    if peers == 1:
        return _na(rank, q, k, v, ks, **keywords, **extra)

    size, starts, before, after = slab_plan(length, peers, ks[axis], st[axis], dil[axis],
                                            causal[axis])
    me = jax.lax.axis_index(axis_name)
    start = jnp.asarray(starts, dtype=jnp.int32)[me]
    kv = _neighbour_rows(jnp.concatenate([k, v], axis=-1), dim, block, peers, before, after,
                         axis_name)
    kv = jax.lax.dynamic_slice_in_dim(kv, start - (me * block - before), size, axis=dim)
    k_slab, v_slab = jnp.split(kv, [k.shape[-1]], axis=-1)
    offset = me * block - start                             # of the block in the slab
    q_shape = list(q.shape)
    q_shape[dim] = size
    q_slab = jax.lax.dynamic_update_slice_in_dim(jnp.zeros(q_shape, q.dtype), q, offset,
                                                 axis=dim)
    # The replicated inputs enter the op as values that vary over the mesh
    # axis, like the slabs (each device's op differs); the transpose of the
    # cast sums their gradients over the devices.
    extra = {name: None if x is None else jax.lax.pcast(x, axis_name, to="varying")
             for name, x in extra.items()}
    result = _na(rank, q_slab, k_slab, v_slab, ks, **keywords, **extra)
    outputs = result if return_lse else (result,)
    outputs = tuple(jax.lax.dynamic_slice_in_dim(t, offset, block, axis=dim) for t in outputs)
    return outputs if return_lse else outputs[0]


_DOC = """{rank}D context-parallel neighborhood attention inside ``jax.shard_map``.

    q: [B, {spatial}, heads, D], k / v: [B, {spatial}, heads_kv, D / D_v]:
    this device's block along spatial axis ``axis``, which the mesh axis
    ``axis_name`` shards in equal blocks. Every other keyword is that of
    ``libna.jax.na{rank}d`` (rpb and additional keys/values replicated).
    Returns this device's block of out (and lse with return_lse=True).
    """


def _make(rank):
    def fn(q, k, v, kernel_size, *, axis_name, axis=0, stride=1, dilation=1, is_causal=False,
           scale=None, rpb=None, return_lse=False, additional_keys=None,
           additional_values=None):
        return na(rank, q, k, v, kernel_size, axis_name=axis_name, axis=axis, stride=stride,
                  dilation=dilation, is_causal=is_causal, scale=scale, rpb=rpb,
                  return_lse=return_lse, additional_keys=additional_keys,
                  additional_values=additional_values)

    fn.__name__ = fn.__qualname__ = f"na{rank}d"
    fn.__doc__ = _DOC.format(rank=rank, spatial=_ops._SPATIAL[rank])
    return fn


na1d, na2d, na3d = (_make(r) for r in (1, 2, 3))
