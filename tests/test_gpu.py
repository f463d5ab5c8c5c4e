"""The CUDA backend against the float64 reference and the CPU backend, over
the feature grid, with PyTorch tensors, on two kinds of target:

- a GPU (marked `gpu`; skipped without a CUDA device or a CUDA build):

      python -m pytest -m gpu tests/test_gpu.py

- the CUDA emulator (a build with LIBNA_CUDA_EMULATOR=ON; skipped otherwise):
  the same kernels, run on the CPU under an emulation of the CUDA execution
  model as a GPU of compute capability 8.0 (tensor cores for float16 and
  bfloat16) or 7.5 (SIMT kernels only) would run them, on CPU tensors. CI
  runs these on a subset of the cases (every EMULATED_STEP-th of the grids)
  to stay within its time; LIBNA_EMULATOR_ALL=1 runs all of them.

Tolerance (as in FlashAttention's tests): the CUDA result's error against the
float64 reference is at most twice the CPU backend's error for the same
dtype and inputs, plus a small floor for its rounding of the output."""

import contextlib
import os

import numpy as np
import pytest
import torch

import libna
from libna import reference

from _dense import dense_na
from _cases import case_id, grid, make_qkv, make_rpb

HAVE_GPU = torch.cuda.is_available()
BACKENDS = libna.build_info()["backends"] if libna._C is not None else []
CUDA_BUILT = "cuda" in BACKENDS
EMULATOR_BUILT = "cuda-emulator" in BACKENDS


class Target:
    """Where the CUDA backend runs: `device` holds its tensors, run() is the
    context its calls are made in, `arch` the compute capability."""

    def __init__(self, name, device, emulated_arch=None):
        self.name, self.device, self.emulated_arch = name, device, emulated_arch

    def run(self):
        if self.emulated_arch is None:
            return contextlib.nullcontext()
        return libna.cuda_emulator(self.emulated_arch)

    @property
    def tensor_cores(self):
        if self.emulated_arch is not None:
            return self.emulated_arch >= 80
        return HAVE_GPU and torch.cuda.get_device_capability()[0] >= 8

    def __repr__(self):
        return self.name


GPU = Target("gpu", "cuda")
SM80 = Target("emulated-sm80", "cpu", 80)
SM75 = Target("emulated-sm75", "cpu", 75)
GPU_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not HAVE_GPU, reason="no CUDA device"),
             pytest.mark.skipif(not CUDA_BUILT, reason="libna was built without CUDA")]
EMULATOR_MARKS = [pytest.mark.skipif(not EMULATOR_BUILT,
                                     reason="libna was built without the CUDA emulator "
                                            "(-C cmake.define.LIBNA_CUDA_EMULATOR=ON)")]
EMULATED_STEP = 1 if os.environ.get("LIBNA_EMULATOR_ALL") else None


def targets(cases=None, sm80_step=1, sm75_step=None, gpu_only=False):
    """pytest params of (target, case): every case on a GPU, every
    sm80_step-th under the emulator at sm_80 and every sm75_step-th at sm_75
    (None: not at all); without `cases`, the targets alone."""
    def params(target, marks, step, offset):
        if step is None:
            return []
        if cases is None:
            return [pytest.param(target, marks=marks, id=target.name)]
        step = 1 if target is GPU else EMULATED_STEP or step
        return [pytest.param(target, c, marks=marks, id=f"{target.name}-{case_id(c)}")
                for c in cases[offset::step]]
    result = params(GPU, GPU_MARKS, 1, 0)
    if not gpu_only:
        result += params(SM80, EMULATOR_MARKS, sm80_step, 0)
        result += params(SM75, EMULATOR_MARKS, sm75_step, 1 if (sm75_step or 1) > 1 else 0)
    return result


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def to_torch(x, dtype, device):
    return None if x is None else torch.from_numpy(x).to(device=device, dtype=dtype)


def f64(x):
    return x.detach().to("cpu", torch.float64).numpy()


def max_err(x, ref):
    return float(np.max(np.abs(f64(x) - ref) / (1 + np.abs(ref)))) if ref.size else 0.0


