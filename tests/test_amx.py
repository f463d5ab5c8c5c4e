"""The bfloat16 forward on AMX tiles (cpp/src/cpu/amx_forward.cpp), on CPUs
that have AMX-BF16 (Intel Xeon from Sapphire Rapids on; skipped elsewhere,
saying so): within bf16's precision of the float64 reference over ranks,
kernel sizes, dilation, stride, causal windows, rpb, GQA and head dims; a
different kernel from the one LIBNA_CPU_AMX=0 runs where it applies, the
same bits where it does not; non-finite inputs reaching only the queries
that attend to them; the same bits on one thread and on two."""

import numpy as np
import pytest

import libna

from _run_python import run_python

torch = pytest.importorskip("torch")
import libna.torch  # noqa: E402  (after torch's importorskip)

pytestmark = pytest.mark.skipif(
    libna._C is None or not libna.build_info()["cpu_amx"],
    reason="the bfloat16 forward runs on AMX tiles only where the CPU has AMX-BF16 "
           "(and LIBNA_CPU_AMX is not 0); this CPU does not")

# (name, spatial, heads, heads_kv, dim, dim_v, kernel, stride, dilation, causal, rpb)
CASES = [
    ("2d-nat-level", (14, 14), 2, 2, 32, 32, 7, 1, 1, False, True),
    ("2d-tiles-and-edges", (9, 37), 3, 3, 32, 16, 5, 1, 1, False, True),
    ("2d-dilated", (20, 41), 2, 1, 64, 48, (3, 5), 1, (2, 3), False, True),
    ("2d-causal-stride", (11, 23), 2, 2, 32, 32, (3, 5), (2, 3), 1, True, False),
    ("2d-short-rows", (7, 7), 4, 2, 32, 32, 7, 1, 1, False, True),
    ("1d-long-kernel", (90,), 2, 2, 32, 32, 63, 1, 1, False, True),
    ("1d-causal", (50,), 2, 2, 128, 32, 9, 1, 2, True, False),
    ("3d", (5, 6, 19), 2, 2, 32, 32, (3, 3, 5), 1, (1, 2, 1), False, True),
]
# Where it does not apply: the other kernels run, bit for bit.
OTHER_KERNELS = [
    ("head-dim-16", (9, 13), 2, 2, 16, 16, 3, 1, 1, False, False),
    ("value-dim-8", (9, 13), 2, 2, 32, 8, 3, 1, 1, False, False),
]

RUN_CASES = """
import numpy as np, torch, libna
data = np.load(IN)
results = {}
for name in NAMES:
    q, k, v = (torch.from_numpy(data[name + "/" + x]).view(torch.bfloat16) for x in "qkv")
    rpb = data[name + "/rpb"] if name + "/rpb" in data.files else None
    rpb = None if rpb is None else torch.from_numpy(rpb).view(torch.bfloat16)
    kw = {x: tuple(int(y) for y in data[name + "/" + x]) for x in ("kernel", "stride", "dilation")}
    causal = tuple(bool(y) for y in data[name + "/causal"])
    rank = q.dim() - 3
    out, lse = getattr(libna, f"na{rank}d")(q, k, v, kw["kernel"], stride=kw["stride"],
                                            dilation=kw["dilation"], is_causal=causal, rpb=rpb,
                                            return_lse=True)
    results[name + "/out"] = out.view(torch.int16).numpy()
    results[name + "/lse"] = lse.numpy()
np.savez(OUT, **results)
"""


def tuple_of(x, rank):
    return tuple(x) if isinstance(x, tuple) else (x,) * rank


def make_inputs(case, seed, poison=None):
    name, spatial, heads, heads_kv, dim, dim_v, kernel, stride, dilation, causal, use_rpb = case
    rank = len(spatial)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, *spatial, heads, dim, generator=g).bfloat16()
    k = torch.randn(2, *spatial, heads_kv, dim, generator=g).bfloat16()
    v = torch.randn(2, *spatial, heads_kv, dim_v, generator=g).bfloat16()
    kernel = tuple_of(kernel, rank)
    rpb = (torch.randn(heads, *[2 * x - 1 for x in kernel], generator=g).bfloat16()
           if use_rpb else None)
    return dict(q=q, k=k, v=v, rpb=rpb, kernel=kernel, stride=tuple_of(stride, rank),
                dilation=tuple_of(dilation, rank), causal=tuple_of(causal, rank))


