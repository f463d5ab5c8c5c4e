"""libna.torch: the differentiable custom ops and the NATTEN-style modules.

The oracle is a plain PyTorch neighborhood attention written here with
gather/softmax/weighted-sum: for each query the key indices come from
libna.reference.neighborhood (itself checked against hand-worked examples in
test_reference.py). In float64 it checks libna's gradients (besides
gradcheck); run in half precision, its error sets the tolerance of libna's.
"""

import functools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import libna  # noqa: E402
import libna.torch as lt  # noqa: E402
from libna import reference  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402


# --------------------------------------------------------------------------
# Plain gather-based PyTorch implementation
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _tables(spatial, kernel, stride, dilation, causal):
    """For each query (flat index t) and slot s: the flat key index, whether
    the slot is filled and the per-axis rpb index."""
    rank, slots, tokens = len(spatial), math.prod(kernel), math.prod(spatial)
    index = np.zeros((tokens, slots), np.int64)
    valid = np.zeros((tokens, slots), bool)
    rel = np.zeros((rank, tokens, slots), np.int64)
    for t, pos in enumerate(np.ndindex(*spatial)):
        keys = reference.neighborhood(pos, spatial, kernel, stride, dilation, causal)
        lo = [min(key[a] // dilation[a] for key in keys) for a in range(rank)]
        for key in keys:
            group = [key[a] // dilation[a] for a in range(rank)]
            s = np.ravel_multi_index(tuple(g - l for g, l in zip(group, lo)), kernel)
            index[t, s] = np.ravel_multi_index(key, spatial)
            valid[t, s] = True
            rel[:, t, s] = [group[a] - pos[a] // dilation[a] + kernel[a] - 1
                            for a in range(rank)]
    return torch.from_numpy(index), torch.from_numpy(valid), torch.from_numpy(rel)


def _flat(x, rank):
    return x.reshape(x.shape[0], -1, *x.shape[rank + 1:])


def _gather_heads(x, index, heads):
    """x [B, T, heads_kv, E] -> [B, T, slots, heads, E] (GQA repeat)."""
    x = x.repeat_interleave(heads // x.shape[-2], dim=-2)
    return x[:, index]


def plain_qk(q, k, kernel, dilation, causal, rpb=None, stride=None):
    rank = q.dim() - 3
    spatial = tuple(q.shape[1:1 + rank])
    stride = stride or (1,) * rank
    index, valid, rel = _tables(spatial, kernel, stride, dilation, causal)
    heads = q.shape[-2]
    logits = torch.einsum("bthd,btshd->bths", _flat(q, rank),
                          _gather_heads(_flat(k, rank), index, heads))
    if rpb is not None:
        logits = logits + rpb[(slice(None),) + tuple(rel)].permute(1, 0, 2)
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    return logits.reshape(*q.shape[:-1], -1)


def plain_av(attn, v, kernel, dilation, causal, stride=None):
    rank = attn.dim() - 3
    spatial = tuple(attn.shape[1:1 + rank])
    stride = stride or (1,) * rank
    index, valid, _ = _tables(spatial, kernel, stride, dilation, causal)
    heads = attn.shape[-2]
    a = _flat(attn, rank).masked_fill(~valid[:, None, :], 0)
    out = torch.einsum("bths,btshe->bthe", a, _gather_heads(_flat(v, rank), index, heads))
    return out.reshape(*attn.shape[:-1], v.shape[-1])


def plain_na(q, k, v, kernel, stride, dilation, causal, scale=None, rpb=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = plain_qk(q * scale, k, kernel, dilation, causal, rpb, stride=stride)
    out = plain_av(logits.softmax(-1), v, kernel, dilation, causal, stride=stride)
    return out, torch.logsumexp(logits, dim=-1)


# --------------------------------------------------------------------------
# The feature grid
# --------------------------------------------------------------------------


def _case(spatial, kernel, stride=1, dilation=1, causal=False, rpb=False, heads=2,
          heads_kv=None, dim=4, dim_v=None, scale=None, batch=1):
    rank = len(spatial)
    per = lambda x: tuple(x) if isinstance(x, tuple) else (x,) * rank  # noqa: E731
    return dict(spatial=spatial, kernel=per(kernel), stride=per(stride),
                dilation=per(dilation), causal=per(causal), rpb=rpb, heads=heads,
                heads_kv=heads_kv or heads, dim=dim, dim_v=dim_v or dim, scale=scale,
                batch=batch)


CASES = [
    _case((7,), 3, batch=2),
    _case((8,), 4, rpb=True),
    _case((9,), 3, dilation=2, rpb=True, scale=0.3),
    _case((9,), 3, stride=2),
    _case((8,), 3, causal=True),
    _case((9,), 4, stride=2, dilation=2, causal=True, heads=4, heads_kv=2),
    _case((7,), 3, heads=4, heads_kv=1, dim_v=3, rpb=True),
    _case((5, 6), 3, rpb=True),
    _case((5, 6), 3, dilation=(1, 2), causal=(True, False), heads=1),
    _case((5, 6), (2, 3), stride=(2, 1), causal=(False, True), heads=4, heads_kv=2),
    _case((5, 6), 2, dilation=(2, 1), rpb=True, dim_v=6, scale=0.5),
    _case((5, 6), 3, stride=(1, 3), dilation=(1, 2), heads=1),
    _case((5, 6), (3, 2), causal=True, heads=1),
    _case((4, 4, 5), 3, rpb=True, heads=1),
    _case((4, 4, 5), (2, 3, 2), stride=(1, 2, 1), dilation=(1, 1, 2),
          causal=(True, False, True), heads=1),
    _case((4, 4, 5), (2, 2, 3), heads=2, heads_kv=1, dim_v=2, scale=0.7, rpb=True),
]
UNFUSED_CASES = [c for c in CASES if all(s == 1 for s in c["stride"])]


def case_id(c):
    parts = ["x".join(map(str, c["spatial"])), "k" + "x".join(map(str, c["kernel"]))]
    if any(s != 1 for s in c["stride"]):
        parts.append("s" + "x".join(map(str, c["stride"])))
    if any(d != 1 for d in c["dilation"]):
        parts.append("d" + "x".join(map(str, c["dilation"])))
    if any(c["causal"]):
        parts.append("c" + "".join("TF"[not x] for x in c["causal"]))
    if c["rpb"]:
        parts.append("rpb")
    if c["heads_kv"] != c["heads"]:
        parts.append(f"gqa{c['heads']}-{c['heads_kv']}")
    if c["dim_v"] != c["dim"]:
        parts.append(f"dv{c['dim_v']}")
    if c["scale"] is not None:
        parts.append(f"scale{c['scale']}")
    return "-".join(parts)


def make_inputs(c, dtype=torch.float64, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    shape = (c["batch"], *c["spatial"])
    q = torch.randn(*shape, c["heads"], c["dim"], generator=g, dtype=torch.float64)
    k = torch.randn(*shape, c["heads_kv"], c["dim"], generator=g, dtype=torch.float64)
    v = torch.randn(*shape, c["heads_kv"], c["dim_v"], generator=g, dtype=torch.float64)
    rpb = None
    if c["rpb"]:
        rpb = torch.randn(c["heads"], *(2 * x - 1 for x in c["kernel"]), generator=g,
                          dtype=torch.float64)
    tensors = [x.to(dtype).requires_grad_(requires_grad) if x is not None else None
               for x in (q, k, v, rpb)]
    return tensors


def kw_fused(c):
    return dict(stride=c["stride"], dilation=c["dilation"], is_causal=c["causal"],
                scale=c["scale"])


def leaves(*xs):
    return [x for x in xs if x is not None]


# --------------------------------------------------------------------------
# gradcheck (float64) of the fused and unfused ops
# --------------------------------------------------------------------------


@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_gradcheck_fused(c):
    rank = len(c["spatial"])
    q, k, v, rpb = make_inputs(c)
    kw = kw_fused(c)

    def with_lse(q, k, v, *rest):
        return lt.ops.na(rank, q, k, v, c["kernel"], rpb=rest[0] if rest else None,
                         return_lse=True, **kw)

    def out_only(q, k, v, *rest):
        return lt.ops.na(rank, q, k, v, c["kernel"], rpb=rest[0] if rest else None, **kw)

    # Full Jacobians in 1D and 2D; random projections keep 3D quick.
    fast = rank == 3
    assert torch.autograd.gradcheck(with_lse, leaves(q, k, v, rpb), fast_mode=fast)
    assert torch.autograd.gradcheck(out_only, leaves(q, k, v, rpb), fast_mode=fast)


@pytest.mark.parametrize("c", UNFUSED_CASES, ids=case_id)
def test_gradcheck_unfused(c):
    rank = len(c["spatial"])
    q, k, v, rpb = make_inputs(c)
    attn = torch.randn(*q.shape[:-1], math.prod(c["kernel"]), dtype=torch.float64,
                       requires_grad=True)
    qk = getattr(lt, f"na{rank}d_qk")
    av = getattr(lt, f"na{rank}d_av")
    kw = dict(dilation=c["dilation"], is_causal=c["causal"])

    def scores(q, k, *rest):
        a = qk(q, k, c["kernel"], rpb=rest[0] if rest else None, **kw)
        # Unfilled causal slots hold -inf, which finite differences cannot take.
        return a.masked_fill(torch.isinf(a), 0.0)

    fast = rank == 3
    assert torch.autograd.gradcheck(scores, leaves(q, k, rpb), fast_mode=fast)
    assert torch.autograd.gradcheck(lambda a, v: av(a, v, c["kernel"], **kw), (attn, v),
                                    fast_mode=fast)


# --------------------------------------------------------------------------
# Against the plain implementation: float64, and low precision
# --------------------------------------------------------------------------


def _run(fn, tensors, weights):
    """Forward, then backward with loss sum(out_i * w_i); returns outputs and grads."""
    outs = fn(*tensors)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.double() * w).sum() for o, w in zip(outs, weights))
    grads = torch.autograd.grad(loss, tensors)
    return [o.detach().double() for o in outs] + [g.double() for g in grads]


def _weights(fn, tensors, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        outs = fn(*[t.detach().double() for t in tensors])
    outs = outs if isinstance(outs, tuple) else (outs,)
    return [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]


def _rel_err(x, ref):
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(x))
    x, ref = x[finite], ref[finite]
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("c", CASES[::2], ids=case_id)
def test_fused_matches_plain_float64(c):
    rank = len(c["spatial"])
    tensors = leaves(*make_inputs(c))

    def ours(q, k, v, *rest):
        return lt.ops.na(rank, q, k, v, c["kernel"], rpb=rest[0] if rest else None,
                         return_lse=True, **kw_fused(c))

    def plain(q, k, v, *rest):
        return plain_na(q, k, v, c["kernel"], c["stride"], c["dilation"], c["causal"],
                        c["scale"], rest[0] if rest else None)

    w = _weights(plain, tensors)
    for name, x, r in zip(["out", "lse", "dq", "dk", "dv", "drpb"],
                          _run(ours, tensors, w), _run(plain, tensors, w)):
        torch.testing.assert_close(x, r, rtol=1e-9, atol=1e-10, msg=name)


FLOOR = {torch.float32: 1e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3}
LOW_CASES = [CASES[1], CASES[5], CASES[7], CASES[9], CASES[13], CASES[15]]


def _check_low_precision(ours, plain, c, dtype, names):
    exact = leaves(*make_inputs(c, dtype))
    rounded = [t.detach().double().requires_grad_() for t in exact]
    w = _weights(plain, rounded)
    ref = _run(plain, rounded, w)
    got = _run(ours, exact, w)
    low = _run(plain, [t.detach().clone().requires_grad_() for t in exact], w)
    for name, x, r, p in zip(names, got, ref, low):
        err, plain_err = _rel_err(x, r), _rel_err(p, r)
        assert err <= 2 * plain_err + FLOOR[dtype], (name, err, plain_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("c", LOW_CASES, ids=case_id)
def test_fused_low_precision(c, dtype):
    rank = len(c["spatial"])

    def ours(q, k, v, *rest):
        out = lt.ops.na(rank, q, k, v, c["kernel"], rpb=rest[0] if rest else None,
                        **kw_fused(c))
        assert out.dtype == q.dtype
        return out

    def plain(q, k, v, *rest):
        return plain_na(q, k, v, c["kernel"], c["stride"], c["dilation"], c["causal"],
                        c["scale"], rest[0] if rest else None)[0]

    _check_low_precision(ours, plain, c, dtype, ["out", "dq", "dk", "dv", "drpb"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("c", [c for c in LOW_CASES if c in UNFUSED_CASES], ids=case_id)
def test_unfused_low_precision(c, dtype):
    rank = len(c["spatial"])
    kw = dict(dilation=c["dilation"], is_causal=c["causal"])
    scale = c["dim"] ** -0.5

    def ours(q, k, v, *rest):
        a = lt.ops.na_qk(rank, q * scale, k, c["kernel"], rpb=rest[0] if rest else None, **kw)
        return lt.ops.na_av(rank, a.softmax(-1), v, c["kernel"], **kw)

    def plain(q, k, v, *rest):
        a = plain_qk(q * scale, k, c["kernel"], rpb=rest[0] if rest else None,
                     dilation=c["dilation"], causal=c["causal"])
        return plain_av(a.softmax(-1), v, c["kernel"], c["dilation"], c["causal"])

    _check_low_precision(ours, plain, c, dtype, ["out", "dq", "dk", "dv", "drpb"])


# --------------------------------------------------------------------------
# Double backward is not implemented, and says so with the op's name
# --------------------------------------------------------------------------


def _double_backward_cases():
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64,  # noqa: E731
                               requires_grad=True)
    q2, k2, v2 = r(1, 5, 6, 2, 4), r(1, 5, 6, 2, 4), r(1, 5, 6, 2, 3)
    q3 = r(1, 3, 4, 4, 2, 4)
    xk, xv = r(1, 3, 2, 4), r(1, 3, 2, 3)
    return {
        "na1d": (lambda q: lt.na1d(q, q, q, 3, is_causal=True), (r(1, 7, 2, 4),), "na1d"),
        "na2d-rpb": (lambda q, k, v, b: lt.na2d(q, k, v, 3, rpb=b), (q2, k2, v2, r(2, 5, 5)),
                     "na2d"),
        "na3d-lse": (lambda q: lt.na3d(q, q, q, 3, return_lse=True), (q3,), "na3d"),
        "na2d-additional": (lambda q, xk, xv: lt.na2d(q, k2.detach(), v2.detach(), 3,
                                                      additional_keys=xk,
                                                      additional_values=xv),
                            (q2, xk, xv), "na2d"),
        "na2d_qk": (lambda q, k: lt.na2d_qk(q, k, 3), (q2, k2), "na2d_qk"),
        "na2d_av": (lambda a, v: lt.na2d_av(a, v, 3), (r(1, 5, 6, 2, 9), v2), "na2d_av"),
        "merge_attentions": (lambda a, b, c, d: lt.merge_attentions([a, c], [b, d]),
                             (r(1, 5, 2, 3), r(1, 5, 2), r(1, 5, 2, 3), r(1, 5, 2)),
                             "merge_attentions"),
    }


@pytest.mark.parametrize("name", list(_double_backward_cases()))
def test_double_backward_names_the_op(name):
    fn, inputs, op = _double_backward_cases()[name]
    message = rf"^\[{op}\] double backward \(gradients of gradients\) is not implemented$"
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    # First-order gradients work, also when they are made differentiable ...
    grads = torch.autograd.grad(sum((o * o).sum() for o in outputs), inputs, create_graph=True)
    assert all(g is not None and g.requires_grad for g in grads)
    # ... but differentiating them again raises.
    with pytest.raises(NotImplementedError, match=message):
        sum(g.sum() for g in grads).backward()
    with pytest.raises(NotImplementedError, match=message):
        torch.autograd.gradgradcheck(fn, inputs)


# --------------------------------------------------------------------------
# torch.library.opcheck on every custom op
# --------------------------------------------------------------------------


def _opcheck_args():
    d = torch.float64
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=d)  # noqa: E731
    q, k, v = r(1, 5, 6, 4, 4), r(1, 5, 6, 2, 4), r(1, 5, 6, 2, 3)
    rpb = r(4, 5, 3)
    plain = ([3, 2], [1, 1], [1, 2], [False, False], 0.4)
    causal = ([2, 3], [2, 1], [2, 1], [True, False], 0.3)
    ops = torch.ops.libna
    out, lse = ops.na_forward(q, k, v, rpb, *plain)
    out_c, lse_c = ops.na_forward(q, k, v, None, *causal)
    attn = r(1, 5, 6, 4, 6).softmax(-1)
    grad = lambda *xs: [x.clone().requires_grad_() for x in xs]  # noqa: E731
    return {
        "na_forward-rpb": (ops.na_forward, (*grad(q, k, v, rpb), *plain)),
        "na_forward-causal": (ops.na_forward, (*grad(q, k, v), None, *causal)),
        "na_backward-rpb": (ops.na_backward, (q, k, v, out, r(*out.shape), lse, rpb, *plain)),
        "na_backward-causal": (ops.na_backward,
                               (q, k, v, out_c, r(*out_c.shape), lse_c, None, *causal)),
        "na_qk-rpb": (ops.na_qk, (*grad(q, k, rpb), *plain[:1], *plain[2:4])),
        "na_qk-causal": (ops.na_qk, (*grad(q, k), None, [3, 2], [1, 2], [True, True])),
        "na_qk_backward": (ops.na_qk_backward,
                           (r(1, 5, 6, 4, 6), q, k, rpb, [3, 2], [1, 2], [False, False])),
        "na_av": (ops.na_av, (*grad(attn, v), [3, 2], [1, 2], [False, True])),
        "na_av_backward": (ops.na_av_backward,
                           (r(1, 5, 6, 4, 3), attn, v, [3, 2], [1, 2], [True, False])),
    }


@pytest.mark.parametrize("name", list(_opcheck_args()))
def test_opcheck(name):
    op, args = _opcheck_args()[name]
    torch.library.opcheck(op, args)


def test_ops_registered():
    for name in ("na_forward", "na_backward", "na_qk", "na_qk_backward", "na_av",
                 "na_av_backward"):
        assert hasattr(torch.ops.libna, name)
    # A missing rpb gradient is an empty tensor.
    q = torch.randn(1, 7, 2, 4)
    out, lse = torch.ops.libna.na_forward(q, q, q, None, [3], [1], [1], [False], 0.5)
    assert lse.dtype == torch.float32 and lse.shape == (1, 7, 2)
    grads = torch.ops.libna.na_backward(q, q, q, out, out, lse, None, [3], [1], [1],
                                        [False], 0.5)
    assert grads[3].numel() == 0


# --------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def test_compile_training_step_no_graph_breaks():
    torch.manual_seed(0)
    model = lt.nn.NeighborhoodAttention2D(16, 2, (3, 5), dilation=(2, 1))
    x = torch.randn(2, 7, 6, 16, requires_grad=True)

    def loss_fn(x):
        return model(x).square().mean()

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(loss_fn, fullgraph=True)
    loss = compiled(x)
    loss.backward()
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    got, got_x = _grads(model), x.grad.clone()

    model.zero_grad()
    x.grad = None
    ref = loss_fn(x)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, got_x, rtol=1e-4, atol=1e-6)
    for name, g in _grads(model).items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(loss_fn)(x)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_compile_functional_and_unfused(rank):
    spatial = {1: (9,), 2: (5, 6), 3: (4, 4, 5)}[rank]
    c = _case(spatial, 3, causal=(True,) + (False,) * (rank - 1), heads=4, heads_kv=2,
              dim_v=3)
    q, k, v, _ = make_inputs(c, torch.float32)
    kw = dict(dilation=1, is_causal=c["causal"])

    def fn(q, k, v):
        out, lse = lt.ops.na(rank, q, k, v, 3, return_lse=True, **kw)
        a = lt.ops.na_qk(rank, q * 0.5, k, 3, **kw).softmax(-1)
        out2 = lt.ops.na_av(rank, a, v, 3, **kw)
        return out.sum() + (out2 * out).sum() + lse.square().sum()

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    assert sum(counters["graph_break"].values()) == 0
    ref = torch.autograd.grad(fn(q, k, v), (q, k, v))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_compile_autocast_module():
    torch.manual_seed(0)
    model = lt.nn.NeighborhoodAttention1D(8, 2, 3)
    x = torch.randn(1, 9, 8)

    def fn(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)

    torch._dynamo.reset()
    counters.clear()
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert sum(counters["graph_break"].values()) == 0
    assert model.rpb.grad is not None and model.rpb.grad.dtype == torch.float32
    torch.testing.assert_close(out, fn(x))


# --------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------

MODULES = {1: lt.nn.NeighborhoodAttention1D, 2: lt.nn.NeighborhoodAttention2D,
           3: lt.nn.NeighborhoodAttention3D}
SPATIAL = {1: (9,), 2: (5, 6), 3: (4, 4, 5)}


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("rel_pos_bias,qkv_bias", [(True, True), (False, True), (True, False)])
def test_module_state_dict(rank, rel_pos_bias, qkv_bias):
    kernel = (3, 5, 3)[:rank]
    m = MODULES[rank](24, 4, kernel, rel_pos_bias=rel_pos_bias, qkv_bias=qkv_bias)
    expected = {"qkv.weight": (72, 24), "proj.weight": (24, 24), "proj.bias": (24,)}
    if qkv_bias:
        expected["qkv.bias"] = (72,)
    if rel_pos_bias:
        expected["rpb"] = (4, *(2 * x - 1 for x in kernel))
    assert {n: tuple(t.shape) for n, t in m.state_dict().items()} == expected
    if rel_pos_bias:
        assert isinstance(m.rpb, torch.nn.Parameter)
        assert m.rpb.abs().max() <= 2.0 and m.rpb.std() > 0
        assert float(m.rpb.detach().std()) < 0.05
    else:
        assert m.rpb is None
        assert "rpb" in dict(m._parameters)
    assert isinstance(m.qkv, torch.nn.Linear) and isinstance(m.proj, torch.nn.Linear)
    assert isinstance(m.attn_drop, torch.nn.Dropout) and isinstance(m.proj_drop, torch.nn.Dropout)
    # A state dict round-trips into a fresh module.
    m2 = MODULES[rank](24, 4, kernel, rel_pos_bias=rel_pos_bias, qkv_bias=qkv_bias)
    m2.load_state_dict(m.state_dict())


def test_module_arguments():
    with pytest.raises(ValueError, match="rel_pos_bias.*is_causal"):
        lt.nn.NeighborhoodAttention2D(16, 2, 3, is_causal=(False, True))
    lt.nn.NeighborhoodAttention2D(16, 2, 3, is_causal=(False, True), rel_pos_bias=False)
    with pytest.raises(ValueError, match="num_heads"):
        lt.nn.NeighborhoodAttention1D(10, 3, 3)
    with pytest.raises(ValueError, match="kernel_size"):
        lt.nn.NeighborhoodAttention2D(16, 2, (3, 3, 3))
    with pytest.raises(TypeError, match="dilation"):
        lt.nn.NeighborhoodAttention1D(16, 2, 3, dilation=1.5)
    m = lt.nn.NeighborhoodAttention3D(16, 4, (3, 5, 7), dilation=(1, 2, 1), qk_scale=0.1)
    assert m.kernel_size == (3, 5, 7) and m.dilation == (1, 2, 1)
    assert m.is_causal == (False, False, False) and m.scale == 0.1
    text = repr(m)
    for part in ("dim=16", "num_heads=4", "head_dim=4", "kernel_size=(3, 5, 7)",
                 "dilation=(1, 2, 1)", "is_causal=(False, False, False)", "rel_pos_bias=True"):
        assert part in text, text


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_module_forward_matches_plain(rank):
    torch.manual_seed(rank)
    kernel = {1: (3,), 2: (3, 2), 3: (3, 3, 2)}[rank]
    causal = rank == 3
    m = MODULES[rank](16, 2, kernel, dilation=(1,) * (rank - 1) + (2,),
                      is_causal=(False, False, True)[:rank] if causal else False,
                      rel_pos_bias=not causal, qk_scale=0.3).double().eval()
    x = torch.randn(2, *SPATIAL[rank], 16, dtype=torch.float64)
    out = m(x)
    assert out.shape == x.shape
    qkv = m.qkv(x).reshape(2, *SPATIAL[rank], 3, 2, 8)
    q, k, v = qkv.unbind(-3)
    ref, _ = plain_na(q, k, v, kernel, (1,) * rank, m.dilation, m.is_causal, 0.3, m.rpb)
    ref = m.proj(ref.reshape(x.shape))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_module_dropout_path(rank):
    torch.manual_seed(0)
    m = MODULES[rank](16, 2, 3, attn_drop=0.3).double()
    x = torch.randn(2, *SPATIAL[rank], 16, dtype=torch.float64)
    fused = m.eval()(x)
    # Train mode with p > 0 takes the unfused qk -> softmax -> dropout -> av
    # path; with the dropout itself switched off it must equal the fused one.
    m.train()
    m.attn_drop.eval()
    unfused = m(x)
    torch.testing.assert_close(unfused, fused, rtol=1e-10, atol=1e-12)
    # Real dropout: runs and produces gradients for every parameter.
    m.train()
    out = m(x)
    assert not torch.allclose(out, fused)
    out.square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_module_dropout_p0_is_fused():
    torch.manual_seed(0)
    m = lt.nn.NeighborhoodAttention2D(16, 2, 3, attn_drop=0.0).train()
    x = torch.randn(1, 5, 6, 16)
    torch.testing.assert_close(m(x), m.eval()(x))


# --------------------------------------------------------------------------
# autocast, requires_grad, dtypes
# --------------------------------------------------------------------------


def test_autocast_module_bf16():
    torch.manual_seed(0)
    m = lt.nn.NeighborhoodAttention2D(16, 2, 3)
    x = torch.randn(2, 5, 6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert m.rpb.grad is not None and m.rpb.grad.dtype == torch.float32
    ref = m(x)
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_functional(dtype):
    c = _case((5, 6), 3, rpb=True)
    q, k, v, rpb = make_inputs(c, torch.float32)
    with torch.autocast("cpu", dtype=dtype):
        out = lt.na2d(q, k, v.to(dtype), 3, rpb=rpb)
        attn = lt.na2d_qk(q.to(dtype), k, 3, rpb=rpb)
        out2 = lt.na2d_av(attn.float().softmax(-1), v, 3)
    assert out.dtype == attn.dtype == out2.dtype == dtype
    out.float().sum().backward()
    assert q.grad.dtype == rpb.grad.dtype == torch.float32


def test_mixed_dtypes_outside_autocast():
    c = _case((5, 6), 3, rpb=True)
    q, k, v, rpb = make_inputs(c, torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        lt.na2d(q, k.double(), v, 3)
    with pytest.raises(TypeError, match="rpb"):
        lt.na2d(q.half(), k.half(), v.half(), 3, rpb=rpb)
    with pytest.raises(TypeError, match="dtype"):
        lt.na2d_qk(q, k.bfloat16(), 3)
    with pytest.raises(TypeError, match="dtype"):
        lt.na2d_av(torch.randn(1, 5, 6, 2, 9, dtype=torch.float64), v, 3)


def test_requires_grad_inputs_and_no_grad():
    c = _case((9,), 3, rpb=True)
    q, k, v, rpb = make_inputs(c, torch.float32)
    out = lt.na1d(q, k, v, 3, rpb=rpb)
    assert out.requires_grad and out.grad_fn is not None
    out.sum().backward()
    assert all(t.grad is not None for t in (q, k, v, rpb))
    # Only some inputs needing grad, non-contiguous inputs.
    q2 = q.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()
    out = lt.na1d(q2, k.detach(), v.detach(), 3)
    (dq,) = torch.autograd.grad(out.sum(), q2)
    q3 = q.detach().clone().requires_grad_()
    (ref,) = torch.autograd.grad(lt.na1d(q3, k.detach(), v.detach(), 3).sum(), q3)
    torch.testing.assert_close(dq, ref)
    with torch.no_grad():
        assert not lt.na1d(q, k, v, 3, rpb=rpb).requires_grad
    with torch.inference_mode():
        ref = libna.na1d(q.detach(), k.detach(), v.detach(), 3, rpb=rpb.detach())
        torch.testing.assert_close(lt.na1d(q, k, v, 3, rpb=rpb), ref)


def test_argument_errors():
    q = torch.randn(1, 9, 2, 4)
    with pytest.raises(ValueError, match="kernel_size"):
        lt.na1d(q, q, q, (3, 3))
    with pytest.raises(TypeError, match="is_causal"):
        lt.na1d(q, q, q, 3, is_causal=1)
    with pytest.raises(TypeError, match="scale"):
        lt.na1d(q, q, q, 3, scale="big")
    with pytest.raises(ValueError, match="rpb"):
        lt.na1d(q, q, q, 3, is_causal=True, rpb=torch.zeros(2, 5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or "cuda" not in libna.build_info()["backends"],
                    reason="needs a CUDA GPU and a CUDA build of libna")
def test_cuda_matches_cpu():
    c = _case((5, 6), 3, rpb=True, heads=4, heads_kv=2)
    cpu = make_inputs(c, torch.float32)
    gpu = [t.detach().cuda().requires_grad_() for t in cpu]
    out_c = lt.na2d(*cpu[:3], 3, rpb=cpu[3])
    out_g = lt.na2d(*gpu[:3], 3, rpb=gpu[3])
    torch.testing.assert_close(out_g.cpu(), out_c, rtol=1e-4, atol=1e-5)
    out_c.sum().backward()
    out_g.sum().backward()
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-4, atol=1e-5)


def _fast_path_cases():
    g = torch.Generator().manual_seed(11)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    qkv = r(2, 6, 7, 3, 4, 8)  # a fused projection's output: q, k, v are strided views
    return {
        "rpb-dilation": ((r(1, 7, 9, 4, 8), r(1, 7, 9, 4, 8), r(1, 7, 9, 4, 8)),
                         dict(kernel_size=3, dilation=(2, 1), rpb=r(4, 5, 5))),
        "gqa-causal-stride": ((r(2, 6, 8, 4, 8), r(2, 6, 8, 2, 8), r(2, 6, 8, 2, 5)),
                              dict(kernel_size=(3, 4), stride=(1, 2), is_causal=(True, False))),
        "qkv-views-lse": (tuple(qkv.unbind(-3)), dict(kernel_size=5, return_lse=True)),
        "additional-keys": ((r(1, 5, 6, 2, 8), r(1, 5, 6, 2, 8), r(1, 5, 6, 2, 8)),
                            dict(kernel_size=3, additional_keys=r(1, 3, 2, 8),
                                 additional_values=r(1, 3, 2, 8))),
        "parameter-bf16": (tuple(torch.nn.Parameter(t) for t in
                                 (r(1, 6, 6, 2, 16).bfloat16(), r(1, 6, 6, 2, 16).bfloat16(),
                                  r(1, 6, 6, 2, 16).bfloat16())),
                           dict(kernel_size=3, scale=0.3)),
    }


@pytest.mark.parametrize("name", list(_fast_path_cases()))
def test_eager_fast_path_is_the_custom_op(name):
    """Plain CPU calls go straight to the core (forward and backward) without
    the custom ops' dispatch: outputs and gradients are bitwise those of the
    custom ops libna::na_forward and libna::na_backward called explicitly,
    also for strided views, Parameters, bfloat16, an lse gradient and a
    stride-0 dout."""
    (q, k, v), kw = _fast_path_cases()[name]
    q, k, v = (t if isinstance(t, torch.nn.Parameter) else t.detach().requires_grad_()
               for t in (q, k, v))
    optional = {key: kw.pop(key, None) for key in ("rpb", "additional_keys", "additional_values")}
    optional = {key: None if t is None else t.requires_grad_() for key, t in optional.items()}
    leaves = [t for t in (q, k, v, *optional.values()) if t is not None]
    out = lt.na2d(q, k, v, **kw, **optional)
    outputs = out if isinstance(out, tuple) else (out,)
    assert "NaForwardEager" in type(outputs[0].grad_fn).__name__
    assert any(type(t) is torch.nn.Parameter for t in leaves) == (name == "parameter-bf16")
    # sum() gives a stride-0 (expanded) dout; lse's gradient flows when returned.
    grads = torch.autograd.grad(sum(o.float().sum() for o in outputs), leaves)

    axes = [list(libna._ops.per_axis("na2d", key, kw.get(key, default), 2, boolean=key == "is_causal"))
            for key, default in (("kernel_size", None), ("stride", 1), ("dilation", 1),
                                 ("is_causal", False))]
    scale = kw.get("scale", q.shape[-1] ** -0.5)
    detached = {key: None if t is None else t.detach() for key, t in optional.items()}
    q, k, v = (t.detach() for t in (q, k, v))
    out_ref, lse_ref = torch.ops.libna.na_forward(
        q, k, v, detached["rpb"], *axes, scale, detached["additional_keys"],
        detached["additional_values"])
    dlse = torch.ones_like(lse_ref) if kw.get("return_lse") else None
    grads_ref = torch.ops.libna.na_backward(
        q, k, v, out_ref, torch.ones_like(out_ref), lse_ref, detached["rpb"], *axes, scale,
        detached["additional_keys"], detached["additional_values"], dlse)
    assert torch.equal(outputs[0], out_ref)
    if kw.get("return_lse"):
        assert torch.equal(outputs[1], lse_ref)
    grads_ref = [g for g, x in zip(grads_ref, (q, k, v, *optional.values())) if x is not None]
    assert len(grads) == len(grads_ref)
    for a, b in zip(grads, grads_ref):
        assert torch.equal(a, b)


def test_numpy_fast_path_matches_the_checked_one(rng):
    """A NumPy call with plain arguments skips the Python checks (the core
    validates); arguments in other forms (tuples, NumPy integers, a scale
    given as an int) take the checked path and give the same answer, and bad
    input is refused the same way on both."""
    q, k, v = (rng.standard_normal((1, 6, 7, 2, 8)).astype(np.float32) for _ in range(3))
    fast = libna.na2d(q, k, v, 3, dilation=2, scale=0.5, return_lse=True)
    checked = libna.na2d(q, k, v, (3, 3), dilation=(np.int64(2), 2), scale=np.float32(0.5),
                         return_lse=np.True_)
    for a, b in zip(fast, checked):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"\[na2d\] .*kernel_size"):
        libna.na2d(q, k, v, 9)
    with pytest.raises(ValueError, match=r"\[na2d\] .*kernel_size"):
        libna.na2d(q, k, v, (9, 9))
    with pytest.raises(ValueError, match=r"\[na2d\] kernel_size=.* out of range"):
        libna.na2d(q, k, v, 2**70)


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
def test_eager_calls_show_in_the_profiler(grad):
    """The eager paths bypass torch's dispatcher (which is what torch.profiler
    records), so they name themselves: a model's profile shows libna's time."""
    q, k, v = (torch.randn(1, 6, 6, 2, 8, requires_grad=grad) for _ in range(3))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        libna.torch.na2d(q, k, v, 3)
    names = [event.key for event in prof.key_averages()]
    assert names.count("libna::na_forward") == 1, names
    if grad:  # and so does the backward's
        out = libna.torch.na2d(q, k, v, 3)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out.sum().backward()
        names = [event.key for event in prof.key_averages()]
        assert names.count("libna::na_backward") == 1, names


def test_cpu_outputs_from_libna_are_freed():
    """Plain CPU calls get outputs that libna allocates and torch imports over
    DLPack: 64-byte aligned, freed when the tensor dies, and freed also when
    the importer never takes the capsule or raises (a fresh interpreter
    repeats each 40 times on 32 MiB outputs; resident memory stays within
    two outputs)."""
    from _run_python import run_python

    result = run_python("""
        import json, torch, libna, libna.torch as lt
        from libna import _C
        from torch.utils.dlpack import to_dlpack

        def rss():
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f
                            if line.startswith("VmRSS:"))

        x = torch.randn(1, 2**19, 1, 16)  # out: 32 MiB
        capsules = lambda: [to_dlpack(x) for _ in range(3)]
        def never_taken(capsule):
            return None
        def raising(capsule):
            raise RuntimeError("importer failed")
        def call(wrap):
            return _C.call("na", capsules(), 1, [3], [1], [1], [False], None, True, None,
                           False, 0, wrap)
        report = {"aligned": lt.na1d(x, x, x, 3).data_ptr() % 64 == 0}
        for name, run in (("tensors", lambda: lt.na1d(x, x, x, 3, return_lse=True)),
                          ("never_taken", lambda: call(never_taken))):
            run()
            before = rss()
            for _ in range(40):
                run()
            report[name] = rss() - before
        before = rss()
        for _ in range(40):
            try:
                call(raising)
            except RuntimeError as error:
                assert "importer failed" in str(error)
        report["raising"] = rss() - before
        print(json.dumps(report))
    """)
    assert result.returncode == 0, result.stderr
    report = __import__("json").loads(result.stdout.splitlines()[-1])
    assert report.pop("aligned") is True
    for name, grown in report.items():
        assert grown < 2 * 32 * 2**20, (name, grown)


def test_freed_outputs_are_reused_and_fully_written():
    """A dead CPU output of 1 MiB or more is kept (libna.host_cache_info) and
    handed to the next output of its size, which the kernels then write
    whole: outputs and gradients computed into reused memory that was
    filled with NaN are bitwise the first ones (fresh memory of this size
    comes zeroed from the OS, which would hide an element left unwritten)."""
    libna.empty_host_cache()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 48, 48, 4, 32, generator=g) for _ in range(3))  # 1.2 MB each
    dout = torch.randn(q.shape, generator=g)

    def run():
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = lt.na2d(*leaves, 7, dilation=(1, 2), return_lse=True)
        out.backward(dout)
        return [out.detach(), lse.detach()] + [x.grad for x in leaves]

    first = [x.clone() for x in run()]
    start = libna.host_cache_info()
    assert start["blocks"] >= 4 and start["bytes"] <= start["limit"], start  # out, dq, dk, dv
    for _ in range(2):
        results = run()
        pointers = {x.data_ptr() for x in results}
        for result in results:
            result.fill_(float("nan"))
        del results, result  # (each name: the outputs die here)
        again = run()
        reused = pointers & {x.data_ptr() for x in again}
        assert len(reused) >= 4, "the NaN-filled outputs were not reused"
        for result, expected in zip(again, first):
            assert torch.equal(result, expected)
        del again, result
    assert libna.host_cache_info()["reused"] >= start["reused"] + 8
    libna.empty_host_cache()
    assert libna.host_cache_info()["blocks"] == 0


def test_host_cache_limit():
    """LIBNA_HOST_CACHE_BYTES bounds the kept outputs (the oldest go first);
    0 keeps none."""
    from _run_python import run_python

    script = """
        import json, torch, libna, libna.torch as lt
        x = torch.randn(1, 2**15, 1, 16)  # outputs of 2 MiB
        outs = [lt.na1d(x + i, x, x, 3) for i in range(5)]
        del outs
        print(json.dumps(libna.host_cache_info()))
    """
    import json

    for limit, blocks in ((0, 0), (5 * 2**20, 2), (2**30, 5)):
        result = run_python(script, env={"LIBNA_HOST_CACHE_BYTES": str(limit)})
        assert result.returncode == 0, result.stderr
        info = json.loads(result.stdout.splitlines()[-1])
        assert info["limit"] == limit, info
        assert (info["blocks"], info["bytes"]) == (blocks, blocks * 2**21), info


_QKVPACKED_CASES = {
    "1d-causal-lse": ((2, 11), dict(kernel_size=5, is_causal=True, return_lse=True)),
    "2d-rpb-dilation": ((1, 7, 9), dict(kernel_size=3, dilation=(2, 1), rpb=True)),
    "2d-stride-scale": ((2, 6, 8), dict(kernel_size=(3, 5), stride=(2, 1), scale=0.3)),
    "3d": ((1, 4, 5, 6), dict(kernel_size=3)),
}


def _qkvpacked_inputs(name, dtype=torch.float32):
    shape, kw = _QKVPACKED_CASES[name]
    kw = dict(kw)
    g = torch.Generator().manual_seed(4)
    heads, dim = 2, 8
    qkv = torch.randn(*shape, 3 * heads * dim, generator=g, dtype=dtype)
    qkv = qkv.reshape(*shape, 3, heads, dim).requires_grad_()  # as a fused Linear gives it
    if kw.pop("rpb", False):
        kernel = kw["kernel_size"]
        kw["rpb"] = torch.randn(heads, *(2 * kernel - 1,) * (len(shape) - 1), generator=g,
                                dtype=dtype).requires_grad_()
    return qkv, kw


@pytest.mark.parametrize("name", list(_QKVPACKED_CASES))
def test_qkvpacked_is_na_on_the_unbound_views(name):
    """na{n}d_qkvpacked(qkv) gives bitwise na{n}d(*qkv.unbind(-3)): outputs,
    the lse, and gradients of qkv (written in one piece on the eager path:
    contiguous, no stack) and of rpb; the custom ops' path (any torch
    function mode) gives the same."""
    qkv, kw = _qkvpacked_inputs(name)
    rank = qkv.dim() - 4  # [B, *spatial, 3, heads, D]
    packed = getattr(lt, f"na{rank}d_qkvpacked")
    plain = getattr(lt, f"na{rank}d")
    leaves = [qkv] + ([kw["rpb"]] if "rpb" in kw else [])

    def run(fn, *args):
        out = fn(*args, **kw)
        outs = out if isinstance(out, tuple) else (out,)
        grads = torch.autograd.grad(sum((o * (i + 1)).sum() for i, o in enumerate(outs)), leaves)
        return outs, grads

    outs, grads = run(packed, qkv)
    assert "NaQkvPackedEager" in type(outs[0].grad_fn).__name__
    assert grads[0].is_contiguous() and grads[0].shape == qkv.shape
    ref_outs, ref_grads = run(plain, *qkv.unbind(-3))

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        mode_outs, mode_grads = run(packed, qkv)
    for got in ((outs, grads), (mode_outs, mode_grads)):
        for a, b in zip((*got[0], *got[1]), (*ref_outs, *ref_grads)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["2d-rpb-dilation", "3d"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qkvpacked_under_autocast_keeps_one_gradient(name, dtype):
    """Inside CPU autocast (a bf16/fp16 projection feeding it, as a NAT
    block's under torch.autocast), na{n}d_qkvpacked still takes the packed
    node: it casts float32 qkv and rpb to the autocast dtype, and the
    gradient of qkv comes out in one piece, equal to the unbound call's."""
    qkv32, kw = _qkvpacked_inputs(name)
    rank = qkv32.dim() - 4
    packed = getattr(lt, f"na{rank}d_qkvpacked")
    plain = getattr(lt, f"na{rank}d")
    leaves = [qkv32] + ([kw["rpb"]] if "rpb" in kw else [])
    for source in (qkv32, qkv32.detach().to(dtype).requires_grad_()):
        inputs = [source] + leaves[1:]
        with torch.autocast("cpu", dtype=dtype):
            out = packed(source, **kw)
            ref = plain(*source.unbind(-3), **kw)
        assert "NaQkvPackedEager" in type(out.grad_fn).__name__
        assert out.dtype == dtype and torch.equal(out, ref)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        grads = torch.autograd.grad((out.float() * weight).sum(), inputs)
        ref_grads = torch.autograd.grad((ref.float() * weight).sum(), inputs)
        assert grads[0].dtype == source.dtype
        for a, b in zip(grads, ref_grads):
            assert torch.equal(a, b)


def test_qkvpacked_gradcheck_and_no_double_backward():
    qkv, kw = _qkvpacked_inputs("2d-rpb-dilation", torch.float64)
    rpb = kw.pop("rpb")
    fn = lambda qkv, rpb: lt.na2d_qkvpacked(qkv, rpb=rpb, return_lse=True, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (qkv, rpb))
    out, lse = fn(qkv, rpb)
    (dqkv,) = torch.autograd.grad((out * out).sum() + lse.sum(), qkv, create_graph=True)
    with pytest.raises(NotImplementedError, match=r"^\[na2d\] double backward"):
        dqkv.sum().backward()


def test_qkvpacked_bad_input():
    qkv = torch.randn(1, 5, 6, 3, 2, 8)
    with pytest.raises(TypeError, match=r"^\[na2d_qkvpacked\] qkv must be a torch\.Tensor, got "
                                        r"numpy\.ndarray"):
        lt.na2d_qkvpacked(qkv.numpy(), 3)
    for bad in (qkv[..., :2, :, :], qkv[0], qkv.reshape(1, 5, 6, 2, 3, 8)):
        with pytest.raises(ValueError, match=r"^\[na2d_qkvpacked\] qkv has shape .*expected "
                                             r"\[B, 2 spatial axes, 3, heads, D\]"):
            lt.na2d_qkvpacked(bad, 3)
    with pytest.raises(ValueError, match=r"\[na2d_qkvpacked\] kernel_size=\(3, 3, 3\)"):
        lt.na2d_qkvpacked(qkv, (3, 3, 3))
    with pytest.raises(ValueError, match=r"kernel_size"):  # the core's check, on q
        lt.na2d_qkvpacked(qkv.requires_grad_(), 9)
    with pytest.raises(TypeError, match=r"\[na2d_qkvpacked\] got an unexpected keyword argument "
                                        r"additional_keys"):
        lt.na2d_qkvpacked(qkv, 3, additional_keys=qkv)


def test_dead_functorch_wrappers_act_as_the_tensors_they_wrap():
    """A tensor kept from inside torch.func.grad (a dead wrapper) reaching
    the eager path is unwrapped as torch.autograd.Function.apply does: same
    output, and the gradient reaches the wrapped tensor."""
    captured = []

    def f(x):
        captured.append(x)
        return (x * 2).sum()

    t = torch.randn(1, 5, 5, 1, 4, requires_grad=True)
    torch.func.grad(f)(t)
    (dead,) = captured
    assert torch._C._functorch.is_functorch_wrapped_tensor(dead)
    out = lt.na2d(dead, dead, dead, 3)
    plain = t.detach().clone().requires_grad_()
    ref = lt.na2d(plain, plain, plain, 3)
    assert torch.equal(out, ref)
    out.sum().backward()
    ref.sum().backward()
    assert torch.equal(t.grad, plain.grad)
