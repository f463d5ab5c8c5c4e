"""What each method's output and gradients are checked against (libna
against the float64 NumPy reference, the peers against libna), and the
tolerance of that check."""

from __future__ import annotations

from libna import reference

from .methods import libna_ops, swin_partition, swin_unpartition
from .problem import Problem

TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 8e-2}


def reference_outputs(method, p, q, k, v, dout, backward):
    """What this method is checked against, and a label: libna against the
    float64 NumPy reference, the other methods against libna."""
    import torch
    fwd, bwd = libna_ops(p.rank)
    if method == "sdpa-full":
        label = "vs libna k=extent"
        ref_p = Problem(p.rank, p.spatial, p.spatial, p.batch, p.heads, p.dim, p.dtype)
        out, lse = fwd(q, k, v, ref_p.kernel, return_lse=True)
        grads = bwd(q, k, v, out, dout, lse, ref_p.kernel) if backward else None
        return label, out, grads
    if method == "swin":
        label = "vs libna per window"
        parts = [swin_partition(x, p) for x in (q, k, v, dout)]
        pq, pk, pv, pd = (x.contiguous() for x in parts)
        out, lse = fwd(pq, pk, pv, p.kernel, return_lse=True)
        grads = None
        if backward:
            grads = tuple(swin_unpartition(g, p, p.batch)
                          for g in bwd(pq, pk, pv, out, pd, lse, p.kernel))
        return label, swin_unpartition(out, p, p.batch), grads
    if method == "libna":
        label = "vs float64 reference"
        ref = getattr(reference, f"na{p.rank}d")
        ref_bwd = getattr(reference, f"na{p.rank}d_backward")
        a64 = [x.detach().cpu().to(torch.float64).numpy() for x in (q, k, v, dout)]
        out, lse = ref(*a64[:3], p.kernel, return_lse=True)
        grads = ref_bwd(*a64[:3], out, a64[3], lse, p.kernel) if backward else None
        return (label, torch.from_numpy(out),
                tuple(map(torch.from_numpy, grads)) if backward else None)
    return "vs libna", None, None  # filled in by the caller from libna's own result


def reference_affordable(p):
    """The pure-NumPy float64 reference takes ~1 s per 200k (query, key) pairs."""
    return p.tokens * p.window <= 1_000_000


def max_abs_err(a, b):
    import torch
    return float((a.detach().cpu().to(torch.float64) - b.detach().cpu().to(torch.float64))
                 .abs().max())


def tolerance(p, ref):
    import torch
    scale = max(1.0, float(ref.to(torch.float64).abs().max()))
    return TOLERANCE[p.dtype] * scale


def full_reference_affordable(p):
    return p.positions ** 2 * p.heads * p.dim * p.batch <= 8e10
