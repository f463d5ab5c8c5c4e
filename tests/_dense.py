"""A plain dense-mask neighborhood attention in PyTorch, in any dtype.

It shares nothing with libna's kernels: the per-axis windows come from
libna.reference.window (itself checked against hand-worked examples in
test_reference.py), and the attention is ordinary masked softmax attention
computed by PyTorch in the caller's dtype. It serves as a second float64
oracle, and its error in half precision sets the tolerance of the kernels.
"""

import numpy as np
import torch

from libna import reference


def axis_tables(length, kernel, stride, dilation, causal):
    """mask[i, j]: key j is in query i's window; rel[i, j]: rpb index."""
    mask = np.zeros((length, length), dtype=bool)
    rel = np.zeros((length, length), dtype=np.int64)
    for i in range(length):
        keys, _ = reference.window(i, length, kernel, stride, dilation, causal)
        mask[i, keys] = True
        rel[i, keys] = [j // dilation - i // dilation + kernel - 1 for j in keys]
    return mask, rel


def dense_na(q, k, v, kernel_size, stride, dilation, is_causal, scale=None, rpb=None):
    """q, k, v: torch tensors [B, *spatial, heads(_kv), D]; per-axis tuples."""
    rank = q.dim() - 3
    spatial = tuple(q.shape[1:1 + rank])
    batch, heads, dim = q.shape[0], q.shape[-2], q.shape[-1]
    heads_kv = k.shape[-2]
    tokens = int(np.prod(spatial))
    tables = [axis_tables(spatial[a], kernel_size[a], stride[a], dilation[a], is_causal[a])
              for a in range(rank)]
    # Dense [tokens, tokens] mask: cartesian product of the per-axis masks.
    mask = np.ones((1, 1), dtype=bool)
    for m, _ in tables:
        mask = (mask[:, None, :, None] & m[None, :, None, :]).reshape(
            mask.shape[0] * m.shape[0], mask.shape[1] * m.shape[1])
    qf = q.reshape(batch, tokens, heads, dim).transpose(1, 2)
    group = heads // heads_kv
    kf = k.reshape(batch, tokens, heads_kv, -1).transpose(1, 2).repeat_interleave(group, 1)
    vf = v.reshape(batch, tokens, heads_kv, -1).transpose(1, 2).repeat_interleave(group, 1)
    scale = dim ** -0.5 if scale is None else scale
    logits = (qf * scale) @ kf.transpose(-1, -2)
    if rpb is not None:
        grids = np.meshgrid(*[np.arange(n) for n in spatial], indexing="ij")
        qpos = [g.reshape(-1) for g in grids]
        index = tuple(tables[a][1][qpos[a][:, None], qpos[a][None, :]] for a in range(rank))
        bias = rpb[(slice(None),) + tuple(torch.from_numpy(i) for i in index)]
        logits = logits + bias.to(logits.dtype)
    logits = logits.masked_fill(~torch.from_numpy(mask), float("-inf"))
    out = torch.softmax(logits, dim=-1) @ vf
    lse = torch.logsumexp(logits.double(), dim=-1)
    out = out.transpose(1, 2).reshape(batch, *spatial, heads, -1)
    lse = lse.transpose(1, 2).reshape(batch, *spatial, heads)
    return out, lse
