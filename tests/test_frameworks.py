"""Every DLPack framework gets its own array type back, mixed frameworks in
one call are refused with a TypeError, and CuPy arrays (on a GPU) come back
as CuPy arrays computed on the caller's stream."""

import numpy as np
import pytest
import torch

import libna

pytestmark = pytest.mark.skipif(libna._ops._C is None, reason="compiled core not loaded")

jax = pytest.importorskip("jax", reason="JAX is not installed")
jnp = jax.numpy


def make(rng):
    q = rng.standard_normal((2, 5, 6, 4, 8)).astype(np.float32)
    k = rng.standard_normal((2, 5, 6, 2, 8)).astype(np.float32)
    v = rng.standard_normal((2, 5, 6, 2, 8)).astype(np.float32)
    xk = rng.standard_normal((2, 3, 2, 8)).astype(np.float32)
    return q, k, v, xk


FRAMEWORKS = {
    "numpy": (lambda x: x, np.ndarray),
    "torch": (torch.from_numpy, torch.Tensor),
    "jax": (jnp.asarray, jax.Array),
}


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_each_framework_gets_its_own_type(framework, rng):
    convert, kind = FRAMEWORKS[framework]
    arrays = make(rng)
    q, k, v, xk = (convert(x) for x in arrays)
    out, lse = libna.na2d(q, k, v, 3, return_lse=True, additional_keys=xk, additional_values=xk)
    assert isinstance(out, kind) and isinstance(lse, kind)
    merged, merged_lse = libna.merge_attentions([out, out], [lse, lse])
    assert isinstance(merged, kind) and isinstance(merged_lse, kind)
    grads = libna.na2d_backward(q, k, v, out, out, lse, 3, additional_keys=xk,
                                additional_values=xk)
    assert all(isinstance(g, kind) for g in grads)
    want = libna.na2d(*arrays[:3], 3, additional_keys=arrays[3], additional_values=arrays[3])
    np.testing.assert_allclose(np.asarray(out), want, rtol=0, atol=0)


def _in_dtype(framework, x, name):
    """x (float32, NumPy) as framework's array of dtype `name`."""
    if framework == "torch":
        return torch.from_numpy(x).to(getattr(torch, name))
    if framework == "jax":
        return jnp.asarray(x, dtype=getattr(jnp, name))
    if name == "bfloat16":
        return x.astype(pytest.importorskip("ml_dtypes", reason="needs ml_dtypes").bfloat16)
    return x.astype(name)


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
@pytest.mark.parametrize("dtype", libna.build_info()["dtypes"] if libna._ops._C else [])
def test_every_dtype_of_the_core_in_every_framework(framework, dtype, rng):
    """Each dtype the core lists (LIBNA_FOR_EACH_DTYPE in libna/tensor.h) goes
    in and comes back in that framework's own type of that dtype: a name map
    of the bindings, the JAX FFI or _frameworks.py that forgets one fails
    here."""
    if framework == "jax" and dtype == "float64" and not jax.config.jax_enable_x64:
        pytest.skip("JAX runs without x64 here: its float64 arrays are float32")
    arrays = [_in_dtype(framework, x, dtype) for x in make(rng)[:3]]
    out = libna.na2d(*arrays, 3)
    assert isinstance(out, FRAMEWORKS[framework][1])
    assert str(out.dtype).removeprefix("torch.") == dtype
    as_f64 = (lambda x: x.double().numpy()) if framework == "torch" else (
        lambda x: np.asarray(x).astype(np.float64))
    want = libna.na2d(*(as_f64(x) for x in arrays), 3)
    tol = {"float64": 1e-12, "float32": 1e-5}.get(dtype, 3e-2)
    np.testing.assert_allclose(as_f64(out), want, rtol=tol, atol=tol)


MIXES = [("numpy", "torch"), ("numpy", "jax"), ("torch", "jax")]


