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


def test_forced_sets_are_reported():
    default = libna.build_info()
    assert default["cpu_kernels"] in ("avx2", "portable")
    assert kernel_report("auto") == kernel_report("") == [default["cpu_kernels"], default["simd"]]
    kernels, simd = kernel_report("portable")
    assert kernels == "portable" and simd in ("sse2", "neon", "portable")
    if default["cpu_kernels"] == "avx2":
        assert kernel_report("avx2") == ["avx2", "avx2+fma"]


def test_unknown_set_is_refused_by_every_op_and_build_info():
    result = run_python(TRY_AN_OP, env={"LIBNA_CPU_KERNELS": "avx512"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stdout
    for line in lines:
        assert line.startswith("ValueError: LIBNA_CPU_KERNELS='avx512' is not a kernel set; "
                               "choose one of auto, portable"), line


def test_avx2_is_refused_where_the_cpu_cannot_run_it():
    if libna.build_info()["cpu_kernels"] == "avx2":
        pytest.skip("this CPU runs the AVX2 kernels (the refusal is checked on aarch64 by "
                    "test_aarch64.py)")
    result = run_python(TRY_AN_OP, env={"LIBNA_CPU_KERNELS": "avx2"})
    assert result.returncode == 0, result.stderr
    for line in result.stdout.splitlines():
        assert line.startswith("ValueError: LIBNA_CPU_KERNELS=avx2 cannot run here"), line
        assert line.endswith("choose one of auto, portable"), line


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
