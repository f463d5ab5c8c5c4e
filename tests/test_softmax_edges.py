"""The edges of softmax, the same in the compiled kernels (every dtype, rank
and kernel path) and in libna.reference (README, "Non-finite values"): a query
whose logits are all -inf attends to nothing (out 0, lse -inf, no gradient
through it); a +inf logit gives lse +inf and a NaN output."""

import contextlib

import numpy as np
import pytest

import libna
from libna import reference

ml_dtypes = pytest.importorskip("ml_dtypes")
DTYPES = [np.float64, np.float32, np.float16, ml_dtypes.bfloat16]
SPATIAL = {1: (13,), 2: (9, 10), 3: (5, 6, 7)}


EMULATOR = libna._C is not None and "cuda-emulator" in libna.build_info()["backends"]


def backends(dtype):
    """(name, module, context) of each backend that runs `dtype`: the CPU
    kernels, the reference, and the CUDA kernels under the emulator (SIMT at
    sm_75, tensor cores at sm_80) where it is built."""
    runs = [("cpu", libna, contextlib.nullcontext), ("reference", reference, contextlib.nullcontext)]
    if EMULATOR and dtype != np.float64:
        runs += [(f"cuda-emulated-sm{arch}", libna, lambda arch=arch: libna.cuda_emulator(arch))
                 for arch in (75, 80)]
    return runs


def problem(rank, dtype, rng, heads=2):
    shape = (2,) + SPATIAL[rank] + (heads, 8)
    q, k, v = (rng.standard_normal(shape).astype(dtype) for _ in range(3))
    kernel = (3,) * rank
    rpb = np.zeros((heads,) + (5,) * rank, np.float32).astype(dtype)
    rpb[1] = -np.inf  # head 1 sees nothing
    return q, k, v, kernel, rpb


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_query_that_sees_nothing(rank, dtype, rng):
    q, k, v, kernel, rpb = problem(rank, dtype, rng)
    for backend, lib, context in backends(dtype):
        with context():
            out, lse = getattr(lib, f"na{rank}d")(q, k, v, kernel, rpb=rpb, return_lse=True)
            dout = np.ones_like(out)
            dq, dk, dv, drpb = getattr(lib, f"na{rank}d_backward")(q, k, v, out, dout, lse,
                                                                 kernel, rpb=rpb)
        assert np.all(np.asarray(out[..., 1, :], np.float64) == 0), backend
        assert np.all(np.asarray(lse[..., 1]) == -np.inf), backend
        assert np.all(np.isfinite(np.asarray(out[..., 0, :], np.float64))), backend
        for name, grad in (("dq", dq), ("dk", dk), ("dv", dv), ("drpb", drpb)):
            grad = np.asarray(grad, np.float64)
            assert np.all(np.isfinite(grad)), (backend, name)
            assert np.all(grad[..., 1, :] == 0 if name != "drpb" else grad[1] == 0), (backend, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_query_that_sees_nothing_with_additional_keys(dtype, rng):
    """The neighbourhood part contributes nothing; the additional keys carry
    the whole softmax."""
    q, k, v, kernel, rpb = problem(2, dtype, rng)
    extra = rng.standard_normal((2, 2, 4, 2, 8)).astype(dtype)
    for lib in (libna, reference):
        out, lse = lib.na2d(q, k, v, kernel, rpb=rpb, return_lse=True,
                            additional_keys=extra[0], additional_values=extra[1])
        logits = np.einsum("bxyhd,bnhd->bxyhn", np.asarray(q, np.float64),
                           np.asarray(extra[0], np.float64)) * 8 ** -0.5
        dense_lse = np.log(np.exp(logits).sum(-1))
        tol = 1e-9 if dtype == np.float64 else 5e-2
        np.testing.assert_allclose(np.asarray(lse[..., 1], np.float64), dense_lse[..., 1],
                                   rtol=tol, atol=tol, err_msg=lib.__name__)


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_infinite_logit(rank, dtype, rng):
    q, k, v, kernel, _ = problem(rank, dtype, rng)
    rpb = np.zeros((2,) + (5,) * rank, np.float32).astype(dtype)
    rpb[(0,) + (2,) * rank] = np.inf  # the query's own position, head 0
    for backend, lib, context in backends(dtype):
        with context():
            out, lse = getattr(lib, f"na{rank}d")(q, k, v, kernel, rpb=rpb, return_lse=True)
        assert np.all(np.asarray(lse[..., 0]) == np.inf), backend
        assert np.all(np.isnan(np.asarray(out[..., 0, :], np.float64))), backend
        assert np.all(np.isfinite(np.asarray(out[..., 1, :], np.float64))), backend


def test_reference_softmax_does_not_hide_a_nan_row(rng):
    """A NaN logit makes its whole row of probabilities NaN (the reference
    once divided by 1 instead of a NaN sum and left the rest finite)."""
    q, k, v = (rng.standard_normal((1, 16, 1, 8)) for _ in range(3))
    k[0, 10, 0, 3] = np.nan
    out, lse = reference.na1d(q, k, v, 3, return_lse=True)
    _, _, dv = reference.na1d_backward(q, k, v, out, np.ones_like(out), lse, 3)
    # Queries 9-11 see key 10; dv of every key in their windows (8-12) is NaN.
    assert np.isnan(dv[0, :, 0]).any(-1).nonzero()[0].tolist() == [8, 9, 10, 11, 12]