def assert_close(name, cuda, cpu, ref, dtype):
    err_cuda, err_cpu = max_err(cuda, ref), max_err(cpu, ref)
    bound = 2 * err_cpu + FLOOR[dtype]
    assert err_cuda <= bound, f"{name}: CUDA error {err_cuda:.3g} > {bound:.3g} (CPU {err_cpu:.3g})"


def problem(case, rng, dim=16, dim_v=12, heads=4, heads_kv=2):
    spatial, kernel, stride, dilation, causal = case
    q, k, v = make_qkv(rng, 2, spatial, heads, heads_kv, dim, dim_v)
    use_rpb = not any(causal) and all(x == 1 for x in stride)
    rpb = make_rpb(rng, heads, kernel) if use_rpb else None
    kw = dict(stride=stride, dilation=dilation, is_causal=causal)
    return len(spatial), kernel, (q, k, v), rpb, kw


def forward_all(target, rank, kernel, qkv, rpb, kw, dtype, scale=None):
    """(cuda, cpu, reference) results of the fused forward: (out, lse)."""
    op = getattr(libna, f"na{rank}d")
    runs = []
    for device, context in ((target.device, target.run()), ("cpu", contextlib.nullcontext())):
        q, k, v = (to_torch(x, dtype, device) for x in qkv)
        with context:
            runs.append(op(q, k, v, kernel, rpb=to_torch(rpb, dtype, device), scale=scale,
                           return_lse=True, **kw))
    # The reference sees the same rounded inputs.
    rounded = [f64(to_torch(x, dtype, "cpu")) for x in qkv]
    rpb64 = None if rpb is None else f64(to_torch(rpb, dtype, "cpu"))
    ref = getattr(reference, f"na{rank}d")(*rounded, kernel, rpb=rpb64, scale=scale,
                                           return_lse=True, **kw)
    return runs[0], runs[1], ref


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("target,case", targets(grid(), sm80_step=4, sm75_step=12))
def test_forward_grid(target, case, dtype, rng):
    rank, kernel, qkv, rpb, kw = problem(case, rng)
    (out, lse), (out_cpu, lse_cpu), (ref, ref_lse) = forward_all(target, rank, kernel, qkv, rpb,
                                                                 kw, dtype)
    assert out.device.type == target.device and out.dtype == dtype
    assert lse.dtype == torch.float32
    assert_close("out", out, out_cpu, ref, dtype)
    assert_close("lse", lse, lse_cpu, ref_lse, dtype)


# Head dims: every bucket (32/64/128/256), odd sizes, D_v != D, GQA.
@pytest.mark.parametrize("dim,dim_v", [(8, 8), (32, 32), (64, 64), (128, 128), (256, 256),
                                       (64, 16), (16, 40), (72, 200), (1, 3)])
@pytest.mark.parametrize("heads,heads_kv", [(4, 4), (6, 3), (4, 1)])
@pytest.mark.parametrize("target", targets(sm75_step=1))
def test_forward_head_dims_and_gqa(target, dim, dim_v, heads, heads_kv, rng):
    case = ((9, 10), (3, 5), (1, 1), (2, 1), (False, False))
    rank, kernel, qkv, rpb, kw = problem(case, rng, dim, dim_v, heads, heads_kv)
    for dtype in (torch.float32, torch.float16):
        (out, lse), (out_cpu, lse_cpu), (ref, ref_lse) = forward_all(target, rank, kernel, qkv,
                                                                     rpb, kw, dtype, scale=0.3)
        assert_close("out", out, out_cpu, ref, dtype)
        assert_close("lse", lse, lse_cpu, ref_lse, dtype)


# Larger problems: many query blocks and key tiles, partial and full tiles.
LARGE_CASES = [
    ((1000,), (63,), (1,), (1,), (False,)),
    ((777,), (64,), (3,), (2,), (True,)),
    ((40, 36), (7, 9), (1, 1), (2, 3), (False, False)),
    ((33, 47), (13, 8), (2, 4), (1, 1), (True, False)),
    ((12, 14, 16), (5, 3, 7), (1, 1, 1), (1, 2, 2), (False, True, False)),
]


