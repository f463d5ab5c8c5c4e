"""Wall-clock timing: best and median of repeated calls, a method's forward
or gradient pass, and the machine's matmul ceiling."""

from __future__ import annotations

import statistics
import time

from .problem import torch_dtype


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
