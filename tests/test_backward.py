"""libna's compiled backward ops (framework-free, NumPy arrays) against the
float64 reference over the feature grid, plus determinism and a torch-free
end-to-end run. PyTorch autograd is tested in test_torch.py."""

import itertools
import multiprocessing
import os

import numpy as np
import pytest

import libna
from libna import _ops, reference

from _cases import case_id, grid, make_qkv, make_rpb


def run_backward(module, rank, q, k, v, kernel, rpb, dout_seed=1, **kw):
    out, lse = getattr(libna, f"na{rank}d")(q, k, v, kernel, rpb=rpb, return_lse=True, **kw)
    dout = np.random.default_rng(dout_seed).standard_normal(out.shape).astype(q.dtype)
    return getattr(module, f"na{rank}d_backward")(q, k, v, out, dout, lse, kernel, rpb=rpb, **kw)


def grid_problem(case, rng, dim, dim_v, scale):
    """Inputs for one feature-grid case: rank, q, k, v (float64), rpb where
    the case allows it (non-causal, stride 1), and the keyword arguments."""
    spatial, kernel, stride, dilation, causal = case
    q, k, v = make_qkv(rng, 2, spatial, 4, 2, dim, dim_v)
    use_rpb = not any(causal) and all(x == 1 for x in stride)
    rpb = make_rpb(rng, 4, kernel) if use_rpb else None
    kw = dict(stride=stride, dilation=dilation, is_causal=causal, scale=scale)
    return len(spatial), q, k, v, rpb, kw


@pytest.mark.parametrize("case", grid()[::2], ids=case_id)
def test_backward_matches_reference_float64(case, rng):
    rank, q, k, v, rpb, kw = grid_problem(case, rng, 8, 6, 0.4)
    kernel = case[1]
    grads = run_backward(libna, rank, q, k, v, kernel, rpb, **kw)
    ref = run_backward(reference, rank, q, k, v, kernel, rpb, **kw)
    assert len(grads) == (3 if rpb is None else 4)
    for name, g, r in zip(("dq", "dk", "dv", "drpb"), grads, ref):
        assert g.shape == r.shape and g.dtype == np.float64, name
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-11, err_msg=name)


@pytest.mark.parametrize("heads,heads_kv,dim,dim_v", [(6, 3, 32, 16), (4, 1, 64, 64), (2, 2, 128, 8)])
def test_backward_gqa_and_head_dims(heads, heads_kv, dim, dim_v, rng):
    q, k, v = make_qkv(rng, 1, (6, 7), heads, heads_kv, dim, dim_v)
    rpb = make_rpb(rng, heads, (3, 5))
    grads = run_backward(libna, 2, q, k, v, (3, 5), rpb)
    ref = run_backward(reference, 2, q, k, v, (3, 5), rpb)
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-5), (np.float16, 2e-2)])
def test_backward_low_precision(dtype, tol, rng):
    q, k, v = make_qkv(rng, 1, (9, 8), 2, 2, 16, 16)
    rpb = make_rpb(rng, 2, (3, 3))
    low = [x.astype(dtype) for x in (q, k, v)]
    rounded = [x.astype(np.float64) for x in low]
    grads = run_backward(libna, 2, *low, 3, rpb.astype(dtype))
    ref = run_backward(reference, 2, *rounded, 3, rpb.astype(dtype).astype(np.float64))
    for g, r in zip(grads, ref):
        assert g.dtype == dtype
        assert np.abs(g.astype(np.float64) - r).max() <= tol * max(1.0, np.abs(r).max())


def test_backward_is_deterministic_across_thread_counts(rng):
    q, k, v = make_qkv(rng, 2, (20, 20), 4, 2, 16, 16, np.float32)
    rpb = make_rpb(rng, 4, (5, 5), np.float32)
    n = libna.get_num_threads()
    try:
        libna.set_num_threads(1)
        one = run_backward(libna, 2, q, k, v, 5, rpb)
        libna.set_num_threads(2)
        two = run_backward(libna, 2, q, k, v, 5, rpb)
        # 4 (b, kv head) pairs on 3 threads: P and dS are computed again in
        # the key pass instead of kept (test_saved_probabilities_...).
        libna.set_num_threads(3)
        three = run_backward(libna, 2, q, k, v, 5, rpb)
    finally:
        libna.set_num_threads(n)
    for a, b, c in zip(one, two, three):
        assert np.array_equal(a, b) and np.array_equal(a, c)