@pytest.mark.parametrize("target,case", targets(LARGE_CASES, sm80_step=2))
def test_forward_large(target, case, rng):
    rank, kernel, qkv, rpb, kw = problem(case, rng, 64, 64, 2, 1)
    for dtype in DTYPES.values():
        (out, lse), (out_cpu, lse_cpu), (ref, ref_lse) = forward_all(target, rank, kernel, qkv,
                                                                     rpb, kw, dtype)
        assert_close("out", out, out_cpu, ref, dtype)
        assert_close("lse", lse, lse_cpu, ref_lse, dtype)


def backward_all(target, rank, kernel, qkv, rpb, kw, dtype, seed=1):
    """(cuda, cpu, reference) fused gradients, each (dq, dk, dv[, drpb]), all
    from the same inputs, out and lse (the CPU forward's)."""
    q, k, v = (to_torch(x, dtype, "cpu") for x in qkv)
    r = to_torch(rpb, dtype, "cpu")
    out, lse = getattr(libna, f"na{rank}d")(q, k, v, kernel, rpb=r, return_lse=True, **kw)
    dout = to_torch(np.random.default_rng(seed).standard_normal(tuple(out.shape)), dtype, "cpu")
    inputs = (q, k, v, out, dout, lse)
    op = getattr(libna, f"na{rank}d_backward")
    grads = []
    for device, context in ((target.device, target.run()), ("cpu", contextlib.nullcontext())):
        with context:
            grads.append(op(*(x.to(device) for x in inputs), kernel,
                            rpb=None if r is None else r.to(device), **kw))
    ref = getattr(reference, f"na{rank}d_backward")(
        *(f64(x) for x in inputs), kernel, rpb=None if r is None else f64(r), **kw)
    return grads[0], grads[1], ref


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("target,case", targets(grid(), sm80_step=4, sm75_step=12))
def test_backward_grid(target, case, dtype, rng):
    rank, kernel, qkv, rpb, kw = problem(case, rng)
    cuda, cpu, ref = backward_all(target, rank, kernel, qkv, rpb, kw, dtype)
    assert len(cuda) == len(ref) == (3 if rpb is None else 4)
    for name, g, c, r in zip(("dq", "dk", "dv", "drpb"), cuda, cpu, ref):
        assert g.device.type == target.device and g.dtype == dtype, name
        assert_close(name, g, c, r, dtype)


@pytest.mark.parametrize("dim,dim_v,heads,heads_kv", [
    (32, 32, 4, 2), (64, 16, 6, 3), (128, 128, 2, 1), (256, 200, 2, 2), (24, 72, 4, 4)])
@pytest.mark.parametrize("target", targets(sm75_step=1))
def test_backward_head_dims_and_gqa(target, dim, dim_v, heads, heads_kv, rng):
    case = ((11, 13), (5, 3), (1, 1), (1, 2), (False, False))
    rank, kernel, qkv, rpb, kw = problem(case, rng, dim, dim_v, heads, heads_kv)
    for dtype in (torch.float32, torch.bfloat16):
        cuda, cpu, ref = backward_all(target, rank, kernel, qkv, rpb, kw, dtype)
        for name, g, c, r in zip(("dq", "dk", "dv", "drpb"), cuda, cpu, ref):
            assert_close(name, g, c, r, dtype)


@pytest.mark.parametrize("target", targets())
def test_backward_large_and_deterministic(target, rng):
    case = ((48, 40), (9, 7), (1, 1), (2, 1), (False, True))
    rank, kernel, qkv, rpb, kw = problem(case, rng, 64, 64, 4, 2)
    first, cpu, ref = backward_all(target, rank, kernel, qkv, rpb, kw, torch.float32)
    for name, g, c, r in zip(("dq", "dk", "dv"), first, cpu, ref):
        assert_close(name, g, c, r, torch.float32)
    again, _, _ = backward_all(target, rank, kernel, qkv, rpb, kw, torch.float32)
    for name, a, b in zip(("dq", "dk", "dv"), first, again):  # no atomics: bitwise equal
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("target,case", targets(
    [c for c in grid() if all(s == 1 for s in c[2])][::2], sm80_step=6))
