"""libna's compiled forward ops against the float64 references, over the
feature grid: rank, odd/even kernels, dilation, stride, per-axis causal, rpb,
GQA, scale, head dims, batch, odd extents, dtypes and strided inputs."""

import numpy as np
import pytest
import torch

import libna
from libna import reference

from _cases import case_id, grid, make_qkv, make_rpb
from _dense import dense_na


@pytest.mark.parametrize("case", grid(), ids=case_id)
def test_forward_matches_reference_float64(case, rng):
    spatial, kernel, stride, dilation, causal = case
    rank = len(spatial)
    q, k, v = make_qkv(rng, 2, spatial, 4, 2, 8, 6)
    use_rpb = not any(causal) and all(x == 1 for x in stride)
    rpb = make_rpb(rng, 4, kernel) if use_rpb else None
    kw = dict(stride=stride, dilation=dilation, is_causal=causal, rpb=rpb, return_lse=True)
    out, lse = getattr(libna, f"na{rank}d")(q, k, v, kernel, **kw)
    ref_out, ref_lse = getattr(reference, f"na{rank}d")(q, k, v, kernel, **kw)
    assert out.dtype == np.float64 and lse.dtype == np.float64
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", grid()[::4], ids=case_id)
def test_reference_matches_dense_torch(case, rng):
    """The two float64 oracles agree (dense masked attention vs the reference)."""
    spatial, kernel, stride, dilation, causal = case
    rank = len(spatial)
    q, k, v = make_qkv(rng, 1, spatial, 2, 1, 4, 4)
    use_rpb = not any(causal) and all(x == 1 for x in stride)
    rpb = make_rpb(rng, 2, kernel) if use_rpb else None
    out, lse = getattr(libna, f"na{rank}d")(q, k, v, kernel, stride=stride, dilation=dilation,
                                            is_causal=causal, rpb=rpb, return_lse=True)
    t = torch.from_numpy
    d_out, d_lse = dense_na(t(q), t(k), t(v), kernel, stride, dilation, causal,
                            rpb=None if rpb is None else t(rpb))
    np.testing.assert_allclose(out, d_out.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, d_lse.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dim,dim_v", [(8, 8), (32, 32), (64, 16), (128, 128), (16, 40)])
@pytest.mark.parametrize("heads,heads_kv", [(4, 4), (4, 2), (6, 3), (4, 1)])
def test_head_dims_and_gqa(dim, dim_v, heads, heads_kv, rng):
    q, k, v = make_qkv(rng, 1, (6, 7), heads, heads_kv, dim, dim_v)
    out = libna.na2d(q, k, v, 3)
    # GQA equals repeating the kv heads and running multi-head attention.
    rep = heads // heads_kv
    ref = reference.na2d(q, np.repeat(k, rep, axis=-2), np.repeat(v, rep, axis=-2), 3)
    assert out.shape == (1, 6, 7, heads, dim_v)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", [None, 0.05, 1.0, 3, np.float32(0.7)])
@pytest.mark.parametrize("batch", [1, 3])
def test_scale_and_batch(scale, batch, rng):
    q, k, v = make_qkv(rng, batch, (11,), 2, 2, 16, 16)
    out, lse = libna.na1d(q, k, v, 5, scale=scale, return_lse=True)
    ref, ref_lse = reference.na1d(q, k, v, 5, scale=scale, return_lse=True)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-12, atol=1e-12)


def test_full_window_is_self_attention(rng):
    """k = extent: NA is plain self-attention (checked against torch SDPA)."""
    q, k, v = make_qkv(rng, 2, (5, 6), 2, 2, 8, 8)
    out = libna.na2d(q, k, v, (5, 6))
    t = lambda x: torch.from_numpy(x).reshape(2, 30, 2, -1).transpose(1, 2)
    sdpa = torch.nn.functional.scaled_dot_product_attention(t(q), t(k), t(v))
    np.testing.assert_allclose(out, sdpa.transpose(1, 2).reshape(out.shape).numpy(),
                               rtol=1e-12, atol=1e-12)


# --- dtypes: principled tolerances -----------------------------------------
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                "float32": torch.float32, "float64": torch.float64}

