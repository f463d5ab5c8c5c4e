"""Property-based tests (hypothesis) of every op over random geometry
(rank 1-3, kernel, stride, dilation, per-axis causal, rpb, GQA, D_v != D,
float64/float32/float16/bfloat16): agreement with the float64 reference
(inputs in random strided, flipped, transposed or unaligned layouts),
bitwise invariance under memory layout (strided, negative, zero and
permuted strides, unaligned offsets), and batch slices that give bitwise
the slice of the batched result. Profiles: see conftest.py
(LIBNA_HYPOTHESIS_PROFILE)."""

import numpy as np
import pytest

pytest.importorskip("hypothesis")
from hypothesis import given
from hypothesis import strategies as st

from _problems import (OPS, SAME_VALUES, UNFUSED, apply_layouts, bits, layouts, op_inputs,
                       problems, run_libna, run_reference)

# Error bound in units of the dtype's epsilon, relative to max(1, max |ref|).
# The kernels accumulate in float32 (float64 for float64) and round once, so
# 16-bit results are within a rounding or two of the float64 reference (at
# most 1.7 ulps seen over 1500 random problems); float32 and float64 sum up
# to a few hundred terms (at most 15 ulps seen). drpb sums over the batch and
# every query, and its bound grows with the square root of their number
# (float32: at most 52 ulps seen).
ULPS = {"float64": 64, "float32": 64, "float16": 4, "bfloat16": 4}


def eps(dtype):
    return 2.0 ** -7 if dtype == "bfloat16" else float(np.finfo(dtype).eps)


def assert_matches_reference(p, got, ref):
    for name, r in ref.items():
        g = got[name].astype(np.float64)
        # the unfused scores' slots that a causal window does not fill
        np.testing.assert_array_equal(np.isneginf(g), np.isneginf(r), err_msg=name)
        finite = np.isfinite(r)
        assert np.isfinite(g[finite]).all(), name
        bound = ULPS[p.dtype] * eps(p.dtype) * max(1.0, np.abs(r[finite]).max(initial=0))
        if name == "drpb":  # a sum over the batch and every query
            bound *= np.sqrt(p.batch * np.prod(p.spatial))
        err = np.abs(g[finite] - r[finite]).max(initial=0)
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} ({p})"


def check_against_reference(op, p, data):
    """libna's inputs in random memory layouts that keep their values."""
    f64, arrays = op_inputs(op, p)
    views = apply_layouts(arrays, data.draw(layouts(op.inputs, SAME_VALUES), label="layouts"))
    assert_matches_reference(p, run_libna(op, p, views), run_reference(op, p, f64))


@given(problems(), st.data())
def test_forward_matches_reference(p, data):
    check_against_reference(OPS["forward"], p, data)


@given(problems(), st.data())
def test_backward_matches_reference(p, data):
    check_against_reference(OPS["backward"], p, data)


@given(st.sampled_from(UNFUSED), problems(stride=False), st.data())
def test_unfused_ops_match_reference(name, p, data):
    check_against_reference(OPS[name], p, data)


def ops_and_problems(**kw):
    """(op, problem) over every op (stride 1 for the unfused ones)."""
    return st.sampled_from(sorted(OPS)).flatmap(
        lambda name: st.tuples(st.just(OPS[name]), problems(stride=name not in UNFUSED, **kw)))


@given(ops_and_problems(), st.data())
def test_layouts_give_bitwise_the_contiguous_result(case, data):
    """Every input in a strided, flipped (negative strides), transposed,
    unaligned or broadcast (zero strides) view gives bit for bit what its
    contiguous copy gives."""
    op, p = case
    plan = data.draw(layouts(op.inputs), label="layouts")
    _, arrays = op_inputs(op, p)
    views = apply_layouts(arrays, plan)
    contiguous = {n: None if x is None else np.ascontiguousarray(x) for n, x in views.items()}
    got, expected = run_libna(op, p, views), run_libna(op, p, contiguous)
    for name in expected:
        assert np.array_equal(bits(got[name]), bits(expected[name])), name


@given(ops_and_problems(batch=st.integers(2, 4)), st.data())
def test_batch_slice_is_the_slice_of_the_batch(case, data):
    op, p = case
    start = data.draw(st.integers(0, p.batch - 1), label="start")
    stop = data.draw(st.integers(start + 1, p.batch), label="stop")
    _, arrays = op_inputs(op, p)
    full = run_libna(op, p, arrays)
    part = run_libna(op, p.with_batch(stop - start), {
        n: x if n == "rpb" or x is None else x[start:stop] for n, x in arrays.items()})
    for name in part:
        if name != "drpb":  # a sum over the batch
            assert np.array_equal(bits(part[name]), bits(full[name][start:stop])), name
