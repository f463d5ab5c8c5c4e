"""One validation and one output-shape rule for every front end.

Each op is planned once in the C++ core (libna::plan_<op>): the plan
validates the call and says what it writes. The Python bindings plan,
allocate and run; ``_C.plan`` plans on shapes alone, which is what the torch
fake kernels (torch.compile, FakeTensorMode) and JAX's abstract evaluation
use. These tests check that the planned outputs are exactly what the ops
return, that planning on shapes raises the errors the call raises, and that
the torch fake kernels follow the plan (also with symbolic sizes).
"""

import numpy as np
import pytest

import libna

_C = libna._ops._C
pytestmark = pytest.mark.skipif(_C is None, reason="compiled core not loaded")


def spec(x):
    return None if x is None else (tuple(x.shape), x.dtype.name, "cpu", 0)


def planned_shapes(op, arrays, **params):
    return [None if p is None else (p[0], p[1]) for p in _C.plan(op, [spec(a) for a in arrays],
                                                                 **params)]


def shapes(*arrays):
    return [None if a is None else (tuple(a.shape), a.dtype.name) for a in arrays]


CASES = [  # spatial, heads, heads_kv, dim, dim_v, kernel, extra keyword arguments
    ((9,), 2, 2, 4, 4, 3, {}),
    ((9,), 4, 2, 4, 6, 4, dict(is_causal=True)),
    ((6, 7), 2, 1, 8, 3, (3, 5), dict(stride=(1, 2), dilation=(2, 1))),
    ((3, 4, 5), 2, 2, 4, 4, 3, dict(rpb=True)),
    ((5, 5), 4, 2, 4, 6, 3, dict(additional=3)),
]


def make_case(rng, case, dtype=np.float32):
    spatial, heads, heads_kv, dim, dim_v, kernel, kw = case
    r = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    q, k, v = r(2, *spatial, heads, dim), r(2, *spatial, heads_kv, dim), r(2, *spatial, heads_kv,
                                                                          dim_v)
    kw = dict(kw)
    rank = len(spatial)
    kernel_size = (kernel,) * rank if isinstance(kernel, int) else kernel
    if kw.pop("rpb", False):
        kw["rpb"] = r(heads, *(2 * k - 1 for k in kernel_size))
    extra = kw.pop("additional", 0)
    if extra:
        kw["additional_keys"], kw["additional_values"] = r(2, extra, heads_kv, dim), r(
            2, extra, heads_kv, dim_v)
    return q, k, v, kernel_size, kw


def window(rank, kernel_size, kw, unit_stride=False):
    def axes(value):
        return list(value) if isinstance(value, tuple) else [value] * rank

    return dict(rank=rank, kernel_size=list(kernel_size),
                stride=[] if unit_stride else axes(kw.get("stride", 1)),
                dilation=axes(kw.get("dilation", 1)),
                is_causal=[bool(c) for c in axes(kw.get("is_causal", False))])


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{len(c[0])}d-{sorted(c[6])}")
def test_planned_outputs_are_what_the_ops_return(case, rng):
    q, k, v, kernel_size, kw = make_case(rng, case)
    rank = len(kernel_size)
    na = getattr(libna, f"na{rank}d")
    out, lse = na(q, k, v, kernel_size, return_lse=True, **kw)
    rpb, xk, xv = kw.get("rpb"), kw.get("additional_keys"), kw.get("additional_values")
    params = window(rank, kernel_size, kw)
    inputs = [q, k, v, rpb, xk, xv]
    assert planned_shapes("na", inputs, **params, want_lse=True) == shapes(out, lse)
    # Unwanted, lse is not an output (with additional keys it is a workspace).
    assert planned_shapes("na", inputs, **params) == shapes(out, None)
    grads = getattr(libna, f"na{rank}d_backward")(
        q, k, v, out, np.ones_like(out), lse, kernel_size,
        **{n: x for n, x in kw.items() if n not in ("return_lse",)})
    planned = planned_shapes("na_backward", [q, k, v, rpb, out, out, lse, None, xk, xv],
                             **params)
    assert planned[:3] == shapes(*grads[:3])
    assert planned[3] == (shapes(rpb)[0] if rpb is not None else None)
    if xk is not None:
        assert planned[4:] == shapes(xk, xv) == shapes(*grads[-2:])
        extra = planned_shapes("na_additional_backward", [q, xk, xv, out, out, lse], rank=rank)
        assert extra == shapes(q, xk, xv) == shapes(grads[0], *grads[-2:])
    else:
        assert planned[4:] == [None, None]
    if "stride" not in kw and "additional_keys" not in kw:
        attn = getattr(libna, f"na{rank}d_qk")(q, k, kernel_size, rpb=rpb,
                                               dilation=kw.get("dilation", 1),
                                               is_causal=kw.get("is_causal", False))
        unfused = window(rank, kernel_size, kw, unit_stride=True)
        assert planned_shapes("na_qk", [q, k, rpb], **unfused) == shapes(attn)
        assert planned_shapes("na_av", [attn, v], **unfused) == shapes(
            getattr(libna, f"na{rank}d_av")(attn, v, kernel_size,
                                            dilation=kw.get("dilation", 1),
                                            is_causal=kw.get("is_causal", False)))


