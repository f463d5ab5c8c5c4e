"""libna.natten: NATTEN's older API on libna, compared with NATTEN 0.17.5.

The cases (tests/natten_cases.py) call NATTEN's functions and modules as
user code does; their outputs and gradients must equal those of NATTEN 0.17.5:

* always, those recorded in tests/data/natten_0_17_5.npz;
* and, where a NATTEN 0.17.5 install is found (``LIBNA_NATTEN017_PYTHON``,
  or the venv ``../shared/tools/natten-peers.sh`` builds), freshly computed
  by it in a subprocess.
"""

import os
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import libna  # noqa: E402
import libna.natten  # noqa: E402
import libna.reference as ref  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import natten_cases  # noqa: E402

FIXTURE = pathlib.Path(__file__).parent / "data" / "natten_0_17_5.npz"


@pytest.fixture(scope="module")
def libna_results():
    return natten_cases.run(libna.natten, torch)


def _compare(expected, actual, source):
    keys = sorted(k for k in expected if k != "natten_version")
    assert keys == sorted(actual), f"case keys differ from {source}"
    for key in keys:
        want, got = np.asarray(expected[key]), np.asarray(actual[key])
        assert want.shape == got.shape, f"{key}: shape {got.shape}, {source} {want.shape}"
        # -inf (slots a causal window does not fill) exactly where NATTEN has them
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want), err_msg=key)
        finite = np.isfinite(want)
        np.testing.assert_allclose(got[finite], want[finite], rtol=1e-10, atol=1e-12,
                                   err_msg=f"{key} differs from {source}")


def test_fixture_is_natten_0_17_5():
    with np.load(FIXTURE) as f:
        assert str(f["natten_version"]) == "0.17.5"
        # every case and every module rank is in it
        cases = {k.split("/")[0] for k in f.files if k != "natten_version"}
    assert cases == set(natten_cases.CASES) | {"module1d", "module2d", "module3d"}


def test_equals_recorded_natten_0_17_5(libna_results):
    with np.load(FIXTURE) as f:
        expected = {k: f[k] for k in f.files}
    _compare(expected, libna_results, "NATTEN 0.17.5 (recorded)")


def _natten017_python():
    candidates = [os.environ.get("LIBNA_NATTEN017_PYTHON")]
    for root in (os.environ.get("LIBNA_PEERS"), os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                             "natten-peers")):
        if root:
            candidates.append(os.path.join(root, "natten017", "bin", "python"))
    for python in candidates:
        if python and os.path.exists(python):
            return python
    return None


def test_equals_live_natten_0_17_5(libna_results, tmp_path):
    python = _natten017_python()
    if python is None:
        pytest.skip("no NATTEN 0.17.5 install found (set LIBNA_NATTEN017_PYTHON, or build "
                    "../shared/tools/natten-peers.sh); test_equals_recorded_natten_0_17_5 "
                    "compares with its recorded results instead")
    out = tmp_path / "live.npz"
    subprocess.run([python, str(pathlib.Path(natten_cases.__file__)), str(out)], check=True,
                   cwd=tmp_path, timeout=300)
    with np.load(out) as f:
        expected = {k: f[k] for k in f.files}
    assert str(expected["natten_version"]) == "0.17.5"
    _compare(expected, libna_results, f"NATTEN 0.17.5 ({python})")


# --------------------------------------------------------------------------
# Beyond NATTEN 0.17.5 on the CPU: checked against libna.reference
# --------------------------------------------------------------------------