DTYPE_CASES = [
    ((12,), (5,), (1,), (2,), (False,), True),
    ((9, 10), (3, 4), (1, 1), (1, 2), (False, False), True),
    ((9, 10), (3, 3), (2, 1), (1, 1), (True, False), False),
    ((4, 6, 5), (3, 3, 2), (1, 1, 1), (1, 1, 2), (False, True, False), False),
]


def check_error_bound(dtype, spatial, kernel, stride, dilation, causal, use_rpb, dim=32):
    """Error vs the float64 reference is at most twice that of a plain
    same-dtype PyTorch implementation, plus a floor of two units in the
    dtype's last place (the kernels accumulate in float32 and round once).
    In float64 the plain implementation *is* the reference: there the
    bound is a fixed 1e-12."""
    rank = len(spatial)
    g = torch.Generator().manual_seed(1)
    td = TORCH_DTYPES[dtype]
    shape = (2, *spatial)
    q64 = torch.randn(*shape, 4, dim, generator=g, dtype=torch.float64)
    k64 = torch.randn(*shape, 2, dim, generator=g, dtype=torch.float64)
    v64 = torch.randn(*shape, 2, 16, generator=g, dtype=torch.float64)
    rpb64 = torch.randn(4, *[2 * x - 1 for x in kernel], generator=g,
                        dtype=torch.float64) if use_rpb else None
    # Round the inputs to the dtype first, so that every implementation sees
    # the same values and only arithmetic error is measured.
    q, k, v = (x.to(td) for x in (q64, k64, v64))
    rpb = rpb64.to(td) if use_rpb else None
    q64, k64, v64 = (x.double() for x in (q, k, v))
    rpb64 = rpb.double() if use_rpb else None
    kw = dict(stride=stride, dilation=dilation, is_causal=causal)

    out, lse = getattr(libna, f"na{rank}d")(q, k, v, kernel, rpb=rpb, return_lse=True, **kw)
    assert isinstance(out, torch.Tensor) and out.dtype == td
    assert lse.dtype == (torch.float64 if td == torch.float64 else torch.float32)
    ref, ref_lse = dense_na(q64, k64, v64, kernel, stride, dilation, causal, rpb=rpb64)
    plain, _ = dense_na(q, k, v, kernel, stride, dilation, causal, rpb=rpb)

    err = (out.double() - ref).abs().max().item()
    plain_err = (plain.double() - ref).abs().max().item()
    ulp = 2 * torch.finfo(td).eps * max(1.0, ref.abs().max().item())
    bound = 1e-12 if td == torch.float64 else 2 * plain_err + ulp
    assert err <= bound, (err, plain_err, ulp)
    lse_tol = 1e-12 if td == torch.float64 else 1e-5 * max(1.0, ref_lse.abs().max().item())
    assert (lse.double() - ref_lse).abs().max().item() <= lse_tol


@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
@pytest.mark.parametrize("case", DTYPE_CASES, ids=lambda c: f"{len(c[0])}d-{c[0]}")
def test_dtypes_error_bound(dtype, case):
    check_error_bound(dtype, *case)


@pytest.mark.parametrize("case", grid(), ids=case_id)
def test_float32_grid_error_bound(case):
    """The vectorised float32 kernels over the whole feature grid."""
    spatial, kernel, stride, dilation, causal = case
    use_rpb = not any(causal) and all(x == 1 for x in stride)
    check_error_bound("float32", spatial, kernel, stride, dilation, causal, use_rpb, dim=16)


@pytest.mark.parametrize("case", grid()[1::5], ids=case_id)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_grid_error_bound(case, dtype):
    spatial, kernel, stride, dilation, causal = case
    use_rpb = not any(causal) and all(x == 1 for x in stride)
    check_error_bound(dtype, spatial, kernel, stride, dilation, causal, use_rpb, dim=16)


