"""python -m libna.bench: time libna's neighborhood attention against its peers.

Every method runs on the same inputs in the same run (on the CPU, or on the
GPU with --device cuda; PyTorch tensors in the heads-last layout
[B, *spatial, heads, D]):

  libna        libna.naNd (fused forward) and libna.naNd_backward
  gather       plain PyTorch: index_select of the prod(k) neighbours of every
               query, einsum, softmax, weighted sum; backward by autograd
  sdpa-mask    torch SDPA over all tokens with a dense boolean NA mask
               (N x N entries); backward by autograd
  sdpa-full    torch SDPA full self-attention (a different operator: every
               token sees every token); checked against libna with the kernel
               spanning the whole extent, which is the same operator
  swin         Swin-style non-overlapping windows of the kernel size:
               partition + SDPA + un-partition (a different operator, given
               for speed/memory context; zero-padded to a multiple of the
               window); checked against libna run inside each window
  natten       NATTEN's naNd, when `import natten` works (skipped otherwise)
  flex         torch.nn.attention.flex_attention, torch.compile'd, with a
               block mask built from the NA rule (--device cuda only: its
               fused kernels are the GPU peer); backward by autograd

Before timing, every method's output (and gradients) is compared with
libna's, and libna's with the float64 NumPy reference (libna.reference) when
that is affordable; the bench exits with status 1 if anything disagrees
beyond the dtype's tolerance. Times are best and median of --repeats calls
after one warm-up call; --rounds R repeats the whole timing sequence R times
and keeps each row's best round (steadier on a shared machine). GFLOP/s counts NA FLOPs for every row: forward
4 * tokens * prod(kernel) * D * heads (two matmuls of 2 FLOPs per
multiply-add, softmax ignored), backward twice that, so dense methods get no
credit for the masked-out work they do. The backward time is the gradient
pass alone (forward excluded; libna recomputes the probabilities from lse).
Peak memory: each method runs in a fresh subprocess; the figure is that
child's peak RSS minus the peak RSS of a child that only builds the inputs
and allocates (and touches) the outputs. The peak is VmHWM from
/proc/self/status: Linux carries ru_maxrss over fork + exec, so a child of
this (large) process would report the parent's peak; ru_maxrss is the
fallback elsewhere. The machine ceiling is torch.matmul on 1024^3 float32 in
the same run. Subprocesses get OPENBLAS_NUM_THREADS=1 (and the bench restarts
itself with it when unset), so NumPy's idle OpenBLAS threads do not spin on
the cores being measured.

--sweep times the forward and backward per token against the token count
(fixed kernel) and against the kernel size (fixed --size) and writes PNG
plots to --out-dir; peers that would take more than --sweep-budget seconds
for a point, or more memory than half the available RAM, are skipped with a
note.

Examples:
  python -m libna.bench                         # 2D 56x56, 4 heads, D 32, k 7
  python -m libna.bench --rank 1 --size 4096 --kernel 63
  python -m libna.bench --dtype bfloat16 --no-backward
  python -m libna.bench --sweep --out-dir docs
  python -m libna.bench --methods libna,sdpa-mask --threads 1 --no-memory
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

import libna
from libna import reference

ALL_METHODS = ("libna", "gather", "sdpa-mask", "sdpa-full", "swin", "natten", "flex")
SAME_OPERATOR = {"libna", "gather", "sdpa-mask", "natten", "flex"}
CUDA_ONLY = {"flex": "CUDA only (python -m libna.bench --device cuda)"}
DEFAULTS = {  # rank: (size, kernel)
    1: (3136, 49),
    2: (56, 7),
    3: (16, 5),
}
SWEEP_SIZES = {1: [784, 3136, 12544, 50176], 2: [28, 56, 84, 112, 168, 224],
               3: [8, 12, 16, 24, 32]}
SWEEP_KERNELS = {1: [9, 25, 49, 81, 121, 169], 2: [3, 5, 7, 9, 11, 13], 3: [3, 5, 7]}
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 8e-2}
CHILD_ENV = {"OPENBLAS_NUM_THREADS": "1"}


# --------------------------------------------------------------------------
# problem and inputs
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------


def _na(rank):
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
        return _na(self.p.rank)[0](q, k, v, self.p.kernel)

    def backward_runner(self, q, k, v, dout):
        fwd, bwd = _na(self.p.rank)
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


class SdpaMaskMethod(Method):
    name = "sdpa-mask"
    note = "torch SDPA, dense bool NA mask"

    def setup(self):
        import torch
        self.mask = torch.from_numpy(dense_mask(self.p)).to(self.p.device)

    def forward(self, q, k, v):
        import torch.nn.functional as F
        p = self.p
        out = F.scaled_dot_product_attention(_to_sdpa(q, p), _to_sdpa(k, p), _to_sdpa(v, p),
                                             attn_mask=self.mask)
        return _from_sdpa(out, p)


class SdpaFullMethod(Method):
    name = "sdpa-full"
    note = "torch SDPA, full self-attention (other operator)"

    def forward(self, q, k, v):
        import torch.nn.functional as F
        p = self.p
        out = F.scaled_dot_product_attention(_to_sdpa(q, p), _to_sdpa(k, p), _to_sdpa(v, p))
        return _from_sdpa(out, p)


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


# --------------------------------------------------------------------------
# correctness
# --------------------------------------------------------------------------


def reference_outputs(method, p, q, k, v, dout, backward):
    """What this method is checked against, and a label: libna against the
    float64 NumPy reference, the other methods against libna."""
    import torch
    fwd, bwd = _na(p.rank)
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


# --------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------


def time_calls(fn, repeats, warmup=1, min_time=0.0, max_calls=200, sync=None):
    """(best, median) seconds of at least `repeats` calls after `warmup` calls,
    continuing up to max_calls until the timed calls add up to min_time.
    `sync` (torch.cuda.synchronize for CUDA work) ends each timed call."""
    if sync is not None:
        call = fn

        def fn():
            call()
            sync()
        sync()
    for _ in range(warmup):
        fn()
    times = []
    while len(times) < repeats or (sum(times) < min_time and len(times) < max_calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def time_method(m, ps, q, k, v, dout, repeats, warmup=1, min_time=0.0):
    """Times one pass ("fwd" inference or "bwd" gradient pass) of a set-up method."""
    import torch
    sync = torch.cuda.synchronize if q.is_cuda else None
    if ps == "fwd":
        with torch.no_grad():
            return time_calls(lambda: m.forward(q, k, v), repeats, warmup, min_time, sync=sync)
    runner = m.backward_runner(q, k, v, dout)
    try:
        return time_calls(runner, repeats, warmup, min_time, sync=sync)
    finally:
        del runner


def matmul_ceiling(repeats, p=None):
    """GFLOP/s of torch.matmul: 1024^3 float32 on the CPU, 4096^3 in the
    problem's dtype on CUDA."""
    import torch
    cuda = p is not None and p.device == "cuda"
    n = 4096 if cuda else 1024
    kw = dict(device="cuda", dtype=torch_dtype(p.dtype)) if cuda else {}
    a = torch.randn(n, n, **kw)
    b = torch.randn(n, n, **kw)
    best, _ = time_calls(lambda: torch.matmul(a, b), max(repeats, 5), warmup=2,
                         sync=torch.cuda.synchronize if cuda else None)
    return 2 * n ** 3 / best / 1e9