@pytest.mark.parametrize("first,second", MIXES)
def test_mixed_frameworks_are_refused(first, second, rng):
    q, k, v, xk = make(rng)
    a, b = FRAMEWORKS[first][0], FRAMEWORKS[second][0]
    match = f"one framework.*{first}.*{second}"
    with pytest.raises(TypeError, match=match):
        libna.na2d(a(q), b(k), a(v), 3)
    with pytest.raises(TypeError, match=match):
        libna.na2d(a(q), a(k), a(v), 3, additional_keys=b(xk), additional_values=b(xk))
    out, lse = libna.na2d(q, k, v, 3, return_lse=True)
    with pytest.raises(TypeError, match=match):
        libna.merge_attentions([a(out), b(out)], [a(lse), b(lse)])
    with pytest.raises(TypeError, match=match):
        libna.na2d_backward(a(q), a(k), a(v), a(out), b(out), a(lse), 3)


def _cupy_or_skip():
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("CuPy found no CUDA GPU")
    except cupy.cuda.runtime.CUDARuntimeError as error:
        pytest.skip(f"CuPy found no CUDA GPU ({error})")
    if "cuda" not in libna.build_info()["backends"]:
        pytest.skip("libna was built without its CUDA backend")
    return cupy


@pytest.mark.gpu
def test_cupy_in_cupy_out_on_the_callers_stream(rng):
    cupy = _cupy_or_skip()
    q, k, v, xk = make(rng)
    want, want_lse = libna.na2d(q, k, v, 3, return_lse=True)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        out, lse = libna.na2d(*(cupy.asarray(x) for x in (q, k, v)), 3, return_lse=True)
        stream.synchronize()
    assert isinstance(out, cupy.ndarray) and isinstance(lse, cupy.ndarray)
    assert out.device.id == cupy.cuda.Device().id
    np.testing.assert_allclose(cupy.asnumpy(out), want, atol=1e-5)
    np.testing.assert_allclose(cupy.asnumpy(lse), want_lse, atol=1e-5)
    with pytest.raises(TypeError, match="one framework"):
        libna.na2d(cupy.asarray(q), k, v, 3)


def test_plain_calls_take_the_short_path_and_the_rest_the_checked_one(rng):
    """Arrays' short path (no per-array framework checks) is taken only by
    calls whose arrays are all NumPy float16/32/64 arrays or all plain CPU
    torch tensors; everything else (mixes, bfloat16 and uint16 NumPy arrays,
    subclasses, Parameters, meta tensors, a missing required input) goes
    through the checked path, which refuses or converts as before."""
    from libna._frameworks import _plain_family

    a = rng.standard_normal((1, 4, 4, 1, 8)).astype(np.float32)
    t = torch.from_numpy(a)
    opt = ("rpb",)
    assert _plain_family({"q": a, "k": a.astype(np.float16), "rpb": None}, opt) == "numpy"
    assert _plain_family({"q": t, "k": t.requires_grad_(False), "rpb": None}, opt) == "torch"
    for named in ({"q": a, "k": t}, {"q": t, "k": a},
                  {"q": a, "k": a.view(np.uint16)},
                  {"q": a, "k": np.asarray(a, dtype=np.int32)},
                  {"q": a, "k": np.ma.asarray(a)},
                  {"q": t, "k": torch.nn.Parameter(t.clone())},
                  {"q": t, "k": torch.empty(t.shape, device="meta")},
                  {"q": a, "k": None}):
        assert _plain_family(named, opt) is None, named
    # Both paths give the same answer and the caller's type back.
    out_numpy = libna.na2d(a, a, a, 3)
    out_torch = libna.na2d(t, t, t, 3)
    out_param = libna.na2d(torch.nn.Parameter(t.clone()), t, t, 3)
    assert isinstance(out_numpy, np.ndarray) and type(out_torch) is torch.Tensor
    np.testing.assert_array_equal(out_torch.numpy(), out_numpy)
    np.testing.assert_array_equal(out_param.detach().numpy(), out_numpy)
    with pytest.raises(TypeError, match="one framework"):
        libna.na2d(a, t, a, 3)
    with pytest.raises(TypeError, match=r"\bk\b.*None"):
        libna.na2d(a, None, a, 3)
