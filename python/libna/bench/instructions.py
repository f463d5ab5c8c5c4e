"""Instructions per small call, counted under callgrind (valgrind).

    python -m libna.bench.instructions [--calls 2000]

Timings of a call of ~20 µs drift by tens of percent on a shared VM; the
instructions a call executes do not. Each case runs in a fresh process under
``valgrind --tool=callgrind`` twice, with ``--calls`` calls and with none, and
the difference divided by the calls is printed. Under valgrind the CPU
reports no AVX-512, so libna runs its avx2 (or portable) kernels. 1 thread.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys

# Each case: (label, set-up code, the call), run as a loop in a child process.
_SETUP = """
import numpy as np, libna
from libna import _C
libna.set_num_threads(1)
a = np.random.default_rng(0).standard_normal((1, 7, 7, 1, 8)).astype(np.float32)
s = np.random.default_rng(0).standard_normal((1, 2, 2, 1, 8)).astype(np.float32)
alloc = lambda shape, name: np.empty(shape, name)
"""
_TORCH_SETUP = """
import torch, libna.torch
torch.set_num_threads(1)
t = torch.from_numpy(a)
tg = t.clone().requires_grad_()
"""
CASES = [
    ("NumPy libna.na2d, 7x7, 1 head, D 8, kernel 7", "libna.na2d(a, a, a, 7)"),
    ("_C.call alone, same problem",
     "_C.call('na', [a, a, a, None, None, None], 2, (7, 7), (1, 1), (1, 1), (False, False), "
     "None, False, alloc, True, 0)"),
    ("_C.call alone, 2x2, kernel 2 (the fixed cost)",
     "_C.call('na', [s, s, s, None, None, None], 2, (2, 2), (1, 1), (1, 1), (False, False), "
     "None, False, alloc, True, 0)"),
]
# torch cases (when torch is installed): its own add of the same size is the floor.
TORCH_CASES = [
    ("libna.torch.na2d, same problem, no_grad", "libna.torch.na2d(t, t, t, 7)"),
    ("libna.torch.na2d, inputs requiring grad", "libna.torch.na2d(tg, tg, tg, 7)"),
    ("  and its backward (out.sum().backward())", "libna.torch.na2d(tg, tg, tg, 7).sum().backward()"),
    ("torch add of the same size", "t + t"),
]


def _instructions(call: str, calls: int, setup: str = _SETUP) -> int:
    code = f"{setup}\n{call}\nfor _ in range({calls}):\n    {call}\n"
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    result = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-c",
         code], capture_output=True, text=True, env=env, timeout=1800, check=False)
    found = re.search(r"Collected\s*:\s*(\d+)", result.stderr)
    if result.returncode != 0 or found is None:
        raise RuntimeError(f"callgrind failed on {call!r}:\n{result.stderr[-2000:]}")
    return int(found.group(1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m libna.bench.instructions",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per case (default 2000)")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error(f"--calls={args.calls} must be at least 1")
    if shutil.which("valgrind") is None:
        print("valgrind is not installed; nothing to count (apt install valgrind)")
        return 1
    print(f"instructions per call (callgrind, {args.calls} calls minus none, 1 thread)")
    print(f"{'case':50s} {'instructions':>14s}")
    cases = [(label, call, _SETUP) for label, call in CASES]
    if importlib.util.find_spec("torch") is not None:
        cases += [(label, call, _SETUP + _TORCH_SETUP) for label, call in TORCH_CASES]
    else:
        print("(torch is not installed: its cases are left out)")
    for label, call, setup in cases:
        per_call = (_instructions(call, args.calls, setup)
                    - _instructions(call, 0, setup)) / args.calls
        print(f"{label:50s} {per_call:14,.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