def _set_environ(values):
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _process_with(saved_probs_bytes):
    """A worker process on one thread with LIBNA_CPU_SAVED_PROBS_BYTES set
    (None: unset), which libna reads once per process."""
    variables = {"LIBNA_NUM_THREADS": "1", "LIBNA_CPU_SAVED_PROBS_BYTES": saved_probs_bytes}
    before = {name: os.environ.get(name) for name in variables}
    _set_environ(variables)
    try:  # the worker starts here, with this environment
        return multiprocessing.get_context("spawn").Pool(1)
    finally:
        _set_environ(before)


@pytest.fixture(scope="module")
def saving_and_recomputing():
    with _process_with(None) as saving, _process_with("0") as recomputing:
        for process, budget in ((saving, None), (recomputing, "0")):
            assert process.apply(os.getenv, ("LIBNA_CPU_SAVED_PROBS_BYTES",)) == budget
            assert process.apply(libna.get_num_threads) == 1
        yield saving, recomputing


def saved_and_recomputed(processes, *args, **kwargs):
    """_ops.na_backward(*args, **kwargs) with the 1D/2D backward keeping P
    and dS from its query pass for its key pass (the default when the ring
    fits and whole (b, kv head) pairs keep every thread busy: one thread
    here), and with it computing them again (LIBNA_CPU_SAVED_PROBS_BYTES=0)."""
    return tuple(process.apply(_ops.na_backward, args, kwargs) for process in processes)


@pytest.mark.parametrize("case", [c for c in grid() if len(c[0]) < 3], ids=case_id)
def test_saved_probabilities_match_recomputed(case, rng, saving_and_recomputing):
    """Both ways compute the same P and dS with the same operations in the
    same order, and accumulate dk and dv in the same order: bitwise equal
    gradients (so the choice, which depends on sizes and thread count, never
    changes a result), and both agree with the float64 reference."""
    args, kwargs, ref = float32_grid_problem(case, rng)
    saved, recomputed = saved_and_recomputed(saving_and_recomputing, *args, **kwargs)
    for name, a, b, r in zip(("dq", "dk", "dv", "drpb"), saved, recomputed, ref):
        assert np.array_equal(a, b), name
        assert np.abs(a - r).max() <= 1e-5 * max(1.0, np.abs(r).max()), name


UNFUSED = [
    ((11,), (4,), (2,), (False,)),
    ((11,), (3,), (1,), (True,)),
    ((7, 8), (3, 2), (1, 3), (True, False)),
    ((7, 8), (3, 3), (2, 1), (False, False)),
    ((4, 5, 6), (2, 3, 2), (1, 1, 2), (False, True, False)),
    ((4, 5, 6), (3, 3, 3), (1, 1, 1), (False, False, False)),
]


@pytest.mark.parametrize("case", UNFUSED, ids=lambda c: f"{c[0]}-k{c[1]}-d{c[2]}-c{c[3]}")
def test_unfused_backward_matches_reference(case, rng):
    spatial, kernel, dilation, causal = case
    rank = len(spatial)
    q, k, v = make_qkv(rng, 2, spatial, 4, 2, 6, 5)
    rpb = None if any(causal) else make_rpb(rng, 4, kernel)
    kw = dict(dilation=dilation, is_causal=causal)
    attn = getattr(libna, f"na{rank}d_qk")(q, k, kernel, rpb=rpb, **kw)
    dattn = rng.standard_normal(attn.shape)
    got = getattr(libna, f"na{rank}d_qk_backward")(dattn, q, k, kernel, rpb=rpb, **kw)
    ref = getattr(reference, f"na{rank}d_qk_backward")(dattn, q, k, kernel, rpb=rpb, **kw)
    assert len(got) == (3 if rpb is not None else 2)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-11)

    probs = rng.random(attn.shape)
    dout = rng.standard_normal((2, *spatial, 4, 5))
    got = getattr(libna, f"na{rank}d_av_backward")(dout, probs, v, kernel, **kw)
    ref = getattr(reference, f"na{rank}d_av_backward")(dout, probs, v, kernel, **kw)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-11)
    if any(causal):  # dattn is exactly zero where the causal window has no key
        assert np.all(got[0][np.isneginf(attn)] == 0)


