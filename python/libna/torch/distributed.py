"""Context-parallel neighborhood attention over ``torch.distributed``.

    import libna.torch.distributed as cp
    # the ranks of `group` hold consecutive blocks of spatial axis 0, in rank order
    out = cp.na2d(q, k, v, 7, axis=0)      # q, k, v: this rank's block [B, H_r, W, heads, D]

``na1d`` / ``na2d`` / ``na3d`` take every keyword of ``libna.torch.na{n}d``
and return this rank's block of what the single-device op returns for the
gathered tensors: out, lse, and (through autograd) every gradient. ``group``
is a ProcessGroup (default: the world); block sizes may differ between
ranks. ``axis`` and ``group`` may be tuples of equal length to shard several
axes: the ranks then form a grid, each ``group[i]`` holding the ranks that
share their blocks of every other sharded axis. rpb and additional
keys/values are replicated on every rank; their gradients are summed over
the ranks (the gradient of the sum of the ranks' losses, as on one device).

Halo strategy
-------------
Only K and V cross ranks. Along a sharded axis of global length ``L`` a
rank's queries are the rows ``[a, b)``. Windows only move forward as the
query does (within each dilation group), so the first and last ``dilation``
queries of the block bound the keys its windows reach, ``[key_lo, key_hi)``.
The rank receives the rows of ``[min(key_lo, a), max(key_hi, b))`` outside
its block from the ranks that own them (any number of ranks away when blocks
are thin), and runs the single-device op on a slab ``[start, stop)`` that
holds them, with its queries in place and zero queries elsewhere; rows of
the slab outside the received ones are zeros and are never a key of a local
query. The slab reproduces the global windows exactly (see ``axis_slab``):

* ``start`` is a multiple of ``stride * dilation``, so the slab has the same
  dilation groups and stride blocks as the axis, shifted by whole blocks;
* it contains every window of the local queries and lies inside ``[0, L)``,
  so clamping a window into the slab's group is clamping it into the axis's
  group (non-causal windows shift inward at the same places);
* causal: it contains the whole stride block of every local query, so the
  block's leader (the query whose window the block shares) is the same;
* it is at least ``kernel_size * dilation`` long, as the op requires.

Several sharded axes are exchanged one after the other, each over its own
group, so the corner rows arrive with the second exchange. The backward
sends the gradients of the received rows back to their owners, which add
them to their own, and all-reduces the gradients of the replicated tensors;
every collective of a call sits in one autograd node, so all ranks run them
in one order. The zero queries cost compute in proportion to halo / block.

Validation is collective: each rank checks its arguments, then the ranks
gather what they were given over every group; a bad argument on any rank or
a mismatch between ranks (shapes other than the block's extent, dtypes,
keywords) raises the same error on every rank, naming the rank. Every rank
of a group must call the op, and run its backward, the same number of times
in the same order.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import _ops, reference
from . import ops

__all__ = ["na", "na1d", "na2d", "na3d", "axis_slab", "AxisSlab"]

_STRATEGIES = ("auto", "halo", "heads")


# --------------------------------------------------------------------------
# The slab of one sharded axis
# --------------------------------------------------------------------------


class AxisSlab(NamedTuple):
    """Global rows of one sharded axis that a rank's local op runs on.

    The op runs on rows ``[start, stop)``; rows ``[rows_start, rows_stop)``
    hold real K/V (the rank's own block and the halo it receives), the rest
    of the slab is zeros."""
    start: int
    stop: int
    rows_start: int
    rows_stop: int


def axis_slab(length: int, block_start: int, block_stop: int, kernel_size: int,
              stride: int = 1, dilation: int = 1, is_causal: bool = False) -> AxisSlab:
    """The slab on which queries ``[block_start, block_stop)`` of an axis of
    ``length`` have the same windows (keys, slot order and rpb offsets,
    shifted by ``start``) as on the whole axis. See the module docstring."""
    def keys(i):
        return reference.window(i, length, kernel_size, stride, dilation, is_causal)[0]

    first_of_each_group = range(block_start, min(block_stop, block_start + dilation))
    last_of_each_group = range(max(block_start, block_stop - dilation), block_stop)
    rows_start = min(block_start, *(keys(i)[0] for i in first_of_each_group))
    rows_stop = max(block_stop, *(keys(i)[-1] + 1 for i in last_of_each_group))
    chunk = stride * dilation  # one stride block of every dilation group
    start = rows_start // chunk * chunk
    stop = rows_stop
    if is_causal:
        stop = max(stop, min(length, -(-block_stop // chunk) * chunk))
    span = kernel_size * dilation
    stop = min(length, max(stop, start + span))
    if stop - start < span:
        start = (stop - span) // chunk * chunk
    return AxisSlab(start, stop, rows_start, rows_stop)


# --------------------------------------------------------------------------
# Moving rows between ranks
# --------------------------------------------------------------------------


class _AxisExchange(NamedTuple):
    """Who sends which rows of one sharded axis to whom, seen from one rank.
    receives / sends: (group rank of the peer, first global row, end row)."""
    dim: int
    group: object
    block_start: int
    block_size: int
    slab: AxisSlab
    receives: Tuple[Tuple[int, int, int], ...]
    sends: Tuple[Tuple[int, int, int], ...]


def _axis_exchange(dim, group, my_index, block_sizes, slabs) -> _AxisExchange:
    starts = [sum(block_sizes[:p]) for p in range(len(block_sizes))]

    def overlap(p, slab):
        lo = max(slab.rows_start, starts[p])
        hi = min(slab.rows_stop, starts[p] + block_sizes[p])
        return lo, hi

    receives, sends = [], []
    for p in range(len(block_sizes)):
        if p == my_index:
            continue
        lo, hi = overlap(p, slabs[my_index])
        if lo < hi:
            receives.append((p, lo, hi))
        lo, hi = overlap(my_index, slabs[p])
        if lo < hi:
            sends.append((p, lo, hi))
    return _AxisExchange(dim, group, starts[my_index], block_sizes[my_index], slabs[my_index],
                         tuple(receives), tuple(sends))


def _with_extent(x: Tensor, dim: int, extent: int) -> List[int]:
    shape = list(x.shape)
    shape[dim] = extent
    return shape


def _send_and_receive(group, sends, receives) -> None:
    """sends / receives: (group rank of the peer, tensor); all at once."""
    p2p = [dist.P2POp(dist.isend, t, group=group, group_peer=p) for p, t in sends]
    p2p += [dist.P2POp(dist.irecv, t, group=group, group_peer=p) for p, t in receives]
    if p2p:
        for work in dist.batch_isend_irecv(p2p):
            work.wait()


def _gather_rows(x: Tensor, ex: _AxisExchange) -> Tensor:
    """The slab of ``x`` (this rank's block along ``ex.dim``)."""
    received = [x.new_empty(_with_extent(x, ex.dim, hi - lo)) for _, lo, hi in ex.receives]
    _send_and_receive(
        ex.group,
        [(p, x.narrow(ex.dim, lo - ex.block_start, hi - lo).contiguous())
         for p, lo, hi in ex.sends],
        [(p, buf) for (p, _, _), buf in zip(ex.receives, received)])
    before = [buf for (_, lo, _), buf in zip(ex.receives, received) if lo < ex.block_start]
    after = [buf for (_, lo, _), buf in zip(ex.receives, received) if lo > ex.block_start]
    zeros_before = x.new_zeros(_with_extent(x, ex.dim, ex.slab.rows_start - ex.slab.start))
    zeros_after = x.new_zeros(_with_extent(x, ex.dim, ex.slab.stop - ex.slab.rows_stop))
    return torch.cat([zeros_before, *before, x, *after, zeros_after], dim=ex.dim)


def _return_rows(grad_slab: Tensor, ex: _AxisExchange) -> Tensor:
    """The gradient of this rank's block: its own rows of ``grad_slab`` plus
    what the ranks it sent rows to computed for them."""
    def rows(lo, hi):
        return grad_slab.narrow(ex.dim, lo - ex.slab.start, hi - lo)

    returned = [grad_slab.new_empty(_with_extent(grad_slab, ex.dim, hi - lo))
                for _, lo, hi in ex.sends]
    _send_and_receive(
        ex.group,
        [(p, rows(lo, hi).contiguous()) for p, lo, hi in ex.receives],
        [(p, buf) for (p, _, _), buf in zip(ex.sends, returned)])
    grad = rows(ex.block_start, ex.block_start + ex.block_size).clone()
    for (_, lo, hi), buf in zip(ex.sends, returned):
        grad.narrow(ex.dim, lo - ex.block_start, hi - lo).add_(buf)
    return grad


def _distinct(groups):
    seen = []
    for g in groups:
        if all(g is not s for s in seen):
            seen.append(g)
    return seen


class _HaloExchange(torch.autograd.Function):
    """K/V slab from this rank's block, axis after axis; the replicated
    tensors pass through. The backward returns the halo's gradients to their
    owners and sums the replicated tensors' gradients over the groups."""

    @staticmethod
    def forward(ctx, exchanges, kv, *replicated):
        ctx.exchanges = exchanges
        for ex in exchanges:
            kv = _gather_rows(kv, ex)
        return (kv, *(x.view_as(x) for x in replicated))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kv, *grad_replicated):
        if ctx.needs_input_grad[1]:
            for ex in reversed(ctx.exchanges):
                grad_kv = _return_rows(grad_kv, ex)
        else:
            grad_kv = None
        summed = []
        for needed, grad in zip(ctx.needs_input_grad[2:], grad_replicated):
            if needed:
                grad = grad.contiguous().clone()
                for group in _distinct([ex.group for ex in ctx.exchanges]):
                    dist.all_reduce(grad, group=group)
            summed.append(grad if needed else None)
        return (None, grad_kv, *summed)


# --------------------------------------------------------------------------
# Collective validation
# --------------------------------------------------------------------------


class _Failure(NamedTuple):
    rank: int        # global rank that raised
    kind: str        # exception class name
    message: str


_KINDS = {"TypeError": TypeError, "ValueError": ValueError,
          "NotImplementedError": NotImplementedError}


def _failure_of(error: Exception) -> _Failure:
    kind = type(error).__name__ if type(error).__name__ in _KINDS else "ValueError"
    return _Failure(dist.get_rank(), kind, str(error))


def _first(*failures) -> Optional[_Failure]:
    known = [f for f in failures if f is not None]
    return min(known, key=lambda f: f.rank) if known else None


def _raise(op: str, failure: _Failure, cause: Optional[Exception]):
    raise _KINDS[failure.kind](f"[{op}] rank {failure.rank}: {failure.message}") from cause


def _gather(group, obj) -> list:
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


class _Request(NamedTuple):
    """What one rank was asked to compute, in the form the ranks compare."""
    shapes: tuple            # (name, shape or None) per tensor argument
    dtype: str
    device: str
    requires_grad: tuple
    keywords: tuple          # (name, normalised value)


def _disagreement(op, group, axis, dim_of_axis, requests) -> Optional[_Failure]:
    """A failure naming the first value on which the group's ranks disagree;
    extents of the group's own sharded axis may differ."""
    ranks = [dist.get_global_rank(group, i) for i in range(len(requests))]

    def comparable(request):
        shapes = tuple((name, None if s is None else tuple(
            None if (name in ("q", "k", "v") and d == dim_of_axis) else n
            for d, n in enumerate(s))) for name, s in request.shapes)
        return request._replace(shapes=shapes)

    first = comparable(requests[0])
    for rank, request in zip(ranks[1:], requests[1:]):
        other = comparable(request)
        for field in _Request._fields:
            mine, theirs = getattr(first, field), getattr(other, field)
            if mine != theirs:
                return _Failure(rank, "ValueError", (
                    f"the ranks of the group of sharded axis {axis} disagree on {field}: rank "
                    f"{ranks[0]} has {getattr(requests[0], field)}, rank {rank} has "
                    f"{getattr(request, field)} (only the extent of axis {axis} may differ)"))
    return None


def _groups_and_axes(op, group, axis, rank):
    """(groups, axes) as equal-length tuples; raised locally (the ranks to
    talk to are not known before this)."""
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    groups = group if isinstance(group, (tuple, list)) else (group,) * len(axes)
    if len(groups) != len(axes) or not axes:
        raise ValueError(f"[{op}] group and axis must have equal lengths when tuples; got "
                         f"{len(groups)} groups for axis={axis!r}")
    for a in axes:
        if not _ops._is_int(a) or not 0 <= a < rank:
            raise ValueError(f"[{op}] axis={axis!r} must be an int (or a tuple of ints) in "
                             f"[0, {rank}), 0-based among the spatial axes")
    if len(set(axes)) != len(axes):
        raise ValueError(f"[{op}] axis={axis!r} names an axis twice")
    groups = tuple(dist.group.WORLD if g is None else g for g in groups)
    for g in groups:
        if dist.get_rank(g) < 0:
            raise ValueError(f"[{op}] rank {dist.get_rank()} is not a member of the group it "
                             f"passed for axis {axes[groups.index(g)]}")
    return groups, tuple(int(a) for a in axes)


def _local_request(op, rank, axes, tensors, kernel_size, stride, dilation, is_causal, scale,
                   return_lse, strategy):
    """This rank's normalised request; raises on a bad argument."""
    if strategy not in _STRATEGIES:
        raise ValueError(f"[{op}] strategy={strategy!r} must be one of {_STRATEGIES}")
    if strategy == "heads":
        raise NotImplementedError(f"[{op}] strategy='heads' is not implemented yet; use "
                                  "'halo' (or 'auto', which is 'halo' for now)")
    keywords = (
        ("kernel_size", tuple(ops._per_axis(op, "kernel_size", kernel_size, rank))),
        ("stride", tuple(ops._per_axis(op, "stride", stride, rank))),
        ("dilation", tuple(ops._per_axis(op, "dilation", dilation, rank))),
        ("is_causal", tuple(ops._per_axis(op, "is_causal", is_causal, rank, boolean=True))),
        ("scale", _ops.check_scale(op, scale)),
        ("return_lse", _ops.check_flag(op, "return_lse", return_lse)),
        ("axis", axes),
    )
    _ops.check_additional(op, tensors["additional_keys"], tensors["additional_values"])
    ops._check_tensors(op, tensors)
    given = {name: t for name, t in tensors.items() if t is not None}
    for name in ("q", "k", "v"):
        if given[name].dim() != rank + 3:
            raise ValueError(f"[{op}] {name} has shape {tuple(given[name].shape)}; expected "
                             f"{rank + 3} dimensions [B, {rank} spatial axes, heads, head_dim]")
    for name in ("k", "v"):
        if given[name].shape[1:rank + 1] != given["q"].shape[1:rank + 1]:
            raise ValueError(f"[{op}] {name} has spatial extent "
                             f"{tuple(given[name].shape[1:rank + 1])} but q has "
                             f"{tuple(given['q'].shape[1:rank + 1])}; this rank's blocks of q, "
                             "k and v must cover the same rows")
    if given["k"].shape[-2] != given["v"].shape[-2]:
        raise ValueError(f"[{op}] k has {given['k'].shape[-2]} heads but v has "
                         f"{given['v'].shape[-2]}; they must match")
    for a in axes:
        if given["q"].shape[1 + a] < 1:
            raise ValueError(f"[{op}] this rank holds no rows of sharded axis {a} "
                             f"(q has shape {tuple(given['q'].shape)}); every rank needs at "
                             "least one")
    devices = {str(t.device) for t in given.values()}
    if len(devices) > 1:
        raise ValueError(f"[{op}] the tensors are on several devices {sorted(devices)}")
    return _Request(
        shapes=tuple((name, None if t is None else tuple(t.shape)) for name, t in tensors.items()),
        dtype=str(given["q"].dtype), device=str(given["q"].device),
        requires_grad=tuple(t is not None and t.requires_grad for t in tensors.values()),
        keywords=keywords)


def _agree(op, rank, groups, axes, tensors, **arguments):
    """Validate collectively: (request, block sizes per sharded axis, their
    offsets), the same on every rank, or the same error raised on all."""
    failure, cause, request = None, None, None
    try:
        request = _local_request(op, rank, axes, tensors, **arguments)
    except (TypeError, ValueError, NotImplementedError) as error:
        failure, cause = _failure_of(error), error
    blocks = {}
    for group, axis in zip(groups, axes):
        gathered = _gather(group, (failure, request))
        failure = _first(failure, *(f for f, _ in gathered))
        if failure is None:
            requests = [r for _, r in gathered]
            failure = _disagreement(op, group, axis, 1 + axis, requests)
            blocks[axis] = [dict(r.shapes)["q"][1 + axis] for r in requests]
    if len(groups) > 1:
        # The ranks sharing a block of one axis must share their blocks of
        # the others (a grid), and every failure must reach every rank.
        if failure is None:
            where = {a: (sum(b[:dist.get_rank(g)]), sum(b)) for (a, b), g in
                     zip(blocks.items(), groups)}
        for group, axis in zip(groups, axes):
            gathered = _gather(group, (failure, None if failure else where))
            failure = _first(failure, *(f for f, _ in gathered))
            if failure is None:
                for i, theirs in enumerate(gathered):
                    differ = [a for a in axes if a != axis and theirs[1][a] != where[a]]
                    if differ:
                        a = differ[0]
                        failure = _Failure(dist.get_global_rank(group, i), "ValueError", (
                            f"the ranks of the group of sharded axis {axis} must hold the same "
                            f"block of sharded axis {a}, but rank {dist.get_rank()} holds rows "
                            f"from {where[a][0]} of {where[a][1]} and rank "
                            f"{dist.get_global_rank(group, i)} rows from {theirs[1][a][0]} of "
                            f"{theirs[1][a][1]}"))
                        break
        for group in groups:
            failure = _first(failure, *(f for f in _gather(group, failure)))
    if failure is not None:
        _raise(op, failure, cause if failure.rank == dist.get_rank() else None)
    return request, blocks


# --------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------


def _pad(x: Tensor, dim: int, before: int, after: int) -> Tensor:
    return F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [before, after])