def test_planned_merge_outputs(rng):
    outs = [rng.standard_normal((2, 5, 3, 4)).astype(np.float32) for _ in range(3)]
    lses = [rng.standard_normal((2, 5, 3)).astype(np.float32) for _ in range(3)]
    out, lse = libna.merge_attentions(outs, lses)
    assert planned_shapes("merge_attentions", [*outs, *lses]) == shapes(out, lse)
    planned = planned_shapes("merge_attentions_backward", [*outs, *lses, out, lse, out, None])
    assert planned == shapes(*outs, *lses)


BAD = [  # what to change, the error type, a fragment of the message
    (dict(kernel_size=(9, 3)), ValueError, r"\[na2d\] kernel_size=\(9, 3\) must not exceed"),
    (dict(k_dtype="float64"), TypeError, r"\[na2d\] k has dtype float64 but q has dtype float32"),
    (dict(heads_kv=3), ValueError, r"\[na2d\] q has 4 heads, which is not a multiple of the 3"),
    (dict(rpb_shape=(4, 5, 4)), ValueError, r"\[na2d\] rpb must have shape"),
    (dict(stride=(4, 1)), ValueError, r"\[na2d\] stride=\(4, 1\) must be between 1 and"),
]


@pytest.mark.parametrize("change,error,match", BAD, ids=[str(b[0]) for b in BAD])
def test_planning_raises_what_the_call_raises(change, error, match, rng):
    """The same check runs for a plan on shapes and for a call on arrays."""
    r = lambda *s, dtype="float32": rng.standard_normal(s).astype(dtype)  # noqa: E731
    q = r(1, 8, 8, 4, 4)
    k = r(1, 8, 8, change.get("heads_kv", 2), 4, dtype=change.get("k_dtype", "float32"))
    v = r(1, 8, 8, change.get("heads_kv", 2), 4)
    kernel_size = change.get("kernel_size", (3, 3))
    stride = change.get("stride", (1, 1))
    rpb = r(*change["rpb_shape"]) if "rpb_shape" in change else None
    with pytest.raises(error, match=match):
        libna.na2d(q, k, v, kernel_size, stride=stride, rpb=rpb)
    with pytest.raises(error, match=match):
        _C.plan("na", [spec(x) for x in (q, k, v, rpb)], 2, list(kernel_size), list(stride),
                [1, 1], [False, False], None, False)


def test_plan_names_its_inputs():
    with pytest.raises(ValueError, match=r"\[na1d_backward\] lse must be an array, got None"):
        _C.plan("na_backward", [((1, 8, 1, 4), "float32", "cpu", 0)] * 6 + [None], 1, [3], [1],
                [1], [False])
    with pytest.raises(ValueError, match="unknown op 'na_sideways'"):
        _C.plan("na_sideways", [])
    with pytest.raises(TypeError, match=r"\[na1d\] q has dtype int8"):
        _C.plan("na", [((1, 8, 1, 4), "int8", "cpu", 0)] * 3 + [None], 1, [3], [1], [1],
                [False])


class TestTorchFakes:
    """The torch fake kernels are the plan: FakeTensorMode (what
    torch.compile traces with) gives the eager shapes and dtypes and raises
    the eager errors."""

    torch = pytest.importorskip("torch")

    def test_fake_outputs_match_eager(self, rng):
        torch = self.torch
        import libna.torch as lt
        from torch._subclasses.fake_tensor import FakeTensorMode

        for case in CASES:
            q, k, v, kernel_size, kw = make_case(rng, case)
            kw = {n: torch.from_numpy(x) if isinstance(x, np.ndarray) else x
                  for n, x in kw.items()}
            tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
            rank = len(kernel_size)
            eager = lt.ops.na(rank, tq, tk, tv, kernel_size, return_lse=True, **kw)
            with FakeTensorMode() as mode:
                fake = lt.ops.na(rank, *(mode.from_tensor(x) for x in (tq, tk, tv)), kernel_size,
                                 return_lse=True, **{n: mode.from_tensor(x)
                                                     if isinstance(x, torch.Tensor) else x
                                                     for n, x in kw.items()})
            for e, f in zip(eager, fake):
                assert (tuple(f.shape), f.dtype) == (tuple(e.shape), e.dtype), case

    def test_fake_kernel_raises_the_eager_error(self):
        torch = self.torch
        import libna.torch as lt
        from torch._subclasses.fake_tensor import FakeTensorMode

        q = torch.zeros(1, 8, 8, 4, 4)
        k = torch.zeros(1, 8, 8, 3, 4)
        with pytest.raises(ValueError, match="q has 4 heads, which is not a multiple of the 3"):
            lt.na2d(q, k, k, 3)
        with FakeTensorMode() as mode, pytest.raises(
                ValueError, match="q has 4 heads, which is not a multiple of the 3"):
            lt.na2d(mode.from_tensor(q), mode.from_tensor(k), mode.from_tensor(k), 3)


def test_a_workspace_is_allocated_but_not_returned(rng):
    """With additional keys and no lse wanted, the core still needs lse: the
    binding allocates it through the caller's allocator (as for CUDA
    arrays, whose memory only the framework may allocate) and returns only out."""
    q, k, v, kernel_size, kw = make_case(rng, CASES[-1])
    allocated = []

    def alloc(shape, dtype):
        allocated.append(tuple(shape))
        return np.empty(shape, dtype)

    params = window(2, kernel_size, kw)
    inputs = [q, k, v, None, kw["additional_keys"], kw["additional_values"]]
    out, lse = _C.call("na", inputs, **params, alloc=alloc)
    assert lse is None and allocated == [out.shape, out.shape[:-1]]
    want = libna.na2d(q, k, v, kernel_size, **kw)
    np.testing.assert_array_equal(out, want)
