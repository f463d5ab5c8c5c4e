"""Attention composition: additional keys that every query attends to
besides its neighbourhood, and the exact lse merge of partial attentions.

The oracle is plain dense attention (NumPy, float64): NA whose kernel covers
the whole input is full self-attention, so NA plus additional keys must equal
dense attention over the concatenated keys, and merging attentions over two
halves of the keys must equal attention over all of them. Elsewhere the
compiled path is checked against the float64 reference (which computes the
neighbourhood and the additional keys in one softmax, without merging), and
gradients against the reference and torch.autograd.gradcheck."""

import numpy as np
import pytest
import torch

import libna
from libna import reference

compiled_only = pytest.mark.skipif(libna._ops._C is None, reason="compiled core not loaded")


def dense_attention(q, k, v, scale=None):
    """q [B, T, H, D], k/v [B, N, Hkv, D/Dv] -> out [B, T, H, Dv], lse [B, T, H]."""
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = scale * np.einsum("bthd,bnhd->bthn", q, k)
    m = logits.max(-1, keepdims=True)
    p = np.exp(logits - m)
    lse = np.log(p.sum(-1)) + m[..., 0]
    return np.einsum("bthn,bnhe->bthe", p / p.sum(-1, keepdims=True), v), lse


SPATIAL = {1: (9,), 2: (4, 5), 3: (3, 4, 3)}


def make(rng, rank, heads=4, heads_kv=2, dim=8, dim_v=6, extra=5, batch=2, dtype=np.float64):
    spatial = SPATIAL[rank]
    r = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    return (r(batch, *spatial, heads, dim), r(batch, *spatial, heads_kv, dim),
            r(batch, *spatial, heads_kv, dim_v), r(batch, extra, heads_kv, dim),
            r(batch, extra, heads_kv, dim_v))


def flat(x, rank):
    """[B, *spatial, H, D] -> [B, T, H, D]."""
    return x.reshape(x.shape[0], -1, *x.shape[rank + 1:])


@pytest.fixture(params=["compiled", "reference"])
def impl(request):
    if request.param == "compiled" and libna._ops._C is None:
        pytest.skip("compiled core not loaded")
    return libna if request.param == "compiled" else reference


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_full_kernel_plus_additional_keys_is_dense_attention(impl, rank, rng):
    q, k, v, xk, xv = make(rng, rank)
    na = getattr(impl, f"na{rank}d")
    out, lse = na(q, k, v, SPATIAL[rank], return_lse=True, scale=0.3,
                  additional_keys=xk, additional_values=xv)
    keys = np.concatenate([flat(k, rank), xk], axis=1)
    values = np.concatenate([flat(v, rank), xv], axis=1)
    want, want_lse = dense_attention(flat(q, rank), keys, values, scale=0.3)
    np.testing.assert_allclose(flat(out, rank), want, atol=1e-12)
    np.testing.assert_allclose(lse.reshape(want_lse.shape), want_lse, atol=1e-12)


@pytest.mark.parametrize("parts", [2, 3])
def test_merge_of_key_subsets_is_the_whole(impl, parts, rng):
    q, k, v = (rng.standard_normal(s) for s in ((2, 7, 3, 8), (2, 12, 3, 8), (2, 12, 3, 5)))
    want, want_lse = dense_attention(q, k, v)
    bounds = np.linspace(0, 12, parts + 1).astype(int)
    pieces = [dense_attention(q, k[:, a:b], v[:, a:b]) for a, b in zip(bounds, bounds[1:])]
    out, lse = impl.merge_attentions([p[0] for p in pieces], [p[1] for p in pieces])
    np.testing.assert_allclose(out, want, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, atol=1e-12)


def test_merge_ignores_empty_parts(impl, rng):
    out = rng.standard_normal((3, 2, 4))
    lse = rng.standard_normal((3, 2))
    empty = np.full((3, 2), -np.inf)
    merged, merged_lse = impl.merge_attentions([out, rng.standard_normal((3, 2, 4))],
                                               [lse, empty])
    np.testing.assert_allclose(merged, out, atol=1e-15)
    np.testing.assert_allclose(merged_lse, lse, atol=1e-15)
    nothing, nothing_lse = impl.merge_attentions([out, out], [empty, empty])
    assert np.all(nothing == 0) and np.all(nothing_lse == -np.inf)


# (rank, kernel, stride, dilation, causal, rpb, heads, heads_kv, dim, dim_v)
CASES = [
    (1, 3, 1, 2, False, True, 4, 2, 8, 6),
    (1, 4, 2, 1, True, False, 2, 2, 4, 4),
    (2, (3, 2), (1, 2), (1, 2), (False, True), False, 4, 1, 8, 3),
    (2, 3, 1, 1, False, True, 2, 2, 16, 16),
    (3, (2, 3, 2), 1, 1, (True, False, False), False, 2, 1, 4, 5),
]