def na(rank: int, q, k, v, kernel_size, *, group=None, axis=0, strategy="auto", stride=1,
       dilation=1, is_causal=False, scale=None, rpb=None, return_lse=False,
       additional_keys=None, additional_values=None):
    """Rank-generic context-parallel neighborhood attention (see ``na1d``)."""
    op = f"libna.torch.distributed.na{rank}d"
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"[{op}] torch.distributed has no initialised process group; call "
                           "torch.distributed.init_process_group first")
    groups, axes = _groups_and_axes(op, group, axis, rank)
    q, k, v, rpb, additional_keys, additional_values = ops._autocast(
        q, k, v, rpb, additional_keys, additional_values)
    tensors = {"q": q, "k": k, "v": v, "rpb": rpb, "additional_keys": additional_keys,
               "additional_values": additional_values}
    request, blocks = _agree(op, rank, groups, axes, tensors, kernel_size=kernel_size,
                             stride=stride, dilation=dilation, is_causal=is_causal, scale=scale,
                             return_lse=return_lse, strategy=strategy)
    keywords = dict(request.keywords)
    del keywords["axis"]
    ks, st, dil, causal = (keywords[n] for n in ("kernel_size", "stride", "dilation", "is_causal"))
    global_extent = list(q.shape[1:rank + 1])
    for a in axes:
        global_extent[a] = sum(blocks[a])
    try:  # the gathered call's per-axis rules, the same on every rank
        reference.neighborhood((0,) * rank, tuple(global_extent), ks, st, dil, causal)
    except ValueError as error:
        raise ValueError(f"[{op}] the gathered spatial extent is {tuple(global_extent)} (blocks "
                         f"of sharded axes: {blocks}): {error}") from None
    if all(len(blocks[a]) == 1 for a in axes):
        return ops.na(rank, q, k, v, rpb=rpb, additional_keys=additional_keys,
                      additional_values=additional_values, **keywords)

    exchanges = []
    for group, a in zip(groups, axes):
        sizes = blocks[a]
        slabs = [axis_slab(global_extent[a], sum(sizes[:p]), sum(sizes[:p + 1]), ks[a], st[a],
                           dil[a], causal[a]) for p in range(len(sizes))]
        exchanges.append(_axis_exchange(1 + a, group, dist.get_rank(group), sizes, slabs))
    replicated = [t for t in (rpb, additional_keys, additional_values) if t is not None]
    kv_slab, *replicated = _HaloExchange.apply(exchanges, torch.cat([k, v], dim=-1), *replicated)
    k_slab, v_slab = kv_slab.split([k.shape[-1], v.shape[-1]], dim=-1)
    rpb, additional_keys, additional_values = (
        None if t is None else replicated.pop(0) for t in (rpb, additional_keys, additional_values))
    q_slab = q
    for ex in exchanges:
        q_slab = _pad(q_slab, ex.dim, ex.block_start - ex.slab.start,
                      ex.slab.stop - ex.block_start - ex.block_size)
    result = ops.na(rank, q_slab, k_slab, v_slab, rpb=rpb, additional_keys=additional_keys,
                    additional_values=additional_values, **keywords)
    outputs = list(result) if keywords["return_lse"] else [result]
    for ex in exchanges:
        outputs = [t.narrow(ex.dim, ex.block_start - ex.slab.start, ex.block_size)
                   for t in outputs]
    return tuple(outputs) if keywords["return_lse"] else outputs[0]


