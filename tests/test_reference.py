"""Tests of libna's pure-NumPy reference (python/libna/reference.py).

The reference is the project's float64 oracle, so it is checked here against
properties that do not reuse its window code: dense attention written inline,
the dilation <-> interleaved-subsequence identity, hand-worked windows written
out as literals, composition of the unfused ops, GQA as repeated heads, and
central finite differences for the backward pass.

The module is loaded by file path so these tests do not depend on the package
``__init__``.
"""

import importlib.util
import itertools
import pathlib

import numpy as np
import pytest

from _cases import make_qkv

_REF_PATH = pathlib.Path(__file__).resolve().parents[1] / "python" / "libna" / "reference.py"
_spec = importlib.util.spec_from_file_location("libna_reference_under_test", _REF_PATH)
R = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(R)

try:  # optional
    import ml_dtypes
except ImportError:  # pragma: no cover
    ml_dtypes = None


# --------------------------------------------------------------------------
# helpers (independent of the reference's window code)
# --------------------------------------------------------------------------


def rand(rng, *shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


def fused(n):
    return getattr(R, f"na{n}d")


def coords(spatial):
    """[n, N] integer coordinates of the row-major flattened positions."""
    return np.indices(spatial).reshape(len(spatial), -1)


def causal_mask(spatial, causal):
    """mask[query, key]: key <= query along every causal axis."""
    c = coords(spatial)
    n_pos = c.shape[1]
    mask = np.ones((n_pos, n_pos), dtype=bool)
    for a, is_c in enumerate(causal):
        if is_c:
            mask &= c[a][None, :] <= c[a][:, None]
    return mask


def dense_rpb_bias(rpb, spatial):
    """bias[h, query, key] for a full window (k == L, stride 1, dilation 1)."""
    c = coords(spatial)
    rel = tuple(c[a][None, :] - c[a][:, None] + spatial[a] - 1 for a in range(len(spatial)))
    return rpb[(slice(None),) + rel]


def dense_attention(q, k, v, scale, mask=None, bias=None):
    """Plain softmax attention over the flattened spatial positions."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    b = q.shape[0]
    spatial = q.shape[1:-2]
    heads, d = q.shape[-2:]
    heads_kv = k.shape[-2]
    n_pos = int(np.prod(spatial))
    rep = heads // heads_kv
    qf = q.reshape(b, n_pos, heads, d)
    kf = np.repeat(k.reshape(b, n_pos, heads_kv, d), rep, axis=2)
    vf = np.repeat(v.reshape(b, n_pos, heads_kv, -1), rep, axis=2)
    logits = scale * np.einsum("bihd,bjhd->bhij", qf, kf)
    if bias is not None:
        logits = logits + bias[None]
    if mask is not None:
        logits = np.where(mask[None, None], logits, -np.inf)
    m = logits.max(axis=-1, keepdims=True)
    e = np.exp(logits - m)
    s = e.sum(axis=-1, keepdims=True)
    lse = np.log(s[..., 0]) + m[..., 0]  # [B, H, N]
    out = np.einsum("bhij,bjhe->bihe", e / s, vf)
    return (out.reshape((b,) + spatial + (heads, -1)),
            lse.transpose(0, 2, 1).reshape((b,) + spatial + (heads,)))


def softmax_last(x):
    m = x.max(axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=-1, keepdims=True)


def num_grad(loss, x, eps=1e-6):
    """Central finite differences of scalar loss() w.r.t. array x (in place)."""
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        idx = it.multi_index
        orig = x[idx]
        x[idx] = orig + eps
        lp = loss()
        x[idx] = orig - eps
        lm = loss()
        x[idx] = orig
        g[idx] = (lp - lm) / (2 * eps)
    return g


def check_grad(loss, x, grad, max_elems=60, eps=1e-6, seed=0):
    """Compare an analytic gradient with central finite differences.

    Small arrays are checked element by element; for larger ones a random
    subset of max_elems entries is checked element by element, plus three
    random directional derivatives covering the whole array.
    """
    assert grad.shape == x.shape
    if x.size <= max_elems:
        np.testing.assert_allclose(grad, num_grad(loss, x, eps), rtol=1e-6, atol=1e-7)
        return
    rng = np.random.default_rng(seed)
    flat = rng.choice(x.size, size=max_elems, replace=False)
    for f in flat:
        idx = np.unravel_index(f, x.shape)
        orig = x[idx]
        x[idx] = orig + eps
        lp = loss()
        x[idx] = orig - eps
        lm = loss()
        x[idx] = orig
        np.testing.assert_allclose(grad[idx], (lp - lm) / (2 * eps), rtol=1e-6, atol=1e-7,
                                   err_msg=f"element {idx}")
    x0 = x.copy()
    for _ in range(3):
        u = rng.standard_normal(x.shape)
        x[...] = x0 + eps * u
        lp = loss()
        x[...] = x0 - eps * u
        lm = loss()
        x[...] = x0
        np.testing.assert_allclose(float((grad * u).sum()), (lp - lm) / (2 * eps),
                                   rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------
# k == L: dense attention
# --------------------------------------------------------------------------

FULL_CASES = [
    # n, spatial, causal, stride
    (1, (9,), (False,), (1,)),
    (1, (9,), (True,), (1,)),
    (1, (9,), (False,), (4,)),
    (1, (8,), (True,), (3,)),
    (2, (5, 6), (False, False), (1, 1)),
    (2, (5, 6), (True, True), (1, 1)),
    (2, (5, 6), (True, False), (2, 3)),
    (2, (4, 5), (False, True), (1, 2)),
    (3, (3, 4, 5), (False, False, False), (1, 1, 1)),
    (3, (3, 4, 5), (True, True, True), (1, 1, 1)),
    (3, (3, 4, 5), (False, True, False), (2, 1, 3)),
]


@pytest.mark.parametrize("n,spatial,causal,stride", FULL_CASES)
def test_full_window_equals_dense(n, spatial, causal, stride):
    rng = np.random.default_rng(1)
    q, k, v = make_qkv(rng, 2, spatial, 4, 2, 5, 3)
    scale = 0.37
    out, lse = fused(n)(q, k, v, spatial, stride=stride, is_causal=causal,
                        scale=scale, return_lse=True)
    exp_out, exp_lse = dense_attention(q, k, v, scale, mask=causal_mask(spatial, causal))
    np.testing.assert_allclose(out, exp_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, exp_lse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n,spatial", [(1, (7,)), (2, (4, 5)), (3, (3, 3, 4))])
def test_full_window_with_rpb_equals_dense(n, spatial):
    rng = np.random.default_rng(2)
    q, k, v = make_qkv(rng, 2, spatial, 2, 2, 4, 4)
    rpb = rand(rng, 2, *(2 * L - 1 for L in spatial))
    out, lse = fused(n)(q, k, v, spatial, rpb=rpb, return_lse=True)
    exp_out, exp_lse = dense_attention(q, k, v, 4 ** -0.5, bias=dense_rpb_bias(rpb, spatial))
    np.testing.assert_allclose(out, exp_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, exp_lse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,spatial", [(1, (8,)), (2, (4, 5)), (3, (2, 3, 4))])
def test_lse_is_log_sum_exp_of_logits(n, spatial, causal):
    rng = np.random.default_rng(3)
    q, k, v = make_qkv(rng, 1, spatial, 3, 1, 6, 2)
    _, lse = fused(n)(q, k, v, spatial, is_causal=causal, return_lse=True)
    # inline: logits over all keys, masked, log(sum(exp))
    n_pos = int(np.prod(spatial))
    qf = q.reshape(1, n_pos, 3, 6)
    kf = k.reshape(1, n_pos, 1, 6)[:, :, 0]
    logits = np.einsum("bihd,bjd->bhij", qf, kf) * 6 ** -0.5
    mask = causal_mask(spatial, (causal,) * n)
    expected = np.log(np.where(mask[None, None], np.exp(logits), 0.0).sum(-1))
    expected = expected.transpose(0, 2, 1).reshape((1,) + spatial + (3,))
    np.testing.assert_allclose(lse, expected, rtol=1e-12, atol=1e-12)
    # and the unfused scores give the same lse
    scores = getattr(R, f"na{n}d_qk")(q, k, spatial, is_causal=causal) * 6 ** -0.5
    with np.errstate(divide="ignore"):
        lse2 = np.log(np.exp(scores).sum(-1))
    np.testing.assert_allclose(lse, lse2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("spatial", [(6,), (3, 4), (2, 3, 3)])
def test_qk_slot_layout_full_window(spatial, causal):
    """With k == L the window starts at 0 on every axis, so slot t is key t."""
    n = len(spatial)
    rng = np.random.default_rng(4)
    q, k, _ = make_qkv(rng, 1, spatial, 2, 2, 3, 3)
    scores = getattr(R, f"na{n}d_qk")(q, k, spatial, is_causal=causal)
    n_pos = int(np.prod(spatial))
    full = np.einsum("bihd,bjhd->bihj", q.reshape(1, n_pos, 2, 3), k.reshape(1, n_pos, 2, 3))
    mask = causal_mask(spatial, (causal,) * n)
    expected = np.where(mask[None, :, None, :], full, -np.inf)
    np.testing.assert_array_equal(np.isinf(scores.reshape(expected.shape)), np.isinf(expected))
    np.testing.assert_allclose(scores.reshape(expected.shape), expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------
# dilation == NA on interleaved subsequences
# --------------------------------------------------------------------------

DIL_CASES = [
    # spatial, kernel, dilation, stride, causal
    ((13,), (3,), (2,), (1,), (False,)),
    ((13,), (4,), (3,), (2,), (False,)),
    ((12,), (3,), (4,), (1,), (True,)),
    ((11,), (3,), (2,), (3,), (True,)),
    ((9, 10), (3, 2), (2, 3), (1, 1), (False, False)),
    ((9, 10), (3, 3), (3, 2), (2, 3), (True, False)),
    ((8, 7), (2, 3), (2, 2), (2, 1), (False, True)),
    ((6, 7, 8), (2, 3, 2), (3, 2, 2), (1, 2, 2), (False, False, True)),
    ((5, 6, 7), (2, 2, 3), (2, 3, 2), (2, 1, 1), (True, False, False)),
]


@pytest.mark.parametrize("spatial,kernel,dilation,stride,causal", DIL_CASES)
def test_dilation_equals_interleaved_subsequences(spatial, kernel, dilation, stride, causal):
    n = len(spatial)
    rng = np.random.default_rng(5)
    q, k, v = make_qkv(rng, 2, spatial, 2, 1, 4, 5)
    out, lse = fused(n)(q, k, v, kernel, stride=stride, dilation=dilation,
                        is_causal=causal, return_lse=True)
    for groups in itertools.product(*(range(d) for d in dilation)):
        sel = (slice(None),) + tuple(slice(g, None, d) for g, d in zip(groups, dilation))
        sub_out, sub_lse = fused(n)(q[sel], k[sel], v[sel], kernel, stride=stride,
                                    dilation=1, is_causal=causal, return_lse=True)
        np.testing.assert_allclose(out[sel], sub_out, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(lse[sel], sub_lse, rtol=1e-13, atol=1e-13)


def test_dilation_equals_subsequences_unfused_and_rpb():
    rng = np.random.default_rng(6)
    spatial, kernel, dilation = (9, 8), (3, 2), (3, 2)
    q, k, v = make_qkv(rng, 1, spatial, 2, 2, 3, 3)
    rpb = rand(rng, 2, 5, 3)
    out = R.na2d(q, k, v, kernel, dilation=dilation, rpb=rpb)
    scores = R.na2d_qk(q, k, kernel, dilation=dilation, rpb=rpb)
    for g0 in range(3):
        for g1 in range(2):
            sel = (slice(None), slice(g0, None, 3), slice(g1, None, 2))
            np.testing.assert_allclose(out[sel], R.na2d(q[sel], k[sel], v[sel], kernel, rpb=rpb),
                                       rtol=1e-13, atol=1e-13)
            np.testing.assert_allclose(scores[sel], R.na2d_qk(q[sel], k[sel], kernel, rpb=rpb),
                                       rtol=1e-13, atol=1e-13)


# --------------------------------------------------------------------------
# hand-worked 1D windows
# --------------------------------------------------------------------------

LITERAL_1D = [
    # L, kernel, stride, dilation, causal, windows per query (keys in slot order)
    (7, 3, 1, 1, False, [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 6], [4, 5, 6]]),
    (7, 4, 1, 1, False, [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5],
                         [3, 4, 5, 6], [3, 4, 5, 6]]),
    (7, 3, 2, 1, False, [[0, 1, 2], [0, 1, 2], [2, 3, 4], [2, 3, 4], [4, 5, 6], [4, 5, 6], [4, 5, 6]]),
    (7, 3, 1, 1, True, [[0], [0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 6]]),
    (7, 3, 2, 1, True, [[0], [0, 1], [1, 2], [1, 2, 3], [3, 4], [3, 4, 5], [4, 5, 6]]),
    (7, 3, 1, 2, False, [[0, 2, 4], [1, 3, 5], [0, 2, 4], [1, 3, 5], [2, 4, 6], [1, 3, 5], [2, 4, 6]]),
    (7, 3, 1, 2, True, [[0], [1], [0, 2], [1, 3], [0, 2, 4], [1, 3, 5], [2, 4, 6]]),
    (8, 2, 2, 1, False, [[0, 1], [0, 1], [2, 3], [2, 3], [4, 5], [4, 5], [6, 7], [6, 7]]),
    (6, 6, 1, 1, False, [[0, 1, 2, 3, 4, 5]] * 6),
]


@pytest.mark.parametrize("L,kernel,stride,dilation,causal,windows", LITERAL_1D)
def test_literal_1d_windows(L, kernel, stride, dilation, causal, windows):
    # helper
    for i in range(L):
        keys, _ = R.window(i, L, kernel, stride, dilation, causal)
        assert keys == windows[i], (i, keys, windows[i])
        assert R.neighborhood((i,), (L,), kernel, stride, dilation, causal) == [(j,) for j in windows[i]]
    # numeric op vs dense attention masked by the literal windows
    rng = np.random.default_rng(7)
    q, k, v = make_qkv(rng, 2, (L,), 2, 2, 4, 3)
    mask = np.zeros((L, L), dtype=bool)
    for i, w in enumerate(windows):
        mask[i, w] = True
    out, lse = R.na1d(q, k, v, kernel, stride=stride, dilation=dilation, is_causal=causal,
                      return_lse=True)
    exp_out, exp_lse = dense_attention(q, k, v, 0.5, mask=mask)
    np.testing.assert_allclose(out, exp_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, exp_lse, rtol=1e-12, atol=1e-12)
    if stride == 1:
        # unfused slot order: slot a holds key windows[i][a]; the rest is -inf
        scores = R.na1d_qk(q, k, kernel, dilation=dilation, is_causal=causal)
        assert scores.shape == (2, L, 2, kernel)
        for i, w in enumerate(windows):
            expected = np.full((2, 2, kernel), -np.inf)
            expected[:, :, : len(w)] = np.einsum("bhd,bnhd->bhn", q[:, i], k[:, w])
            np.testing.assert_allclose(scores[:, i], expected, rtol=1e-12, atol=1e-12)


def test_literal_window_start():
    # lo is in group coordinates
    assert R.window(0, 7, 3) == ([0, 1, 2], 0)
    assert R.window(6, 7, 3) == ([4, 5, 6], 4)
    assert R.window(6, 7, 3, 1, 2, False) == ([2, 4, 6], 1)
    assert R.window(1, 7, 3, 1, 1, True) == ([0, 1], 0)


def test_literal_2d_neighborhood():
    got = R.neighborhood((0, 6), (7, 7), 3, 1, 1, False)
    assert got == [(0, 4), (0, 5), (0, 6), (1, 4), (1, 5), (1, 6), (2, 4), (2, 5), (2, 6)]
    got = R.neighborhood((1, 3), (7, 7), (3, 2), 1, 1, (True, False))
    assert got == [(0, 2), (0, 3), (1, 2), (1, 3)]


@pytest.mark.parametrize("spatial,kernel,dilation,causal", [
    ((9,), (3,), (2,), (True,)),
    ((7, 8), (3, 4), (2, 1), (True, False)),
    ((5, 6, 4), (2, 3, 2), (2, 1, 2), (False, True, True)),
])
def test_filled_slot_count(spatial, kernel, dilation, causal):
    n = len(spatial)
    rng = np.random.default_rng(8)
    q, k, _ = make_qkv(rng, 1, spatial, 1, 1, 2, 2)
    scores = getattr(R, f"na{n}d_qk")(q, k, kernel, dilation=dilation, is_causal=causal)
    filled = np.isfinite(scores[0, ..., 0, :]).sum(-1)
    for pos in np.ndindex(*spatial):
        expected = 1
        for i, kk, d, c in zip(pos, kernel, dilation, causal):
            expected *= min(i // d + 1, kk) if c else kk
        assert filled[pos] == expected


# --------------------------------------------------------------------------
# composition qk -> softmax -> av == fused; GQA == repeated heads
# --------------------------------------------------------------------------

COMPOSE_CASES = [
    # spatial, kernel, dilation, causal, use_rpb
    ((9,), (4,), (2,), (False,), True),
    ((9,), (3,), (1,), (True,), False),
    ((10,), (5,), (2,), (True,), False),
    ((6, 7), (3, 2), (2, 1), (False, False), True),
    ((6, 7), (3, 4), (1, 1), (True, False), False),
    ((4, 5, 6), (2, 3, 2), (1, 1, 3), (False, False, False), True),
    ((4, 5, 6), (3, 2, 3), (1, 2, 1), (True, True, False), False),
]


@pytest.mark.parametrize("spatial,kernel,dilation,causal,use_rpb", COMPOSE_CASES)
def test_composition_equals_fused(spatial, kernel, dilation, causal, use_rpb):
    n = len(spatial)
    rng = np.random.default_rng(9)
    heads, heads_kv = 4, 2
    q, k, v = make_qkv(rng, 2, spatial, heads, heads_kv, 5, 3)
    rpb = rand(rng, heads, *(2 * kk - 1 for kk in kernel)) if use_rpb else None
    scale = 0.71
    scores = getattr(R, f"na{n}d_qk")(q * scale, k, kernel, dilation=dilation,
                                       is_causal=causal, rpb=rpb)
    attn = softmax_last(scores)
    out = getattr(R, f"na{n}d_av")(attn, v, kernel, dilation=dilation, is_causal=causal)
    expected = fused(n)(q, k, v, kernel, dilation=dilation, is_causal=causal,
                        scale=scale, rpb=rpb)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    # av ignores whatever the unfilled slots hold
    junk = np.where(np.isinf(scores), 1e3, attn)
    out2 = getattr(R, f"na{n}d_av")(junk, v, kernel, dilation=dilation, is_causal=causal)
    np.testing.assert_array_equal(out2, out)


@pytest.mark.parametrize("n,spatial,kernel,causal,stride", [
    (1, (9,), 3, False, 2),
    (2, (6, 5), (3, 2), (True, False), (1, 2)),
    (3, (3, 4, 4), 2, True, 1),
])
def test_gqa_equals_repeated_heads(n, spatial, kernel, causal, stride):
    rng = np.random.default_rng(10)
    heads, heads_kv = 6, 2
    q, k, v = make_qkv(rng, 2, spatial, heads, heads_kv, 4, 3)
    kr = np.repeat(k, heads // heads_kv, axis=-2)
    vr = np.repeat(v, heads // heads_kv, axis=-2)
    out, lse = fused(n)(q, k, v, kernel, stride=stride, is_causal=causal, return_lse=True)
    out_r, lse_r = fused(n)(q, kr, vr, kernel, stride=stride, is_causal=causal, return_lse=True)
    np.testing.assert_allclose(out, out_r, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(lse, lse_r, rtol=1e-13, atol=1e-13)
    # backward: dk/dv of GQA are the per-group sums of the MHA ones
    dout = rand(rng, *out.shape)
    dq, dk, dv = getattr(R, f"na{n}d_backward")(q, k, v, out, dout, lse, kernel, stride=stride,
                                                 is_causal=causal)
    dq_r, dk_r, dv_r = getattr(R, f"na{n}d_backward")(q, kr, vr, out_r, dout, lse_r, kernel,
                                                       stride=stride, is_causal=causal)
    grp = heads // heads_kv
    np.testing.assert_allclose(dq, dq_r, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dk, dk_r.reshape(dk_r.shape[:-2] + (heads_kv, grp, -1)).sum(-2),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dv, dv_r.reshape(dv_r.shape[:-2] + (heads_kv, grp, -1)).sum(-2),
                               rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------
# dtypes, array-likes, immutability
# --------------------------------------------------------------------------

DTYPES = [np.float16, np.float32, np.float64]
if ml_dtypes is not None:
    DTYPES.append(ml_dtypes.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_dtype_round_trip(dtype):
    rng = np.random.default_rng(11)
    q, k, v = make_qkv(rng, 1, (5, 6), 2, 1, 4, 3, dtype=dtype)
    rpb = rand(rng, 2, 5, 5, dtype=dtype)
    out, lse = R.na2d(q, k, v, 3, rpb=rpb, return_lse=True)
    assert out.dtype == np.dtype(dtype)
    assert lse.dtype == (np.float64 if np.dtype(dtype) == np.float64 else np.float32)
    ref = R.na2d(*(x.astype(np.float64) for x in (q, k, v)), 3, rpb=rpb.astype(np.float64))
    tol = {"float16": 2e-3, "bfloat16": 2e-2, "float32": 1e-6, "float64": 1e-14}[np.dtype(dtype).name]
    np.testing.assert_allclose(out.astype(np.float64), ref, rtol=tol, atol=tol)
    scores = R.na2d_qk(q, k, 3, rpb=rpb)
    assert scores.dtype == np.dtype(dtype)
    attn = softmax_last(scores.astype(np.float64)).astype(dtype)
    assert R.na2d_av(attn, v, 3).dtype == np.dtype(dtype)
    grads = R.na2d_backward(q, k, v, out, out, lse, 3, rpb=rpb)
    assert [g.dtype for g in grads] == [np.dtype(dtype)] * 4
    assert [g.dtype for g in R.na2d_qk_backward(scores, q, k, 3)] == [np.dtype(dtype)] * 2
    assert [g.dtype for g in R.na2d_av_backward(out, attn, v, 3)] == [np.dtype(dtype)] * 2


class _ArrayLike:
    def __init__(self, a):
        self._a = a

    def __array__(self, dtype=None, copy=None):
        return self._a if dtype is None else self._a.astype(dtype)


class _DLPackOnly:
    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


def test_array_likes_accepted():
    rng = np.random.default_rng(12)
    q, k, v = make_qkv(rng, 1, (7,), 2, 2, 3, 3, dtype=np.float32)
    expected = R.na1d(q, k, v, 3)
    np.testing.assert_array_equal(R.na1d(_ArrayLike(q), _ArrayLike(k), _ArrayLike(v), 3), expected)
    np.testing.assert_array_equal(R.na1d(_DLPackOnly(q), _DLPackOnly(k), _DLPackOnly(v), 3), expected)


def test_inputs_not_modified():
    rng = np.random.default_rng(13)
    q, k, v = make_qkv(rng, 1, (6, 6), 2, 2, 3, 3)
    rpb = rand(rng, 2, 5, 5)
    arrays = [q, k, v, rpb]
    copies = [a.copy() for a in arrays]
    for a in arrays:
        a.flags.writeable = False  # any write attempt raises
    out, lse = R.na2d(q, k, v, 3, rpb=rpb, return_lse=True)
    scores = R.na2d_qk(q, k, 3, rpb=rpb)
    attn = softmax_last(scores)
    dout = rand(rng, *out.shape)
    for a in (out, lse, scores, attn, dout):
        a.flags.writeable = False
        arrays.append(a)
        copies.append(a.copy())
    R.na2d_av(attn, v, 3)
    R.na2d_backward(q, k, v, out, dout, lse, 3, rpb=rpb)
    R.na2d_qk_backward(scores, q, k, 3, rpb=rpb)
    R.na2d_av_backward(dout, attn, v, 3)
    R.na2d(q, k, v, 3, is_causal=True)
    for a, c in zip(arrays, copies):
        np.testing.assert_array_equal(a, c)


def test_default_scale():
    rng = np.random.default_rng(14)
    q, k, v = make_qkv(rng, 1, (5,), 1, 1, 9, 2)
    np.testing.assert_allclose(R.na1d(q, k, v, 5), dense_attention(q, k, v, 1 / 3)[0],
                               rtol=1e-13, atol=1e-13)


# --------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------

_rng = np.random.default_rng(15)
Q2, K2, V2 = make_qkv(_rng, 1, (8, 8), 2, 2, 4, 4, dtype=np.float32)
Q1, K1, V1 = make_qkv(_rng, 1, (8,), 2, 2, 4, 4, dtype=np.float32)
RPB2 = rand(_rng, 2, 5, 5, dtype=np.float32)
ATT2 = np.full((1, 8, 8, 2, 9), 1 / 9, dtype=np.float32)


def _shape(a, axis, size):
    shape = list(a.shape)
    shape[axis] = size
    return np.zeros(shape, dtype=a.dtype)


BAD = [
    # id, thunk, exception, substrings expected in the message
    ("kernel_too_big", lambda: R.na2d(Q2, K2, V2, (9, 3)), ValueError, ["[na2d]", "kernel_size", "(9, 3)"]),
    ("kernel_1", lambda: R.na2d(Q2, K2, V2, 1), ValueError, ["kernel_size", ">= 2"]),
    ("kernel_0", lambda: R.na1d(Q1, K1, V1, 0), ValueError, ["kernel_size"]),
    ("kernel_neg", lambda: R.na1d(Q1, K1, V1, -3), ValueError, ["kernel_size"]),
    ("kernel_x_dilation", lambda: R.na2d(Q2, K2, V2, 3, dilation=3), ValueError, ["dilation", "(3, 3)"]),
    ("kernel_x_dilation_axis", lambda: R.na2d(Q2, K2, V2, (2, 3), dilation=(4, 3)), ValueError,
     ["dilation"]),
    ("dilation_0", lambda: R.na2d(Q2, K2, V2, 3, dilation=0), ValueError, ["dilation", ">= 1"]),
    ("stride_0", lambda: R.na2d(Q2, K2, V2, 3, stride=0), ValueError, ["stride"]),
    ("stride_gt_kernel", lambda: R.na2d(Q2, K2, V2, 3, stride=(1, 4)), ValueError, ["stride", "(1, 4)"]),
    ("kernel_len", lambda: R.na2d(Q2, K2, V2, (3, 3, 3)), ValueError, ["kernel_size", "2"]),
    ("stride_len", lambda: R.na2d(Q2, K2, V2, 3, stride=[1]), ValueError, ["stride"]),
    ("dilation_len", lambda: R.na1d(Q1, K1, V1, 3, dilation=(1, 1)), ValueError, ["dilation"]),
    ("causal_len", lambda: R.na2d(Q2, K2, V2, 3, is_causal=(True,)), ValueError, ["is_causal"]),
    ("kernel_float", lambda: R.na2d(Q2, K2, V2, 3.0), TypeError, ["kernel_size", "3.0"]),
    ("kernel_float_elem", lambda: R.na2d(Q2, K2, V2, (3, 3.0)), TypeError, ["kernel_size"]),
    ("kernel_str", lambda: R.na2d(Q2, K2, V2, "3"), TypeError, ["kernel_size"]),
    ("kernel_bool", lambda: R.na2d(Q2, K2, V2, True), TypeError, ["kernel_size"]),
    ("kernel_none", lambda: R.na2d(Q2, K2, V2, None), TypeError, ["kernel_size"]),
    ("stride_float", lambda: R.na2d(Q2, K2, V2, 3, stride=1.5), TypeError, ["stride"]),
    ("causal_int", lambda: R.na2d(Q2, K2, V2, 3, is_causal=1), TypeError, ["is_causal"]),
    ("causal_elem_int", lambda: R.na2d(Q2, K2, V2, 3, is_causal=(True, 0)), TypeError, ["is_causal"]),
    ("causal_str", lambda: R.na2d(Q2, K2, V2, 3, is_causal="yes"), TypeError, ["is_causal"]),
    ("rank_2d_arrays_to_1d", lambda: R.na1d(Q2, K2, V2, 3), ValueError, ["[na1d]", "q", "rank"]),
    ("rank_1d_arrays_to_2d", lambda: R.na2d(Q1, K1, V1, 3), ValueError, ["q", "rank"]),
    ("rank_k", lambda: R.na2d(Q2, K2[0], V2, 3), ValueError, ["k", "rank"]),
    ("batch_mismatch", lambda: R.na2d(Q2, np.concatenate([K2, K2]), V2, 3), ValueError, ["k", "batch"]),
    ("spatial_mismatch", lambda: R.na2d(Q2, K2[:, :7], V2[:, :7], 3), ValueError, ["k", "spatial"]),
    ("v_spatial_mismatch", lambda: R.na2d(Q2, K2, V2[:, :, :7], 3), ValueError, ["v"]),
    ("head_dim_mismatch", lambda: R.na2d(Q2, K2[..., :3], V2, 3), ValueError, ["head_dim"]),
    ("kv_heads_mismatch", lambda: R.na2d(Q2, K2, V2[..., :1, :], 3), ValueError, ["v", "heads"]),
    ("heads_not_divisible", lambda: R.na2d(np.concatenate([Q2, Q2[..., :1, :]], -2), K2, V2, 3),
     ValueError, ["divisible"]),
    ("mixed_dtype", lambda: R.na2d(Q2, K2.astype(np.float64), V2, 3), TypeError, ["k", "float64"]),
    ("mixed_dtype_v", lambda: R.na2d(Q2, K2, V2.astype(np.float16), 3), TypeError, ["v", "float16"]),
    ("int_dtype", lambda: R.na2d(Q2.astype(np.int32), K2, V2, 3), TypeError, ["q", "int32"]),
    ("bool_dtype", lambda: R.na2d(Q2 > 0, K2, V2, 3), TypeError, ["q", "bool"]),
    ("complex_dtype", lambda: R.na2d(Q2.astype(np.complex64), K2, V2, 3), TypeError, ["complex64"]),
    ("object_dtype", lambda: R.na2d(Q2.astype(object), K2, V2, 3), TypeError, ["object"]),
    ("rpb_causal", lambda: R.na2d(Q2, K2, V2, 3, rpb=RPB2, is_causal=(False, True)), ValueError,
     ["rpb", "is_causal"]),
    ("rpb_stride", lambda: R.na2d(Q2, K2, V2, 3, rpb=RPB2, stride=2), ValueError, ["rpb", "stride"]),
    ("rpb_shape", lambda: R.na2d(Q2, K2, V2, 3, rpb=RPB2[:, :3]), ValueError, ["rpb", "(2, 5, 5)"]),
    ("rpb_heads", lambda: R.na2d(Q2, K2, V2, 3, rpb=RPB2[:1]), ValueError, ["rpb"]),
    ("rpb_dtype", lambda: R.na2d(Q2, K2, V2, 3, rpb=RPB2.astype(np.float64)), TypeError, ["rpb"]),
    ("rpb_list", lambda: R.na2d(Q2, K2, V2, 3, rpb=RPB2.tolist()), TypeError, ["rpb"]),
    ("zero_batch", lambda: R.na2d(Q2[:0], K2[:0], V2[:0], 3), ValueError, ["zero"]),
    ("zero_head_dim", lambda: R.na2d(Q2[..., :0], K2[..., :0], V2, 3), ValueError, ["zero"]),
    ("zero_heads", lambda: R.na2d(Q2[..., :0, :], K2, V2, 3), ValueError, ["zero"]),
    ("zero_dv", lambda: R.na2d(Q2, K2, V2[..., :0], 3), ValueError, ["v", "zero"]),
    ("q_list", lambda: R.na1d(Q1.tolist(), K1, V1, 3), TypeError, ["q", "list"]),
    ("q_str", lambda: R.na1d("abc", K1, V1, 3), TypeError, ["q", "str"]),
    ("q_scalar", lambda: R.na1d(1.0, K1, V1, 3), TypeError, ["q"]),
    ("q_np_scalar", lambda: R.na1d(np.float32(1.0), K1, V1, 3), TypeError, ["q"]),
    ("q_none", lambda: R.na1d(None, K1, V1, 3), TypeError, ["q"]),
    ("v_tuple", lambda: R.na1d(Q1, K1, tuple(V1.tolist()), 3), TypeError, ["v"]),
    ("q_0d", lambda: R.na1d(np.array(1.0, np.float32), K1, V1, 3), ValueError, ["q", "rank"]),
    ("scale_str", lambda: R.na2d(Q2, K2, V2, 3, scale="0.5"), TypeError, ["scale"]),
    ("scale_bool", lambda: R.na2d(Q2, K2, V2, 3, scale=True), TypeError, ["scale"]),
    ("scale_complex", lambda: R.na2d(Q2, K2, V2, 3, scale=1j), TypeError, ["scale"]),
    ("scale_array", lambda: R.na2d(Q2, K2, V2, 3, scale=np.ones(2)), TypeError, ["scale"]),
    ("scale_nan", lambda: R.na2d(Q2, K2, V2, 3, scale=float("nan")), ValueError, ["scale"]),
    ("return_lse_int", lambda: R.na2d(Q2, K2, V2, 3, return_lse=1), TypeError, ["return_lse"]),
    ("return_lse_str", lambda: R.na2d(Q2, K2, V2, 3, return_lse="yes"), TypeError, ["return_lse"]),
    # unfused ops
    ("qk_kernel", lambda: R.na2d_qk(Q2, K2, (3, 9)), ValueError, ["[na2d_qk]", "kernel_size"]),
    ("qk_rank", lambda: R.na3d_qk(Q2, K2, 3), ValueError, ["[na3d_qk]", "rank"]),
    ("qk_rpb_causal", lambda: R.na2d_qk(Q2, K2, 3, rpb=RPB2, is_causal=True), ValueError, ["rpb"]),
    ("qk_dtype", lambda: R.na2d_qk(Q2, K2.astype(np.float16), 3), TypeError, ["k"]),
    ("qk_list", lambda: R.na2d_qk(Q2.tolist(), K2, 3), TypeError, ["q"]),
    ("av_slots", lambda: R.na2d_av(ATT2[..., :8], V2, 3), ValueError, ["attn", "9"]),
    ("av_kernel_vs_slots", lambda: R.na2d_av(ATT2, V2, (3, 2)), ValueError, ["attn"]),
    ("av_dtype", lambda: R.na2d_av(ATT2.astype(np.float64), V2, 3), TypeError, ["float64"]),
    ("av_spatial", lambda: R.na2d_av(ATT2[:, :7], V2, 3), ValueError, ["v"]),
    ("av_heads", lambda: R.na2d_av(np.concatenate([ATT2, ATT2[..., :1, :]], -2), V2, 3), ValueError,
     ["divisible"]),
    ("av_int", lambda: R.na2d_av(ATT2.astype(np.int64), V2, 3), TypeError, ["attn"]),
    # backward
    ("bwd_dout_shape", lambda: R.na2d_backward(Q2, K2, V2, Q2, Q2[..., :3], Q2[..., 0], 3), ValueError,
     ["dout"]),
    ("bwd_out_dtype", lambda: R.na2d_backward(Q2, K2, V2, Q2.astype(np.float64), Q2, Q2[..., 0], 3),
     TypeError, ["out"]),
    ("bwd_lse_shape", lambda: R.na2d_backward(Q2, K2, V2, Q2, Q2, Q2, 3), ValueError, ["lse"]),
    ("bwd_dout_list", lambda: R.na2d_backward(Q2, K2, V2, Q2, Q2.tolist(), Q2[..., 0], 3), TypeError,
     ["dout"]),
    ("bwd_rpb_shape", lambda: R.na2d_backward(Q2, K2, V2, Q2, Q2, Q2[..., 0], 3, rpb=RPB2[:, :3]),
     ValueError, ["rpb"]),
    ("bwd_stride", lambda: R.na2d_backward(Q2, K2, V2, Q2, Q2, Q2[..., 0], 3, stride=4), ValueError,
     ["stride"]),
    ("qk_bwd_shape", lambda: R.na2d_qk_backward(ATT2[..., :4], Q2, K2, 3), ValueError, ["dattn"]),
    ("av_bwd_shape", lambda: R.na2d_av_backward(Q2[..., :2], ATT2, V2, 3), ValueError, ["dout"]),
    # helpers
    ("window_kernel", lambda: R.window(0, 7, 8), ValueError, ["kernel_size"]),
    ("window_index", lambda: R.window(7, 7, 3), ValueError, ["i"]),
    ("window_float", lambda: R.window(0.0, 7, 3), TypeError, ["i"]),
    ("neighborhood_len", lambda: R.neighborhood((0,), (7, 7), 3), ValueError, ["query_index"]),
]


@pytest.mark.parametrize("thunk,exc,substrings", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises(thunk, exc, substrings):
    with pytest.raises(exc) as info:
        thunk()
    msg = str(info.value)
    for s in substrings:
        assert s in msg, f"{s!r} not in message {msg!r}"



# --------------------------------------------------------------------------
# backward vs central finite differences (float64)
# --------------------------------------------------------------------------

BWD_CASES = [
    # spatial, kernel, stride, dilation, causal, heads, heads_kv, use_rpb
    ((7,), 3, 1, 1, False, 4, 2, True),
    ((8,), 4, 2, 2, True, 2, 1, False),
    ((9,), 3, 3, 2, False, 2, 2, False),
    ((4, 5), (3, 2), 1, (1, 2), False, 2, 1, True),
    ((5, 4), (3, 2), (2, 1), 1, (True, False), 2, 2, False),
    ((2, 3, 4), 2, 1, (1, 1, 2), False, 2, 1, True),
    ((3, 3, 4), (2, 3, 2), (2, 1, 2), 1, (False, True, True), 2, 1, False),
]


@pytest.mark.parametrize("spatial,kernel,stride,dilation,causal,heads,heads_kv,use_rpb", BWD_CASES)
def test_fused_backward_finite_differences(spatial, kernel, stride, dilation, causal, heads,
                                           heads_kv, use_rpb):
    n = len(spatial)
    rng = np.random.default_rng(16)
    q, k, v = make_qkv(rng, 2, spatial, heads, heads_kv, 3, 2)
    ks = kernel if isinstance(kernel, tuple) else (kernel,) * n
    rpb = rand(rng, heads, *(2 * kk - 1 for kk in ks)) if use_rpb else None
    scale = 0.8
    kw = dict(stride=stride, dilation=dilation, is_causal=causal, scale=scale, rpb=rpb)
    out, lse = fused(n)(q, k, v, kernel, return_lse=True, **kw)
    dout = rand(rng, *out.shape)

    def loss():
        return float((fused(n)(q, k, v, kernel, **kw) * dout).sum())

    grads = getattr(R, f"na{n}d_backward")(q, k, v, out, dout, lse, kernel, **kw)
    inputs = [q, k, v] + ([rpb] if use_rpb else [])
    assert len(grads) == len(inputs)
    for g, x in zip(grads, inputs):
        check_grad(loss, x, g)


UNFUSED_BWD_CASES = [
    # spatial, kernel, dilation, causal, heads, heads_kv, use_rpb
    ((7,), 3, 2, False, 2, 1, True),
    ((7,), 4, 1, True, 2, 2, False),
    ((4, 5), (2, 3), (2, 1), False, 2, 2, True),
    ((5, 4), (3, 2), 1, (True, False), 4, 2, False),
    ((3, 3, 4), (2, 2, 3), 1, (False, True, False), 2, 1, False),
]


@pytest.mark.parametrize("spatial,kernel,dilation,causal,heads,heads_kv,use_rpb", UNFUSED_BWD_CASES)
def test_qk_backward_finite_differences(spatial, kernel, dilation, causal, heads, heads_kv, use_rpb):
    n = len(spatial)
    rng = np.random.default_rng(17)
    q, k, _ = make_qkv(rng, 2, spatial, heads, heads_kv, 3, 2)
    ks = kernel if isinstance(kernel, tuple) else (kernel,) * n
    rpb = rand(rng, heads, *(2 * kk - 1 for kk in ks)) if use_rpb else None
    qk = getattr(R, f"na{n}d_qk")
    kw = dict(dilation=dilation, is_causal=causal, rpb=rpb)
    scores = qk(q, k, kernel, **kw)
    filled = np.isfinite(scores)
    dattn = rand(rng, *scores.shape)

    def loss():
        return float((np.where(filled, qk(q, k, kernel, **kw), 0.0) * dattn).sum())

    # unfilled slots of dattn must be ignored: put garbage there
    dattn_junk = np.where(filled, dattn, np.nan)
    grads = getattr(R, f"na{n}d_qk_backward")(dattn_junk, q, k, kernel, **kw)
    inputs = [q, k] + ([rpb] if use_rpb else [])
    assert len(grads) == len(inputs)
    for g, x in zip(grads, inputs):
        check_grad(loss, x, g)


@pytest.mark.parametrize("spatial,kernel,dilation,causal,heads,heads_kv",
                         [c[:6] for c in UNFUSED_BWD_CASES])
def test_av_backward_finite_differences(spatial, kernel, dilation, causal, heads, heads_kv):
    n = len(spatial)
    rng = np.random.default_rng(18)
    ks = kernel if isinstance(kernel, tuple) else (kernel,) * n
    _, _, v = make_qkv(rng, 2, spatial, heads, heads_kv, 3, 2)
    attn = rand(rng, 2, *spatial, heads, int(np.prod(ks)))  # finite everywhere
    av = getattr(R, f"na{n}d_av")
    kw = dict(dilation=dilation, is_causal=causal)
    dout = rand(rng, 2, *spatial, heads, 2)

    def loss():
        return float((av(attn, v, kernel, **kw) * dout).sum())

    dattn, dv = getattr(R, f"na{n}d_av_backward")(dout, attn, v, kernel, **kw)
    check_grad(loss, attn, dattn)
    check_grad(loss, v, dv)
    # unfilled slots get exactly zero gradient
    scores = getattr(R, f"na{n}d_qk")(v[..., :1].repeat(heads // heads_kv, -2), v[..., :1], kernel, **kw)
    assert np.all(dattn[np.isinf(scores)] == 0.0)


def test_fused_backward_matches_composition():
    """Chain rule through qk -> softmax -> av equals the fused backward."""
    rng = np.random.default_rng(19)
    q, k, v = make_qkv(rng, 2, (6, 5), 4, 2, 3, 4)
    rpb = rand(rng, 4, 5, 3)
    scale = 0.6
    out, lse = R.na2d(q, k, v, (3, 2), scale=scale, rpb=rpb, return_lse=True)
    dout = rand(rng, *out.shape)
    dq, dk, dv, drpb = R.na2d_backward(q, k, v, out, dout, lse, (3, 2), scale=scale, rpb=rpb)
    scores = R.na2d_qk(q * scale, k, (3, 2), rpb=rpb)
    p = softmax_last(scores)
    dp, dv2 = R.na2d_av_backward(dout, p, v, (3, 2))
    ds = p * (dp - (p * dp).sum(-1, keepdims=True))
    dq2, dk2, drpb2 = R.na2d_qk_backward(ds, q * scale, k, (3, 2), rpb=rpb)
    np.testing.assert_allclose(dv, dv2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dq, dq2 * scale, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dk, dk2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(drpb, drpb2, rtol=1e-12, atol=1e-12)


def test_no_torch_and_no_libna_imports():
    import ast

    tree = ast.parse(_REF_PATH.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in reference.py"
            names = [node.module or ""]
        else:
            continue
        for name in names:
            root = name.split(".")[0]
            assert root not in ("torch", "libna"), name


def test_2d_16x16_is_fast():
    import time

    rng = np.random.default_rng(20)
    q, k, v = make_qkv(rng, 1, (16, 16), 2, 2, 16, 16, dtype=np.float32)
    t0 = time.perf_counter()
    R.na2d(q, k, v, 5, return_lse=True)
    assert time.perf_counter() - t0 < 1.0
