"""libna.cuda_emulator: the CUDA backend's kernels run on the CPU under the
emulation of the CUDA execution model (cuda/emulator/). tests/test_gpu.py runs
the GPU suite's cases under it; this file covers the switch itself, its bad
input, the checking mode (threads of a block in random order between
barriers, global accesses checked) and what the emulator does not run."""

import numpy as np
import pytest

import libna
from libna import reference

BUILT = libna._C is not None and "cuda-emulator" in libna.build_info()["backends"]
needs_emulator = pytest.mark.skipif(
    not BUILT, reason="libna was built without the CUDA emulator "
                      "(-C cmake.define.LIBNA_CUDA_EMULATOR=ON)")


def qkv(rng, shape, dtype=np.float32):
    return [rng.standard_normal(shape).astype(dtype) for _ in range(3)]


def test_refused_without_the_emulator(monkeypatch):
    if libna._C is None:
        pytest.skip("compiled core not loaded")
    info = dict(libna._C.build_info())
    info["backends"] = [b for b in info["backends"] if b != "cuda-emulator"]
    monkeypatch.setattr(libna._C, "build_info", lambda: info)
    with pytest.raises(RuntimeError, match="LIBNA_CUDA_EMULATOR=ON"):
        libna.cuda_emulator(80)


@needs_emulator
@pytest.mark.parametrize("arch,error,match", [
    (70, ValueError, r"arch=70 is not supported; expected one of \(75, 80, 86, 89, 90\)"),
    (100, ValueError, "arch=100 is not supported"),
    ("80", TypeError, "arch='80' must be an int"),
    (8.0, TypeError, "must be an int"),
    (True, TypeError, "must be an int"),
])
def test_bad_arch(arch, error, match):
    with pytest.raises(error, match=match):
        libna.cuda_emulator(arch)


@needs_emulator
def test_bad_checks():
    with pytest.raises(TypeError, match="checks='yes' must be a bool"):
        libna.cuda_emulator(80, checks="yes")


@needs_emulator
def test_the_core_refuses_a_bad_arch_too():
    with pytest.raises(ValueError, match="expected one of 75, 80, 86, 89, 90"):
        libna._C.set_cuda_emulator(61)
    assert libna._C.cuda_emulator_arch() == 0


@needs_emulator
def test_context_nests_and_restores(rng):
    assert libna._C.cuda_emulator_arch() == 0
    with libna.cuda_emulator(80, checks=True):
        assert (libna._C.cuda_emulator_arch(), libna._C.cuda_emulator_checks()) == (80, True)
        with libna.cuda_emulator(75):
            assert (libna._C.cuda_emulator_arch(), libna._C.cuda_emulator_checks()) == (75, False)
        assert (libna._C.cuda_emulator_arch(), libna._C.cuda_emulator_checks()) == (80, True)
    assert libna._C.cuda_emulator_arch() == 0
    with pytest.raises(ZeroDivisionError), libna.cuda_emulator(80):
        1 / 0
    assert libna._C.cuda_emulator_arch() == 0


@needs_emulator
def test_routes_cpu_arrays_to_the_cuda_kernels(rng):
    q, k, v = qkv(rng, (1, 12, 11, 2, 16))
    libna._C.cuda_emulator_launches()
    out_cpu = libna.na2d(q, k, v, 3)
    assert libna._C.cuda_emulator_launches() == []  # outside the block: the CPU backend
    with libna.cuda_emulator(80):
        out = libna.na2d(q, k, v, 3)
        out16 = libna.na2d(*(x.astype(np.float16) for x in (q, k, v)), 3)
    assert libna._C.cuda_emulator_launches() == ["fused_forward_kernel", "tc_forward_kernel"]
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, out_cpu, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out16.astype(np.float32), out_cpu, rtol=2e-2, atol=2e-2)
    with libna.cuda_emulator(75):
        libna.na2d(*(x.astype(np.float16) for x in (q, k, v)), 3)
    assert libna._C.cuda_emulator_launches() == ["fused_forward_kernel"]


@needs_emulator
def test_float64_is_refused_as_on_a_gpu(rng):
    q, k, v = qkv(rng, (1, 9, 2, 8), np.float64)
    with libna.cuda_emulator(80), pytest.raises(
            TypeError, match=r"\[na1d\] float64 is not supported by the CUDA backend"):
        libna.na1d(q, k, v, 3)


@needs_emulator
def test_ops_the_cuda_backend_lacks_say_so(rng):
    q, k, v = qkv(rng, (1, 9, 2, 8))
    extra = rng.standard_normal((1, 3, 2, 8)).astype(np.float32)
    with libna.cuda_emulator(80), pytest.raises(
            RuntimeError, match="not implemented on the cuda-emulator backend"):
        libna.na1d(q, k, v, 3, additional_keys=extra, additional_values=extra)