def case_kwargs(case, rng, dtype=np.float64):
    rank, kernel, stride, dilation, causal, with_rpb, heads, heads_kv, dim, dim_v = case
    q, k, v, xk, xv = make(rng, rank, heads, heads_kv, dim, dim_v, dtype=dtype)
    kernels = kernel if isinstance(kernel, tuple) else (kernel,) * rank
    rpb = (rng.standard_normal((heads, *[2 * x - 1 for x in kernels])).astype(dtype)
           if with_rpb else None)
    return rank, (q, k, v, kernel), dict(stride=stride, dilation=dilation, is_causal=causal,
                                         rpb=rpb, additional_keys=xk, additional_values=xv)


@compiled_only
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_and_backward_match_reference(case, rng):
    rank, args, kw = case_kwargs(case, rng)
    na, na_backward = getattr(libna, f"na{rank}d"), getattr(libna, f"na{rank}d_backward")
    out, lse = na(*args, return_lse=True, **kw)
    want, want_lse = getattr(reference, f"na{rank}d")(*args, return_lse=True, **kw)
    np.testing.assert_allclose(out, want, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, atol=1e-12)
    dout = rng.standard_normal(out.shape)
    q, k, v, kernel = args
    grads = na_backward(q, k, v, out, dout, lse, kernel, **kw)
    want_grads = getattr(reference, f"na{rank}d_backward")(q, k, v, out, dout, lse, kernel, **kw)
    assert len(grads) == len(want_grads) == (6 if kw["rpb"] is not None else 5)
    for got, expected in zip(grads, want_grads):
        np.testing.assert_allclose(got, expected, atol=1e-11)


def test_reference_backward_finite_differences(rng):
    """The reference's additional-key gradients against central differences."""
    rank, (q, k, v, kernel), kw = case_kwargs(CASES[0], rng)
    xk, xv = kw["additional_keys"], kw["additional_values"]
    out = reference.na1d(q, k, v, kernel, **kw)
    dout = rng.standard_normal(out.shape)
    _, _, _, _, dxk, dxv = reference.na1d_backward(q, k, v, out, dout, out[..., 0], kernel, **kw)

    def loss(**override):
        return np.sum(reference.na1d(q, k, v, kernel, **{**kw, **override}) * dout)

    eps = 1e-6
    for name, x, grad in (("additional_keys", xk, dxk), ("additional_values", xv, dxv)):
        for index in [(0, 0, 0, 0), (1, 3, 1, 2), (0, 4, 1, 3)]:
            e = np.zeros_like(x)
            e[index] = eps
            numeric = (loss(**{name: x + e}) - loss(**{name: x - e})) / (2 * eps)
            assert abs(numeric - grad[index]) < 1e-7, (name, index)


@compiled_only
def test_merge_backward_matches_reference(rng):
    outs = [rng.standard_normal((2, 3, 4, 5)) for _ in range(3)]
    lses = [rng.standard_normal((2, 3, 4)) for _ in range(3)]
    out, lse = libna.merge_attentions(outs, lses)
    dout, dlse = rng.standard_normal(out.shape), rng.standard_normal(lse.shape)
    for with_dlse in (None, dlse):
        got = libna.merge_attentions_backward(outs, lses, out, lse, dout, with_dlse)
        want = reference.merge_attentions_backward(outs, lses, out, lse, dout, with_dlse)
        for g, w in zip(got[0] + got[1], want[0] + want[1]):
            np.testing.assert_allclose(g, w, atol=1e-13)


@compiled_only
@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-6), (np.float16, 5e-3)])
def test_low_precision(dtype, tol, rng):
    rank, args, kw = case_kwargs(CASES[2], rng, dtype=dtype)
    out = libna.na2d(*args, **kw)
    assert out.dtype == dtype
    args64 = [a.astype(np.float64) if isinstance(a, np.ndarray) else a for a in args]
    kw64 = {n: (x.astype(np.float64) if isinstance(x, np.ndarray) else x) for n, x in kw.items()}
    want = reference.na2d(*args64, **kw64)
    np.testing.assert_allclose(out.astype(np.float64), want, atol=tol)