def test_unfused_grid(target, case, dtype, rng):
    rank, kernel, qkv, rpb, kw = problem(case, rng)
    kw.pop("stride")
    op = lambda name: getattr(libna, f"na{rank}d_{name}")
    ref_op = lambda name: getattr(reference, f"na{rank}d_{name}")
    rounded = lambda x: None if x is None else f64(to_torch(x, dtype, "cpu"))
    q64, k64, v64, rpb64 = (rounded(x) for x in (*qkv, rpb))
    ref_attn = ref_op("qk")(q64, k64, kernel, rpb=rpb64, **kw)
    empty = ~np.isfinite(ref_attn)  # slots outside causal windows
    probs = np.exp(np.where(empty, -np.inf, ref_attn) - np.max(ref_attn, -1, keepdims=True))
    probs = rounded(probs / probs.sum(-1, keepdims=True))
    d_rng = np.random.default_rng(2)
    dout = rounded(d_rng.standard_normal((*ref_attn.shape[:-1], v64.shape[-1])))
    dattn = rounded(np.where(empty, 0.0, d_rng.standard_normal(ref_attn.shape)))
    results = {}
    for name, device, context in (("cuda", target.device, target.run()),
                                  ("cpu", "cpu", contextlib.nullcontext())):
        t = lambda x: to_torch(x, dtype, device)
        with context:
            results[name] = {
                "attn": op("qk")(t(q64), t(k64), kernel, rpb=t(rpb64), **kw),
                "out": op("av")(t(probs), t(v64), kernel, **kw),
                "qk_backward": op("qk_backward")(t(dattn), t(q64), t(k64), kernel, rpb=t(rpb64),
                                                 **kw),
                "av_backward": op("av_backward")(t(dout), t(probs), t(v64), kernel, **kw),
            }
    g, c = results["cuda"], results["cpu"]
    assert np.array_equal(torch.isinf(g["attn"]).cpu().numpy(), empty)
    keep = lambda x: x[torch.from_numpy(~empty).to(x.device)]
    assert_close("attn", keep(g["attn"]), keep(c["attn"]), ref_attn[~empty], dtype)
    assert_close("av", g["out"], c["out"], ref_op("av")(probs, v64, kernel, **kw), dtype)
    ref = ref_op("qk_backward")(dattn, q64, k64, kernel, rpb=rpb64, **kw)
    for name, a, b, r in zip(("dq", "dk", "drpb"), g["qk_backward"], c["qk_backward"], ref):
        assert_close(name, a, b, r, dtype)
    ref = ref_op("av_backward")(dout, probs, v64, kernel, **kw)
    for name, a, b, r in zip(("dattn", "dv"), g["av_backward"], c["av_backward"], ref):
        assert_close(name, a, b, r, dtype)


@pytest.mark.parametrize("target", targets())
def test_strided_inputs_and_outputs_views(target, rng):
    """Non-contiguous q/k/v (a permuted buffer, a head-dim slice) give the
    same result as contiguous copies."""
    base = torch.from_numpy(rng.standard_normal((2, 4, 10, 12, 24))).float().to(target.device)
    q = base.permute(0, 2, 3, 1, 4)[..., :16]           # [B, 10, 12, 4, 16], strided
    k = base.permute(0, 2, 3, 1, 4)[..., 4:20]
    v = base.permute(0, 2, 3, 1, 4)[..., 8:]
    with target.run():
        out = libna.na2d(q, k, v, (3, 5), dilation=(2, 1))
        ref = libna.na2d(q.contiguous(), k.contiguous(), v.contiguous(), (3, 5),
                         dilation=(2, 1))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("target", targets(gpu_only=True))
