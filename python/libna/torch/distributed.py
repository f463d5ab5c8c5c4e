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
them to their own, and all-reduces the gradients of the replicated tensors.
The zero queries cost compute in proportion to halo / block.

Head strategy
-------------
DeepSpeed-Ulysses style: an all-to-all turns the ranks' spatial blocks of q,
k and v into head groups of the whole axis (rank p of a group of P gets
heads ``[p H / P, (p + 1) H / P)`` and the matching kv heads), each rank runs
the single-device op on the whole axis with its heads (and its slice of rpb
and of the additional keys/values), and a second all-to-all returns out
(and lse) to the blocks. It is exact for any window; heads and heads_kv
must be divisible by the number of ranks (the product of the group sizes
when several axes are sharded; the axes are gathered one after the other).

Strategy "auto"
---------------
Every rank computes, from the agreed shapes and block sizes, the bytes each
rank of the grid would send in the forward under either strategy
(``exchange_bytes``; the backward sends as many again) and picks "heads" when
the heads divide and its busiest rank sends fewer bytes than the halo's
busiest rank, else "halo". The halo moves K/V rows in proportion to the
window's reach; the head strategy moves (P - 1) / P of q, k, v and out
whatever the window, so "heads" wins only when windows span most of a block.

Transport
---------
Every exchange is an all-to-all of ``torch.distributed._functional_collectives``
(``all_to_all_single_autograd``), whose backward is the reverse all-to-all:
it works eagerly on gloo and NCCL, keeps CUDA work on the current stream, and
traces under ``torch.compile(fullgraph=True)``. ``bytes_sent()`` counts what
this process sent.