def test_numpy_bfloat16_round_trip():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(3)
    q, k, v = make_qkv(rng, 1, (8, 8), 2, 2, 16, 16, np.float32)
    qb, kb, vb = (x.astype(ml_dtypes.bfloat16) for x in (q, k, v))
    out = libna.na2d(qb, kb, vb, 3)
    assert isinstance(out, np.ndarray) and out.dtype == ml_dtypes.bfloat16
    ref = reference.na2d(*(x.astype(np.float64) for x in (qb, kb, vb)), 3)
    assert np.abs(out.astype(np.float64) - ref).max() <= 2 * 2.0 ** -8 * np.abs(ref).max()


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_numpy_dtypes_round_trip(dtype, rng):
    q, k, v = make_qkv(rng, 1, (10,), 2, 2, 8, 8, dtype)
    out, lse = libna.na1d(q, k, v, 3, return_lse=True)
    assert out.dtype == dtype and lse.dtype == np.float32
    ref = reference.na1d(*(x.astype(np.float64) for x in (q, k, v)), 3)
    tol = 4 * np.finfo(dtype).eps * np.abs(ref).max()
    assert np.abs(out.astype(np.float64) - ref).max() <= tol


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_every_finite_16bit_value_round_trips(dtype):
    """Attention that is exactly one-hot (each query matches only its own key
    by a margin of 1000) returns v itself: every finite float16/bfloat16
    value, subnormals included, survives the kernels' 16-bit -> float ->
    16-bit conversions bit for bit (all but -0, which the weighted sum
    1 * (-0) + 0 * x turns into +0)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    values = np.arange(1 << 16, dtype=np.uint16).view(np_dtype)
    values = values[np.isfinite(values.astype(np.float32)) & (values.view(np.uint16) != 0x8000)]
    dim = 8
    tokens = -(-values.size // dim)
    v = np.zeros(tokens * dim, np_dtype)
    v[: values.size] = values
    v = v.reshape(1, tokens, 1, dim)
    onehot = np.zeros((1, tokens, 1, dim), np.float32)
    onehot[0, np.arange(tokens), 0, np.arange(tokens) % dim] = 1000.0
    q = onehot.astype(np_dtype)
    k = (onehot / 1000.0).astype(np_dtype)
    out = libna.na1d(q, k, v, 3, scale=1.0)
    np.testing.assert_array_equal(out.view(np.uint16), v.view(np.uint16))


# --- strides, views and frameworks ---------------------------------------------
def test_non_contiguous_inputs(rng):
    base_q = rng.standard_normal((2, 8, 10, 3, 32))
    base_kv = rng.standard_normal((2, 10, 8, 16, 3))
    q = base_q[:, :, ::-1][..., ::2]                  # negative and step strides
    k = base_kv.transpose(0, 2, 1, 4, 3)               # permuted axes
    v = np.asfortranarray(rng.standard_normal((2, 8, 10, 3, 5)))
    assert not any(x.flags.c_contiguous for x in (q, k, v))
    kw = dict(dilation=(2, 1), is_causal=(False, True))
    out = libna.na2d(q, k, v, (3, 4), **kw)
    ref = reference.na2d(*(np.ascontiguousarray(x) for x in (q, k, v)), (3, 4), **kw)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


def test_torch_in_torch_out_and_inputs_untouched():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 6, 6, 2, 8, generator=g, requires_grad=True)
    k = torch.randn(1, 6, 6, 2, 8, generator=g)
    v = torch.randn(1, 6, 6, 2, 8, generator=g)
    before = [x.detach().clone() for x in (q, k, v)]
    out = libna.na2d(q, k, v, 3)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 6, 6, 2, 8)
    for x, y in zip((q, k, v), before):
        assert torch.equal(x.detach(), y)
    assert out.data_ptr() not in {x.data_ptr() for x in (q, k, v)}


def test_threads_give_identical_results(rng):
    q, k, v = make_qkv(rng, 2, (16, 16), 4, 4, 32, 32, np.float32)
    n = libna.get_num_threads()
    try:
        libna.set_num_threads(1)
        one = libna.na2d(q, k, v, 5)
        libna.set_num_threads(2)
        two = libna.na2d(q, k, v, 5)
    finally:
        libna.set_num_threads(n)
    assert np.array_equal(one, two)


# --- unfused ops -------------------------------------------------------------
UNFUSED_CASES = [
    ((13,), (4,), (2,), (False,)),
    ((13,), (5,), (1,), (True,)),
    ((7, 9), (3, 4), (2, 1), (False, True)),
    ((7, 9), (2, 5), (1, 1), (False, False)),
    ((4, 5, 6), (2, 3, 3), (1, 1, 2), (True, False, False)),
]


@pytest.mark.parametrize("case", UNFUSED_CASES, ids=lambda c: f"{c[0]}-k{c[1]}-c{c[3]}")
def test_unfused_ops_match_reference_and_compose(case, rng):
    spatial, kernel, dilation, causal = case
    rank = len(spatial)
    q, k, v = make_qkv(rng, 2, spatial, 4, 2, 8, 5)
    rpb = None if any(causal) else make_rpb(rng, 4, kernel)
    qk, av = getattr(libna, f"na{rank}d_qk"), getattr(libna, f"na{rank}d_av")
    scale = 0.3
    attn = qk(q * scale, k, kernel, dilation=dilation, is_causal=causal, rpb=rpb)
    ref_attn = getattr(reference, f"na{rank}d_qk")(q * scale, k, kernel, dilation=dilation,
                                                   is_causal=causal, rpb=rpb)
    assert attn.shape == (2, *spatial, 4, int(np.prod(kernel)))
    np.testing.assert_array_equal(np.isneginf(attn), np.isneginf(ref_attn))
    np.testing.assert_allclose(attn, ref_attn, rtol=1e-12, atol=1e-12)

    probs = np.exp(attn - attn.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = av(probs, v, kernel, dilation=dilation, is_causal=causal)
    np.testing.assert_allclose(
        out, getattr(reference, f"na{rank}d_av")(probs, v, kernel, dilation=dilation,
                                                  is_causal=causal), rtol=1e-12, atol=1e-12)
    fused = getattr(libna, f"na{rank}d")(q, k, v, kernel, dilation=dilation, is_causal=causal,
                                         scale=scale, rpb=rpb)
    np.testing.assert_allclose(out, fused, rtol=1e-12, atol=1e-12)


UNFUSED_GRID = [c for c in grid() if all(s == 1 for s in c[2])]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("case", UNFUSED_GRID, ids=case_id)
def test_unfused_vectorised_kernels_over_the_grid(case, dtype, rng):
    """The float32/float16 unfused kernels (the vectorised CPU path) against
    the float64 reference over every stride-1 case of the feature grid: the
    same unfilled (-inf) slots, and values within a few ulps of the inputs'
    precision."""
    spatial, kernel, _, dilation, causal = case
    rank = len(spatial)
    q, k, v = make_qkv(rng, 2, spatial, 4, 2, 16, 8)
    rpb = None if any(causal) else make_rpb(rng, 4, kernel)
    q, k, v = (x.astype(dtype).astype(np.float64) for x in (q, k, v))
    rpb = None if rpb is None else rpb.astype(dtype).astype(np.float64)
    kw = dict(dilation=dilation, is_causal=causal)
    low = lambda x: None if x is None else x.astype(dtype)
    eps = np.finfo(dtype).eps

    attn = getattr(libna, f"na{rank}d_qk")(low(q), low(k), kernel, rpb=low(rpb), **kw)
    ref_attn = getattr(reference, f"na{rank}d_qk")(q, k, kernel, rpb=rpb, **kw)
    assert attn.dtype == dtype
    np.testing.assert_array_equal(np.isneginf(attn), np.isneginf(ref_attn))
    finite = np.isfinite(ref_attn)
    bound = 4 * eps * (np.abs(q).max() * np.abs(k).max() * q.shape[-1] + 1)
    assert np.abs(attn[finite].astype(np.float64) - ref_attn[finite]).max() <= bound

    probs = np.exp(ref_attn - ref_attn.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    probs = probs.astype(dtype)
    out = getattr(libna, f"na{rank}d_av")(probs, low(v), kernel, **kw)
    ref_out = getattr(reference, f"na{rank}d_av")(probs.astype(np.float64), v, kernel, **kw)
    assert out.dtype == dtype
    bound = 4 * eps * np.abs(v).max() * np.sqrt(np.prod(kernel))  # float32/16 sums of prod(k) terms
    assert np.abs(out.astype(np.float64) - ref_out).max() <= bound


def test_av_ignores_unfilled_causal_slots(rng):
    q, k, v = make_qkv(rng, 1, (9,), 2, 2, 4, 4)
    attn = libna.na1d_qk(q, k, 4, is_causal=True)
    noisy = np.where(np.isneginf(attn), 123.0, 0.5)
    clean = np.where(np.isneginf(attn), 0.0, 0.5)
    np.testing.assert_array_equal(libna.na1d_av(noisy, v, 4, is_causal=True),
                                  libna.na1d_av(clean, v, 4, is_causal=True))