def test_runs_on_the_current_stream(target, rng):
    case = ((30, 30), (7, 7), (1, 1), (1, 1), (False, False))
    rank, kernel, qkv, rpb, kw = problem(case, rng, 32, 32)
    q, k, v = (to_torch(x, torch.float16, "cuda") for x in qkv)
    expected = libna.na2d(q, k, v, kernel, **kw)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = libna.na2d(q, k, v, kernel, **kw)
        out.record_stream(stream)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("target", targets(gpu_only=True))
def test_second_device_if_present(target, rng):
    if torch.cuda.device_count() < 2:
        pytest.skip("one CUDA device")
    q, k, v = (to_torch(x, torch.float32, "cuda:1") for x in make_qkv(rng, 1, (9,), 2, 2, 8, 8))
    out = libna.na1d(q, k, v, 3)
    assert out.device == torch.device("cuda:1")
    torch.testing.assert_close(out.cpu(), libna.na1d(q.cpu(), k.cpu(), v.cpu(), 3))


@pytest.mark.parametrize("target", targets())
def test_torch_autograd_on_cuda(target, rng):
    import libna.torch as lt

    qkv = make_qkv(rng, 1, (8, 9), 2, 2, 32, 32)
    grads = {}
    for name, device, context in (("cuda", target.device, target.run()),
                                  ("cpu", "cpu", contextlib.nullcontext())):
        q, k, v = (to_torch(x, torch.float32, device).requires_grad_() for x in qkv)
        with context:
            out = lt.na2d(q, k, v, (3, 3), dilation=(2, 1))
            out.square().sum().backward()
        grads[name] = [out, q.grad, k.grad, v.grad]
    for a, b in zip(grads["cuda"], grads["cpu"]):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target", targets())
def test_float64_and_huge_head_dims_are_refused(target, rng):
    device = target.device
    q, k, v = (to_torch(x, torch.float64, device) for x in make_qkv(rng, 1, (9,), 2, 2, 8, 8))
    with target.run(), pytest.raises(TypeError, match="float64 is not supported by the CUDA"):
        libna.na1d(q, k, v, 3)
    q, k, v = (to_torch(x, torch.float32, device) for x in make_qkv(rng, 1, (9,), 1, 1, 300, 8))
    with target.run(), pytest.raises(ValueError, match="head dims up to 256"):
        libna.na1d(q, k, v, 3)


# ---- the tensor-core forward (float16/bfloat16, head dims up to 128, sm_80+) ----
# Its tolerance follows FlashAttention's rule: the error against the float64
# reference is at most twice that of a plain PyTorch attention (dense NA
# mask, on the CPU) computed in the same dtype, plus a small floor.
TC_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
TC_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
TC_CASES = [
    ((37,), (7,), (1,), (1,), (False,)),           # 1D, several query tiles
    ((50,), (9,), (2,), (3,), (True,)),            # 1D causal, dilation, stride
    ((13, 11), (5, 3), (1, 1), (2, 1), (False, False)),
    ((16, 12), (4, 5), (2, 1), (1, 2), (True, False)),
    ((20, 20), (7, 7), (1, 1), (1, 1), (True, True)),
    ((6, 7, 8), (3, 3, 5), (1, 1, 1), (1, 2, 1), (False, True, False)),
    ((5, 6, 9), (2, 3, 4), (2, 1, 3), (1, 1, 2), (False, False, False)),
]


def tc_problem(case, rng, dim, dim_v, heads, heads_kv, with_rpb):
    spatial, kernel, stride, dilation, causal = case
    q, k, v = make_qkv(rng, 2, spatial, heads, heads_kv, dim, dim_v)
    rpb = make_rpb(rng, heads, kernel) if with_rpb else None
    return kernel, (q, k, v), rpb, dict(stride=stride, dilation=dilation, is_causal=causal)