Validation is collective: each rank checks its arguments, then the ranks
gather what they were given over every group; a bad argument on any rank or
a mismatch between ranks (shapes other than the block's extent, dtypes,
keywords) raises the same error on every rank, naming the rank. Every rank
of a group must call the op, and run its backward, the same number of times
in the same order. Under torch.compile the validation is this rank's only
(an all-gather of Python objects does not trace), and the blocks of a
sharded axis must then be equal: the compiled graph all-gathers the block
sizes and raises RuntimeError on every rank when they differ.
"""

from __future__ import annotations

import itertools
import math
from typing import List, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from .. import _ops, reference
from .._context import AxisSlab, axis_slab
from . import ops

__all__ = ["na", "na1d", "na2d", "na3d", "parallelize", "axis_slab", "AxisSlab", "exchange_bytes",
           "bytes_sent", "reset_bytes_sent"]

_STRATEGIES = ("auto", "halo", "heads")


# --------------------------------------------------------------------------
# The slab of one sharded axis
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# Moving rows between ranks
# --------------------------------------------------------------------------
#
# Every exchange is one all-to-all over the group of a sharded axis, through
# the functional collectives: they work eagerly on gloo and NCCL, run on the
# current stream of CUDA tensors, are differentiable (the backward of an
# all-to-all is the reverse all-to-all, which is how the halo's dK/dV go back
# to their owners and the head groups' gradients back to their blocks) and
# trace under torch.compile(fullgraph=True).

_sent = {"bytes": 0}


def bytes_sent() -> int:
    """Bytes this process has sent to other ranks in the forward exchanges of
    ``na1d`` / ``na2d`` / ``na3d`` since it started (or since
    ``reset_bytes_sent()``); counted at each all-to-all, own rows excluded.
    The backward sends as many again (the gradients of what was sent).
    Calls traced by torch.compile are not counted."""
    return _sent["bytes"]


def reset_bytes_sent() -> None:
    """Starts the count of ``bytes_sent()`` again from 0."""
    _sent["bytes"] = 0


def _all_to_all(x: Tensor, dim: int, send: List[int], receive: List[int], group) -> Tensor:
    """x holds along ``dim`` ``send[p]`` rows for group rank p, in rank
    order; returns the ``receive[p]`` rows from each p, in rank order."""
    me = dist.get_rank(group)
    if not torch.compiler.is_compiling():
        row_bytes = x.numel() // max(1, x.shape[dim]) * x.element_size()
        _sent["bytes"] += row_bytes * (sum(send) - send[me])
    rows = x.movedim(dim, 0).contiguous()
    received = funcol.all_to_all_single_autograd(rows, list(receive), list(send), group)
    return funcol.wait_tensor(received).movedim(0, dim)


class _AxisExchange(NamedTuple):
    """Who sends which rows of one sharded axis to whom, seen from one rank.
    receives / sends: (group rank of the peer, first global row, end row),
    in rank order."""
    dim: int
    group: object
    peers: int
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
    return _AxisExchange(dim, group, len(block_sizes), starts[my_index], block_sizes[my_index],
                         slabs[my_index], tuple(receives), tuple(sends))


def _with_extent(x: Tensor, dim: int, extent: int) -> List[int]:
    shape = list(x.shape)
    shape[dim] = extent
    return shape


def _halo_slab(x: Tensor, ex: _AxisExchange) -> Tensor:
    """The slab of ``x`` (this rank's block along ``ex.dim``): the rows the
    windows of this rank's queries reach, from whichever ranks own them, with
    zeros where the slab holds no key of a local query."""
    send, receive = [0] * ex.peers, [0] * ex.peers
    parts = []
    for p, lo, hi in ex.sends:
        send[p] = hi - lo
        parts.append(x.narrow(ex.dim, lo - ex.block_start, hi - lo))
    for p, lo, hi in ex.receives:
        receive[p] = hi - lo
    outgoing = torch.cat(parts, dim=ex.dim) if parts else x.narrow(ex.dim, 0, 0)
    received = _all_to_all(outgoing, ex.dim, send, receive, ex.group)
    # Blocks are in rank order, so the received rows are in row order:
    # first those before this rank's block, then those after it.
    before = ex.block_start - ex.slab.rows_start
    pieces = [x.new_zeros(_with_extent(x, ex.dim, ex.slab.rows_start - ex.slab.start)),
              received.narrow(ex.dim, 0, before), x,
              received.narrow(ex.dim, before, received.shape[ex.dim] - before),
              x.new_zeros(_with_extent(x, ex.dim, ex.slab.stop - ex.slab.rows_stop))]
    return torch.cat(pieces, dim=ex.dim)


def _to_head_groups(x: Tensor, dim: int, sizes: List[int], group) -> Tensor:
    """[..., own block along dim, ..., heads, D] -> [..., the whole axis,
    ..., heads / P, D]: group rank p gets head group p of every block."""
    peers, me = len(sizes), dist.get_rank(group)
    y = x.unflatten(-2, (peers, x.shape[-2] // peers)).movedim(-3, dim).flatten(dim, dim + 1)
    return _all_to_all(y, dim, [sizes[me]] * peers, list(sizes), group)


def _from_head_groups(y: Tensor, dim: int, sizes: List[int], group) -> Tensor:
    """The inverse of ``_to_head_groups``."""
    peers, me = len(sizes), dist.get_rank(group)
    x = _all_to_all(y, dim, list(sizes), [sizes[me]] * peers, group)
    return x.unflatten(dim, (peers, sizes[me])).movedim(dim, -3).flatten(-3, -2)


def _distinct(groups):
    seen = []
    for g in groups:
        if all(g is not s for s in seen):
            seen.append(g)
    return seen


class _SumGradients(torch.autograd.Function):
    """Identity forward; the backward sums the gradients of the replicated
    tensors (rpb, additional keys/values) over the groups, so every rank gets
    the gradient of the sum of the ranks' losses, as on one device."""

    @staticmethod
    def forward(ctx, groups, *replicated):
        ctx.groups = groups
        return tuple(x.view_as(x) for x in replicated)

    @staticmethod
    def backward(ctx, *grads):
        summed = []
        for needed, grad in zip(ctx.needs_input_grad[1:], grads):
            if needed and grad is not None:
                for group in ctx.groups:
                    grad = funcol.wait_tensor(funcol.all_reduce(grad.contiguous(), "sum", group))
            summed.append(grad if needed else None)
        return (None, *summed)


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
    message = failure.message
    if message.startswith(f"[{op}] "):
        message = message[len(op) + 3:]
    raise _KINDS[failure.kind](f"[{op}] rank {failure.rank}: {message}") from cause


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


def _devices_served(backend: str) -> List[str]:
    """Device types a group's backend serves: "gloo" -> cpu, cuda;
    "cpu:gloo,cuda:nccl" -> cpu, cuda."""
    if ":" in backend:
        return [part.split(":")[0] for part in backend.split(",")]
    return list(dist.Backend.backend_capability.get(backend, []))


def _local_request(op, rank, groups, axes, tensors, kernel_size, stride, dilation, is_causal,
                   scale, return_lse, strategy):
    """This rank's normalised request; raises on a bad argument."""
    if strategy not in _STRATEGIES:
        raise ValueError(f"[{op}] strategy={strategy!r} must be one of {_STRATEGIES}")
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
    device = given["q"].device
    for group, a in zip(groups, () if torch.compiler.is_compiling() else axes):
        backend = dist.get_backend(group)
        serves = _devices_served(backend)
        if device.type not in serves:
            raise ValueError(f"[{op}] the tensors are on device {device}, but the process group "
                             f"of sharded axis {a} has backend {backend!r}, which serves "
                             f"{', '.join(serves) or 'no device'}; put the tensors on a device "
                             "it serves or use a group of another backend")
    if strategy == "heads":
        peers = 1
        for group in groups:
            peers *= dist.get_world_size(group)
        for name in ("q", "k"):
            heads = given[name].shape[-2]
            if heads % peers:
                raise ValueError(
                    f"[{op}] strategy='heads' needs the heads of q and k/v divisible by the "
                    f"{peers} ranks they are spread over, but {name} has {heads} heads; use "
                    "strategy='halo' (or 'auto', which then picks it)")
    return _Request(
        shapes=tuple((name, None if t is None else tuple(t.shape)) for name, t in tensors.items()),
        dtype=str(given["q"].dtype), device=str(given["q"].device),
        requires_grad=tuple(t is not None and t.requires_grad for t in tensors.values()),
        keywords=keywords)


def _assert_equal_blocks(op, group, axis, rows, device):
    """Under torch.compile: every rank of ``group`` must hold ``rows`` rows
    of sharded axis ``axis``, checked in the graph (a tensor all-gather and
    an assertion, which trace) so that unequal blocks raise on every rank
    instead of exchanging the wrong rows."""
    mine = torch.tensor([rows], dtype=torch.int64, device=device)
    every = funcol.wait_tensor(funcol.all_gather_tensor(mine, 0, group))
    torch._assert_async(
        torch.all(every == rows),
        f"[{op}] under torch.compile every rank must hold a block of the same size along "
        f"sharded axis {axis}, but this rank holds {rows} rows and another a different "
        f"number; call it eagerly (which supports unequal blocks) or shard evenly")


def _agree(op, rank, groups, axes, tensors, **arguments):
    """Validate collectively: (request, block sizes per sharded axis, their
    offsets), the same on every rank, or the same error raised on all.

    Under torch.compile the checks are this rank's only (an object
    all-gather does not trace) and the blocks are taken to be equal."""
    if torch.compiler.is_compiling():
        request = _local_request(op, rank, groups, axes, tensors, **arguments)
        extent = dict(request.shapes)["q"]
        for g, a in zip(groups, axes):
            _assert_equal_blocks(op, g, a, extent[1 + a], tensors["q"].device)
        return request, {a: [extent[1 + a]] * dist.get_world_size(g)
                         for g, a in zip(groups, axes)}
    failure, cause, request = None, None, None
    try:
        request = _local_request(op, rank, groups, axes, tensors, **arguments)
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
# Bytes each strategy moves, and the choice between them
# --------------------------------------------------------------------------


def _grid(blocks):
    """Every rank of the grid as (index along each sharded axis)."""
    return itertools.product(*(range(len(sizes)) for sizes in blocks.values()))


def _starts(sizes):
    return [sum(sizes[:p]) for p in range(len(sizes))]


def exchange_bytes(strategy: str, spatial, blocks: dict, kernel_size, *, heads: int,
                   heads_kv: int, head_dim: int, head_dim_v: Optional[int] = None,
                   batch: int = 1, stride=1, dilation=1, is_causal=False, itemsize: int = 4,
                   return_lse: bool = False, lse_itemsize: int = 4) -> List[int]:
    """Bytes each rank sends in the forward of one call, by the rule the op
    follows (``bytes_sent()`` counts them as they go; the backward sends as
    many again), for every rank of the grid in row-major order of ``blocks``.

    spatial: the global extent; blocks: {sharded axis: block sizes in rank
    order}, axes in the order they are exchanged. "halo": the K/V rows that
    the windows of a rank's queries reach outside its block (the minimum any
    exchange of K/V must move), axis after axis, so the second axis's rows
    already span the first axis's slab. "heads": all of q, k and v but the
    rank's own head group to the other ranks, and the output (and lse) back.
    """
    rank = len(spatial)
    ks = _ops.per_axis("exchange_bytes", "kernel_size", kernel_size, rank)
    st = _ops.per_axis("exchange_bytes", "stride", stride, rank)
    dil = _ops.per_axis("exchange_bytes", "dilation", dilation, rank)
    causal = _ops.per_axis("exchange_bytes", "is_causal", is_causal, rank, boolean=True)
    if strategy not in ("halo", "heads"):
        raise ValueError(f"[exchange_bytes] strategy={strategy!r} must be 'halo' or 'heads'")
    dv = head_dim if head_dim_v is None else head_dim_v
    axes = list(blocks)
    result = []
    for coords in _grid(blocks):
        extent = list(spatial)
        for a, c in zip(axes, coords):
            extent[a] = blocks[a][c]

        def rows_elsewhere(a):  # elements of one row of axis a, all else included
            return batch * math.prod([n for j, n in enumerate(extent) if j != a])

        sent = 0
        if strategy == "halo":
            for a, c in zip(axes, coords):
                sizes, starts = blocks[a], _starts(blocks[a])
                slabs = [axis_slab(spatial[a], starts[p], starts[p] + sizes[p], ks[a], st[a],
                                   dil[a], causal[a]) for p in range(len(sizes))]
                ex = _axis_exchange(1 + a, None, c, sizes, slabs)
                rows = sum(hi - lo for _, lo, hi in ex.sends)
                sent += rows * rows_elsewhere(a) * heads_kv * (head_dim + dv) * itemsize
                extent[a] = ex.slab.stop - ex.slab.start
        else:
            h, h_kv = heads, heads_kv
            for a, c in zip(axes, coords):
                peers = len(blocks[a])
                h, h_kv = h // peers, h_kv // peers
                sent += ((peers - 1) * blocks[a][c] * rows_elsewhere(a)
                         * (h * head_dim + h_kv * (head_dim + dv)) * itemsize)
                extent[a] = spatial[a]
            for a, c in reversed(list(zip(axes, coords))):
                per_head = dv * itemsize + (lse_itemsize if return_lse else 0)
                sent += (spatial[a] - blocks[a][c]) * rows_elsewhere(a) * h * per_head
                h *= len(blocks[a])
                extent[a] = blocks[a][c]
        result.append(sent)
    return result


def _choose(strategy, request, rank, global_extent, blocks, peers):
    """"auto": the strategy whose busiest rank sends fewer bytes
    (``exchange_bytes``; a tie goes to "halo"); "heads" only where the heads
    divide over the ranks. Every rank computes the same choice from the
    agreed request."""
    if strategy != "auto":
        return strategy
    shapes, keywords = dict(request.shapes), dict(request.keywords)
    heads, heads_kv = shapes["q"][-2], shapes["k"][-2]
    if heads % peers or heads_kv % peers:
        return "halo"
    itemsize = torch.empty((), dtype=getattr(torch, request.dtype.split(".")[-1])).element_size()
    arguments = dict(heads=heads, heads_kv=heads_kv, head_dim=shapes["q"][-1],
                     head_dim_v=shapes["v"][-1], batch=shapes["q"][0],
                     stride=keywords["stride"], dilation=keywords["dilation"],
                     is_causal=keywords["is_causal"], itemsize=itemsize,
                     return_lse=keywords["return_lse"], lse_itemsize=8 if itemsize == 8 else 4)
    halo, heads_bytes = (max(exchange_bytes(s, global_extent, blocks, keywords["kernel_size"],
                                            **arguments)) for s in ("halo", "heads"))
    return "heads" if heads_bytes < halo else "halo"


# --------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------


def _pad(x: Tensor, dim: int, before: int, after: int) -> Tensor:
    return F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [before, after])


