"""``python -m libna.bench --overhead``: what a small call costs.

Per-call wall time of libna's fused forward on small problems (the 7x7
single-head call and the last two levels of NAT), from NumPy and through
``libna.torch`` (eager, with and without autograd), next to a same-process
elementwise add of the same size in the same framework: the add is the
floor a framework's own call costs, so ``libna / add`` says how much of the
call is libna's and is comparable across machines."""

from __future__ import annotations

import numpy as np

import libna

from .timing import time_calls

# (name, batch, spatial, heads, head dim)
PROBLEMS = [
    ("7x7, 1 head, D 8", 1, (7, 7), 1, 8),
    ("NAT level 3: 8 x 14x14, 8 heads, D 32", 8, (14, 14), 8, 32),
    ("NAT level 4: 8 x 7x7, 16 heads, D 32", 8, (7, 7), 16, 32),
]


def _us(fn, calls):
    best, _ = time_calls(fn, calls, warmup=max(3, calls // 10), max_calls=calls)
    return best * 1e6


def run_overhead(args) -> int:
    import torch
    import libna.torch as lt

    calls = args.repeats
    rng = np.random.default_rng(0)
    print(f"libna {libna.__version__}, {args.threads} thread(s); best of {calls} calls; "
          "kernel 7 (the whole 7x7 window at 7x7)")
    header = (f"{'problem':40s} {'caller':24s} {'libna us':>9s} {'add us':>8s} "
              f"{'libna-add us':>13s}")
    print(header)
    print("-" * len(header))
    for name, batch, spatial, heads, dim in PROBLEMS:
        q = rng.standard_normal((batch, *spatial, heads, dim)).astype(np.float32)
        tq = torch.from_numpy(q)
        tq_grad = tq.clone().requires_grad_()
        rows = [
            ("NumPy", lambda: libna.na2d(q, q, q, 7), lambda: np.add(q, q)),
            ("libna.torch, no_grad", None, lambda: torch.add(tq, tq)),
            ("libna.torch, autograd", lambda: lt.na2d(tq_grad, tq_grad, tq_grad, 7),
             lambda: torch.add(tq_grad, tq_grad)),
        ]
        for caller, call, add in rows:
            if call is None:
                def call():
                    with torch.no_grad():
                        return lt.na2d(tq, tq, tq, 7)

                def add(add=add):
                    with torch.no_grad():
                        return add()
            ours, floor = _us(call, calls), _us(add, calls)
            print(f"{name:40s} {caller:24s} {ours:9.1f} {floor:8.1f} {ours - floor:13.1f}")
    return 0