# --------------------------------------------------------------------------
# memory (fresh subprocesses)
# --------------------------------------------------------------------------


def memory_child(p: Problem, method: str, backward: bool, threads: int) -> int:
    """Runs in a fresh interpreter; prints {"fwd": bytes, "bwd": bytes}."""
    import resource
    import torch
    libna.set_num_threads(threads)
    torch.set_num_threads(threads)

    def peak():
        # Linux keeps a process's ru_maxrss across fork + exec, so a child of
        # a big parent would report the parent's peak: read the high-water
        # mark of this process's own memory (VmHWM) where there is one.
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kB elsewhere
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    q, k, v, dout = make_inputs(p)
    result = {}
    if method == "baseline":
        keep = [torch.ones_like(q)]  # out
        result["fwd"] = peak()
        if backward:
            keep += [torch.ones(q.shape[:-1], dtype=torch.float32)]  # lse
            keep += [torch.ones_like(x) for x in (q, k, v)]  # dq, dk, dv
            result["bwd"] = peak()
    else:
        m = METHOD_CLASSES[method](p)
        m.setup()
        with torch.no_grad():
            out = m.forward(q, k, v)
        result["fwd"] = peak()
        del out
        if backward:
            grads = m.backward_runner(q, k, v, dout)()
            result["bwd"] = peak()
            del grads
    print(json.dumps(result))
    return 0


