"""The feature grid and the random inputs that the op tests share.

``grid()`` lists the geometries (rank, odd/even kernels, dilation, stride,
per-axis causal) that test_forward.py, test_backward.py and test_gpu.py run
over, ``case_id`` names them in test ids, and ``make_qkv`` / ``make_rpb``
draw float64 inputs from a NumPy generator. Nothing here uses libna, so the
reference's own tests (test_reference.py) use these helpers too.
"""

import itertools

import numpy as np


def make_qkv(rng, batch, spatial, heads, heads_kv, dim, dim_v, dtype=np.float64):
    q = rng.standard_normal((batch, *spatial, heads, dim)).astype(dtype)
    k = rng.standard_normal((batch, *spatial, heads_kv, dim)).astype(dtype)
    v = rng.standard_normal((batch, *spatial, heads_kv, dim_v)).astype(dtype)
    return q, k, v


def make_rpb(rng, heads, kernel_size, dtype=np.float64):
    return rng.standard_normal((heads, *[2 * k - 1 for k in kernel_size])).astype(dtype)


def valid(spatial, kernel, stride, dilation):
    return all(k * d <= n and 1 <= s <= k for n, k, s, d in zip(spatial, kernel, stride, dilation))


def grid():
    """(spatial, kernel, stride, dilation, causal) cases, every one a tuple per axis."""
    cases = []
    for L, k, d, s, causal in itertools.product(
            [13], [2, 3, 4, 5, 13], [1, 2, 3], [1, 2, 3], [False, True]):
        if valid((L,), (k,), (s,), (d,)):
            cases.append(((L,), (k,), (s,), (d,), (causal,)))
    for spatial, k, d, s, causal in itertools.product(
            [(7, 9)], [(3, 3), (2, 5), (4, 3), (7, 9)], [(1, 1), (2, 1), (1, 3)],
            [(1, 1), (2, 3)], [(False, False), (True, False), (False, True), (True, True)]):
        if valid(spatial, k, s, d):
            cases.append((spatial, k, s, d, causal))
    for spatial, k, d, s, causal in itertools.product(
            [(4, 5, 6)], [(2, 3, 3), (3, 2, 4), (4, 5, 6)], [(1, 1, 1), (1, 2, 1)],
            [(1, 1, 1), (2, 1, 3)], [(False,) * 3, (True, False, False), (False, True, True)]):
        if valid(spatial, k, s, d):
            cases.append((spatial, k, s, d, causal))
    return cases


def case_id(case):
    spatial, k, s, d, c = case
    return f"L{spatial}-k{k}-s{s}-d{d}-c{''.join('T' if x else 'F' for x in c)}".replace(" ", "")
