"""libna.jax: XLA FFI custom calls under jax.jit, jax.grad and jax.vmap.

Forward results are compared with the float64 NumPy reference; gradients
with jax.grad of a plain jnp implementation (a dense masked softmax built from
libna.reference.window) and with the reference backward."""

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="JAX is not installed")
jnp = pytest.importorskip("jax.numpy")

import libna  # noqa: E402
from libna import reference  # noqa: E402

try:
    import libna.jax as lj
except ImportError as error:  # built without XLA FFI headers
    pytest.skip(f"libna.jax is unavailable: {error}", allow_module_level=True)


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def plain_na(q, k, v, kernel_size, stride, dilation, is_causal, scale, rpb=None,
             additional_keys=None, additional_values=None):
    """Dense masked-softmax NA in jnp (differentiable by JAX), per-axis tuples."""
    rank = q.ndim - 3
    spatial = q.shape[1:1 + rank]
    tokens = int(np.prod(spatial))
    mask = np.ones((1, 1), bool)
    rel = []
    for a in range(rank):
        n = spatial[a]
        m = np.zeros((n, n), bool)
        r = np.zeros((n, n), np.int64)
        for i in range(n):
            keys, _ = reference.window(i, n, kernel_size[a], stride[a], dilation[a], is_causal[a])
            m[i, keys] = True
            r[i, keys] = [j // dilation[a] - i // dilation[a] + kernel_size[a] - 1 for j in keys]
        mask = (mask[:, None, :, None] & m[None, :, None, :]).reshape(
            mask.shape[0] * n, mask.shape[1] * n)
        rel.append(r)
    b, heads = q.shape[0], q.shape[-2]
    group = heads // k.shape[-2]
    qf = q.reshape(b, tokens, heads, -1)
    kf = jnp.repeat(k.reshape(b, tokens, k.shape[-2], -1), group, axis=2)
    vf = jnp.repeat(v.reshape(b, tokens, v.shape[-2], -1), group, axis=2)
    logits = scale * jnp.einsum("bthd,bshd->bhts", qf, kf)
    if rpb is not None:
        pos = [g.reshape(-1) for g in np.meshgrid(*[np.arange(n) for n in spatial],
                                                  indexing="ij")]
        index = tuple(rel[a][pos[a][:, None], pos[a][None, :]] for a in range(rank))
        logits = logits + rpb[(slice(None),) + index]
    logits = jnp.where(mask, logits, -jnp.inf)
    if additional_keys is not None:
        xk = jnp.repeat(additional_keys, group, axis=2)
        xv = jnp.repeat(additional_values, group, axis=2)
        logits = jnp.concatenate([logits, scale * jnp.einsum("bthd,bnhd->bhtn", qf, xk)], -1)
        vf = jnp.concatenate([vf, xv], axis=1)
    lse = jax.nn.logsumexp(logits, axis=-1)
    out = jnp.einsum("bhts,bshe->bthe", jax.nn.softmax(logits, axis=-1), vf)
    return out.reshape(*q.shape[:-1], -1), jnp.moveaxis(lse, 1, -1).reshape(q.shape[:-1])


# (rank, spatial, kernel, stride, dilation, causal, rpb, heads, heads_kv, dim, dim_v, extra)
CASES = [
    (1, (11,), (3,), (1,), (2,), (False,), True, 4, 2, 8, 6, 0),
    (1, (10,), (4,), (2,), (1,), (True,), False, 2, 1, 4, 4, 3),
    (2, (5, 6), (3, 2), (1, 2), (1, 2), (False, True), False, 4, 4, 8, 8, 2),
    (2, (5, 5), (3, 3), (1, 1), (1, 1), (False, False), True, 2, 1, 4, 3, 4),
    (3, (3, 4, 4), (2, 3, 2), (1, 1, 2), (1, 1, 1), (True, False, False), False, 2, 2, 4, 4, 0),
]


def make_case(case, rng):
    rank, spatial, kernel, stride, dilation, causal, with_rpb, h, hkv, d, dv, extra = case
    r = lambda *s: rng.standard_normal(s)  # noqa: E731
    arrays = dict(q=r(2, *spatial, h, d), k=r(2, *spatial, hkv, d), v=r(2, *spatial, hkv, dv))
    kw = dict(stride=stride, dilation=dilation, is_causal=causal, scale=0.4)
    if with_rpb:
        arrays["rpb"] = r(h, *[2 * x - 1 for x in kernel])
    if extra:
        arrays["additional_keys"] = r(2, extra, hkv, d)
        arrays["additional_values"] = r(2, extra, hkv, dv)
    return rank, kernel, arrays, kw


@pytest.mark.parametrize("case", CASES, ids=str)
def test_jit_forward_matches_reference(case, rng):
    rank, kernel, arrays, kw = make_case(case, rng)
    fn = jax.jit(lambda a: getattr(lj, f"na{rank}d")(a["q"], a["k"], a["v"], kernel,
                                                      return_lse=True, **kw,
                                                      **{n: a[n] for n in a if len(n) > 1}))
    out, lse = fn({n: jnp.asarray(x) for n, x in arrays.items()})
    assert isinstance(out, jax.Array) and out.dtype == jnp.float64
    want, want_lse = getattr(reference, f"na{rank}d")(
        arrays["q"], arrays["k"], arrays["v"], kernel, return_lse=True, **kw,
        **{n: arrays[n] for n in arrays if len(n) > 1})
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-12)
    np.testing.assert_allclose(np.asarray(lse), want_lse, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_grad_matches_plain_jax(case, rng):
    rank, kernel, arrays, kw = make_case(case, rng)
    names = list(arrays)
    weights = rng.standard_normal(2)

    def loss(fn):
        def f(*xs):
            a = dict(zip(names, xs))
            out, lse = fn(a)
            return jnp.sum(jnp.sin(out)) * weights[0] + jnp.sum(lse * lse) * weights[1]
        return f

    libna_fn = loss(lambda a: getattr(lj, f"na{rank}d")(
        a["q"], a["k"], a["v"], kernel, return_lse=True, **kw,
        **{n: a[n] for n in a if len(n) > 1}))
    plain_fn = loss(lambda a: plain_na(a["q"], a["k"], a["v"], kernel, kw["stride"],
                                       kw["dilation"], kw["is_causal"], kw["scale"],
                                       **{n: a[n] for n in a if len(n) > 1}))
    xs = [jnp.asarray(arrays[n]) for n in names]
    argnums = tuple(range(len(xs)))
    got = jax.jit(jax.grad(libna_fn, argnums=argnums))(*xs)
    want = jax.grad(plain_fn, argnums=argnums)(*xs)
    for name, g, w in zip(names, got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-10, err_msg=name)


def test_grad_matches_reference_backward(rng):
    rank, kernel, arrays, kw = make_case(CASES[3], rng)
    extra = {n: arrays[n] for n in arrays if len(n) > 1}
    out, lse = reference.na2d(arrays["q"], arrays["k"], arrays["v"], kernel, return_lse=True,
                              **kw, **extra)
    dout = rng.standard_normal(out.shape)
    names = ["q", "k", "v", "rpb", "additional_keys", "additional_values"]
    grads = jax.grad(
        lambda *xs: jnp.sum(dout * lj.na2d(*xs[:3], kernel, rpb=xs[3], additional_keys=xs[4],
                                           additional_values=xs[5], **kw)),
        argnums=tuple(range(6)))(*[jnp.asarray(arrays[n]) for n in names])
    want = reference.na2d_backward(arrays["q"], arrays["k"], arrays["v"], out, dout, lse, kernel,
                                   **kw, **extra)  # dq, dk, dv, drpb, dxk, dxv
    for name, g, w in zip(names, grads, want):
        np.testing.assert_allclose(np.asarray(g), w, atol=1e-11, err_msg=name)


def test_vmap_over_a_leading_axis(rng):
    rank, kernel, arrays, kw = make_case(CASES[3], rng)
    stacked = {n: rng.standard_normal((3, *x.shape)) for n, x in arrays.items() if n != "rpb"}
    rpb = jnp.asarray(arrays["rpb"])

    def one(q, k, v, xk, xv, rpb):
        return lj.na2d(q, k, v, kernel, rpb=rpb, additional_keys=xk, additional_values=xv, **kw)

    order = ["q", "k", "v", "additional_keys", "additional_values"]
    out = jax.jit(jax.vmap(one, in_axes=(0, 0, 0, 0, 0, None)))(
        *[jnp.asarray(stacked[n]) for n in order], rpb)
    for i in range(3):
        want = reference.na2d(*[stacked[n][i] for n in order[:3]], kernel, rpb=arrays["rpb"],
                              additional_keys=stacked["additional_keys"][i],
                              additional_values=stacked["additional_values"][i], **kw)
        np.testing.assert_allclose(np.asarray(out[i]), want, atol=1e-12)
    # Per-example gradients: vmap of grad, with the rpb gradient per example.
    per_example = jax.vmap(jax.grad(lambda q, rpb: jnp.sum(one(
        q, jnp.asarray(arrays["k"]), jnp.asarray(arrays["v"]),
        jnp.asarray(arrays["additional_keys"]), jnp.asarray(arrays["additional_values"]),
        rpb) ** 2), argnums=(0, 1)), in_axes=(0, None))(jnp.asarray(stacked["q"]), rpb)
    for i in range(3):
        single = jax.grad(lambda q, rpb: jnp.sum(one(
            q, arrays["k"], arrays["v"], arrays["additional_keys"], arrays["additional_values"],
            rpb) ** 2), argnums=(0, 1))(jnp.asarray(stacked["q"][i]), rpb)
        for g, s in zip(per_example, single):
            np.testing.assert_allclose(np.asarray(g[i]), np.asarray(s), atol=1e-12)


def test_merge_attentions(rng):
    outs = [rng.standard_normal((2, 5, 3, 4)) for _ in range(3)]
    lses = [rng.standard_normal((2, 5, 3)) for _ in range(3)]
    out, lse = jax.jit(lj.merge_attentions)([jnp.asarray(o) for o in outs],
                                            [jnp.asarray(x) for x in lses])
    want, want_lse = reference.merge_attentions(outs, lses)
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-13)
    np.testing.assert_allclose(np.asarray(lse), want_lse, atol=1e-13)

    def loss(merge, *xs):
        out, lse = merge(list(xs[:3]), list(xs[3:]))
        return jnp.sum(jnp.cos(out)) + jnp.sum(lse ** 2)

    def plain(outs, lses):
        lse = jax.nn.logsumexp(jnp.stack(lses), axis=0)
        return sum(jnp.exp(x - lse)[..., None] * o for o, x in zip(outs, lses)), lse

    xs = [jnp.asarray(x) for x in outs + lses]
    got = jax.grad(lambda *a: loss(lj.merge_attentions, *a), argnums=tuple(range(6)))(*xs)
    want = jax.grad(lambda *a: loss(plain, *a), argnums=tuple(range(6)))(*xs)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [("float32", 2e-6), ("float16", 4e-3), ("bfloat16", 3e-2)])