def measure_memory(p, methods, backward, threads, parallel=2):
    """{method: {"fwd": MiB, "bwd": MiB} or {"error": str}}."""
    env = dict(os.environ, **CHILD_ENV)
    jobs = ["baseline", *methods]
    raw = {}
    pending = list(jobs)
    running = []

    def launch(name):
        cmd = [sys.executable, "-m", "libna.bench", "--memory-child", name,
               "--threads", str(threads), *p.argv()]
        cmd.append("--backward" if backward else "--no-backward")
        return name, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env)

    while pending or running:
        while pending and len(running) < parallel:
            running.append(launch(pending.pop(0)))
        name, proc = running.pop(0)
        out, err = proc.communicate()
        if proc.returncode == 0:
            try:
                raw[name] = json.loads(out.strip().splitlines()[-1])
            except (ValueError, IndexError):
                raw[name] = {"error": f"bad output {out[-200:]!r}"}
        else:
            last = (err.strip().splitlines() or ["?"])[-1]
            raw[name] = {"error": f"exit {proc.returncode}: {last[:120]}"}
    base = raw.get("baseline", {})
    result = {}
    for name in methods:
        r = raw.get(name, {})
        if "error" in r or "error" in base:
            result[name] = {"error": r.get("error") or base.get("error")}
            continue
        result[name] = {key: max(0.0, (r[key] - base[key]) / 2 ** 20)
                        for key in ("fwd", "bwd") if key in r and key in base}
    return result


# --------------------------------------------------------------------------
# machine description
# --------------------------------------------------------------------------


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")
                            if x in flags]
    except OSError:
        pass
    return []


def machine_lines(threads):
    import torch
    info = libna.build_info()
    avail = ""
    try:
        with open("/proc/meminfo") as f:
            mem = {l.split(":")[0]: l.split(":")[1].strip() for l in f}
        avail = f", RAM {int(mem['MemTotal'].split()[0]) / 2**20:.1f} GiB"
    except (OSError, KeyError, ValueError):
        pass
    flags = cpu_flags()
    try:
        load = "load average %.2f %.2f %.2f (1/5/15 min) at start" % os.getloadavg()
    except OSError:
        load = "load average unknown"
    return [
        f"date:    {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"machine: {cpu_model()}, {os.cpu_count()} logical cores"
        f"{' (' + ' '.join(flags) + ')' if flags else ''}{avail}, {platform.system()} "
        f"{platform.machine()}",
        f"libna:   {info.get('version')} backends={','.join(info.get('backends', []))} "
        f"simd={info.get('simd')} compiler={info.get('compiler')}",
        f"torch:   {torch.__version__}, numpy {np.__version__}, python "
        f"{platform.python_version()}",
        f"threads: {threads} (libna and torch); OPENBLAS_NUM_THREADS="
        f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}; {load}",
    ]


# --------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------


def fmt_ms(t):
    return "-" if t is None else (f"{t * 1e3:.3f}" if t < 0.01 else f"{t * 1e3:.2f}"
                                  if t < 1 else f"{t * 1e3:.0f}")