def check_tensor_core_forward(target, case, kernel, qkv, rpb, kw, dtype, scale=None):
    rank = len(case[0])
    q, k, v = (to_torch(x, dtype, target.device) for x in qkv)
    r = to_torch(rpb, dtype, target.device)
    with target.run():
        out, lse = getattr(libna, f"na{rank}d")(q, k, v, kernel, rpb=r, scale=scale,
                                                return_lse=True, **kw)
    assert out.dtype == dtype and lse.dtype == torch.float32
    rounded = [f64(x) for x in (q, k, v)]
    rpb64 = None if r is None else f64(r)
    ref, ref_lse = getattr(reference, f"na{rank}d")(*rounded, kernel, rpb=rpb64, scale=scale,
                                                    return_lse=True, **kw)
    full = lambda t: tuple(t) if isinstance(t, tuple) else (t,) * rank
    dense_args = (kernel, full(kw["stride"]), full(kw["dilation"]), full(kw["is_causal"]))
    dense, _ = dense_na(q.cpu(), k.cpu(), v.cpu(), *dense_args, scale=scale,
                        rpb=None if r is None else r.cpu())
    bound = 2 * max_err(dense, ref) + TC_FLOOR[dtype]
    err = max_err(out, ref)
    assert err <= bound, f"out: tensor-core error {err:.3g} > {bound:.3g}"
    err_lse = max_err(lse, ref_lse)
    assert err_lse <= 1e-4, f"lse: error {err_lse:.3g}"  # float32 statistics of rounded inputs



# The tensor-core backward (dq and dk/dv kernels) follows the same rule: each gradient's error against the float64 reference
# gradients (of the same rounded inputs, out and lse) is at most twice that
# of the dense-mask attention differentiated by PyTorch autograd in the same
# dtype (on the CPU), plus a small floor.
TC_GRAD_FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def tc_backward(target, case, kernel, qkv, rpb, kw, dtype, scale=None, seed=4):
    """The CUDA forward and backward of float16/bfloat16 inputs: (inputs,
    out, lse, dout, grads) with every tensor on the target's device."""
    rank = len(case[0])
    q, k, v = (to_torch(x, dtype, target.device) for x in qkv)
    r = to_torch(rpb, dtype, target.device)
    dout_values = None
    with target.run():
        out, lse = getattr(libna, f"na{rank}d")(q, k, v, kernel, rpb=r, scale=scale,
                                                return_lse=True, **kw)
        dout_values = np.random.default_rng(seed).standard_normal(tuple(out.shape))
        dout = to_torch(dout_values, dtype, target.device)
        grads = getattr(libna, f"na{rank}d_backward")(q, k, v, out, dout, lse, kernel, rpb=r,
                                                      scale=scale, **kw)
    return (q, k, v, r), out, lse, dout, grads


def check_tensor_core_backward(target, case, kernel, qkv, rpb, kw, dtype, scale=None):
    rank = len(case[0])
    (q, k, v, r), out, lse, dout, grads = tc_backward(target, case, kernel, qkv, rpb, kw, dtype,
                                                      scale)
    assert len(grads) == (3 if rpb is None else 4)
    ref = getattr(reference, f"na{rank}d_backward")(
        *(f64(x) for x in (q, k, v, out, dout, lse)), kernel,
        rpb=None if r is None else f64(r), scale=scale, **kw)
    full = lambda t: tuple(t) if isinstance(t, tuple) else (t,) * rank
    dense_args = (kernel, full(kw["stride"]), full(kw["dilation"]), full(kw["is_causal"]))
    leaves = [x.cpu().requires_grad_() for x in (q, k, v)]
    rpb_leaf = None if r is None else r.cpu().requires_grad_()
    dense, _ = dense_na(*leaves, *dense_args, scale=scale, rpb=rpb_leaf)
    dense.backward(dout.cpu())
    dense_grads = [x.grad for x in leaves] + ([] if r is None else [rpb_leaf.grad])
    for name, g, d, rf in zip(("dq", "dk", "dv", "drpb"), grads, dense_grads, ref):
        assert g.device.type == target.device and g.dtype == dtype, name
        bound = 2 * max_err(d, rf) + TC_GRAD_FLOOR[dtype]
        err = max_err(g, rf)
        assert err <= bound, f"{name}: tensor-core error {err:.3g} > {bound:.3g}"
    return grads



TC_CHECKS = {"forward": check_tensor_core_forward, "backward": check_tensor_core_backward}


def needs_tensor_cores(target):
    if not target.tensor_cores:
        pytest.skip("tensor cores need sm_80+")