def _check_gathered(op, rank, request, global_extent, blocks):
    """The single-device op's argument checks on the gathered call, on
    stand-ins of the gathered shapes that hold no memory; the requests of
    all ranks agree, so this raises the same error on every rank."""
    shapes, keywords = dict(request.shapes), dict(request.keywords)

    def stand_in(name):
        shape = shapes[name]
        if shape is None:
            return None
        if name in ("q", "k", "v"):
            shape = (shape[0], *global_extent, *shape[1 + rank:])
        return np.broadcast_to(np.zeros((), np.float64), shape)

    q, k, v, rpb, xk, xv = (stand_in(n) for n in (
        "q", "k", "v", "rpb", "additional_keys", "additional_values"))
    try:
        reference._check_qkv(op, rank, q, k, v)
        ks, st, dil, causal = reference._check_params(
            op, global_extent, keywords["kernel_size"], keywords["stride"],
            keywords["dilation"], keywords["is_causal"], rank)
        reference._check_rpb(op, rpb, q.shape[-2], ks, st, causal, np.float64)
        reference._check_additional(op, q, xk, xv)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{error} (the gathered spatial extent is {tuple(global_extent)}; "
                          f"blocks of the sharded axes: {blocks})") from None


def _na_halo(rank, q, k, v, groups, axes, blocks, global_extent, keywords, extra):
    ks, st, dil, causal = (keywords[n] for n in ("kernel_size", "stride", "dilation",
                                                 "is_causal"))
    exchanges = []
    for group, a in zip(groups, axes):
        sizes, starts = blocks[a], _starts(blocks[a])
        slabs = [axis_slab(global_extent[a], starts[p], starts[p] + sizes[p], ks[a], st[a],
                           dil[a], causal[a]) for p in range(len(sizes))]
        exchanges.append(_axis_exchange(1 + a, group, dist.get_rank(group), sizes, slabs))
    kv = torch.cat([k, v], dim=-1)
    for ex in exchanges:
        kv = _halo_slab(kv, ex)
    k_slab, v_slab = kv.split([k.shape[-1], v.shape[-1]], dim=-1)
    q_slab = q
    for ex in exchanges:
        q_slab = _pad(q_slab, ex.dim, ex.block_start - ex.slab.start,
                      ex.slab.stop - ex.block_start - ex.block_size)
    result = ops.na(rank, q_slab, k_slab, v_slab, **extra, **keywords)
    outputs = list(result) if keywords["return_lse"] else [result]
    for ex in exchanges:
        outputs = [t.narrow(ex.dim, ex.block_start - ex.slab.start, ex.block_size)
                   for t in outputs]
    return outputs


