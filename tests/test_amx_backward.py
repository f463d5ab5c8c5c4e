"""The bfloat16 backward on AMX tiles (cpp/src/cpu/amx_backward.cpp), on CPUs
that have AMX-BF16 (skipped elsewhere, saying so): dq, dk, dv and drpb within
bf16's precision of the float64 backward of the same out, lse and dout, over
ranks, kernel sizes, dilation, stride, causal windows, rpb, GQA, head dims
(32 to 160, q's and v's apart) and dlse; a different kernel from the one LIBNA_CPU_AMX=0 runs where it
applies, the same bits where it does not; the same bits on one thread and on
two; non-finite q, k and dout values (which stay out of the tile products)
reaching only their neighbourhood's gradients."""

import numpy as np
import pytest

import libna

from _run_python import run_python
from test_amx import make_inputs, reference

torch = pytest.importorskip("torch")
import libna.torch  # noqa: E402  (after torch's importorskip)

pytestmark = pytest.mark.skipif(
    libna._C is None or not libna.build_info()["cpu_amx"],
    reason="the bfloat16 backward runs on AMX tiles only where the CPU has AMX-BF16 "
           "(and LIBNA_CPU_AMX is not 0); this CPU does not")

# (name, spatial, heads, heads_kv, dim, dim_v, kernel, stride, dilation, causal, rpb)
CASES = [
    ("2d-nat-level", (14, 14), 2, 2, 32, 32, 7, 1, 1, False, True),
    ("2d-tiles-and-edges", (9, 37), 3, 3, 32, 32, 5, 1, 1, False, True),
    ("2d-dilated-gqa", (20, 41), 4, 2, 64, 64, (3, 5), 1, (2, 3), False, True),
    ("2d-causal-stride", (11, 23), 2, 2, 32, 32, (3, 5), (2, 3), 1, True, False),
    ("1d-long-kernel", (90,), 2, 2, 32, 32, 63, 1, 1, False, True),
    ("1d-causal-wide-head", (50,), 2, 1, 128, 32, 9, 1, 2, True, False),
    ("3d", (5, 6, 19), 2, 2, 32, 32, (3, 3, 5), 1, (1, 2, 1), False, True),
    # dq in 48 channels at a time with a 16-channel remainder; dk, dv in 32s.
    ("2d-head-dims-160-96", (11, 19), 2, 2, 160, 96, 5, 1, 1, False, False),
]
# Few (batch, kv head) pairs and tall enough to be cut into stripes of rows
# when there are more threads than pairs (2 and 4 pairs: 2 to 6 stripes on
# 4 to 12 threads; in 3D, of whole planes).
STRIPES = [
    ("2d-stripes", (30, 20), 2, 1, 32, 32, 5, 1, 1, False, True),
    ("2d-stripes-dilated-gqa", (30, 20), 4, 2, 32, 32, 3, 1, (2, 1), False, True),
    ("3d-stripes", (18, 5, 17), 2, 1, 32, 32, 3, 1, 1, False, True),
]
CASES += STRIPES
# Where it does not apply (value dim not a multiple of 32): the other kernels, bit for bit.
OTHER_KERNELS = [
    ("value-dim-16", (9, 13), 2, 2, 32, 16, 3, 1, 1, False, True),
]
ALL = CASES + OTHER_KERNELS
NAMES = [c[0] for c in ALL]

RUN_BACKWARD = """
import numpy as np, torch, libna
data = np.load(IN)
results = {}
def bf16(key):
    return torch.from_numpy(data[key]).view(torch.bfloat16) if key in data.files else None
for name in NAMES:
    t = {x: bf16(name + "/" + x) for x in ("q", "k", "v", "rpb", "out", "dout")}
    kw = {x: tuple(int(y) for y in data[name + "/" + x]) for x in ("kernel", "stride", "dilation")}
    causal = tuple(bool(y) for y in data[name + "/causal"])
    lse = torch.from_numpy(data[name + "/lse"])
    dlse = torch.from_numpy(data[name + "/dlse"])
    grads = getattr(libna, f"na{t['q'].dim() - 3}d_backward")(t["q"], t["k"], t["v"], t["out"], t["dout"], lse,
                              kw["kernel"], stride=kw["stride"], dilation=kw["dilation"],
                              is_causal=causal, rpb=t["rpb"], dlse=dlse)
    for i, g in enumerate(grads):
        results[name + "/" + str(i)] = g.view(torch.int16).numpy()
np.savez(OUT, **results)
"""


def backward_inputs(case, seed):
    """make_inputs plus out and lse (the float64 forward's, out in bf16), a
    bf16 dout and a float32 dlse."""
    inputs = make_inputs(case, seed)
    out, lse = reference(inputs)
    g = torch.Generator().manual_seed(100 + seed)
    return {**inputs, "out": out.bfloat16(), "lse": lse.float(),
            "dout": torch.randn(out.shape, generator=g).bfloat16(),
            "dlse": torch.randn(lse.shape, generator=g).float()}