@pytest.mark.parametrize("direction", TC_CHECKS)
@pytest.mark.parametrize("dtype", TC_DTYPES.values(), ids=TC_DTYPES.keys())
@pytest.mark.parametrize("dim", [32, 64, 128])
@pytest.mark.parametrize("target,case", targets(TC_CASES))
def test_tensor_core(target, case, dim, dtype, direction, rng):
    needs_tensor_cores(target)
    with_rpb = not any(case[4]) and all(s == 1 for s in case[2])
    kernel, qkv, rpb, kw = tc_problem(case, rng, dim, dim, 4, 2, with_rpb)
    TC_CHECKS[direction](target, case, kernel, qkv, rpb, kw, dtype)


@pytest.mark.parametrize("direction", TC_CHECKS)
@pytest.mark.parametrize("dtype", TC_DTYPES.values(), ids=TC_DTYPES.keys())
@pytest.mark.parametrize("dim,dim_v,heads,heads_kv", [
    (32, 32, 8, 1), (64, 16, 6, 3), (40, 72, 4, 2), (128, 96, 2, 2), (8, 128, 3, 1)])
@pytest.mark.parametrize("target", targets())
def test_tensor_core_head_dims_and_gqa(target, dim, dim_v, heads, heads_kv, dtype, direction,
                                       rng):
    """GQA (the backward sums dk/dv over the query heads of a kv head), D_v != D,
    head dims that are not multiples of 8 (scalar loads), rpb and its gradient."""
    case = ((11, 14), (5, 7), (1, 1), (2, 1), (False, False))
    needs_tensor_cores(target)
    kernel, qkv, rpb, kw = tc_problem(case, rng, dim, dim_v, heads, heads_kv, True)
    TC_CHECKS[direction](target, case, kernel, qkv, rpb, kw, dtype, scale=0.2)


TC_LARGE_CASES = [
    ((1000,), (63,), (1,), (1,), (False,)),
    ((2048,), (256,), (1,), (1,), (True,)),
    ((64, 64), (13, 13), (1, 1), (1, 1), (False, False)),
    ((48, 40), (9, 7), (3, 1), (2, 1), (False, True)),
    ((16, 16, 16), (5, 5, 5), (1, 1, 1), (1, 1, 1), (False, False, False)),
]


@pytest.mark.parametrize("target,case", targets(TC_LARGE_CASES, sm80_step=3))
def test_tensor_core_large(target, case, rng):
    """Many blocks, many full (unmasked) and partial tiles, forward and
    backward; dq, dk and dv are written once each (no atomics), so a second
    backward is bitwise equal."""
    needs_tensor_cores(target)
    kernel, qkv, rpb, kw = tc_problem(case, rng, 64, 64, 2, 1, False)
    for dtype in TC_DTYPES.values():
        check_tensor_core_forward(target, case, kernel, qkv, rpb, kw, dtype)
        first = check_tensor_core_backward(target, case, kernel, qkv, rpb, kw, dtype)
        _, _, _, _, again = tc_backward(target, case, kernel, qkv, rpb, kw, dtype)
        for name, a, b in zip(("dq", "dk", "dv"), first, again):
            assert torch.equal(a, b), name


def launched_kernels(target, fn):
    if target.emulated_arch is not None:
        libna._C.cuda_emulator_launches()  # forget earlier launches
        with target.run():
            fn()
        return libna._C.cuda_emulator_launches()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.key for e in prof.key_averages()]