# --- PyTorch: autograd --------------------------------------------------------
@compiled_only
@pytest.mark.parametrize("case", CASES, ids=str)
def test_torch_gradcheck(case, rng):
    import libna.torch

    rank, (q, k, v, kernel), kw = case_kwargs(case, rng)
    rpb = kw.pop("rpb")
    xk, xv = kw.pop("additional_keys"), kw.pop("additional_values")
    na = getattr(libna.torch, f"na{rank}d")
    leaves = [torch.from_numpy(x).requires_grad_() for x in (q, k, v, xk, xv)]
    if rpb is not None:
        leaves.append(torch.from_numpy(rpb).requires_grad_())

    def fn(q, k, v, xk, xv, rpb=None):
        return na(q, k, v, kernel, rpb=rpb, return_lse=True, additional_keys=xk,
                  additional_values=xv, **kw)

    # Full Jacobians for the small causal case, fast mode (random projections) elsewhere.
    assert torch.autograd.gradcheck(fn, tuple(leaves), fast_mode=case is not CASES[1])


@compiled_only
def test_torch_merge_gradcheck_and_compile(rng):
    import libna.torch

    parts = [torch.from_numpy(rng.standard_normal(s)).requires_grad_()
             for s in ((2, 3, 4), (2, 3), (2, 3, 4), (2, 3))]
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: libna.torch.merge_attentions([a, c], [b, d]), tuple(parts))
    torch.library.opcheck(torch.ops.libna.merge_attentions,
                          ([parts[0], parts[2]], [parts[1], parts[3]]))
    q, k, v, xk, xv = (torch.from_numpy(x).requires_grad_() for x in make(rng, 2))

    def step(q, k, v, xk, xv):
        return libna.torch.na2d(q, k, v, 3, additional_keys=xk, additional_values=xv).sum()

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(q, k, v, xk, xv)
    assert explained.graph_break_count == 0
    compiled = torch.compile(step, fullgraph=True)
    grads = torch.autograd.grad(compiled(q, k, v, xk, xv), (q, xk, xv))
    eager = torch.autograd.grad(step(q, k, v, xk, xv), (q, xk, xv))
    for g, e in zip(grads, eager):
        torch.testing.assert_close(g, e)


@compiled_only
def test_torch_opcheck_with_additional_keys(rng):
    import libna.torch  # noqa: F401  (registers the ops)

    q, k, v, xk, xv = (torch.from_numpy(x) for x in make(rng, 1))
    plain = ([3], [1], [1], [False], 0.4)
    ops = torch.ops.libna
    torch.library.opcheck(ops.na_forward, (q.clone().requires_grad_(), k, v, None, *plain,
                                           xk.clone().requires_grad_(), xv))
    out, lse = ops.na_forward(q, k, v, None, *plain, xk, xv)
    torch.library.opcheck(ops.na_backward, (q, k, v, out, torch.randn_like(out), lse, None,
                                            *plain, xk, xv))


# --- bad input ------------------------------------------------------------------
def bad_inputs(rng):
    q, k, v, xk, xv = make(rng, 2)
    return {
        "keys without values": (dict(additional_keys=xk), ValueError, "additional_values"),
        "values without keys": (dict(additional_values=xv), ValueError, "additional_keys"),
        "batch mismatch": (dict(additional_keys=xk[:1], additional_values=xv[:1]), ValueError,
                           "batch"),
        "head_dim mismatch": (dict(additional_keys=xk[..., :4], additional_values=xv),
                              ValueError, "head_dim"),
        "heads not divisible": (dict(additional_keys=xk[:, :, :1].repeat(3, 2),
                                     additional_values=xv[:, :, :1].repeat(3, 2)),
                                ValueError, "heads"),
        "keys/values mismatch": (dict(additional_keys=xk, additional_values=xv[:, :3]),
                                 ValueError, "additional_values"),
        "wrong ndim": (dict(additional_keys=xk[0], additional_values=xv[0]), ValueError,
                       "additional_keys"),
        "dtype mismatch": (dict(additional_keys=xk.astype(np.float32), additional_values=xv),
                           TypeError, "additional_keys"),
        "zero extra keys": (dict(additional_keys=xk[:, :0], additional_values=xv[:, :0]),
                            ValueError, "additional_keys"),
    }, (q, k, v)


@pytest.mark.parametrize("name", list(bad_inputs(np.random.default_rng(0))[0]))
def test_bad_additional_keys(impl, name, rng):
    cases, (q, k, v) = bad_inputs(rng)
    kw, error, word = cases[name]
    with pytest.raises(error, match=word):
        impl.na2d(q, k, v, 3, **kw)


def test_bad_merge(impl, rng):
    out, lse = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3))
    with pytest.raises(ValueError, match="outs"):
        impl.merge_attentions([], [])
    with pytest.raises(ValueError, match="lses"):
        impl.merge_attentions([out, out], [lse])
    with pytest.raises(ValueError, match="outs\\[1\\]"):
        impl.merge_attentions([out, out[:, :2]], [lse, lse[:, :2]])
    with pytest.raises(TypeError, match="outs"):
        impl.merge_attentions(out, lse)
    with pytest.raises(TypeError):
        impl.merge_attentions([out, out.astype(np.float32)], [lse, lse])
