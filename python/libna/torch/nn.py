"""Neighborhood attention modules, drop-in for NATTEN 0.17's.

``NeighborhoodAttention1D / 2D / 3D`` take channels-last input
``[B, *spatial, dim]`` and have the parameters of NATTEN 0.17's modules
(``qkv``, ``rpb``, ``proj``), so NATTEN checkpoints load with
``load_state_dict``. ``context_parallel={"group": ..., "axis": ...,
"strategy": ...}`` (or ``libna.torch.distributed.parallelize(model, ...)``
on a whole model) makes a module run ``libna.torch.distributed.na{n}d`` on
the ranks' blocks of its input.
"""

import torch
from torch import nn

from .. import _ops
from .._public import public
from . import ops

__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]


class _NeighborhoodAttention(nn.Module):
    rank = 0

    def __init__(self, dim, num_heads, kernel_size, dilation=1, is_causal=False,
                 rel_pos_bias=True, qkv_bias=True, qk_scale=None, attn_drop=0.0,
                 proj_drop=0.0, context_parallel=None):
        super().__init__()
        name = type(self).__name__
        rank = self.rank
        for arg, value in (("dim", dim), ("num_heads", num_heads)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"[{name}] {arg}={value!r} must be an int")
            if value < 1:
                raise ValueError(f"[{name}] {arg}={value} must be positive")
        if dim % num_heads != 0:
            raise ValueError(
                f"[{name}] dim={dim} must be divisible by num_heads={num_heads}")
        kernel_size = _ops.per_axis(name, "kernel_size", kernel_size, rank)
        dilation = _ops.per_axis(name, "dilation", dilation, rank)
        is_causal = _ops.per_axis(name, "is_causal", is_causal, rank, boolean=True)
        rel_pos_bias = bool(rel_pos_bias)
        if rel_pos_bias and any(is_causal):
            raise ValueError(
                f"[{name}] rel_pos_bias=True is not supported with is_causal={is_causal}; "
                "relative positional bias needs every axis non-causal "
                "(pass rel_pos_bias=False)")
        if any(k < 2 for k in kernel_size):
            raise ValueError(f"[{name}] kernel_size={kernel_size} must be at least 2 "
                             "along every axis")
        if any(d < 1 for d in dilation):
            raise ValueError(f"[{name}] dilation={dilation} must be at least 1 along every axis")
        qk_scale = _ops.check_real(name, "qk_scale", qk_scale)
        for arg, p in (("attn_drop", attn_drop), ("proj_drop", proj_drop)):
            if _ops.check_real(name, arg, p) is None or not 0 <= p <= 1:
                raise ValueError(f"[{name}] {arg}={p!r} must be a probability from 0 to 1")

        if context_parallel is not None and (
                not isinstance(context_parallel, dict)
                or not set(context_parallel) <= {"group", "axis", "strategy"}):
            raise TypeError(f"[{name}] context_parallel={context_parallel!r} must be None or a "
                            "dict of keywords of libna.torch.distributed.na{rank}d from group, "
                            "axis and strategy")
        self.context_parallel = context_parallel
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.is_causal = is_causal
        self.rel_pos_bias = rel_pos_bias

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if rel_pos_bias:
            self.rpb = nn.Parameter(
                torch.zeros(num_heads, *(2 * k - 1 for k in kernel_size)))
            nn.init.trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        rank = self.rank
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"[{type(self).__name__}] x must be a torch.Tensor, got "
                            f"{type(x).__module__}.{type(x).__qualname__}")
        if x.dim() != rank + 2 or x.shape[-1] != self.dim:
            raise ValueError(
                f"[{type(self).__name__}] expected input of shape [B, {rank} spatial axes, "
                f"dim={self.dim}] ({rank + 2} dimensions), got {tuple(x.shape)}")
        batch, spatial = x.shape[0], x.shape[1:-1]
        qkv = self.qkv(x).reshape(batch, *spatial, 3, self.num_heads, self.head_dim)
        if self.context_parallel is None and not (self.training and self.attn_drop.p > 0):
            # One gradient for the projection's output, not three stacked.
            out = ops.na_qkvpacked(rank, qkv, self.kernel_size, dilation=self.dilation,
                                   is_causal=self.is_causal, scale=self.scale, rpb=self.rpb)
            return self.proj_drop(self.proj(out.reshape(batch, *spatial, self.dim)))
        q, k, v = qkv.unbind(dim=-3)
        if self.context_parallel is not None:
            if self.training and self.attn_drop.p > 0:
                raise NotImplementedError(
                    f"[{type(self).__name__}] attention dropout (attn_drop={self.attn_drop.p}) "
                    "is not supported context-parallel (it needs the unfused ops)")
            from . import distributed
            out = distributed.na(rank, q, k, v, self.kernel_size, dilation=self.dilation,
                                 is_causal=self.is_causal, scale=self.scale, rpb=self.rpb,
                                 replicated_grad="local", **self.context_parallel)
        else:
            attn = ops.na_qk(rank, q * self.scale, k, self.kernel_size,
                             dilation=self.dilation, is_causal=self.is_causal, rpb=self.rpb)
            attn = self.attn_drop(attn.softmax(dim=-1))
            out = ops.na_av(rank, attn, v, self.kernel_size, dilation=self.dilation,
                            is_causal=self.is_causal)
        out = out.reshape(batch, *spatial, self.dim)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"kernel_size={self.kernel_size}, dilation={self.dilation}, "
            f"is_causal={self.is_causal}, rel_pos_bias={self.rel_pos_bias}"
        )


class NeighborhoodAttention1D(_NeighborhoodAttention):
    """1D neighborhood attention over x [B, L, dim]."""

    rank = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    """2D neighborhood attention over x [B, H, W, dim]."""

    rank = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    """3D neighborhood attention over x [B, T, H, W, dim]."""

    rank = 3


# A call that does not fit (an unknown keyword, say) names the class, not the
# private base that defines the methods.
for _cls in (NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D):
    _cls.__init__ = public(_NeighborhoodAttention.__init__, _cls.__name__)
    _cls.forward = public(_NeighborhoodAttention.forward, _cls.__name__,
                          f"{_cls.__name__}.forward")