def _na_heads(rank, q, k, v, groups, axes, blocks, keywords, extra):
    kv = torch.cat([k, v], dim=-1)
    (h0, h), (kv0, h_kv) = (0, q.shape[-2]), (0, k.shape[-2])
    for group, a in zip(groups, axes):
        peers, me = dist.get_world_size(group), dist.get_rank(group)
        q = _to_head_groups(q, 1 + a, blocks[a], group)
        kv = _to_head_groups(kv, 1 + a, blocks[a], group)
        h, h_kv = h // peers, h_kv // peers
        h0, kv0 = h0 + me * h, kv0 + me * h_kv
    k, v = kv.split([k.shape[-1], v.shape[-1]], dim=-1)
    rpb, xk, xv = extra["rpb"], extra["additional_keys"], extra["additional_values"]
    extra = {"rpb": None if rpb is None else rpb.narrow(0, h0, h),
             "additional_keys": None if xk is None else xk.narrow(2, kv0, h_kv),
             "additional_values": None if xv is None else xv.narrow(2, kv0, h_kv)}
    result = ops.na(rank, q, k, v, **extra, **keywords)
    outputs = [result[0], result[1].unsqueeze(-1)] if keywords["return_lse"] else [result]
    for group, a in reversed(list(zip(groups, axes))):
        outputs = [_from_head_groups(t, 1 + a, blocks[a], group) for t in outputs]
    if keywords["return_lse"]:
        outputs[1] = outputs[1].squeeze(-1)
    return outputs