def backward(x, dtype=torch.bfloat16):
    def cast(t):
        return None if t is None else t.to(dtype)
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return getattr(libna, f"na{x['q'].dim() - 3}d_backward")(
        cast(x["q"]), cast(x["k"]), cast(x["v"]), cast(x["out"]),
        cast(x["dout"]), x["lse"].to(lse_dtype), x["kernel"], stride=x["stride"],
        dilation=x["dilation"], is_causal=x["causal"], rpb=cast(x["rpb"]),
        dlse=x["dlse"].to(lse_dtype))


def backward_elsewhere(named, tmp_path, env):
    """{name: grads} of the same backward calls in a fresh process with `env`."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, x in named.items():
        for key in ("q", "k", "v", "rpb", "out", "dout"):
            if x[key] is not None:
                arrays[f"{name}/{key}"] = x[key].view(torch.int16).numpy()
        for key in ("lse", "dlse"):
            arrays[f"{name}/{key}"] = x[key].numpy()
        for key in ("kernel", "stride", "dilation", "causal"):
            arrays[f"{name}/{key}"] = np.array(x[key])
    src, dst = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(src, **arrays)
    result = run_python(f"IN, OUT, NAMES = {str(src)!r}, {str(dst)!r}, {list(named)!r}\n"
                        + RUN_BACKWARD, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    with np.load(dst) as data:
        return {name: [torch.from_numpy(data[f"{name}/{i}"]).view(torch.bfloat16)
                       for i in range(3 + (named[name]["rpb"] is not None))]
                for name in named}


@pytest.fixture(scope="module")
def without_amx(tmp_path_factory):
    named = {case[0]: backward_inputs(case, seed=i) for i, case in enumerate(ALL)}
    return backward_elsewhere(named, tmp_path_factory.mktemp("amx-bwd"), {"LIBNA_CPU_AMX": "0"})


def same_bits(a, b):
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_within_bf16_precision_of_the_float64_backward(case, without_amx):
    """P and scale dS round to bf16 before their products (2^-9 relative
    each), the gradients once more when stored: each gradient within 2^-6 of
    its largest magnitude of the float64 one (the vectorised kernels' bf16
    gradients, which round only when stored, are within the same bound; both
    measured at 3e-3 to 8e-3). And a different kernel ran than with
    LIBNA_CPU_AMX=0 (their bits differ somewhere)."""
    inputs = backward_inputs(case, seed=NAMES.index(case[0]))
    got = backward(inputs)
    want = backward(inputs, torch.float64)
    other = without_amx[case[0]]
    assert len(got) == len(want) == len(other) == 3 + (inputs["rpb"] is not None)
    for name, g, w, o in zip(("dq", "dk", "dv", "drpb"), got, want, other):
        assert g.dtype == torch.bfloat16 and g.shape == w.shape, name
        bound = 2.0 ** -6 * w.abs().max().item()
        err = (g.double() - w).abs().max().item()
        assert err <= bound, (name, err, bound)
        assert (o.double() - w).abs().max().item() <= bound, name
    assert not all(same_bits(g, o) for g, o in zip(got, other)), "the same kernel ran"


@pytest.mark.parametrize("case", OTHER_KERNELS, ids=lambda c: c[0])
def test_other_shapes_run_the_other_kernels(case, without_amx):
    inputs = backward_inputs(case, seed=NAMES.index(case[0]))
    for g, o in zip(backward(inputs), without_amx[case[0]]):
        assert same_bits(g, o)


def test_same_bits_whatever_the_threads(tmp_path):
    """A work item is a (batch, kv head) with its own dk/dv accumulators, or
    with more threads than those a stripe of its rows (STRIPES on 4, 8 and
    12 threads), and the rpb gradient is summed from per-row partials in one
    order: the gradients are the same bits on any number of threads."""
    named = {case[0]: backward_inputs(case, seed=NAMES.index(case[0]))
             for case in CASES[:3] + STRIPES}
    mine = {name: backward(inputs) for name, inputs in named.items()}
    for threads in ("1", "4", "8", "12"):
        other = backward_elsewhere(named, tmp_path / threads, {"LIBNA_NUM_THREADS": threads})
        for name in named:
            if threads != "1" and name not in [c[0] for c in STRIPES]:
                continue  # fewer pairs than threads, too short to cut: the other kernels run
            for g, o in zip(mine[name], other[name]):
                assert same_bits(g, o), (name, threads)


def test_qkv_views_and_autograd():
    """q, k, v as views of one packed qkv (the models' layout) give the bits
    of contiguous copies; autograd through the AMX forward and backward stays
    within bf16 precision of float64."""
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 12, 20, 3, 2, 32, generator=g).bfloat16().requires_grad_()
    out = libna.torch.na2d_qkvpacked(qkv, (5, 7), dilation=(1, 2))
    dout = torch.randn(out.shape, generator=g).bfloat16()
    (dqkv,) = torch.autograd.grad(out, qkv, dout)
    parts = [x.detach().contiguous().requires_grad_() for x in qkv.unbind(3)]
    out2 = libna.torch.na2d(*parts, (5, 7), dilation=(1, 2))
    assert same_bits(out, out2)
    for got, want in zip(dqkv.unbind(3), torch.autograd.grad(out2, parts, dout)):
        assert same_bits(got, want)
    q64 = qkv.detach().double().requires_grad_()
    ref = libna.torch.na2d_qkvpacked(q64, (5, 7), dilation=(1, 2))
    (ref_grad,) = torch.autograd.grad(ref, q64, dout.double())
    for got, want in zip(dqkv.unbind(3), ref_grad.unbind(3)):
        assert (got.double() - want).abs().max() <= 2.0 ** -6 * want.abs().max()


def neighbourhood(inputs, token):
    """Which queries' windows hold key `token` (batch and spatial index),
    from the float64 forward with v one-hot there."""
    probe = torch.zeros(inputs["v"].shape, dtype=torch.float64)
    probe[token] = 1.0
    out, _ = reference({**inputs, "v": probe})
    return (out != 0).any(-1)  # [B, *spatial, heads]


@pytest.mark.parametrize("where, value", [("q", float("nan")), ("k", float("inf")),
                                          ("k", float("nan")), ("dout", float("nan")),
                                          ("dout", float("-inf"))])
@pytest.mark.parametrize("case, at", [(CASES[0], (1, 4, 12, 1, 5)), (CASES[4], (1, 70, 0, 20))],
                         ids=["2d", "1d-long-kernel"])
def test_non_finite_values_reach_only_their_neighbourhood(case, at, where, value):
    """A non-finite q, k or dout value is kept out of the tile products (0 x
    inf would be NaN for the queries and keys outside its window) and added
    back where it belongs: every gradient outside its neighbourhood keeps its
    bits, and the non-finite ones are where the float64 backward has them.
    Its neighbourhood: for a query's q or dout, its dq and the dk and dv of
    its window's keys; for a key, the dq of the queries that attend to it and
    the dk and dv of their windows' keys."""
    clean = backward_inputs(case, seed=7)
    bad = {**clean, where: clean[where].clone()}
    bad[where][at] = value
    got_clean, got_bad = backward(clean), backward(bad)
    want_bad = backward(bad, torch.float64)
    token = at[:-2]
    heads, heads_kv = clean["q"].shape[-2], clean["k"].shape[-2]
    if where == "k":
        queries = neighbourhood(clean, token)  # [B, *spatial, heads]
        queries &= (torch.arange(heads) // (heads // heads_kv) == at[-2])
    else:
        queries = torch.zeros(clean["q"].shape[:-1], dtype=torch.bool)
        queries[token + (at[-2],)] = True
    keys = torch.zeros(clean["k"].shape[:-1], dtype=torch.bool)
    for index in queries.nonzero().tolist():
        keys |= neighbourhood_keys(clean, tuple(index))
    if where == "k":
        keys[token + (at[-2],)] = True
    allowed = {"dq": queries, "dk": keys, "dv": keys, "drpb": None}
    for name, g_clean, g_bad, w_bad in zip(("dq", "dk", "dv", "drpb"), got_clean, got_bad,
                                           want_bad):
        if allowed[name] is None:
            continue
        changed = ~torch.eq(g_bad.view(torch.int16), g_clean.view(torch.int16))
        assert not (changed & ~allowed[name][..., None]).any(), \
            f"{name} changed outside the neighbourhood of {where}{at}"
        assert torch.equal(~torch.isfinite(g_bad.float()), ~torch.isfinite(w_bad)), name
    assert any((~torch.isfinite(g.float())).any() for g in got_bad[:3])


def neighbourhood_keys(inputs, query):
    """The keys (batch, spatial..., kv head) in the window of `query` (batch,
    spatial..., head): where the float64 gradient of its output with respect
    to v is not zero."""
    v = inputs["v"].double().requires_grad_()
    rank = v.dim() - 3
    out = getattr(libna.torch, f"na{rank}d")(
        inputs["q"].double(), inputs["k"].double(), v, inputs["kernel"], stride=inputs["stride"],
        dilation=inputs["dilation"], is_causal=inputs["causal"],
        rpb=None if inputs["rpb"] is None else inputs["rpb"].double())
    (dv,) = torch.autograd.grad(out[query].sum(), v)
    return dv.ne(0).any(-1)
