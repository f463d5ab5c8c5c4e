"""A/B of environment settings, alternating fresh processes.

    python -m libna.bench.alternate --env LIBNA_CPU_ROW_PAIRS=0,1 \\
        --shape 8,14,14,8,32 --kernel 7 --pass backward [--rounds 5] [--calls 8]

On a shared VM whose speed drifts by tens of percent from one minute to the
next, two settings timed one after the other compare the machine's phases,
not the settings. Here each round runs one fresh process per setting, in
turn, and each process times ``--calls`` calls of ``libna.na{rank}d`` (or
its backward) on NumPy arrays of ``--shape`` ([B, *spatial, heads,
D]; ``--dtype`` float32, float16 or bfloat16) after one warm-up call and
reports its best; the table gives each setting's median over the rounds,
every round's value, and the ratio of the medians to the first setting's.
Settings that libna reads once per process (LIBNA_CPU_ROW_PAIRS,
LIBNA_CPU_KERNELS, LIBNA_CPU_AMX, LIBNA_CPU_SAVED_PROBS_BYTES, ...) can only
be compared this way.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

# The child: times the calls and prints the best, in ms.
_CHILD = """
import sys, time
import numpy as np, libna
shape, kernel, mode, calls, threads = {shape!r}, {kernel!r}, {mode!r}, {calls!r}, {threads!r}
dtype = {dtype!r}
if dtype == "bfloat16":
    import ml_dtypes
    dtype = ml_dtypes.bfloat16
libna.set_num_threads(threads)
rank = len(shape) - 3
forward = getattr(libna, f"na{{rank}}d")
backward = getattr(libna, f"na{{rank}}d_backward")
rng = np.random.default_rng(0)
q, k, v, dout = (rng.standard_normal(shape, dtype=np.float32).astype(dtype) for _ in range(4))
out, lse = forward(q, k, v, kernel, return_lse=True)
call = ((lambda: forward(q, k, v, kernel)) if mode == "forward"
        else (lambda: backward(q, k, v, out, dout, lse, kernel)))
call()
best = float("inf")
for _ in range(calls):
    start = time.perf_counter()
    call()
    best = min(best, time.perf_counter() - start)
print(f"best_ms {{best * 1e3:.6f}}")
"""


def _ints(text: str, name: str) -> tuple:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}={text!r} must be comma-separated ints") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{name}={text!r} must be positive ints")
    return values


def _settings(text: str) -> tuple:
    name, sep, values = text.partition("=")
    if not sep or not name or not values:
        raise argparse.ArgumentTypeError(
            f"--env={text!r} must be NAME=VALUE[,VALUE...], e.g. LIBNA_CPU_ROW_PAIRS=0,1")
    choices = values.split(",")
    if len(choices) < 2:
        raise argparse.ArgumentTypeError(f"--env={text!r} names one value; give two or more")
    return name, tuple(choices)


def run_one(name: str, value: str, shape, kernel, mode: str, calls: int, threads: int,
            dtype: str = "float32") -> float:
    """One fresh process with name=value: its best of `calls` calls, in ms."""
    code = _CHILD.format(shape=tuple(shape), kernel=kernel, mode=mode, calls=calls,
                         threads=threads, dtype=dtype)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", **{name: value})
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=600, check=False)
    for line in result.stdout.splitlines():
        if line.startswith("best_ms "):
            return float(line.split()[1])
    raise RuntimeError(f"the timing process with {name}={value} failed:\n"
                       f"{result.stdout[-2000:]}{result.stderr[-2000:]}")


def main(argv=None, run=run_one) -> int:
    parser = argparse.ArgumentParser(prog="python -m libna.bench.alternate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", type=_settings, required=True,
                        help="NAME=VALUE,VALUE[,...]: the settings to alternate")
    parser.add_argument("--shape", type=lambda t: _ints(t, "--shape"), required=True,
                        help="B,spatial...,heads,D (4 to 6 ints: 1D to 3D)")
    parser.add_argument("--kernel", type=lambda t: _ints(t, "--kernel"), default=(7,),
                        help="kernel size: an int, or one per spatial axis (default 7)")
    parser.add_argument("--pass", dest="mode", choices=("forward", "backward"),
                        default="forward", help="what to time (default forward)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="the inputs' dtype (default float32; bfloat16 needs ml_dtypes)")
    parser.add_argument("--rounds", type=int, default=5, help="alternations (default 5)")
    parser.add_argument("--calls", type=int, default=8,
                        help="timed calls per process, the best kept (default 8)")
    parser.add_argument("--threads", type=int, default=2, help="libna threads (default 2)")
    args = parser.parse_args(argv)
    if not 4 <= len(args.shape) <= 6:
        parser.error(f"--shape={','.join(map(str, args.shape))} has {len(args.shape)} values; "
                     "expected 4 to 6 (B, 1 to 3 spatial extents, heads, D)")
    spatial = len(args.shape) - 3
    if len(args.kernel) not in (1, spatial):
        parser.error(f"--kernel={','.join(map(str, args.kernel))} has {len(args.kernel)} values; "
                     f"expected 1 or {spatial} (one per spatial axis)")
    kernel = args.kernel[0] if len(args.kernel) == 1 else args.kernel
    for option in ("rounds", "calls", "threads"):
        if getattr(args, option) < 1:
            parser.error(f"--{option}={getattr(args, option)} must be at least 1")
    name, values = args.env
    times = {value: [] for value in values}
    for _ in range(args.rounds):
        for value in values:
            times[value].append(run(name, value, args.shape, kernel, args.mode,
                                    args.calls, args.threads, dtype=args.dtype))
    shape = "x".join(map(str, args.shape))
    print(f"# {args.mode}, shape {shape}, kernel {kernel}, {args.dtype}, {args.threads} "
          f"thread(s); {args.rounds} alternating rounds of fresh processes, best of "
          f"{args.calls} calls each")
    print(f"| {name} | median ms | vs {name}={values[0]} | every round (ms) |")
    print("|---|---:|---:|---|")
    base = statistics.median(times[values[0]])
    for value in values:
        median = statistics.median(times[value])
        rounds = " ".join(f"{t:.3f}" for t in times[value])
        print(f"| {value} | {median:.3f} | {base / median:.2f}x | {rounds} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
