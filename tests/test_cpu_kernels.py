"""LIBNA_CPU_KERNELS: the portable kernels, which every CPU without AVX2 and
FMA runs (ARM among them), forced on this machine and put through the
numerical grid; build_info's and `python -m libna`'s report of the set in
use; and the errors for a set that does not exist or that the CPU cannot
run. The C++ tests run them on aarch64 itself (test_aarch64.py)."""

from pathlib import Path

import numpy as np
import pytest

import libna

from _run_python import run_python

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(libna._C is None, reason="compiled core not loaded")

# The numerical grid, less what never reaches the vectorised kernels: float64
# takes the scalar ones whatever the set (so do torch's gradchecks), and
# compile/opcheck test the PyTorch adapter.
GRID_FILES = ["tests/test_forward.py", "tests/test_backward.py", "tests/test_composition.py"]
GRID_SLICE = "not float64 and not gradcheck and not opcheck and not compile"

# An op in float32 (vectorised kernels) and float64 (scalar ones), then build_info.
TRY_AN_OP = """
    import numpy as np, libna
    def na1d(dtype):
        q = np.ones((1, 8, 2, 4), dtype)
        return libna.na1d(q, q, q, 3)
    for call in (lambda: na1d(np.float32), lambda: na1d(np.float64), libna.build_info):
        try:
            call()
            print("ran")
        except ValueError as error:
            print("ValueError:", error)
"""


def kernel_report(kernels):
    result = run_python("import libna; i = libna.build_info(); print(i['cpu_kernels'], i['simd'])",
                        env={"LIBNA_CPU_KERNELS": kernels})
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


# The sets in order of speed, each with its build_info()["simd"] on x86-64.
X86_SETS = {"avx2": "avx2+fma", "avx512": "avx512+fma"}


def sets_this_cpu_runs():
    """The kernel sets this CPU runs: the default one and every slower one."""
    default = libna.build_info()["cpu_kernels"]
    order = ["portable", "avx2", "avx512"]
    return order[:order.index(default) + 1]


def test_forced_sets_are_reported():
    default = libna.build_info()
    assert default["cpu_kernels"] in ("avx512", "avx2", "portable")
    assert kernel_report("auto") == kernel_report("") == [default["cpu_kernels"], default["simd"]]
    kernels, simd = kernel_report("portable")
    assert kernels == "portable" and simd in ("sse2", "neon", "portable")
    for name in sets_this_cpu_runs()[1:]:
        assert kernel_report(name) == [name, X86_SETS[name]]