def test_low_precision(dtype, tol, rng):
    rank, kernel, arrays, kw = make_case(CASES[2], rng)
    cast = {n: jnp.asarray(x, dtype=dtype) for n, x in arrays.items()}
    out = jax.jit(lambda a: lj.na2d(a["q"], a["k"], a["v"], kernel, **kw,
                                    **{n: a[n] for n in a if len(n) > 1}))(cast)
    assert out.dtype == jnp.dtype(dtype)
    exact = {n: np.asarray(x, dtype=np.float64) for n, x in cast.items()}
    want = reference.na2d(exact["q"], exact["k"], exact["v"], kernel, **kw,
                          **{n: exact[n] for n in exact if len(n) > 1})
    np.testing.assert_allclose(np.asarray(out, dtype=np.float64), want, atol=tol)


def test_inputs_are_not_written(rng):
    q = jnp.asarray(rng.standard_normal((1, 6, 2, 4)))
    before = np.array(q)
    jax.grad(lambda q: jnp.sum(lj.na1d(q, q, q, 3)))(q)
    np.testing.assert_array_equal(np.asarray(q), before)


def test_errors_at_trace_time(rng):
    q = jnp.asarray(rng.standard_normal((1, 6, 2, 4)))
    with pytest.raises(ValueError, match=r"\[na1d\] kernel_size=\(7,\)"):
        jax.jit(lambda q: lj.na1d(q, q, q, 7))(q)
    with pytest.raises(ValueError, match="additional_keys has batch 2"):
        lj.na1d(q, q, q, 3, additional_keys=jnp.zeros((2, 3, 2, 4)),
                additional_values=jnp.zeros((2, 3, 2, 4)))
    with pytest.raises(TypeError, match="int32"):
        lj.na1d(q.astype(jnp.int32), q, q, 3)
    with pytest.raises(TypeError, match="float32"):
        lj.na1d(q.astype(jnp.float32), q, q, 3)
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"libna.jax.*torch|torch.*libna\.na1d"):
        lj.na1d(torch.zeros(1, 6, 2, 4), q, q, 3)