def test_fused_additional_keys_and_rpb_gradient_match_reference():
    """NATTEN 0.17.5 needs xFormers (and a GPU) for these; libna.natten does
    them everywhere. Heads-last additional keys [B, N, heads, D]."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 6, 7, 2, 4)) for _ in range(3))
    xk, xv = rng.standard_normal((2, 1, 3, 2, 4))
    rpb = rng.standard_normal((2, 5, 5))
    t = [torch.tensor(a, requires_grad=True) for a in (q, k, v, rpb)]
    out = libna.natten.functional.na2d(*t[:3], 3, 2, rpb=t[3], scale=0.5)
    np.testing.assert_allclose(out.detach().numpy(),
                               ref.na2d(q, k, v, 3, dilation=2, rpb=rpb, scale=0.5),
                               rtol=1e-10, atol=1e-12)
    out.sum().backward()
    assert t[3].grad is not None and torch.isfinite(t[3].grad).all()
    out = libna.natten.functional.na2d(*(torch.tensor(a) for a in (q, k, v)), 3,
                                       additional_keys=torch.tensor(xk),
                                       additional_values=torch.tensor(xv))
    np.testing.assert_allclose(out.numpy(), ref.na2d(q, k, v, 3, additional_keys=xk,
                                                     additional_values=xv),
                               rtol=1e-10, atol=1e-12)


def test_module_has_natten_0_17_parameters_and_defaults():
    m = libna.natten.NeighborhoodAttention2D(dim=16, num_heads=4, kernel_size=5)
    assert m.rpb is None  # NATTEN 0.17: rel_pos_bias=False by default
    assert sorted(m.state_dict()) == ["proj.bias", "proj.weight", "qkv.bias", "qkv.weight"]
    m = libna.natten.NeighborhoodAttention3D(16, 4, (3, 5, 5), dilation=(1, 2, 1),
                                             rel_pos_bias=True, qkv_bias=False)
    assert tuple(m.rpb.shape) == (4, 5, 9, 9) and m.qkv.bias is None
    assert libna.natten.NeighborhoodAttention1D(8, 2, 3, use_experimental_ops=True)(
        torch.randn(1, 5, 8)).shape == (1, 5, 8)


def test_ops_compile_and_autograd():
    q, k, v = (torch.randn(1, 2, 6, 6, 4, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        attn = libna.natten.functional.natten2dqkrpb(q, k, None, 3, 1).softmax(-1)
        return libna.natten.functional.natten2dav(attn, v, 3, 1)

    eager = f(q, k, v)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(compiled, eager)
    compiled.sum().backward()
    assert all(x.grad is not None for x in (q, k, v))


def test_fused_op_and_module_compile():
    """The fused heads-last na2d (with rpb) and the module (padding a short
    input) under torch.compile(fullgraph=True): the eager values and gradients."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 6, 6, 2, 4, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, requires_grad=True)

    def fused(q, k, v, rpb):
        return libna.natten.functional.na2d(q, k, v, 3, rpb=rpb)

    inputs = (q, k, v, rpb)
    eager = fused(*inputs)
    eager_grads = torch.autograd.grad(eager.sum(), inputs)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")(*inputs)
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(torch.autograd.grad(compiled.sum(), inputs), eager_grads):
        torch.testing.assert_close(got, want)

    module = libna.natten.NeighborhoodAttention2D(8, 2, 5, bias=True)
    x = torch.randn(1, 3, 7, 8)  # 3 < 5: padded as NATTEN 0.14-0.16 did
    torch.testing.assert_close(
        torch.compile(module, fullgraph=True, backend="aot_eager")(x), module(x))


# --------------------------------------------------------------------------
# The import hook
# --------------------------------------------------------------------------

_HOOK_SCRIPT = """
import importlib.metadata, importlib.util, sys, warnings
import libna.natten
assert importlib.util.find_spec("natten") is None
installed = libna.natten.install()
assert installed is True and libna.natten.install() is True
assert importlib.util.find_spec("natten") is not None
assert importlib.metadata.version("natten") == libna.natten.__version__
assert importlib.metadata.distribution("natten").metadata["Name"] == "natten"
import natten
from natten.functional import natten2dqkrpb, natten2dav, na2d_qk
import natten.functional as F
assert natten is libna.natten and F is libna.natten.functional
assert natten2dqkrpb is libna.natten.functional.natten2dqkrpb
assert libna.natten.__spec__.name == "libna.natten"   # not taken over by the alias
from natten.natten2d import NeighborhoodAttention2D      # where 0.14-0.17 kept the modules
from natten.na3d import NeighborhoodAttention3D          # and where 0.17 did
assert NeighborhoodAttention2D is libna.natten.NeighborhoodAttention2D
assert NeighborhoodAttention3D is libna.natten.NeighborhoodAttention3D
assert importlib.util.find_spec("natten.nonexistent") is None
try:
    import natten.nonexistent
except ModuleNotFoundError:
    pass
else:
    raise AssertionError("natten.nonexistent imported")
assert libna.natten.uninstall() and "natten" not in sys.modules
assert importlib.util.find_spec("natten") is None
print("ok")
"""