@pytest.mark.parametrize("case", [c for c in grid() if all(s == 1 for s in c[2])], ids=case_id)
def test_unfused_backward_float32_grid(case, rng):
    """The vectorised float32 unfused backward kernels over the stride-1
    feature grid (GQA, rpb where allowed), against the float64 reference
    evaluated on the same float32 inputs."""
    spatial, kernel, _, dilation, causal = case
    rank = len(spatial)
    f32 = lambda x: None if x is None else x.astype(np.float32)
    q, k, v = (f32(x).astype(np.float64) for x in make_qkv(rng, 2, spatial, 4, 2, 16, 8))
    rpb = None if any(causal) else f32(make_rpb(rng, 4, kernel)).astype(np.float64)
    kw = dict(dilation=dilation, is_causal=causal)
    attn = getattr(reference, f"na{rank}d_qk")(q, k, kernel, rpb=rpb, **kw)
    dattn = f32(np.where(np.isneginf(attn), 0.0, rng.standard_normal(attn.shape))).astype(np.float64)
    probs = f32(np.where(np.isneginf(attn), 0.0, rng.random(attn.shape))).astype(np.float64)
    dout = f32(rng.standard_normal((2, *spatial, 4, 8))).astype(np.float64)

    def check(name, got, ref, terms):
        assert got.dtype == np.float32, name
        bound = 4 * np.finfo(np.float32).eps * np.sqrt(terms) * max(1.0, np.abs(ref).max())
        assert np.abs(got - ref).max() <= bound, name

    terms = np.prod(kernel) * 2  # a kv head sums over two query heads
    got = getattr(libna, f"na{rank}d_qk_backward")(f32(dattn), f32(q), f32(k), kernel,
                                                     rpb=f32(rpb), **kw)
    ref = getattr(reference, f"na{rank}d_qk_backward")(dattn, q, k, kernel, rpb=rpb, **kw)
    assert len(got) == len(ref)
    for name, g, r in zip(("dq", "dk", "drpb"), got, ref):
        check(name, g, r, terms if name != "drpb" else 2 * 4 * np.prod(spatial))
    got = getattr(libna, f"na{rank}d_av_backward")(f32(dout), f32(probs), f32(v), kernel, **kw)
    ref = getattr(reference, f"na{rank}d_av_backward")(dout, probs, v, kernel, **kw)
    for name, g, r in zip(("dattn", "dv"), got, ref):
        check(name, g, r, terms)
    assert np.all(got[0][np.isneginf(attn)] == 0)


def test_backward_bad_input(rng):
    q, k, v = make_qkv(rng, 1, (8,), 2, 2, 4, 4)
    out, lse = libna.na1d(q, k, v, 3, return_lse=True)
    with pytest.raises(ValueError, match=r"\[na1d_backward\] dout must have shape"):
        libna.na1d_backward(q, k, v, out, out[..., :2], lse, 3)
    with pytest.raises(ValueError, match=r"lse must have shape"):
        libna.na1d_backward(q, k, v, out, out, lse[..., :1], 3)
    with pytest.raises(TypeError, match=r"lse must have dtype float64"):
        libna.na1d_backward(q, k, v, out, out, lse.astype(np.float32), 3)
    with pytest.raises(ValueError, match=r"kernel_size=\(9,\)"):
        libna.na1d_backward(q, k, v, out, out, lse, 9)


def test_numpy_backward_without_torch():
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None
        import numpy as np, libna
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((1, 6, 6, 2, 4)) for _ in range(3))
        out, lse = libna.na2d(q, k, v, 3, return_lse=True)
        dq, dk, dv = libna.na2d_backward(q, k, v, out, np.ones_like(out), lse, 3)
        ref = libna.reference.na2d_backward(q, k, v, out, np.ones_like(out), lse, 3)
        print(all(np.allclose(a, b) for a, b in zip((dq, dk, dv), ref)), "torch" in sys.modules
              and sys.modules["torch"] is not None)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True False"


