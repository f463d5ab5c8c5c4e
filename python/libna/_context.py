"""The slab rule of context-parallel neighborhood attention, shared by
``libna.torch.distributed`` and ``libna.jax.distributed`` (no framework
imports): on which rows of an axis a block of queries has its global
windows. See ``libna.torch.distributed`` for why the rule is exact."""

from typing import NamedTuple

from . import reference

__all__ = ["AxisSlab", "axis_slab"]


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
    shifted by ``start``) as on the whole axis."""
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