@pytest.mark.parametrize("target", targets(sm75_step=1))
def test_tensor_core_dispatch(target, rng):
    """float16/bfloat16 with head dims up to 128 run the tensor-core forward,
    dq and dk/dv kernels on sm_80+; float32, head dims above 128 and older
    GPUs run the SIMT ones."""
    def kernels(dtype, dim):
        q, k, v = (to_torch(x, dtype, target.device)
                   for x in make_qkv(rng, 1, (20, 20), 2, 2, dim, dim))
        with target.run():
            out, lse = libna.na2d(q, k, v, (5, 5), return_lse=True)
        return launched_kernels(target, lambda: (
            libna.na2d(q, k, v, (5, 5), return_lse=True),
            libna.na2d_backward(q, k, v, out, out, lse, (5, 5))))

    uses = lambda names, kernel: any(kernel in n for n in names)
    tc = ("tc_forward_kernel", "tc_dq_kernel", "tc_dkdv_kernel")
    simt = ("fused_forward_kernel", "fused_dq_kernel", "fused_dkdv_kernel")
    for dtype, dim in [(t, d) for t in TC_DTYPES.values() for d in (64, 128, 200)] + [
            (torch.float32, 64)]:
        names = kernels(dtype, dim)
        on_tc = target.tensor_cores and dtype != torch.float32 and dim <= 128
        for a, b in zip(tc, simt):
            assert uses(names, a) == on_tc and uses(names, b) != on_tc, (dtype, dim, a, names)


@pytest.mark.parametrize("target", targets())
def test_tensor_core_strided_views_match_contiguous(target, rng):
    """Strided and misaligned rows (scalar loads) give bitwise the results and
    gradients of contiguous aligned ones (16-byte vector loads of K and V in
    the forward and dq, of K, V, Q and dO in dk/dv)."""
    needs_tensor_cores(target)
    base = torch.from_numpy(rng.standard_normal((2, 4, 10, 12, 80))).half().to(target.device)
    q = base.permute(0, 2, 3, 1, 4)[..., :64]
    k = base.permute(0, 2, 3, 1, 4)[..., 4:68]    # rows start 8 bytes off 16-byte alignment
    v = base.permute(0, 2, 3, 1, 4)[..., 16:80]
    dout = base.flip(-1).permute(0, 2, 3, 1, 4)[..., 2:66]  # strided, 4 bytes off alignment
    kw = dict(dilation=(2, 1))
    with target.run():
        out, lse = libna.na2d(q, k, v, (3, 5), return_lse=True, **kw)
        ref, ref_lse = libna.na2d(q.contiguous(), k.contiguous(), v.contiguous(), (3, 5),
                                  return_lse=True, **kw)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)
    with target.run():
        grads = libna.na2d_backward(q, k, v, out, dout, lse, (3, 5), **kw)
        ref = libna.na2d_backward(*(x.contiguous() for x in (q, k, v, out, dout, lse)), (3, 5),
                                  **kw)
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("dtype", TC_DTYPES.values(), ids=TC_DTYPES.keys())
@pytest.mark.parametrize("target,case", targets(TC_CASES[1::2], sm80_step=2))
def test_tensor_core_forward_feeds_the_backward(target, case, dtype, rng):
    """The backward consumes the tensor-core forward's out and lse: the whole
    CUDA pipeline's gradients (tensor-core forward and backward) against the
    CPU pipeline's and float64."""
    import libna.torch as lt

    needs_tensor_cores(target)
    rank = len(case[0])
    kernel, qkv, _, kw = tc_problem(case, rng, 64, 64, 4, 2, False)
    dout = np.random.default_rng(3).standard_normal((*qkv[0].shape[:-1], 64))
    grads = {}
    for name, device, context in (("cuda", target.device, target.run()),
                                  ("cpu", "cpu", contextlib.nullcontext())):
        q, k, v = (to_torch(x, dtype, device).requires_grad_() for x in qkv)
        with context:
            out = getattr(lt, f"na{rank}d")(q, k, v, kernel, **kw)
            out.backward(to_torch(dout, dtype, device))
        grads[name] = (q.grad, k.grad, v.grad)
    rounded = [f64(to_torch(x, dtype, "cpu")) for x in qkv]
    out64, lse64 = getattr(reference, f"na{rank}d")(*rounded, kernel, return_lse=True, **kw)
    ref = getattr(reference, f"na{rank}d_backward")(
        *rounded, out64, f64(to_torch(dout, dtype, "cpu")), lse64, kernel, **kw)
    for name, g, c, r in zip(("dq", "dk", "dv"), grads["cuda"], grads["cpu"], ref):
        assert_close(name, g, c, r, dtype)