def float32_grid_problem(case, rng):
    """A feature-grid case in float32: the arguments of libna's backward on
    it (those of _ops.na_backward, rank first), and the float64 reference
    gradients of the same inputs."""
    rank, q, k, v, rpb, kw = grid_problem(case, rng, 16, 8, 0.3)
    kernel = case[1]
    out, lse = getattr(reference, f"na{rank}d")(q, k, v, kernel, rpb=rpb, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape)
    ref = getattr(reference, f"na{rank}d_backward")(q, k, v, out, dout, lse, kernel, rpb=rpb, **kw)
    f32 = lambda x: None if x is None else x.astype(np.float32)
    args = (rank, *(f32(x) for x in (q, k, v, out, dout, lse)), kernel)
    return args, dict(rpb=f32(rpb), **kw), ref


@pytest.mark.parametrize("case", grid()[1::2], ids=case_id)
def test_backward_float32_grid(case, rng):
    """The vectorised float32 backward over the feature grid. Its error is a
    few float32 ulps of the gradients' magnitude (float32 accumulation over
    at most a few hundred terms): bound 1e-5 relative to max(1, |grad|)."""
    (rank, *args), kwargs, ref = float32_grid_problem(case, rng)
    grads = getattr(libna, f"na{rank}d_backward")(*args, **kwargs)
    for name, g, r in zip(("dq", "dk", "dv", "drpb"), grads, ref):
        assert g.dtype == np.float32, name
        assert np.abs(g - r).max() <= 1e-5 * max(1.0, np.abs(r).max()), name


# Rows long enough that the vectorised kernels split them into several column
# tiles (about 192 KiB of key/value columns per tile: a few hundred positions
# at these head dims; the 1D/2D backward's strips: 1500, 400 and 700
# positions make two or three), with every feature that changes which blocks
# a tile holds: dilation groups, causal starts, stride, rpb (per-tile partials
# of its gradient), GQA.
WIDE_ROWS = [
    ((1500,), (9,), dict(dilation=(2,)), True),
    ((1100,), (7,), dict(stride=(3,)), False),
    ((3, 400), (3, 7), {}, True),
    ((5, 333), (3, 5), dict(dilation=(1, 3), is_causal=(False, True)), False),
    ((4, 700), (3, 5), dict(dilation=(1, 2)), True),
    ((2, 3, 260), (2, 3, 5), dict(dilation=(1, 1, 2)), True),
]


@pytest.mark.parametrize("spatial,kernel,kw,use_rpb", WIDE_ROWS,
                         ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else None)
def test_wide_rows_in_column_tiles(spatial, kernel, kw, use_rpb, rng, saving_and_recomputing):
    q, k, v = make_qkv(rng, 1, spatial, 4, 2, 32, 32)
    rpb = make_rpb(rng, 4, kernel) if use_rpb else None
    rank = len(spatial)
    out, lse = getattr(reference, f"na{rank}d")(q, k, v, kernel, rpb=rpb, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape)
    ref = getattr(reference, f"na{rank}d_backward")(q, k, v, out, dout, lse, kernel, rpb=rpb, **kw)
    f32 = lambda x: None if x is None else x.astype(np.float32)
    got_out = getattr(libna, f"na{rank}d")(f32(q), f32(k), f32(v), kernel, rpb=f32(rpb), **kw)
    assert np.abs(got_out - out).max() <= 1e-5
    got, recomputed = saved_and_recomputed(
        saving_and_recomputing, rank, f32(q), f32(k), f32(v), f32(out), f32(dout), f32(lse),
        kernel, rpb=f32(rpb), **kw)
    assert len(got) == (4 if use_rpb else 3)
    for name, g, b, r in zip(("dq", "dk", "dv", "drpb"), got, recomputed, ref):
        assert np.array_equal(g, b), name
        assert np.abs(g - r).max() <= 1e-5 * max(1.0, np.abs(r).max()), name


