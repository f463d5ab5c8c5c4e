"""Memory bounds: long 1D sequences with a single batch and head need no
more scratch than a fixed budget per thread. Each case runs in its own
interpreter (2 libna threads, address space capped at 8 GiB so that a
regression fails instead of exhausting a shared machine) and measures the
peak resident memory that the call adds: VmHWM after it minus VmRSS before
it, which is exact whenever the call's peak exceeds the peak before it (it
must, to break the bound; the script checks that the earlier peak is below
the bound)."""

import json

import pytest

from _run_python import run_python

MiB = 2**20
THREADS = 2
BUDGET_PER_THREAD = 64 * MiB
SLACK = 16 * MiB  # thread stacks, allocator bookkeeping

SCRIPT = """
import json, resource, time
import numpy as np, libna

resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
libna.set_num_threads({threads})
CASE, L, D = {case!r}, {length}, 64

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

rng = np.random.default_rng(0)
make = lambda length: rng.standard_normal((1, length, 1, D), dtype=np.float32)
if CASE == "forward-broadcast":  # zero strides: 256 bytes of memory per input
    q, k, v = (np.broadcast_to(make(1), (1, L, 1, D)) for _ in range(3))
else:
    q, k, v = make(L), make(L), make(L)
small = [x[:, :64] for x in (q, k, v)]  # load the kernels and start the pool
out, lse = libna.na1d(*small, 7, return_lse=True)
libna.na1d_backward(*small, out, out, lse, 7)
if CASE == "backward":
    out, lse = libna.na1d(q, k, v, 7, return_lse=True)
    dout = make(L)
    call = lambda: libna.na1d_backward(q, k, v, out, dout, lse, 7)
else:
    call = lambda: libna.na1d(q, k, v, 7, return_lse=True)
rss, earlier_peak = status("VmRSS:"), status("VmHWM:")
start = time.perf_counter()
results = call()
seconds = time.perf_counter() - start
print(json.dumps({{"extra": status("VmHWM:") - rss, "earlier": earlier_peak - rss,
                  "outputs": sum(x.nbytes for x in results), "seconds": seconds}}))
"""

CASES = [("forward", 2**18), ("backward", 3 * 2**16), ("forward-broadcast", 2**18)]


@pytest.mark.parametrize("case,length", CASES, ids=[c for c, _ in CASES])
def test_long_1d_scratch_stays_within_a_per_thread_budget(case, length):
    """[1, L, 1, 64] float32 (64 MiB per input at L = 2^18): the memory a
    call adds is its outputs plus at most 64 MiB per thread."""
    code = SCRIPT.format(threads=THREADS, case=case, length=length)
    result = run_python(code, timeout=120)
    assert result.returncode == 0, result.stderr
    m = json.loads(result.stdout.splitlines()[-1])
    bound = m["outputs"] + THREADS * BUDGET_PER_THREAD + SLACK
    assert m["earlier"] < bound
    assert m["extra"] <= bound, (
        f"{case} L={length}: the call added {m['extra'] / MiB:.0f} MiB (outputs "
        f"{m['outputs'] / MiB:.0f} MiB, so {(m['extra'] - m['outputs']) / MiB:.0f} MiB of "
        f"scratch); bound {bound / MiB:.0f} MiB = outputs + {THREADS} threads x "
        f"{BUDGET_PER_THREAD // MiB} MiB + {SLACK // MiB} MiB ({m['seconds']:.2f} s)")