def _run(script, **env):
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_install_hook_serves_import_and_metadata():
    if libna.natten._hook.real_natten() is not None:
        pytest.skip("a real NATTEN is importable here; test_install_keeps_real_natten covers it")
    result = _run(_HOOK_SCRIPT)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_install_keeps_real_natten(tmp_path):
    """A real NATTEN (here a stand-in package on sys.path) stays: install()
    returns False and warns."""
    fake = tmp_path / "natten"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = '0.21.7'\nREAL = True\n")
    script = """
import warnings, libna.natten
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert libna.natten.install() is False
assert any("did nothing" in str(w.message) and "real NATTEN" in str(w.message) for w in caught)
import natten
assert natten.REAL and not libna.natten.is_installed()
print("ok")
"""
    result = _run(script, PYTHONPATH=os.pathsep.join(
        [str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------

F = libna.natten.functional


def test_mixed_up_positional_arguments_name_natten_signature():
    q = torch.randn(1, 2, 6, 6, 4)
    rpb = torch.randn(2, 5, 5)
    # 0.14 order with the rpb where the kernel size belongs
    with pytest.raises(TypeError, match=r"natten2dqkrpb\] rpb=3 must be a torch.Tensor.*"
                       r"expected natten2dqkrpb\(query, key, rpb, kernel_size, dilation\)"):
        F.natten2dqkrpb(q, q, 3, rpb, 1)
    with pytest.raises(TypeError, match=r"missing a required argument: 'dilation'.*"
                       r"natten2dqkrpb\(query, key, rpb, kernel_size, dilation\)"):
        F.natten2dqkrpb(q, q, 3, 1)
    with pytest.raises(TypeError, match=r"kernel_size=a tensor of shape \(2, 5, 5\) must be "
                       r"an int or a tuple of ints; expected na2d_qk\(query, key, kernel_size"):
        F.na2d_qk(q, q, rpb, 3)
    with pytest.raises(TypeError, match=r"got 5 positional arguments; expected natten3dqk"):
        F.natten3dqk(torch.randn(1, 2, 4, 4, 4, 4), q, 3, 3, 1)
    with pytest.raises(TypeError, match=r"xformers_kwargs=.*cannot be honoured"):
        F.na2d(q, q, q, 3, xformers_kwargs={"op": None})


def test_bad_shapes_name_the_argument():
    q = torch.randn(1, 2, 6, 6, 4)
    with pytest.raises(ValueError, match=r"query has shape \(1, 6, 6, 4\); expected 5 "
                       r"dimensions, \[batch, heads, 2 spatial axes, dim\]"):
        F.na2d_qk(q[0:1, 0], q, 3)
    with pytest.raises(ValueError, match=r"attn has 10 weights per token; expected "
                       r"prod\(kernel_size=\(3, 3\)\) = 9"):
        F.na2d_av(torch.randn(1, 2, 6, 6, 10), q, 3)
    with pytest.raises(ValueError, match=r"additional_keys has shape \(2, 5, 5\); expected "
                       r"\[batch=1, heads=2, tokens, dim\]"):
        F.na2d_qk(q, q, 3, 1, torch.randn(2, 5, 5))
    with pytest.raises(TypeError, match=r"NeighborhoodAttention2D\] the call fits no NATTEN "
                       r"signature \(not NATTEN 0.17's: it has no argument rel_pos;"):
        libna.natten.NeighborhoodAttention2D(8, 2, 3, rel_pos=True)


# --------------------------------------------------------------------------
# The modules as NATTEN 0.14-0.16 constructed them
# --------------------------------------------------------------------------
#
# 0.14.5-0.15.1 (no 0.16 was released): NeighborhoodAttention{1,2}D(dim,
# num_heads, kernel_size, dilation=1, bias=True, qkv_bias=True, qk_scale=None,
# attn_drop=0.0, proj_drop=0.0); 0.15's NeighborhoodAttention3D(dim, num_heads,
# kernel_size, kernel_size_d=None, dilation=1, dilation_d=None, bias=True, ...).
# Early 0.14 (and 0.13) took (dim, kernel_size, num_heads, qkv_bias, qk_scale,
# attn_drop, proj_drop, dilation=None), by keyword in practice.

NA = {rank: getattr(libna.natten, f"NeighborhoodAttention{rank}D") for rank in (1, 2, 3)}
SPATIAL = {1: (11,), 2: (10, 11), 3: (7, 10, 11)}

# rank -> (the module in 0.17's keywords, [NATTEN 0.14-0.17 calls meaning the same])
OLD_CALLS = {
    1: (dict(dim=16, num_heads=2, kernel_size=5, dilation=2, rel_pos_bias=True,
             qkv_bias=False, qk_scale=0.3), [
        ("0.15 keywords", (), dict(dim=16, num_heads=2, kernel_size=5, dilation=2, bias=True,
                                   qkv_bias=False, qk_scale=0.3)),
        ("0.15 positional", (16, 2, 5, 2, True, False, 0.3), {}),
        ("0.17 positional", (16, 2, 5, 2, False, True, False, 0.3), {}),
    ]),
    2: (dict(dim=16, num_heads=2, kernel_size=5, dilation=2, rel_pos_bias=True,
             qkv_bias=False, qk_scale=0.3, attn_drop=0.0, proj_drop=0.0), [
        ("0.15 keywords", (), dict(dim=16, num_heads=2, kernel_size=5, dilation=2, bias=True,
                                   qkv_bias=False, qk_scale=0.3, attn_drop=0.0,
                                   proj_drop=0.0)),
        ("0.15 positional", (16, 2, 5, 2, True, False, 0.3, 0.0, 0.0), {}),
        ("0.15 positional, then keywords", (16, 2, 5, 2), dict(bias=True, qkv_bias=False,
                                                               qk_scale=0.3)),
        ("0.14 keywords, dilation=None", (), dict(dim=16, kernel_size=5, num_heads=2,
                                                  qkv_bias=False, qk_scale=0.3, dilation=2,
                                                  bias=True)),
        ("0.17 positional", (16, 2, 5, 2, False, True, False, 0.3, 0.0, 0.0, False), {}),
    ]),
    3: (dict(dim=16, num_heads=2, kernel_size=(3, 5, 5), dilation=(1, 2, 2),
             rel_pos_bias=True, qkv_bias=False, qk_scale=0.3), [
        ("0.15 keywords", (), dict(dim=16, num_heads=2, kernel_size=5, kernel_size_d=3,
                                   dilation=2, dilation_d=1, bias=True, qkv_bias=False,
                                   qk_scale=0.3)),
        ("0.15 positional", (16, 2, 5, 3, 2, 1, True, False, 0.3), {}),
        ("0.17 positional", (16, 2, (3, 5, 5), (1, 2, 2), False, True, False, 0.3), {}),
    ]),
}


@pytest.mark.parametrize("rank,form,args,kwargs", [
    (rank, form, args, kwargs) for rank, (_, calls) in OLD_CALLS.items()
    for form, args, kwargs in calls])
def test_old_module_signatures_build_the_same_module(rank, form, args, kwargs):
    """Each NATTEN release's call builds the module 0.17's keywords build: the
    same parameters (names, shapes), and, with the same weights, the same
    output."""
    current = NA[rank](**OLD_CALLS[rank][0])
    old = NA[rank](*args, **kwargs)
    assert {k: tuple(v.shape) for k, v in old.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in current.state_dict().items()}
    assert sorted(old.state_dict()) == ["proj.bias", "proj.weight", "qkv.weight", "rpb"]
    assert (old.kernel_size, old.dilation, old.is_causal, old.scale) == \
        (current.kernel_size, current.dilation, current.is_causal, current.scale)
    current.load_state_dict(old.state_dict())
    x = torch.randn(2, *SPATIAL[rank], 16, dtype=torch.float64)
    old, current = old.double(), current.double()
    assert torch.equal(old(x), current(x))


def test_old_module_dilation_none_and_depth_defaults():
    """0.14-0.16 took dilation=None for 1; 3D kernel_size_d / dilation_d default
    to kernel_size / dilation."""
    m = NA[2](dim=8, num_heads=2, kernel_size=3, dilation=None, bias=False)
    assert m.dilation == (1, 1) and m.rpb is None
    m = NA[3](8, 2, 5, None, 2)  # (dim, num_heads, kernel_size, kernel_size_d, dilation)
    assert m.kernel_size == (5, 5, 5) and m.dilation == (2, 2, 2)
    m = NA[3](dim=8, num_heads=2, kernel_size=5, kernel_size_d=3, bias=True)
    assert m.kernel_size == (3, 5, 5) and tuple(m.rpb.shape) == (2, 5, 9, 9)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_checkpoint_of_a_natten_014_016_module_loads(rank, tmp_path):
    """Code written for 0.14-0.16 rarely says bias= (NAT/DiNAT do not): there
    the bias was on by default, in 0.17 off. Built that way, the module follows
    0.17 until it loads a state dict with an rpb, then takes the bias on."""
    kwargs = dict(dim=16, num_heads=2, kernel_size=5, dilation=2)
    natten_015 = NA[rank](**kwargs, bias=True).double()
    path = tmp_path / "natten_015.pth"
    torch.save({"model": natten_015.state_dict()}, path)

    m = NA[rank](**kwargs)  # as NAT's code builds it
    assert m.rpb is None
    m.load_state_dict(torch.load(path, weights_only=True)["model"])
    assert tuple(m.rpb.shape) == (2, *(9,) * rank) and m.rel_pos_bias
    assert sorted(m.state_dict()) == sorted(natten_015.state_dict())
    x = torch.randn(1, *(10,) * rank, 16, dtype=torch.float64)
    assert torch.equal(m.double()(x), natten_015(x))
    assert any(p is m.rpb for p in m.parameters())  # trainable like the others


def test_checkpoint_disagreeing_with_an_explicit_bias_switch_does_not_load():
    with_rpb = NA[2](16, 2, 5, rel_pos_bias=True).state_dict()
    without_rpb = NA[2](16, 2, 5).state_dict()
    for said in (dict(rel_pos_bias=False), dict(bias=False), dict(is_causal=True)):
        with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "rpb"'):
            NA[2](16, 2, 5, **said).load_state_dict(with_rpb)
        m = NA[2](16, 2, 5, **said)
        assert m.load_state_dict(with_rpb, strict=False).unexpected_keys == ["rpb"]
        assert m.rpb is None
    for said in (dict(rel_pos_bias=True), dict(bias=True)):
        with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "rpb"'):
            NA[2](16, 2, 5, **said).load_state_dict(without_rpb)


def test_old_positional_calls_that_cannot_be_told_apart_name_the_signatures():
    sig_017 = (r"NATTEN 0.17's NeighborhoodAttention2D\(dim, num_heads, kernel_size, "
               r"dilation=1, is_causal=False, rel_pos_bias=False")
    sig_014 = (r"NATTEN 0.14-0.16's NeighborhoodAttention2D\(dim, num_heads, kernel_size, "
               r"dilation=1, bias=True, qkv_bias=True")
    # 0.17: is_causal=True; 0.14-0.16: bias=True
    with pytest.raises(TypeError, match=r"argument 5 \(True\) is is_causal in NATTEN 0.17, "
                       r"bias in 0.14-0.16\); pass them by keyword; expected " + sig_017 +
                       r".* or " + sig_014):
        NA[2](16, 2, 5, 1, True)
    with pytest.raises(TypeError, match=r"argument 6 \(True\) is rel_pos_bias in NATTEN 0.17, "
                       r"qkv_bias in 0.14-0.16"):
        NA[2](16, 2, 5, 1, False, True)
    with pytest.raises(TypeError, match=r"NeighborhoodAttention3D\] .*argument 4 \(3\) is "
                       r"dilation in NATTEN 0.17, kernel_size_d in 0.14-0.16"):
        NA[3](16, 2, 5, 3)
    # ... while calls that mean the same in both go through
    assert NA[2](16, 2, 5, 1, False).rpb is None
    assert NA[1](16, 2, 5, 2).dilation == (2,)
    # the first modules' order (dim, kernel_size, num_heads)
    with pytest.raises(TypeError, match=r"num_heads=7 does not divide dim=64, but the third "
                       r"argument \(4\) would: NATTEN 0.13 and early 0.14 took \(dim, "
                       r"kernel_size, num_heads, ...\)"):
        NA[2](64, 7, 4)
    # early 0.14's positional qkv_bias where 0.15 and 0.17 have dilation
    with pytest.raises(TypeError, match=r"fits no NATTEN signature \(not NATTEN 0.17's: its "
                       r"argument dilation must be an int or a tuple of ints, got True; not "
                       r"NATTEN 0.14-0.16's: its argument dilation must be an int or None"):
        NA[2](16, 5, 2, True)
    # keywords of both releases together
    with pytest.raises(TypeError, match=r"not NATTEN 0.17's: it has no argument bias; not "
                       r"NATTEN 0.14-0.16's: it has no argument is_causal"):
        NA[2](16, 2, 5, bias=True, is_causal=True)
    with pytest.raises(TypeError, match=r"not NATTEN 0.14-0.16's: its argument kernel_size must "
                       r"be an int, got \(3, 5\)"):
        NA[2](16, 2, (3, 5), bias=True)


@pytest.mark.parametrize("rank, extent, kernel_size, dilation", [
    (1, (3,), 5, 1), (2, (3, 6), 3, 2), (2, (2, 9), 5, 1)])
def test_module_pads_an_input_shorter_than_its_window(rank, extent, kernel_size, dilation):
    """NATTEN 0.14-0.16's 1D/2D modules zero-padded an input shorter than
    kernel_size * dilation at the end of each axis (after which the qkv
    projection's bias makes the padded keys and values) and cropped the
    output. Rebuilt here from the unfused 0.14 ops, which are compared with
    NATTEN itself above."""
    torch.manual_seed(0)
    heads, dim = 2, 8
    module = libna.natten.NeighborhoodAttention1D(dim, heads, kernel_size, dilation, bias=True) \
        if rank == 1 else libna.natten.NeighborhoodAttention2D(dim, heads, kernel_size, dilation,
                                                               bias=True)
    module = module.double()
    x = torch.randn(2, *extent, dim, dtype=torch.float64)
    window = kernel_size * dilation
    padded_extent = [max(n, window) for n in extent]
    padded = torch.zeros(2, *padded_extent, dim, dtype=torch.float64)
    padded[(slice(None), *(slice(0, n) for n in extent))] = x
    qkv = module.qkv(padded).reshape(2, *padded_extent, 3, heads, dim // heads)
    q, k, v = (qkv.select(rank + 1, i).movedim(-2, 1) for i in range(3))
    F = libna.natten.functional
    qk, av = (F.natten1dqkrpb, F.natten1dav) if rank == 1 else (F.natten2dqkrpb, F.natten2dav)
    attn = qk(q * module.scale, k, module.rpb, kernel_size, dilation).softmax(-1)
    out = av(attn, v, kernel_size, dilation).movedim(1, -2).reshape(2, *padded_extent, dim)
    want = module.proj(out)[(slice(None), *(slice(0, n) for n in extent))]
    got = module(x)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