_NA_DOC = """{rank}D context-parallel neighborhood attention over torch.distributed.

    q: [B, {spatial}, heads, D], k: [B, {spatial}, heads_kv, D],
    v: [B, {spatial}, heads_kv, D_v]: this rank's block of the global tensors
    along spatial axis ``axis`` (0-based among the spatial axes), the ranks of
    ``group`` (default: the world) holding consecutive blocks in rank order.
    ``axis`` and ``group`` may be equal-length tuples to shard several axes.
    Every other keyword is that of ``libna.torch.na{rank}d``; rpb and
    additional keys/values are replicated on every rank. Returns this rank's
    block of the single-device result (out, and lse with return_lse=True);
    differentiable. strategy: "halo" (exchange the K/V rows the windows
    reach) or "auto" (= "halo"; "heads" is not implemented yet).
    """


def _make_na(rank):
    def fn(q, k, v, kernel_size, *, group=None, axis=0, strategy="auto", stride=1, dilation=1,
           is_causal=False, scale=None, rpb=None, return_lse=False, additional_keys=None,
           additional_values=None):
        return na(rank, q, k, v, kernel_size, group=group, axis=axis, strategy=strategy,
                  stride=stride, dilation=dilation, is_causal=is_causal, scale=scale, rpb=rpb,
                  return_lse=return_lse, additional_keys=additional_keys,
                  additional_values=additional_values)

    fn.__name__ = fn.__qualname__ = f"na{rank}d"
    fn.__doc__ = _NA_DOC.format(rank=rank, spatial=ops._SPATIAL[rank])
    return fn


na1d, na2d, na3d = (_make_na(r) for r in (1, 2, 3))
