"""The timed methods, libna and its peers, by name: each a Method whose
setup() builds what it needs (not timed), forward() runs inference and
backward_runner() the gradient pass."""

from __future__ import annotations

import math

import libna

from .problem import Problem, axis_windows, dense_mask, gather_index

ALL_METHODS = ("libna", "gather", "sdpa-mask", "sdpa-full", "swin", "natten", "flex")
SAME_OPERATOR = {"libna", "gather", "sdpa-mask", "natten", "flex"}
CUDA_ONLY = {"flex": "CUDA only (python -m libna.bench --device cuda)"}


def libna_ops(rank):
    """libna's fused forward and backward of this rank: (naNd, naNd_backward)."""
    return getattr(libna, f"na{rank}d"), getattr(libna, f"na{rank}d_backward")


def _to_sdpa(x, p):  # [B, *S, h, D] -> [B, h, N, D] (a view)
    return x.reshape(x.shape[0], p.positions, p.heads, x.shape[-1]).transpose(1, 2)


def _from_sdpa(x, p):  # [B, h, N, D] -> [B, *S, h, D]
    return x.transpose(1, 2).reshape(x.shape[0], *p.spatial, p.heads, x.shape[-1])


def swin_geometry(p: Problem):
    padded = tuple(-(-s // k) * k for s, k in zip(p.spatial, p.kernel))
    return padded, tuple(s // k for s, k in zip(padded, p.kernel))


def swin_partition(x, p):
    """[B, *S, h, D] -> [B * windows, *kernel, h, D] (zero-padded to whole windows)."""
    import torch.nn.functional as F
    padded, counts = swin_geometry(p)
    pad = []
    for s, ps in reversed(list(zip(p.spatial, padded))):
        pad += [0, ps - s]
    if padded != p.spatial:
        x = F.pad(x, [0, 0, 0, 0] + pad)
    r = p.rank
    split = [x.shape[0]]
    for c, k in zip(counts, p.kernel):
        split += [c, k]
    x = x.reshape(*split, x.shape[-2], x.shape[-1])
    order = [0] + [1 + 2 * a for a in range(r)] + [2 + 2 * a for a in range(r)]
    x = x.permute(*order, 2 * r + 1, 2 * r + 2)
    return x.reshape(-1, *p.kernel, x.shape[-2], x.shape[-1])


def swin_unpartition(x, p, batch):
    padded, counts = swin_geometry(p)
    r = p.rank
    x = x.reshape(batch, *counts, *p.kernel, x.shape[-2], x.shape[-1])
    order = [0]
    for a in range(r):
        order += [1 + a, 1 + r + a]
    x = x.permute(*order, 2 * r + 1, 2 * r + 2).reshape(batch, *padded, x.shape[-2],
                                                       x.shape[-1])
    if padded != p.spatial:
        x = x[(slice(None),) + tuple(slice(0, s) for s in p.spatial)]
    return x


def natten_function(rank):
    import natten
    fn = getattr(natten, f"na{rank}d", None)
    if fn is None:
        fn = getattr(getattr(natten, "functional", None), f"na{rank}d", None)
    if fn is None:
        raise RuntimeError(f"natten {getattr(natten, '__version__', '?')} has no na{rank}d")
    return fn


class Method:
    """setup() builds what the method needs (not timed); forward(q, k, v) runs
    inference; backward_runner(q, k, v, dout) runs the forward it needs and
    returns a callable doing the gradient pass only, returning (dq, dk, dv)."""

    name = ""
    note = ""

    def __init__(self, p: Problem):
        self.p = p

    def setup(self):
        pass

    def forward(self, q, k, v):
        raise NotImplementedError

    def _autograd_forward(self, q, k, v):
        return self.forward(q, k, v)

    def backward_runner(self, q, k, v, dout):
        import torch
        leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
        with torch.enable_grad():
            out = self._autograd_forward(*leaves)

        def run():
            for x in leaves:
                x.grad = None
            out.backward(dout, retain_graph=True)
            return tuple(x.grad for x in leaves)
        return run


class LibnaMethod(Method):
    name = "libna"
    note = "libna fused kernels"

    def forward(self, q, k, v):
        return libna_ops(self.p.rank)[0](q, k, v, self.p.kernel)

    def backward_runner(self, q, k, v, dout):
        fwd, bwd = libna_ops(self.p.rank)
        out, lse = fwd(q, k, v, self.p.kernel, return_lse=True)
        return lambda: bwd(q, k, v, out, dout, lse, self.p.kernel)


class GatherMethod(Method):
    name = "gather"
    note = "PyTorch index_select + einsum + softmax"

    def setup(self):
        import torch
        self.index = torch.from_numpy(gather_index(self.p).reshape(-1)).to(self.p.device)

    def forward(self, q, k, v):
        import torch
        p = self.p
        b, n, h, d = q.shape[0], p.positions, p.heads, q.shape[-1]
        qf = q.reshape(b, n, h, d) * (d ** -0.5)
        kg = k.reshape(b, n, h, d).index_select(1, self.index).view(b, n, p.window, h, d)
        vg = v.reshape(b, n, h, v.shape[-1]).index_select(1, self.index).view(
            b, n, p.window, h, v.shape[-1])
        attn = torch.einsum("bnhd,bnkhd->bnhk", qf, kg).softmax(dim=-1)
        out = torch.einsum("bnhk,bnkhd->bnhd", attn, vg)
        return out.reshape(b, *p.spatial, h, v.shape[-1])


class SdpaMethod(Method):
    """torch SDPA over all tokens with attn_mask=self.mask (None: every
    token sees every token)."""

    mask = None

    def forward(self, q, k, v):
        import torch.nn.functional as F
        p = self.p
        out = F.scaled_dot_product_attention(_to_sdpa(q, p), _to_sdpa(k, p), _to_sdpa(v, p),
                                             attn_mask=self.mask)
        return _from_sdpa(out, p)


class SdpaMaskMethod(SdpaMethod):
    name = "sdpa-mask"
    note = "torch SDPA, dense bool NA mask"

    def setup(self):
        import torch
        self.mask = torch.from_numpy(dense_mask(self.p)).to(self.p.device)


class SdpaFullMethod(SdpaMethod):
    name = "sdpa-full"
    note = "torch SDPA, full self-attention (other operator)"


class SwinMethod(Method):
    name = "swin"
    note = "Swin windows of the kernel size (other operator)"

    def forward(self, q, k, v):
        import torch.nn.functional as F
        p = self.p
        parts = [swin_partition(x, p) for x in (q, k, v)]
        nw = parts[0].shape[0]
        sd = [x.reshape(nw, p.window, p.heads, x.shape[-1]).transpose(1, 2) for x in parts]
        out = F.scaled_dot_product_attention(*sd)
        out = out.transpose(1, 2).reshape(nw, *p.kernel, p.heads, out.shape[-1])
        return swin_unpartition(out, p, q.shape[0])


class NattenMethod(Method):
    name = "natten"
    note = "NATTEN"

    def setup(self):
        self.fn = natten_function(self.p.rank)

    def forward(self, q, k, v):
        return self.fn(q, k, v, kernel_size=self.p.kernel)


def na_mask_mod(p: Problem):
    """A flex_attention mask_mod of the NA rule: per axis, key coordinate in
    [start(query coordinate), start + kernel). O(extent) tables, no N x N mask."""
    import torch
    starts = [torch.from_numpy(axis_windows(length, kernel)[:, 0]).to(p.device)
              for length, kernel in zip(p.spatial, p.kernel)]
    strides = [math.prod(p.spatial[a + 1:]) for a in range(p.rank)]

    def mask_mod(b, h, q_idx, kv_idx):
        keep = None
        for start, stride, length, kernel in zip(starts, strides, p.spatial, p.kernel):
            qa = (q_idx // stride) % length
            ka = (kv_idx // stride) % length
            first = start[qa]
            axis = (first <= ka) & (ka < first + kernel)
            keep = axis if keep is None else keep & axis
        return keep
    return mask_mod


class FlexMethod(Method):
    name = "flex"
    note = "torch flex_attention (compiled), NA block mask"
    compile = True  # the tests run it eagerly on tiny CPU problems

    def setup(self):
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        p = self.p
        self.block_mask = create_block_mask(na_mask_mod(p), None, None, p.positions,
                                            p.positions, device=p.device)
        self.fn = torch.compile(flex_attention, dynamic=False) if self.compile else flex_attention

    def forward(self, q, k, v):
        p = self.p
        out = self.fn(_to_sdpa(q, p), _to_sdpa(k, p), _to_sdpa(v, p), block_mask=self.block_mask)
        return _from_sdpa(out, p)


METHOD_CLASSES = {c.name: c for c in (LibnaMethod, GatherMethod, SdpaMaskMethod,
                                      SdpaFullMethod, SwinMethod, NattenMethod, FlexMethod)}


def natten_available():
    try:
        import natten  # noqa: F401
    except Exception as error:  # ImportError, or a broken install
        return False, f"natten not importable ({type(error).__name__}: {error})"
    return True, f"natten {getattr(natten, '__version__', '?')}"