@needs_emulator
@pytest.mark.parametrize("call, error, match", [
    ("forward-float64", TypeError, r"\[na1d\] float64 is not supported by the CUDA backend"),
    ("backward-float64", TypeError,
     r"\[na1d_backward\] float64 is not supported by the CUDA backend"),
    ("forward-head-dim-300", ValueError,
     r"\[na1d\] head dims up to 256 are supported by the CUDA backend, got head_dim=300"),
    ("qk-float64", TypeError, r"\[na1d_qk\] float64 is not supported"),
    ("additional-keys", RuntimeError,
     r"\[na1d\] additional keys are not implemented on the cuda-emulator backend"),
])
def test_backend_limits_fail_before_outputs_are_allocated(call, error, match, rng):
    """What the CUDA backend cannot run is refused by the core's checks,
    before the binding asks the caller's framework for any output."""
    allocated = []

    def alloc(shape, dtype):
        allocated.append(shape)
        return np.empty(shape, dtype)

    dtype = np.float64 if "float64" in call else np.float32
    q, k, v = qkv(rng, (1, 9, 2, 300 if "300" in call else 8), dtype)
    lse = np.zeros((1, 9, 2), dtype)
    window = dict(rank=1, kernel_size=[3], stride=[1], dilation=[1], is_causal=[False])
    with libna.cuda_emulator(80), pytest.raises(error, match=match):
        if call.startswith("forward"):
            libna._C.call("na", [q, k, v, None], **window, want_lse=True, alloc=alloc)
        elif call.startswith("backward"):
            libna._C.call("na_backward", [q, k, v, None, q, q, lse], **window, alloc=alloc)
        elif call.startswith("qk"):
            libna._C.call("na_qk", [q, k, None], **window, alloc=alloc)
        else:  # the fused op with additional keys, which the CUDA backend lacks
            libna._C.call("na", [q, k, v, None, k[:, :3], v[:, :3]], **window, want_lse=True,
                          alloc=alloc)
    assert allocated == []


CHECKED_CASES = [
    ((1, 23, 2, 32), 5, dict(dilation=2)),
    ((2, 9, 10, 4, 64), (3, 5), dict(is_causal=(True, False))),
    ((1, 5, 6, 7, 2, 16), (3, 3, 5), dict(stride=(1, 2, 1))),
]


@needs_emulator
@pytest.mark.parametrize("arch", [75, 80])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape,kernel,kw", CHECKED_CASES)
def test_checks_mode_agrees(shape, kernel, kw, dtype, arch, rng):
    """Random thread order between barriers and checked global accesses give
    the same numbers as the plain emulation (bitwise: no atomics without rpb),
    which agree with float64."""
    rank = len(shape) - 3
    q, k, v = qkv(rng, shape, dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    na, backward = getattr(libna, f"na{rank}d"), getattr(libna, f"na{rank}d_backward")
    results = []
    for checks in (False, True, True):
        with libna.cuda_emulator(arch, checks=checks):
            out, lse = na(q, k, v, kernel, return_lse=True, **kw)
            grads = backward(q, k, v, out, dout, lse, kernel, **kw)
        results.append([out, lse, *grads])
    for name, a, b, c in zip(("out", "lse", "dq", "dk", "dv"), *results):
        np.testing.assert_array_equal(a, b, err_msg=name)
        np.testing.assert_array_equal(a, c, err_msg=name)
    f64 = [x.astype(np.float64) for x in (q, k, v)]
    ref = getattr(reference, f"na{rank}d")(*f64, kernel, **kw)
    tol = 1e-4 if dtype == np.float32 else 2e-2
    np.testing.assert_allclose(results[0][0].astype(np.float64), ref, rtol=tol, atol=tol)


@needs_emulator
@pytest.mark.parametrize("checks", [False, True])
def test_self_test_kernels(checks):
    """The emulator's own kernels (cuda/emulator/self_test.cpp; two blocks of
    64 threads): the correct ones give their answers in either thread order;
    without its barrier, a thread reads its neighbour's shared slot before it
    is written and gets the NaN that uninitialised shared memory holds here.
    (scripts/check_build.py tsan checks that ThreadSanitizer reports the racy
    ones and nothing in the CUDA backend's kernels.)"""
    t = np.arange(128) % 64
    after = (t + 1) % 64 + 1  # what thread t's neighbour wrote
    with libna.cuda_emulator(80, checks=checks):
        run = libna._C.cuda_emulator_self_test
        np.testing.assert_array_equal(run("neighbour_read"), after)
        np.testing.assert_array_equal(run("overwrite_after_read"), 2 * after)
        np.testing.assert_array_equal(run("warp_sum"), np.full(128, 32 * 33 / 2))
        assert run("atomic_count") == [64.0]
        racy = np.array(run("neighbour_read_racy"))
    if not checks:  # threads run in order until a barrier: thread 0 goes first
        assert np.isnan(racy[0]) and racy[63] == 1.0, racy
    assert not np.array_equal(racy, after)


@needs_emulator
def test_self_test_bad_name():
    with pytest.raises(ValueError, match="kernel='nope' is not a self-test kernel; expected "
                                         "one of neighbour_read, neighbour_read_racy"):
        libna._C.cuda_emulator_self_test("nope")


@needs_emulator
@pytest.mark.parametrize("arch,dtype", [(75, np.float32), (80, np.float16)])
def test_lse_gradient_in_the_cuda_kernels(arch, dtype, rng):
    """dlse enters the SIMT (arch 75) and tensor-core (arch 80, float16) row
    terms as on the CPU: the emulated gradients equal the float64 reference."""
    q, k, v = (x.astype(dtype) for x in qkv(rng, (2, 9, 10, 4, 16)))
    out, lse = libna.reference.na2d(q, k, v, (3, 5), return_lse=True)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dlse = rng.standard_normal(lse.shape).astype(np.float32)
    want = libna.reference.na2d_backward(q, k, v, out, dout, lse, (3, 5), dlse=dlse)
    libna._C.cuda_emulator_launches()
    with libna.cuda_emulator(arch, checks=True):
        got = libna.na2d_backward(q, k, v, out, dout, lse, (3, 5), dlse=dlse)
    launches = libna._C.cuda_emulator_launches()
    assert any(name.startswith("tc_" if arch == 80 else "fused_") for name in launches), launches
    tol = 1e-4 if dtype == np.float32 else 3e-2
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.astype(np.float64), w, rtol=tol, atol=tol)