def run(inputs):
    rank = inputs["q"].dim() - 3
    return getattr(libna, f"na{rank}d")(
        inputs["q"], inputs["k"], inputs["v"], inputs["kernel"], stride=inputs["stride"],
        dilation=inputs["dilation"], is_causal=inputs["causal"], rpb=inputs["rpb"],
        return_lse=True)


def run_elsewhere(named_inputs, tmp_path, env):
    """{name: (out, lse)} of the same calls in a fresh process with `env`."""
    arrays = {}
    for name, x in named_inputs.items():
        for key in ("q", "k", "v", "rpb"):
            if x[key] is not None:
                arrays[f"{name}/{key}"] = x[key].view(torch.int16).numpy()
        for key in ("kernel", "stride", "dilation", "causal"):
            arrays[f"{name}/{key}"] = np.array(x[key])
    src, dst = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(src, **arrays)
    result = run_python(f"IN, OUT, NAMES = {str(src)!r}, {str(dst)!r}, {list(named_inputs)!r}\n"
                        + RUN_CASES, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    with np.load(dst) as data:
        return {name: (torch.from_numpy(data[name + "/out"]).view(torch.bfloat16),
                       torch.from_numpy(data[name + "/lse"])) for name in named_inputs}


def reference(inputs):
    rank = inputs["q"].dim() - 3
    rpb = None if inputs["rpb"] is None else inputs["rpb"].double()
    return getattr(libna, f"na{rank}d")(
        inputs["q"].double(), inputs["k"].double(), inputs["v"].double(), inputs["kernel"],
        stride=inputs["stride"], dilation=inputs["dilation"], is_causal=inputs["causal"],
        rpb=rpb, return_lse=True)


@pytest.fixture(scope="module")
def without_amx(tmp_path_factory):
    """The outputs of every case with LIBNA_CPU_AMX=0 (the vectorised kernels)."""
    named = {case[0]: make_inputs(case, seed=i) for i, case in enumerate(CASES + OTHER_KERNELS)}
    return run_elsewhere(named, tmp_path_factory.mktemp("amx"), {"LIBNA_CPU_AMX": "0"})


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_within_bf16_precision_of_the_reference(case, without_amx):
    """P rounds to bf16 before P.V (relative error 2^-9 each), so an output
    is within 2^-9 max|v| of the exact weighted sum before its own rounding
    (another 2^-9 of its size): 2^-8 max|v| in all. lse keeps float32's
    precision. And a different kernel ran than with LIBNA_CPU_AMX=0 (their
    bits differ somewhere), within the same bound of each other."""
    inputs = make_inputs(case, seed=[c[0] for c in CASES + OTHER_KERNELS].index(case[0]))
    out, lse = run(inputs)
    ref, ref_lse = reference(inputs)
    bound = 2.0 ** -8 * inputs["v"].double().abs().max().item() * 1.01
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    err = (out.double() - ref).abs().max().item()
    assert err <= bound, (err, bound)
    lse_err = (lse.double() - ref_lse).abs().max().item()
    assert lse_err <= 1e-5 * max(1.0, ref_lse.abs().max().item()), lse_err
    other, other_lse = without_amx[case[0]]
    assert not torch.equal(out.view(torch.int16), other.view(torch.int16)), "the same kernel ran"
    assert (out.double() - other.double()).abs().max().item() <= 2 * bound
    assert (lse.double() - other_lse.double()).abs().max().item() <= 2e-5 * max(
        1.0, ref_lse.abs().max().item())


@pytest.mark.parametrize("case", OTHER_KERNELS, ids=lambda c: c[0])
def test_other_shapes_run_the_other_kernels(case, without_amx):
    inputs = make_inputs(case, seed=[c[0] for c in CASES + OTHER_KERNELS].index(case[0]))
    out, lse = run(inputs)
    other, other_lse = without_amx[case[0]]
    assert torch.equal(out.view(torch.int16), other.view(torch.int16))
    assert torch.equal(lse, other_lse)


def test_strided_views_and_float32_rpb_parameter():
    """q, k and v as views of one packed qkv tensor (the models' layout), and
    a non-contiguous output buffer through libna.torch."""
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 12, 20, 3, 2, 32, generator=g).bfloat16()
    q, k, v = qkv.unbind(3)
    inputs = dict(q=q, k=k, v=v, rpb=None, kernel=(5, 7), stride=(1, 1), dilation=(1, 2),
                  causal=(False, False))
    out, _ = run(inputs)
    ref, _ = reference(inputs)
    assert (out.double() - ref).abs().max().item() <= 2.0 ** -8 * v.double().abs().max() * 1.01
    contiguous, _ = run({**inputs, "q": q.contiguous(), "k": k.contiguous(), "v": v.contiguous()})
    assert torch.equal(out.view(torch.int16), contiguous.view(torch.int16))


