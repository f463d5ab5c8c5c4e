"""The benchmarked problem (rank, extents, kernel, batch, heads, head dim,
dtype, device), its random inputs, and its neighbourhoods as the index
tables and dense masks that the peers need."""

from __future__ import annotations

import math

import numpy as np

from libna import reference


class Problem:
    def __init__(self, rank, spatial, kernel, batch, heads, dim, dtype, device="cpu"):
        self.rank = rank
        self.device = device  # "cpu" or "cuda" (the current CUDA device)
        self.spatial = tuple(spatial)
        self.kernel = tuple(kernel)
        self.batch = batch
        self.heads = heads
        self.dim = dim
        self.dtype = dtype  # name: float32 / float16 / bfloat16

    @property
    def positions(self):  # query positions per batch item
        return math.prod(self.spatial)

    @property
    def tokens(self):
        return self.batch * self.positions

    @property
    def window(self):  # keys per query
        return math.prod(self.kernel)

    def fwd_flops(self):
        return 4 * self.tokens * self.window * self.dim * self.heads

    def describe(self):
        size = "x".join(map(str, self.spatial))
        kern = "x".join(map(str, self.kernel))
        return (f"{self.rank}D, B={self.batch}, {size} ({self.tokens} tokens), "
                f"{self.heads} heads, D {self.dim}, kernel {kern}, {self.dtype}"
                + (f", {self.device}" if self.device != "cpu" else ""))

    def short(self):
        return f"{'x'.join(map(str, self.spatial))} k{'x'.join(map(str, self.kernel))}"

    def argv(self):
        return ["--rank", str(self.rank), "--size", "x".join(map(str, self.spatial)),
                "--kernel", "x".join(map(str, self.kernel)), "--batch", str(self.batch),
                "--heads", str(self.heads), "--dim", str(self.dim), "--dtype", self.dtype,
                "--device", self.device]


def torch_dtype(name):
    import torch
    return {"float32": torch.float32, "float16": torch.float16,
            "bfloat16": torch.bfloat16}[name]


def make_inputs(p: Problem, seed=0):
    """q, k, v, dout: [B, *spatial, heads, D] in the problem's dtype."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    shape = (p.batch, *p.spatial, p.heads, p.dim)
    return tuple(torch.randn(shape, generator=gen).to(device=p.device, dtype=torch_dtype(p.dtype))
                 for _ in range(4))


def axis_windows(length, kernel):
    """[length, kernel] int64: the key indices of every query along one axis."""
    return np.array([reference.window(i, length, kernel)[0] for i in range(length)],
                    dtype=np.int64)


def gather_index(p: Problem):
    """[positions, window] flat key index of every query (row-major slots)."""
    flat = np.zeros((1, 1), dtype=np.int64)
    for length, kernel in zip(p.spatial, p.kernel):
        idx = axis_windows(length, kernel)
        flat = (flat[:, None, :, None] * length + idx[None, :, None, :]).reshape(
            flat.shape[0] * length, flat.shape[1] * kernel)
    return flat


def dense_mask(p: Problem):
    """[positions, positions] bool: query row may attend key column; the outer
    product of the per-axis masks."""
    mask = np.ones((1, 1), dtype=bool)
    for length, kernel in zip(p.spatial, p.kernel):
        axis = np.zeros((length, length), dtype=bool)
        idx = axis_windows(length, kernel)
        axis[np.arange(length)[:, None], idx] = True
        mask = (mask[:, None, :, None] & axis[None, :, None, :]).reshape(
            mask.shape[0] * length, mask.shape[1] * length)
    return mask