def markdown_table(headers, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    align = ["---"] + ["--:"] * (len(headers) - 1)
    lines = ["| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths)) + " |",
             "| " + " | ".join(a.rjust(w, "-") if a.startswith("-") and a.endswith(":")
                               else a.ljust(w, "-") for a, w in zip(align, widths)) + " |"]
    for r in rows:
        cells = [str(r[0]).ljust(widths[0])] + [str(c).rjust(w) for c, w in
                                                 zip(r[1:], widths[1:])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_table(args, p: Problem) -> int:
    import torch
    threads = args.threads
    print("# libna benchmark")
    for line in machine_lines(threads):
        print(line)
    if p.device == "cuda":
        print(f"gpu:     {torch.cuda.get_device_name()} (torch CUDA {torch.version.cuda}); "
              f"libna CUDA architectures {','.join(libna.build_info()['cuda_architectures'])}")
    print(f"problem: {p.describe()}")
    print(flush=True)

    methods = [m for m in args.methods if m in ALL_METHODS]
    skipped = {}
    have_natten, natten_note = natten_available()
    if "natten" in methods and not have_natten:
        skipped["natten"] = natten_note
    for name, why in CUDA_ONLY.items():
        if name in methods and p.device != "cuda":
            skipped[name] = why
    q, k, v, dout = make_inputs(p)
    backward = args.backward

    # libna first: it is the reference for the correctness column
    libna_m = LibnaMethod(p)
    libna_out = libna_m.forward(q, k, v)
    libna_grads = libna_m.backward_runner(q, k, v, dout)() if backward else None

    results = {}  # name -> dict
    failures = []
    for name in methods:
        if name in skipped:
            continue
        m = METHOD_CLASSES[name](p)
        r = {"note": m.note}
        try:
            m.setup()
            with torch.no_grad():
                out = m.forward(q, k, v)
            grads = m.backward_runner(q, k, v, dout)() if backward else None
        except Exception as error:  # report and carry on with the other methods
            skipped[name] = f"failed: {type(error).__name__}: {str(error)[:160]}"
            continue
        if name == "sdpa-full" and not full_reference_affordable(p):
            r["err_label"] = "not checked (libna k=extent too slow)"
        elif name == "libna" and not reference_affordable(p):
            r["err_label"] = "not checked (float64 reference too slow)"
        else:
            label, ref_out, ref_grads = reference_outputs(name, p, q, k, v, dout, backward)
            if ref_out is None:
                ref_out, ref_grads = libna_out, libna_grads
            r["err_label"] = label
            r["fwd_err"] = max_abs_err(out, ref_out)
            r["fwd_ok"] = r["fwd_err"] <= tolerance(p, ref_out)
            if backward:
                errs = [max_abs_err(g, rg) for g, rg in zip(grads, ref_grads)]
                r["bwd_err"] = max(errs)
                r["bwd_ok"] = all(e <= tolerance(p, rg) for e, rg in zip(errs, ref_grads))
            if not r["fwd_ok"] or not r.get("bwd_ok", True):
                failures.append(name)
        del out, grads
        results[name] = r
        print(f"checked {name}: max abs err fwd {r.get('fwd_err', float('nan')):.2e}"
              + (f", bwd {r.get('bwd_err', float('nan')):.2e}" if backward else ""),
              flush=True)

    # timing, method after method on the same inputs; with --rounds R the
    # whole sequence runs R times and each row keeps its best round
    passes = ["fwd", "bwd"] if backward else ["fwd"]
    ceiling = 0.0
    for rnd in range(args.rounds):
        for name, r in results.items():
            m = METHOD_CLASSES[name](p)
            m.setup()
            for ps in passes:
                timing = time_method(m, ps, q, k, v, dout, args.repeats)
                if ps not in r or timing[0] < r[ps][0]:
                    r[ps] = timing
            del m
            rounds = f" (round {rnd + 1}/{args.rounds})" if args.rounds > 1 else ""
            print(f"timed {name}{rounds}: fwd {fmt_ms(r['fwd'][0])} ms"
                  + (f", bwd {fmt_ms(r['bwd'][0])} ms" if backward else "")
                  + (" (best so far)" if rnd else ""), flush=True)
        ceiling = max(ceiling, matmul_ceiling(args.repeats, p))

    memory = {}
    if args.memory:
        print("measuring peak memory in fresh subprocesses ...", flush=True)
        memory = measure_memory(p, list(results), backward, threads)
    print()

    sections = [("fwd", "forward", 1)] + ([("bwd", "backward", 2)] if backward else [])
    for key, title, mult in sections:
        flops = mult * p.fwd_flops()
        base = results.get("libna", {}).get(key, (None,))[0]
        rows = []
        for name, r in results.items():
            best, median = r[key]
            err = r.get(f"{key}_err")
            err_s = "-" if err is None else f"{err:.1e}" + ("" if r[f"{key}_ok"] else " FAIL")
            mem = memory.get(name, {})
            mem_s = ("error" if "error" in mem else f"{mem[key]:.1f}" if key in mem else "-")
            speed = f"{best / base:.2f}x" if base else "-"
            rows.append([name, fmt_ms(best), fmt_ms(median), f"{flops / best / 1e9:.3g}",
                         err_s, mem_s, speed])
        for name, why in skipped.items():
            rows.append([name, "-", "-", "-", "-", "-", "-"])
        print(f"## {title} ({p.describe()}, {threads} threads)")
        print()
        print(markdown_table(["method", "best ms", "median ms", "GFLOP/s", "max abs err",
                              "peak extra MiB", "libna speed-up"], rows))
        print()
    ceiling_what = (f"4096^3 {p.dtype} on {torch.cuda.get_device_name()}" if p.device == "cuda"
                    else "1024^3 float32")
    print(f"machine ceiling: torch.matmul {ceiling_what} = {ceiling:.1f} GFLOP/s; ", end="")
    if "libna" in results:
        libna_gf = p.fwd_flops() / results["libna"]["fwd"][0] / 1e9
        print(f"libna forward = {libna_gf:.1f} GFLOP/s = {100 * libna_gf / ceiling:.0f}% of it"
              + (f" ({p.dtype} inputs)" if p.dtype != "float32" else ""))
    else:
        print()
    print()
    print("notes:")
    rounds = (f"; the whole timing sequence ran {args.rounds} times and each row keeps "
              "its best round" if args.rounds > 1 else "")
    print(f"- times: best and median of {args.repeats} calls after 1 warm-up call{rounds}; "
          "backward = gradient pass only (forward excluded)")
    print(f"- GFLOP/s = NA FLOPs / best time; forward NA FLOPs = 4 * tokens * prod(kernel) * "
          f"D * heads = {p.fwd_flops() / 1e9:.3f} GFLOP, backward counted as 2x forward; "
          "dense methods get no credit for the extra work they do")
    if "sdpa-full" in results or "sdpa-mask" in results:
        dense = 4 * p.batch * p.positions ** 2 * p.dim * p.heads
        print(f"- sdpa-mask/sdpa-full compute all N^2 scores: {dense / 1e9:.3f} GFLOP forward "
              f"({dense / p.fwd_flops():.0f}x the NA work)")
    print("- libna speed-up = that row's best time / libna's best time (>1: libna is faster)")
    print("- peak extra MiB: peak RSS (VmHWM; ru_maxrss off Linux) of a fresh process that "
          "builds the inputs and runs the method, minus that of one that only builds the "
          "inputs and allocates the outputs; backward: forward with autograd + gradient pass" +
          ("" if args.memory else " (not measured: --no-memory)"))
    for name, r in results.items():
        if r.get("err_label", "vs libna") != "vs libna":
            print(f"- {name}: {r['note']}; max abs err {r['err_label']}")
        elif name in SAME_OPERATOR:
            print(f"- {name}: {r['note']}; max abs err vs libna")
        if "error" in memory.get(name, {}):
            print(f"- {name}: memory measurement failed: {memory[name]['error']}")
    if "swin" in results and swin_geometry(p)[0] != p.spatial:
        print(f"- swin: extent zero-padded to {swin_geometry(p)[0]} (whole windows)")
    for name, why in skipped.items():
        print(f"- {name}: skipped: {why}")
    print(f"- tolerance: {TOLERANCE[p.dtype]:g} x max(1, max|reference|) ({p.dtype})")
    if failures:
        print(f"FAILED: {', '.join(failures)} disagree with libna beyond tolerance")
        return 1
    else:
        print("correctness: every method agrees with libna, and libna with the float64 reference "
              "where checked, within tolerance")
    return 0


# --------------------------------------------------------------------------
# sweep
# --------------------------------------------------------------------------


def mem_available():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 8 * 2 ** 30


def estimated_bytes(name, p: Problem, backward):
    es = {"float32": 4, "float16": 2, "bfloat16": 2}[p.dtype]
    nkhd = p.tokens * p.window * p.heads * p.dim
    if name == "gather":
        fwd = 2 * nkhd * es + 2 * p.tokens * p.window * p.heads * 4
        return fwd * (3 if backward else 1)
    if name == "sdpa-mask":
        return p.positions ** 2  # the bool mask; the CPU flash kernel tiles the scores
    return 0


def work(name, p: Problem):
    """Proportional to the method's running time (for extrapolation)."""
    if name in ("sdpa-mask", "sdpa-full"):
        return p.batch * p.positions ** 2 * p.heads * p.dim
    return p.tokens * p.window * p.heads * p.dim


def run_sweep(args) -> int:
    import torch
    rank = args.rank
    print("# libna sweep: time per token")
    for line in machine_lines(args.threads):
        print(line)
    sizes = args.sweep_sizes or SWEEP_SIZES[rank]
    kernels = args.sweep_kernels or SWEEP_KERNELS[rank]
    base_size = args.size
    kernel = args.kernel
    print(f"token sweep: extents {sizes} per axis, kernel {kernel[0]}; kernel sweep: kernels "
          f"{kernels} at {'x'.join(map(str, base_size))}; B={args.batch}, {args.heads} heads, "
          f"D {args.dim}, {args.dtype}; best of >= {args.repeats} timed calls (and >= "
          f"{args.sweep_min_time:g} s) after 2 warm-up calls; the sweep runs {args.rounds} "
          f"time(s), each point keeps its best; peers skipped "
          f"beyond ~{args.sweep_budget:g} s per point or half the available memory",
          flush=True)
    methods = [m for m in args.methods if m in ALL_METHODS and m not in CUDA_ONLY]
    notes = []
    if "natten" in methods:
        ok, why = natten_available()
        if not ok:
            methods.remove("natten")
            notes.append(f"natten: skipped: {why}")
    passes = ["fwd", "bwd"] if args.backward else ["fwd"]
    series = {
        "tokens": [Problem(rank, (s,) * rank, kernel, args.batch, args.heads, args.dim,
                           args.dtype) for s in sizes if s >= kernel[0]],
        "kernel": [Problem(rank, base_size, (kk,) * rank, args.batch, args.heads, args.dim,
                           args.dtype) for kk in kernels if kk <= min(base_size)],
    }
    results = {sweep: {ps: {m: [] for m in methods} for ps in passes} for sweep in series}
    mem_limit = mem_available() / 2
    # --rounds R runs the whole sweep R times (spread over time, so that a
    # burst of load on a shared machine hits one round only) and keeps each
    # point's best; the skip decisions of the first round hold for the rest
    dead = {}  # (sweep, pass, method) -> index of the first skipped point
    for rnd in range(args.rounds):
        for sweep, problems in series.items():
            last = {}  # (pass, method) -> (time, work) of the previous point
            for i, p in enumerate(problems):
                q, k, v, dout = make_inputs(p)
                for name in methods:
                    for ps in passes:
                        key = (sweep, ps, name)
                        tag = f"[{sweep}] {ps} {name:9s} {p.short():>14s}"
                        if args.rounds > 1:
                            tag += f" ({rnd + 1}/{args.rounds})"
                        if key in dead and i >= dead[key]:
                            if rnd == 0:
                                print(f"{tag}: skipped (skipped at a smaller point)", flush=True)
                            continue
                        why = None
                        need = estimated_bytes(name, p, ps == "bwd")
                        if rnd == 0 and need > mem_limit:
                            why = f"skipped: needs ~{need / 2**30:.1f} GiB"
                        elif rnd == 0 and (ps, name) in last:
                            t0, w0 = last[(ps, name)]
                            predicted = t0 * work(name, p) / w0
                            calls = args.repeats + 2
                            if predicted * calls * args.rounds > args.sweep_budget:
                                why = f"skipped: predicted {predicted:.2g} s per call"
                        if why is None:
                            try:
                                m = METHOD_CLASSES[name](p)
                                m.setup()
                                best, _ = time_method(m, ps, q, k, v, dout, args.repeats,
                                                      warmup=2, min_time=args.sweep_min_time)
                                del m
                            except Exception as error:
                                why = f"failed: {type(error).__name__}: {str(error)[:120]}"
                        if why:
                            notes.append(f"{sweep} {ps} {name} at {p.short()}: {why}")
                            dead[key] = i
                            print(f"{tag}: {why}", flush=True)
                            continue
                        last[(ps, name)] = (best, work(name, p))
                        pts = results[sweep][ps][name]
                        if rnd == 0:
                            pts.append((p, best))
                        else:
                            j = next(j for j, (pp, _) in enumerate(pts) if pp is p)
                            best = min(best, pts[j][1])
                            pts[j] = (p, best)
                        print(f"{tag}: {fmt_ms(best)} ms, {best / p.tokens * 1e6:.3g} us/token"
                              + (" (best so far)" if rnd else ""), flush=True)
                del q, k, v, dout
    print()
    for sweep, problems in series.items():
        for ps in passes:
            rows = []
            for p in problems:
                row = [p.short(), str(p.tokens)]
                for name in methods:
                    hit = [t for pp, t in results[sweep][ps][name] if pp is p]
                    row.append(f"{hit[0] / p.tokens * 1e6:.3g}" if hit else "-")
                rows.append(row)
            print(f"## {ps}, us per token, {'vs token count' if sweep == 'tokens' else 'vs kernel size'}")
            print()
            print(markdown_table(["problem", "tokens", *methods], rows))
            print()
    if notes:
        print("notes:")
        for n in notes:
            print(f"- {n}")
    files = plot_sweep(args, series, results, methods, passes)
    for f in files:
        print(f"wrote {f}")
    return 0


STYLE = {"libna": dict(color="C3", marker="o", linewidth=2.2),
         "gather": dict(color="C0", marker="s"),
         "sdpa-mask": dict(color="C1", marker="^"),
         "sdpa-full": dict(color="C7", marker="v", linestyle=":"),
         "swin": dict(color="C2", marker="D", linestyle="--"),
         "natten": dict(color="C4", marker="P")}


def plot_sweep(args, series, results, methods, passes):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(args.out_dir, exist_ok=True)
    files = []
    prefix = f"bench_na{args.rank}d"
    titles = {"fwd": "forward", "bwd": "backward (gradient pass)"}
    for sweep in series:
        fig, axes = plt.subplots(1, len(passes), figsize=(6.2 * len(passes), 4.6),
                                 squeeze=False)
        for ax, ps in zip(axes[0], passes):
            for name in methods:
                pts = results[sweep][ps][name]
                if not pts:
                    continue
                xs = [p.tokens if sweep == "tokens" else p.kernel[0] for p, _ in pts]
                ys = [t / p.tokens * 1e6 for p, t in pts]
                ax.plot(xs, ys, label=name, **STYLE.get(name, {}))
            ax.set_yscale("log")
            if sweep == "tokens":
                ax.set_xscale("log")
                ax.set_xlabel("tokens (k = %s)" % args.kernel[0])
            else:
                ax.set_xlabel(f"kernel size (extent {'x'.join(map(str, args.size))})")
            ax.set_ylabel("time per token [µs]")
            ax.set_title(titles[ps])
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"na{args.rank}d, {args.heads} heads, D {args.dim}, {args.dtype}, "
                     f"{args.threads} threads, {cpu_model()}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(args.out_dir, f"{prefix}_sweep_{sweep}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------


def _int_list(text):
    try:
        values = [int(x) for x in text.replace("x", ",").split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of ints")
    if not values or any(x < 1 for x in values):
        raise argparse.ArgumentTypeError(f"{text!r} must hold positive ints")
    return values


def _extent(text):
    values = [x for x in text.lower().split("x") if x]
    try:
        values = [int(x) for x in values]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int or AxB[xC]")
    if not values or any(x < 1 for x in values):
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return values


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m libna.bench", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, choices=(1, 2, 3), default=2,
                        help="spatial rank: 1 (sequence), 2 (image, default), 3 (volume)")
    parser.add_argument("--size", type=_extent, default=None,
                        help="extent per axis, an int or AxB[xC] (default: 3136 for rank 1, "
                             "56 for rank 2, 16 for rank 3)")
    parser.add_argument("--kernel", type=_extent, default=None,
                        help="kernel size, an int or AxB[xC] (default: 49 / 7 / 5 for "
                             "rank 1 / 2 / 3)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--dim", type=int, default=32, help="head dim (default 32)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                        default="float32", help="input dtype (default float32)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where every method runs (default cpu); cuda times with "
                             "torch.cuda.synchronize after each call and skips the peak-memory "
                             "column")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for libna and torch (default libna.get_num_threads())")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per measurement after one warm-up "
                             "(default 10; 3 with --sweep)")
    parser.add_argument("--backward", action=argparse.BooleanOptionalAction, default=True,
                        help="also time and check the backward pass (default on)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the whole timing sequence this many times, interleaved, and "
                             "keep each row's (each point's) best round: steadier numbers on a "
                             "shared machine (default 1)")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                        help="measure peak memory in fresh subprocesses (default on)")
    parser.add_argument("--methods", type=lambda s: [x.strip() for x in s.split(",")
                                                     if x.strip()],
                        default=list(ALL_METHODS),
                        help=f"comma-separated subset of {','.join(ALL_METHODS)} "
                             "(default all; libna is always run)")
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--sweep", action="store_true",
                       help="time per token vs token count (kernel --kernel) and vs kernel "
                            "size (extent --size); write PNG plots to --out-dir")
    sweep.add_argument("--sweep-sizes", type=_int_list, default=None,
                       help="extents per axis for the token sweep, e.g. 28,56,112 (default "
                            "28,56,84,112,168,224 for rank 2)")
    sweep.add_argument("--sweep-kernels", type=_int_list, default=None,
                       help="kernel sizes for the kernel sweep (default 3,5,...,13 for rank 2)")
    sweep.add_argument("--sweep-budget", type=float, default=20.0,
                       help="skip a peer at a point predicted to take longer than this many "
                            "seconds in all (default 20)")
    sweep.add_argument("--sweep-min-time", type=float, default=0.5,
                       help="keep timing a point until its calls add up to this many seconds "
                            "(default 0.5; at least --repeats calls)")
    sweep.add_argument("--out-dir", default="docs",
                       help="where --sweep writes its PNG files (default docs/)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # for anything started from here
    rank = args.rank
    size, kernel = DEFAULTS[rank]
    args.size = args.size or [size]
    args.kernel = args.kernel or [kernel]
    for name in ("size", "kernel"):
        value = getattr(args, name)
        if len(value) == 1:
            value = value * rank
        if len(value) != rank:
            print(f"error: --{name} {'x'.join(map(str, value))} needs 1 or {rank} values "
                  f"for rank {rank}", file=sys.stderr)
            return 2
        setattr(args, name, value)
    if any(k > s for k, s in zip(args.kernel, args.size)) and not args.sweep:
        print(f"error: --kernel {args.kernel} exceeds --size {args.size}", file=sys.stderr)
        return 2
    if args.repeats is None:
        args.repeats = 3 if args.sweep else 10
    if min(args.repeats, args.rounds, args.batch, args.heads, args.dim) < 1:
        print("error: --repeats, --rounds, --batch, --heads and --dim must be >= 1",
              file=sys.stderr)
        return 2
    bad = [m for m in args.methods if m not in ALL_METHODS]
    if bad:
        print(f"error: unknown method(s) {bad}; choose from {', '.join(ALL_METHODS)}",
              file=sys.stderr)
        return 2
    if "libna" not in args.methods:
        args.methods = ["libna", *args.methods]
    args.methods = [m for m in ALL_METHODS if m in args.methods]
    if args.threads is None:
        args.threads = libna.get_num_threads()
    if args.threads < 1:
        print("error: --threads must be >= 1", file=sys.stderr)
        return 2
    import torch
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("error: --device cuda needs a CUDA device visible to PyTorch", file=sys.stderr)
            return 2
        if "cuda" not in libna.build_info()["backends"]:
            print("error: --device cuda needs libna built with CUDA", file=sys.stderr)
            return 2
        if args.sweep:
            print("error: --sweep runs on the CPU only (for now)", file=sys.stderr)
            return 2
        args.memory = False  # peak RSS of child processes says nothing about GPU memory
    libna.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    p = Problem(rank, args.size, args.kernel, args.batch, args.heads, args.dim, args.dtype,
                args.device)
    if args.memory_child:
        return memory_child(p, args.memory_child, args.backward, args.threads)
    if args.sweep:
        return run_sweep(args)
    return run_table(args, p)


if __name__ == "__main__":
    # NumPy's OpenBLAS threads spin and steal cores from the kernels being
    # timed: start again with one OpenBLAS thread unless the caller chose.
    if "OPENBLAS_NUM_THREADS" not in os.environ:
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "libna.bench", *sys.argv[1:]])
    sys.exit(main())