def test_unknown_set_is_refused_by_every_op_and_build_info():
    result = run_python(TRY_AN_OP, env={"LIBNA_CPU_KERNELS": "avx1024"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stdout
    choices = ", ".join(["auto"] + sets_this_cpu_runs())
    for line in lines:
        assert line == ("ValueError: LIBNA_CPU_KERNELS='avx1024' is not a kernel set; "
                        f"choose one of {choices}"), line


@pytest.mark.parametrize("name, lacks", [("avx2", "AVX2, FMA or F16C"),
                                         ("avx512", "AVX-512 F, VL, BW or DQ")])
def test_x86_set_is_refused_where_the_cpu_cannot_run_it(name, lacks):
    if name in sets_this_cpu_runs():
        pytest.skip(f"this CPU runs the {name} kernels (refusals are checked on aarch64 by "
                    "test_aarch64.py)")
    result = run_python(TRY_AN_OP, env={"LIBNA_CPU_KERNELS": name})
    assert result.returncode == 0, result.stderr
    choices = ", ".join(["auto"] + sets_this_cpu_runs())
    for line in result.stdout.splitlines():
        assert line == (f"ValueError: LIBNA_CPU_KERNELS={name} cannot run here (this CPU lacks "
                        f"{lacks}); choose one of {choices}"), line


# Forward problems for the row pairs (two query rows at a time), with what
# pairs rows differently: odd and even row counts, dilation and causal masks
# along the rows, strides, rpb, grouped heads, 3D, windows as tall as the
# input, and inf among the values (a row one half does not see must not
# reach it).
# The pair tests' scripts start with this: q, k, v of a shape from rng.
RANDOM_INPUTS = """
import numpy as np, libna
def inputs(shape, heads_kv=None, dtype=np.float32):
    q = rng.standard_normal(shape).astype(dtype)
    kv_shape = shape[:-2] + (heads_kv or shape[-2], shape[-1])
    return q, rng.standard_normal(kv_shape).astype(dtype), rng.standard_normal(kv_shape).astype(dtype)
"""
ROW_PAIR_CASES = RANDOM_INPUTS + """
rng = np.random.default_rng(7)
results = []
def run(fn, q, k, v, kernel, **kw):
    out, lse = fn(q, k, v, kernel, return_lse=True, **kw)
    results.extend([np.asarray(out, np.float32), np.asarray(lse, np.float32)])
for rows in (7, 8, 9, 13):  # groups of pairs end in a pair, a row or both
    run(libna.na2d, *inputs((2, rows, 19, 4, 16)), 5)
    run(libna.na2d, *inputs((1, rows, 11, 2, 8)), (3, 5), dilation=(2, 1))
    run(libna.na2d, *inputs((1, rows, 11, 2, 8)), (4, 3), is_causal=(True, False))
    run(libna.na2d, *inputs((1, rows, 10, 2, 8)), 3, stride=(2, 1), dilation=(2, 3))
    run(libna.na2d, *inputs((1, rows, 9, 2, 8)), (rows, 3))
heads = 4
rpb = rng.standard_normal((heads, 9, 13)).astype(np.float32)
run(libna.na2d, *inputs((1, 12, 21, heads, 16)), (5, 7), rpb=rpb)
run(libna.na2d, *inputs((1, 9, 16, heads, 16), heads_kv=2), 3)
run(libna.na3d, *inputs((1, 5, 7, 9, 2, 8)), (3, 3, 5), is_causal=(False, True, False))
run(libna.na3d, *inputs((1, 4, 9, 8, 2, 8)), 3, dilation=(1, 2, 2))
for dtype in (np.float16, "bfloat16"):
    try:
        dt = np.dtype(dtype)
    except TypeError:
        import ml_dtypes
        dt = np.dtype(ml_dtypes.bfloat16)
    run(libna.na2d, *inputs((1, 9, 13, 2, 16), dtype=dt), 5)
# 1D with windows of 16 or more: a row's lane blocks two at a time.
run(libna.na1d, *inputs((2, 203, 2, 16)), 63)
run(libna.na1d, *inputs((1, 150, 2, 8)), 17, dilation=3)
run(libna.na1d, *inputs((1, 97, 2, 8)), 24, is_causal=True)
run(libna.na1d, *inputs((1, 130, 4, 8), heads_kv=2), 31, stride=4)
run(libna.na1d, *inputs((1, 77, 4, 8)), 31, rpb=rng.standard_normal((4, 61)).astype(np.float32))
q, k, v = inputs((1, 120, 2, 8))
v[0, 100, 1, 3] = np.inf
run(libna.na1d, q, k, v, 33)
q, k, v = inputs((1, 10, 12, 2, 8))
v[0, 9, 3, 0, 2] = np.inf       # seen by the rows near the bottom only
v[0, 0, 11, 1, 5] = np.nan      # and near the top
run(libna.na2d, q, k, v, 3)
np.savez(OUT, *results)
"""


@pytest.mark.parametrize("name", ["portable", "avx2", "avx512"])
def test_row_pairs_are_bitwise_single_rows(name, tmp_path):
    """The forward computed two query rows at a time, or in 1D two lane
    blocks of a row (LIBNA_CPU_ROW_PAIRS=1), and with groups of two or three
    row pairs sharing their loads (LIBNA_CPU_PAIR_GROUP), gives the outputs
    and log-sum-exps of one row or block at a time bit for bit, in every
    kernel set this CPU runs (with AVX-512 a pair is one 16-lane register,
    elsewhere two 8-lane halves)."""
    if name not in sets_this_cpu_runs():
        pytest.skip(f"this CPU does not run the {name} kernels")
    settings = {"single": {"LIBNA_CPU_ROW_PAIRS": "0"},
                "pairs": {"LIBNA_CPU_ROW_PAIRS": "1", "LIBNA_CPU_PAIR_GROUP": "1"},
                "groups of 2": {"LIBNA_CPU_ROW_PAIRS": "1", "LIBNA_CPU_PAIR_GROUP": "2"},
                "groups of 3": {"LIBNA_CPU_ROW_PAIRS": "1", "LIBNA_CPU_PAIR_GROUP": "3"}}
    saved = {}
    for i, (setting, env) in enumerate(settings.items()):
        out = tmp_path / f"setting{i}.npz"
        result = run_python(f"OUT = {str(out)!r}\n" + ROW_PAIR_CASES, timeout=300,
                            env={"LIBNA_CPU_KERNELS": name, **env})
        assert result.returncode == 0, result.stdout + result.stderr
        with np.load(out) as data:
            saved[setting] = [data[key] for key in sorted(data.files, key=lambda s: int(s[4:]))]
    for setting in settings:
        assert len(saved[setting]) == 2 * 33, setting
        if setting == "single":
            continue
        for i, (single, computed) in enumerate(zip(saved["single"], saved[setting])):
            np.testing.assert_array_equal(computed, single, err_msg=f"{setting}: result {i}")
    # The inf and NaN values reach the outputs of the rows that see them, and
    # no others.
    out = saved["groups of 3"][-2]
    assert not np.isfinite(out[0, 8:10, 2:5, 0]).all() and np.isfinite(out[0, :7, :, 0]).all()


BACKWARD_PAIR_CASES = RANDOM_INPUTS + """
rng = np.random.default_rng(11)
results = []
def run(q, k, v, kernel, **kw):
    rank = q.ndim - 3
    out, lse = getattr(libna, f"na{rank}d")(q, k, v, kernel, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape).astype(out.dtype)
    grads = getattr(libna, f"na{rank}d_backward")(q, k, v, out, dout, lse, kernel, **kw)
    results.extend(np.asarray(g, np.float32) for g in grads)
for rows in (7, 8, 9, 13):  # an odd last row keeps no partner; groups end in a pair, a row or both
    run(*inputs((2, rows, 14, 4, 16)), 7 if rows >= 7 else rows)
    run(*inputs((1, rows, 11, 2, 8)), (3, 5), dilation=(2, 1))
    run(*inputs((1, rows, 11, 2, 8)), (4, 3), is_causal=(True, False))
    run(*inputs((1, rows, 10, 2, 8)), 3, stride=(2, 1), dilation=(2, 3))
    run(*inputs((1, rows, 9, 2, 8)), (rows, 3))
heads = 4
run(*inputs((1, 14, 14, heads, 32)), 7, rpb=rng.standard_normal((heads, 13, 13)).astype(np.float32))
run(*inputs((1, 17, 19, heads, 8)), (5, 3), dilation=(3, 2),
    rpb=rng.standard_normal((heads, 9, 5)).astype(np.float32))
run(*inputs((1, 9, 16, heads, 16), heads_kv=2), 3)
run(*inputs((1, 12, 56, 2, 16)), 7)   # wide rows: several strips
# 3D (the schedule that computes P and dS again; pairs along the second axis)
run(*inputs((1, 4, 7, 9, 2, 8)), (3, 5, 3), rpb=rng.standard_normal((2, 5, 9, 5)).astype(np.float32))
run(*inputs((1, 5, 8, 7, 2, 8)), 3, dilation=(1, 2, 2), is_causal=(False, True, False))
q, k, v = inputs((1, 10, 12, 2, 8))
v[0, 9, 3, 0, 2] = np.inf       # seen by the rows near the bottom only
k[0, 0, 11, 1, 5] = np.nan      # and near the top
run(q, k, v, 3)
np.savez(OUT, *results)
"""


@pytest.mark.parametrize("name", ["portable", "avx2", "avx512"])
def test_backward_row_pairs_are_bitwise_single_rows(name, tmp_path):
    """The backward's query pass computing two query rows at a time
    (LIBNA_CPU_ROW_PAIRS=1), or groups of two or three such pairs sharing
    their loads (LIBNA_CPU_PAIR_GROUP), and its key pass two key rows at a
    time (2D, the schedule that keeps P and dS) gives the gradients of one row
    at a time bit for bit, and so does the schedule that computes P and dS
    again (LIBNA_CPU_SAVED_PROBS_BYTES=0; 3D always), its query pass in pairs
    or groups, in every kernel set this CPU runs: rpb, dilation, causal,
    stride, GQA, strips, odd row counts, 3D, and inf/NaN inputs."""
    if name not in sets_this_cpu_runs():
        pytest.skip(f"this CPU does not run the {name} kernels")
    saved = {}
    pairs = {"LIBNA_CPU_ROW_PAIRS": "1"}
    settings = {"single": {"LIBNA_CPU_ROW_PAIRS": "0"},
                "pairs": {**pairs, "LIBNA_CPU_PAIR_GROUP": "1"},
                "groups of 2": {**pairs, "LIBNA_CPU_PAIR_GROUP": "2"},
                "groups of 3": {**pairs, "LIBNA_CPU_PAIR_GROUP": "3"},
                "recompute": {**pairs, "LIBNA_CPU_PAIR_GROUP": "1",
                              "LIBNA_CPU_SAVED_PROBS_BYTES": "0"},
                "recompute, groups of 3": {**pairs, "LIBNA_CPU_PAIR_GROUP": "3",
                                           "LIBNA_CPU_SAVED_PROBS_BYTES": "0"}}
    for label, env in settings.items():
        out = tmp_path / f"{label}.npz"
        result = run_python(f"OUT = {str(out)!r}\n" + BACKWARD_PAIR_CASES, timeout=300,
                            env={"LIBNA_CPU_KERNELS": name, **env})
        assert result.returncode == 0, result.stdout + result.stderr
        with np.load(out) as data:
            saved[label] = [data[key] for key in sorted(data.files, key=lambda s: int(s[4:]))]
    assert len(saved["single"]) == 4 * 5 * 3 + 4 + 4 + 3 + 3 + 4 + 3 + 3
    for label in settings:
        assert len(saved[label]) == len(saved["single"])
        for i, (single, other) in enumerate(zip(saved["single"], saved[label])):
            np.testing.assert_array_equal(other, single, err_msg=f"{label}: result {i}")
    # The inf and NaN reach the gradients of what sees them, and no others.
    dq = saved["groups of 3"][-3]
    assert not np.isfinite(dq[0, 7:10, 2:5, 0]).all() and np.isfinite(dq[0, 3:7, :, 0]).all()


def test_main_self_check_on_portable_kernels():
    result = run_python("""
        import sys
        from libna.__main__ import main
        sys.exit(main(["--repeats", "1"]))
    """, env={"LIBNA_CPU_KERNELS": "portable"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "  cpu_kernels: portable" in result.stdout.splitlines(), result.stdout
    assert result.stdout.count(": ok (") == 4 and "FAILED" not in result.stdout, result.stdout


def test_numerical_grid_on_portable_kernels():
    """The forward, backward, unfused and composition grids in every reduced
    precision dtype, in a process that runs the portable kernels."""
    result = run_python(f"""
        import sys, pytest
        sys.exit(pytest.main({GRID_FILES + ["-x", "-p", "no:cacheprovider", "-k", GRID_SLICE]!r}))
    """, env={"LIBNA_CPU_KERNELS": "portable"}, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert "libna cpu kernels: portable (simd" in result.stdout, result.stdout[:2000]
    summary = result.stdout.splitlines()[-1]
    assert " passed" in summary and "failed" not in summary, summary


@pytest.mark.parametrize("scale", [1.0, 1e-5, 2e4], ids=["normal", "subnormal-outputs", "large"])
def test_float16_is_float32_rounded_to_nearest_even(scale):
    """float16 inputs are computed in float32 and only the results are
    rounded: on the same (float16-representable) values, every float16
    output and gradient is the float32 one rounded to nearest even, bit for
    bit. This pins the float16 conversions of the vectorised kernels (F16C
    on x86-64, bit arithmetic elsewhere), subnormals and overflow included."""
    rng = np.random.default_rng(1)
    q, k, dout = (rng.standard_normal((2, 9, 11, 2, 16)).astype(np.float16) for _ in range(3))
    v = np.clip(rng.standard_normal((2, 9, 11, 2, 16)) * scale, -6e4, 6e4).astype(np.float16)
    up = [x.astype(np.float32) for x in (q, k, v)]
    out16, lse16 = libna.na2d(q, k, v, 5, return_lse=True)
    out32, lse32 = libna.na2d(*up, 5, return_lse=True)
    np.testing.assert_array_equal(out16, out32.astype(np.float16))
    np.testing.assert_array_equal(lse16, lse32)
    grads16 = libna.na2d_backward(q, k, v, out16, dout, lse16, 5)
    grads32 = libna.na2d_backward(*up, out16.astype(np.float32), dout.astype(np.float32),
                                  lse16, 5)
    for name, g16, g32 in zip(("dq", "dk", "dv"), grads16, grads32):
        np.testing.assert_array_equal(g16, g32.astype(np.float16), err_msg=name)


def test_consecutive_calls_pack_their_own_rows():
    """A thread keeps its row caches from call to call (row_cache.h: a reset
    forgets only how many entries are in use); a call must never find rows
    packed for an earlier one, whose keys (batch, head, row, tile) are the
    same whenever the shapes are. Calls of one shape on different data, with
    a larger call between them (which grows the caches), on one thread: each
    forward matches the float64 reference and each backward the float64
    (scalar, uncached) kernels."""
    rng = np.random.default_rng(7)
    # (One head: with two, each head's rows happen to move the other's hints.)
    small = [rng.standard_normal((1, 7, 9, 1, 8)).astype(np.float32) for _ in range(7)]
    large = [rng.standard_normal((2, 12, 20, 2, 8)).astype(np.float32) for _ in range(4)]
    threads = libna.get_num_threads()
    libna.set_num_threads(1)
    try:
        for q, k, v, dout in (small[:4], small[3:], large, small[:4], small[3:]):
            out, lse = libna.na2d(q, k, v, 5, return_lse=True)
            grads = libna.na2d_backward(q, k, v, out, dout, lse, 5)
            wide = [x.astype(np.float64) for x in (q, k, v, out, dout)]
            np.testing.assert_allclose(out, libna.reference.na2d(*wide[:3], 5), rtol=1e-5,
                                       atol=1e-5)
            expected = libna.na2d_backward(*wide, lse.astype(np.float64), 5)
            for name, got, want in zip(("dq", "dk", "dv"), grads, expected):
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)
    finally:
        libna.set_num_threads(threads)
