"""PyTorch front end of libna: differentiable, torch.compile-able ops and
NATTEN-compatible modules.

    import libna.torch
    out = libna.torch.na2d(q, k, v, kernel_size=7)     # q, k, v: [B, H, W, heads, D]
    layer = libna.torch.nn.NeighborhoodAttention2D(dim=64, num_heads=4, kernel_size=7)

The ops are ``torch.library.custom_op``s in the ``libna`` namespace
(``torch.ops.libna.na_forward`` etc., see ``libna.torch.ops``) with fake
implementations and autograd formulas, so they work under ``torch.compile``
(``fullgraph=True``), ``torch.autocast`` and ``torch.autograd``.
"""

from . import nn, ops
from .ops import (
    na1d, na2d, na3d,
    na1d_qkvpacked, na2d_qkvpacked, na3d_qkvpacked,
    na1d_qk, na2d_qk, na3d_qk,
    na1d_av, na2d_av, na3d_av,
    merge_attentions,
)
from .nn import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D

__all__ = [
    "ops", "nn",
    "na1d", "na2d", "na3d",
    "na1d_qkvpacked", "na2d_qkvpacked", "na3d_qkvpacked",
    "na1d_qk", "na2d_qk", "na3d_qk",
    "na1d_av", "na2d_av", "na3d_av",
    "merge_attentions",
    "NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D",
]