def na(rank: int, q, k, v, kernel_size, *, group=None, axis=0, strategy="auto", stride=1,
       dilation=1, is_causal=False, scale=None, rpb=None, return_lse=False,
       additional_keys=None, additional_values=None, replicated_grad="sum"):
    """Rank-generic context-parallel neighborhood attention (see ``na1d``)."""
    op = f"libna.torch.distributed.na{rank}d"
    if replicated_grad not in ("sum", "local"):
        raise ValueError(f"[{op}] replicated_grad={replicated_grad!r} must be 'sum' or 'local'")
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
    global_extent = list(q.shape[1:rank + 1])
    for a in axes:
        global_extent[a] = sum(blocks[a])
    if not torch.compiler.is_compiling():
        _check_gathered(op, rank, request, global_extent, blocks)
    extra = {"rpb": rpb, "additional_keys": additional_keys,
             "additional_values": additional_values}
    if all(len(blocks[a]) == 1 for a in axes):
        return ops.na(rank, q, k, v, **extra, **keywords)

    replicated = [name for name, t in extra.items() if t is not None and t.requires_grad]
    if replicated and torch.is_grad_enabled() and replicated_grad == "sum":
        summed = _SumGradients.apply(tuple(_distinct(groups)), *(extra[n] for n in replicated))
        extra.update(zip(replicated, summed))
    peers = math.prod([len(blocks[a]) for a in axes])
    if _choose(strategy, request, rank, global_extent, blocks, peers) == "heads":
        outputs = _na_heads(rank, q, k, v, groups, axes, blocks, keywords, extra)
    else:
        outputs = _na_halo(rank, q, k, v, groups, axes, blocks, global_extent, keywords, extra)
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
    reach), "heads" (all-to-all from spatial blocks to head groups and back;
    heads and heads_kv divisible by the number of ranks) or "auto" (the one
    whose busiest rank sends fewer bytes; see the module docstring).
    replicated_grad: "sum" (default): the gradients of rpb and of the
    additional keys/values are summed over the ranks, so each rank holds the
    single-device gradient; "local": each rank keeps its own contribution,
    like any other replicated parameter, for DDP / FSDP over the ranks to
    reduce (``parallelize`` sets this for the modules).
    """


def _make_na(rank):
    def fn(q, k, v, kernel_size, *, group=None, axis=0, strategy="auto", stride=1, dilation=1,
           is_causal=False, scale=None, rpb=None, return_lse=False, additional_keys=None,
           additional_values=None, replicated_grad="sum"):
        return na(rank, q, k, v, kernel_size, group=group, axis=axis, strategy=strategy,
                  stride=stride, dilation=dilation, is_causal=is_causal, scale=scale, rpb=rpb,
                  return_lse=return_lse, additional_keys=additional_keys,
                  additional_values=additional_values, replicated_grad=replicated_grad)

    fn.__name__ = fn.__qualname__ = f"na{rank}d"
    fn.__doc__ = _NA_DOC.format(rank=rank, spatial=_ops._SPATIAL[rank])
    return fn


na1d, na2d, na3d = (_make_na(r) for r in (1, 2, 3))


def parallelize(module, *, group=None, axis=0, strategy="auto"):
    """Makes every ``libna.torch.nn.NeighborhoodAttention{1,2,3}D`` in
    ``module`` (itself included) run context-parallel over ``group`` /
    ``axis`` (see ``na1d``); the rest of the model must then work on blocks
    of the sharded axes (token-wise layers do). Parameters keep their local
    gradients (``replicated_grad="local"``, rpb included), so that DDP or
    FSDP over the ranks reduces every parameter alike. Returns ``module``."""
    from .nn import _NeighborhoodAttention
    for m in module.modules():
        if isinstance(m, _NeighborhoodAttention):
            m.context_parallel = {"group": group, "axis": axis, "strategy": strategy}
    return module
