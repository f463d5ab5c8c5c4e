"""python -m libna: what this build contains, a self-check of the compiled
kernels against the float64 reference, and a timed NAT-sized forward.

    python -m libna                 # the tour
    python -m libna --cmake-dir     # for find_package(libna): -Dlibna_DIR=...
    python -m libna --include-dir   # the C++ headers
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import libna
from libna import reference

# (rank, spatial extents, kernel_size, keyword arguments)
SELF_CHECKS = [
    (1, (33,), 7, dict(dilation=2, is_causal=True)),
    (2, (14, 15), (5, 4), dict(stride=(2, 1), is_causal=(True, False))),
    (2, (12, 12), 5, dict(dilation=(2, 1), rpb=True)),
    (3, (6, 7, 8), (3, 3, 5), dict(is_causal=(True, False, False))),
]


def self_check(rng) -> bool:
    ok = True
    print("self-check against the float64 NumPy reference:")
    for rank, spatial, kernel, kw in SELF_CHECKS:
        kw = dict(kw)
        heads, heads_kv, dim = 4, 2, 16
        q = rng.standard_normal((2, *spatial, heads, dim))
        k = rng.standard_normal((2, *spatial, heads_kv, dim))
        v = rng.standard_normal((2, *spatial, heads_kv, dim))
        if kw.pop("rpb", False):
            ks = libna._ops.per_axis("self-check", "kernel_size", kernel, rank)
            kw["rpb"] = rng.standard_normal((heads, *[2 * x - 1 for x in ks]))
        ref = getattr(reference, f"na{rank}d")(q, k, v, kernel, **kw)
        worst = 0.0
        for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-5), (np.float16, 5e-3)):
            args = [x.astype(dtype) for x in (q, k, v)]
            kw_d = dict(kw, rpb=kw["rpb"].astype(dtype)) if "rpb" in kw else kw
            out = getattr(libna, f"na{rank}d")(*args, kernel, **kw_d)
            err = float(np.abs(out.astype(np.float64) - ref).max())
            ok &= err <= tol * max(1.0, float(np.abs(ref).max()))
            worst = max(worst, err / tol)
        desc = ", ".join(f"{key}={val}" for key, val in kw.items() if key != "rpb")
        desc += ", rpb" if "rpb" in kw else ""
        print(f"  na{rank}d {spatial} kernel={kernel} {desc}: "
              f"{'ok' if worst <= 1 else 'FAILED'} (worst error {worst:.2g} of tolerance)")
    return ok


def timed_forward(rng, repeats: int) -> None:
    heads, dim, kernel = 4, 32, 7
    q, k, v = (rng.standard_normal((1, 56, 56, heads, dim)).astype(np.float32)
               for _ in range(3))
    libna.na2d(q, k, v, kernel)  # warm up the thread pool
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        libna.na2d(q, k, v, kernel)
        times.append(time.perf_counter() - start)
    best = min(times)
    flops = 4 * 56 * 56 * kernel * kernel * dim * heads
    print(f"NAT level-1 forward (2D 56x56, {heads} heads, head dim {dim}, kernel {kernel}, "
          f"float32, {libna.get_num_threads()} threads):")
    print(f"  best of {repeats}: {best * 1e3:.2f} ms, {flops / best / 1e9:.1f} GFLOP/s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m libna", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cmake-dir", action="store_true",
                        help="print the directory holding libnaConfig.cmake and exit")
    parser.add_argument("--include-dir", action="store_true",
                        help="print the C++ include directory and exit")
    parser.add_argument("--repeats", type=int, default=10, help="timed forward repetitions")
    args = parser.parse_args(argv)
    if args.cmake_dir:
        print(libna.cmake_dir())
        return 0
    if args.include_dir:
        print(libna.include_dir())
        return 0

    print(f"libna {libna.__version__}")
    for key, value in libna.build_info().items():
        print(f"  {key}: {value}")
    rng = np.random.default_rng(0)
    ok = self_check(rng)
    timed_forward(rng, max(1, args.repeats))
    if not ok:
        print("self-check FAILED", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