DLSE_CASES = [  # spatial, kernel, keyword arguments
    ((11,), 4, dict(is_causal=True)),
    ((7, 9), (3, 5), dict(dilation=(2, 1), rpb=True)),
    ((5, 6, 4), 3, dict(stride=(1, 2, 1))),
    ((6, 7), 3, dict(additional=3)),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("spatial,kernel,kw", DLSE_CASES,
                         ids=lambda x: str(x) if not isinstance(x, dict) else str(sorted(x)))
def test_lse_gradient_matches_reference(spatial, kernel, kw, dtype, rng):
    """dlse, the gradient of lse, enters the kernels' row terms (D_i =
    dout_i.out_i - dlse_i): every gradient equals the reference's, which
    adds p * dlse to the logits' gradient, and differs from the one without
    dlse (on the scalar float64 kernels and the vectorised float32 ones)."""
    kw = dict(kw)
    rank = len(spatial)
    kernel_size = (kernel,) * rank if isinstance(kernel, int) else kernel
    q, k, v = (x.astype(dtype) for x in make_qkv(rng, 2, spatial, 4, 2, 8, 6))
    if kw.pop("rpb", False):
        kw["rpb"] = make_rpb(rng, 4, kernel_size).astype(dtype)
    extra = kw.pop("additional", 0)
    if extra:
        kw["additional_keys"] = rng.standard_normal((2, extra, 2, 8)).astype(dtype)
        kw["additional_values"] = rng.standard_normal((2, extra, 2, 6)).astype(dtype)
    out, lse = getattr(reference, f"na{rank}d")(q, k, v, kernel_size, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dlse = rng.standard_normal(lse.shape).astype(lse.dtype)
    args = (q, k, v, out, dout, lse, kernel_size)
    got = getattr(libna, f"na{rank}d_backward")(*args, dlse=dlse, **kw)
    want = getattr(reference, f"na{rank}d_backward")(*args, dlse=dlse, **kw)
    without = getattr(reference, f"na{rank}d_backward")(*args, **kw)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == np.float64 else dict(rtol=2e-4, atol=2e-4)
    for g, w, n in zip(got, want, without):
        np.testing.assert_allclose(g, w, **tol)
    assert not np.allclose(want[0], without[0], rtol=1e-3)  # dlse changes dq


def test_lse_gradient_refuses_a_wrong_shape(rng):
    q, k, v = make_qkv(rng, 1, (8,), 2, 2, 4, 4)
    out, lse = libna.na1d(q, k, v, 3, return_lse=True)
    for module in (libna, reference):
        with pytest.raises(ValueError, match=r"\[na1d_backward\] .*dlse .*shape"):
            module.na1d_backward(q, k, v, out, out, lse, 3, dlse=lse[:, :4])


def test_numpy_backward_short_path_is_the_checked_path(monkeypatch):
    """na2d_backward on plain NumPy arrays goes straight to the core, as the
    forward does (no Arrays, no Python-side argument checks): its gradients
    are bitwise those of the checked path (the same call on torch tensors,
    which goes through Arrays), with and without rpb and dlse, and a call the
    core refuses says the same on both paths."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    q, k, v, dout = (rng.standard_normal((1, 6, 7, 2, 8)).astype(np.float32) for _ in range(4))
    rpb = rng.standard_normal((2, 5, 5)).astype(np.float32)
    out, lse = libna.na2d(q, k, v, 3, rpb=rpb, return_lse=True)
    dlse = rng.standard_normal(lse.shape).astype(np.float32)
    cases = ({}, {"rpb": rpb}, {"dlse": dlse}, {"rpb": rpb, "dlse": dlse, "dilation": 2})
    as_torch = lambda x: torch.from_numpy(x) if isinstance(x, np.ndarray) else x  # noqa: E731
    checked = [libna.na2d_backward(*map(as_torch, (q, k, v, out, dout, lse)), 3,
                                   **{name: as_torch(x) for name, x in kw.items()})
               for kw in cases]
    with pytest.raises(ValueError) as refused:
        libna.na2d_backward(*map(as_torch, (q, k, v, out, dout, lse)), 9)
    monkeypatch.setattr(_ops, "Arrays", None)  # the short path never builds one
    for kw, expected in zip(cases, checked):
        grads = libna.na2d_backward(q, k, v, out, dout, lse, 3, **kw)
        assert len(grads) == (4 if "rpb" in kw else 3)
        for got, want in zip(grads, expected):
            assert type(got) is np.ndarray
            np.testing.assert_array_equal(got, want.numpy())
    with pytest.raises(ValueError) as fast_refused:
        libna.na2d_backward(q, k, v, out, dout, lse, 9)
    assert str(fast_refused.value) == str(refused.value)