@pytest.mark.parametrize("where, value", [("q", float("nan")), ("k", float("inf")),
                                          ("v", float("nan")), ("v", float("-inf"))])
@pytest.mark.parametrize("case, at", [(CASES[1], (1, 4, 17, 0, 5)), (CASES[5], (1, 70, 1, 20))],
                         ids=["2d", "1d-v-transposed-by-blocks"])
def test_non_finite_inputs_reach_only_their_neighbourhood(case, at, where, value):
    """A non-finite value in q reaches its own query's output; in k or v, the
    outputs of the queries whose window holds that key (in v only the
    channel it is in); every other output keeps its bits. (In the 1D case v
    has 32 channels and rows of 16 tokens and more, which V^T's packing
    transposes by blocks; the 2D case's go one value at a time.)"""
    clean = make_inputs(case, seed=3)
    bad = {**clean, where: clean[where].clone()}
    bad[where][at] = value
    out_clean, _ = run(clean)
    out_bad, _ = run(bad)
    # Which outputs may change: the poisoned query's own, or those of the
    # queries whose window holds the poisoned key (their float64 output with
    # v one at that key and zero elsewhere is not zero; in v, only its channel).
    if where == "q":
        affected = torch.zeros(out_clean.shape, dtype=torch.bool)
        affected[at[:-1]] = True
    else:
        probe = torch.zeros(clean["v"].shape, dtype=torch.float64)
        probe[at[:-1]] = 1.0
        attends, _ = reference({**clean, "v": probe})
        affected = attends != 0
        if where == "v":
            affected &= torch.arange(affected.shape[-1]) == at[-1]
    ref_bad, _ = reference(bad)
    changed = ~torch.eq(out_bad.view(torch.int16), out_clean.view(torch.int16))
    non_finite = ~torch.isfinite(out_bad.float())
    assert torch.equal(non_finite, ~torch.isfinite(ref_bad))
    assert changed.any() and affected.any()
    assert not (changed & ~affected).any(), \
        "an output changed outside the poisoned value's neighbourhood"


def test_same_bits_on_one_thread_and_two(tmp_path):
    named = {case[0]: make_inputs(case, seed=i) for i, case in enumerate(CASES[:3])}
    one = run_elsewhere(named, tmp_path, {"LIBNA_NUM_THREADS": "1"})
    for name, inputs in named.items():
        out, lse = run(inputs)
        assert torch.equal(out.view(torch.int16), one[name][0].view(torch.int16)), name
        assert torch.equal(lse, one[name][1]), name


def test_autograd_through_the_amx_forward():
    """The backward takes the AMX forward's output and lse: bf16 gradients
    within bf16 precision of the float64 ones."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 14, 14, 2, 32, generator=g).bfloat16().requires_grad_()
               for _ in range(3))
    out = libna.torch.na2d(q, k, v, 7)
    dout = torch.randn(out.shape, generator=g).bfloat16()
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = libna.torch.na2d(q64, k64, v64, 7)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    for name, got, want in zip("qkv", grads, ref_grads):
        scale = want.abs().max().item()
        assert (got.double() - want).abs().max().item() <= 0.02 * scale, name
