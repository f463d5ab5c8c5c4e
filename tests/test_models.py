"""libna.models (NAT / DiNAT), libna.viz and the digits examples.

Paper figures (NAT: Hassani et al. 2023, DiNAT: Hassani & Shi 2022, 224x224):
parameters 20M / 28M / 51M / 90M and 2.7 / 4.3 / 7.8 / 13.7 GMACs for
mini / tiny / small / base; DiNAT variants share NAT's figures. The big
models are built on the meta device (no memory, no compute).
"""

import functools
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import libna.models as M  # noqa: E402
import libna.torch as lt  # noqa: E402
from libna import reference  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

PAPER = {  # size: (parameters, multiply-adds at 224x224)
    "mini": (20e6, 2.7e9),
    "tiny": (28e6, 4.3e9),
    "small": (51e6, 7.8e9),
    "base": (90e6, 13.7e9),
}
VARIANTS = [f"{arch}_{size}" for arch in ("nat", "dinat") for size in PAPER]


@pytest.fixture(autouse=True)
def _one_thread():
    """The models here are small; on a busy 2-core machine torch's OpenMP pool
    with 2 threads is 10-20x slower than 1 thread, so run single-threaded."""
    import libna

    saved = torch.get_num_threads(), libna.get_num_threads()
    torch.set_num_threads(1)
    libna.set_num_threads(1)
    yield
    torch.set_num_threads(saved[0])
    libna.set_num_threads(saved[1])


@functools.lru_cache(maxsize=None)
def _meta_model(name):
    with torch.device("meta"):
        return getattr(M, name)()


# --------------------------------------------------------------------------
# Size and cost of the paper variants
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_parameters_and_flops_match_paper(name):
    params, macs = PAPER[name.split("_")[1]]
    model = _meta_model(name)
    n = M.count_parameters(model)
    assert abs(n - params) / params <= 0.025, f"{name}: {n / 1e6:.2f}M parameters"
    f = M.flops(model, 224)
    assert abs(f - macs) / macs <= 0.05, f"{name}: {f / 1e9:.3f} GMACs"
    if name == "nat_mini":   # the other input_size spellings
        assert M.flops(model, (224, 224)) == M.flops(model, (3, 224, 224)) == f


def test_flops_counts_na_analytically():
    model = M.NAT(embed_dim=16, depths=[1, 1], num_heads=[2, 4], kernel_size=[5, 3],
                  mlp_ratio=2.0, num_classes=10)
    total, per = M.flops(model, (40, 48), by_module=True)
    assert total == sum(per.values())
    # level 0: 10x12 tokens of 16 channels, kernel 5; level 1: 5x6 tokens of 32, kernel 3
    assert per["levels.0.blocks.0.attn"] == 2 * 10 * 12 * 16 * 25
    assert per["levels.1.blocks.0.attn"] == 2 * 5 * 6 * 32 * 9
    assert per["levels.0.blocks.0.attn.qkv"] == 10 * 12 * 16 * 48
    assert per["patch_embed.proj.0"] == 20 * 24 * 8 * 3 * 9
    assert per["levels.0.downsample.reduction"] == 5 * 6 * 32 * 16 * 9
    assert per["head"] == 32 * 10
    # batch scales linearly; the model's real parameters are untouched
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert M.flops(model, (2, 3, 40, 48)) == 2 * total
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert M.flops(model, (40, 48), include_norms=True) > total


# --------------------------------------------------------------------------
# Checkpoint compatibility: the original code's parameter names
# --------------------------------------------------------------------------


def _original_state_dict(embed_dim, depths, heads, mlp_ratio, kernel_size, layer_scale,
                         num_classes=1000, in_chans=3, device="cpu", seed=0):
    """The state_dict of the NAT/DiNAT papers' classifier, written out by
    name and shape from the architecture description (not from libna's model)."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape):
        if device == "meta":
            return torch.empty(shape, device="meta")
        return torch.randn(shape, generator=g)

    sd = {
        "patch_embed.proj.0.weight": t(embed_dim // 2, in_chans, 3, 3),
        "patch_embed.proj.0.bias": t(embed_dim // 2),
        "patch_embed.proj.1.weight": t(embed_dim, embed_dim // 2, 3, 3),
        "patch_embed.proj.1.bias": t(embed_dim),
        "patch_embed.norm.weight": t(embed_dim),
        "patch_embed.norm.bias": t(embed_dim),
    }
    for i, (depth, h) in enumerate(zip(depths, heads)):
        dim = embed_dim * 2 ** i
        hidden = int(dim * mlp_ratio)
        for j in range(depth):
            p = f"levels.{i}.blocks.{j}."
            sd.update({
                p + "norm1.weight": t(dim), p + "norm1.bias": t(dim),
                p + "attn.qkv.weight": t(3 * dim, dim), p + "attn.qkv.bias": t(3 * dim),
                p + "attn.rpb": t(h, 2 * kernel_size - 1, 2 * kernel_size - 1),
                p + "attn.proj.weight": t(dim, dim), p + "attn.proj.bias": t(dim),
                p + "norm2.weight": t(dim), p + "norm2.bias": t(dim),
                p + "mlp.fc1.weight": t(hidden, dim), p + "mlp.fc1.bias": t(hidden),
                p + "mlp.fc2.weight": t(dim, hidden), p + "mlp.fc2.bias": t(dim),
            })
            if layer_scale:
                sd[p + "gamma1"] = t(dim)
                sd[p + "gamma2"] = t(dim)
        if i < len(depths) - 1:
            sd[f"levels.{i}.downsample.reduction.weight"] = t(2 * dim, dim, 3, 3)
            sd[f"levels.{i}.downsample.norm.weight"] = t(2 * dim)
            sd[f"levels.{i}.downsample.norm.bias"] = t(2 * dim)
    features = embed_dim * 2 ** (len(depths) - 1)
    sd.update({"norm.weight": t(features), "norm.bias": t(features),
               "head.weight": t(num_classes, features), "head.bias": t(num_classes)})
    return sd


def test_original_checkpoint_loads_strict():
    sd = _original_state_dict(64, [3, 4, 6, 5], [2, 4, 8, 16], 3, 7, layer_scale=False)
    model = M.nat_mini()
    model.load_state_dict(sd, strict=True)
    got = model.state_dict()
    assert set(got) == set(sd)
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    assert torch.equal(model.levels[2].blocks[5].attn.rpb, sd["levels.2.blocks.5.attn.rpb"])
    assert model.levels[3].downsample is None

    # a checkpoint with an extra or a missing key is refused
    with pytest.raises(RuntimeError):
        model.load_state_dict({**sd, "levels.3.downsample.norm.weight": torch.ones(1024)})
    with pytest.raises(RuntimeError):
        model.load_state_dict({k: v for k, v in sd.items() if k != "head.bias"})


@pytest.mark.parametrize("name,cfg", [
    ("dinat_tiny", (64, [3, 4, 18, 5], [2, 4, 8, 16], 3, False)),
    ("nat_small", (96, [3, 4, 18, 5], [3, 6, 12, 24], 2, True)),
    ("dinat_base", (128, [3, 4, 18, 5], [4, 8, 16, 32], 2, True)),
])
def test_original_checkpoint_names_and_shapes(name, cfg):
    embed_dim, depths, heads, mlp_ratio, layer_scale = cfg
    sd = _original_state_dict(embed_dim, depths, heads, mlp_ratio, 7, layer_scale,
                              device="meta")
    with torch.device("meta"):
        model = getattr(M, name)()
    model.load_state_dict(sd, strict=True, assign=True)     # names and shapes must all match
    if layer_scale:
        assert model.levels[0].blocks[0].gamma1.shape == (embed_dim,)


def test_layer_scale_initial_value():
    model = M.NAT(embed_dim=16, depths=[1, 1], num_heads=[1, 2], kernel_size=3,
                  layer_scale=1e-5, num_classes=3)
    assert torch.all(model.levels[1].blocks[0].gamma2 == 1e-5)
    assert not hasattr(M.NAT(embed_dim=16, depths=[1], num_heads=[1], kernel_size=3)
                       .levels[0].blocks[0], "gamma1")
    assert _meta_model("nat_small").levels[0].blocks[0].layer_scale
    assert not _meta_model("nat_tiny").levels[0].blocks[0].layer_scale


# --------------------------------------------------------------------------
# Running the models
# --------------------------------------------------------------------------


def test_forward_backward_small_resolution():
    torch.manual_seed(0)
    # 96x96 -> token grids 24, 12, 6, 3: kernel 3 fits every level, and DiNAT's
    # schedule for 96x96 has dilations 8, 4, 2, 1
    model = M.dinat_mini(num_classes=7, in_chans=2, kernel_size=3, img_size=96,
                         drop_path_rate=0.1, layer_scale=1e-2)
    assert model.dilations[:3] == [[1, 8, 1], [1, 4, 1, 4], [1, 2, 1, 2, 1, 2]]
    x = torch.randn(2, 2, 96, 96)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert model.levels[0].blocks[1].attn.rpb.grad.abs().sum() > 0

    # eval mode is deterministic; channels-last inside ([B, H, W, C] between levels)
    model.eval()
    feats = model.patch_embed(x)
    assert feats.shape == (2, 24, 24, 64)
    assert model.levels[0](feats).shape == (2, 12, 12, 128)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    assert model.forward_features(x).shape == (2, 512)


def test_nat_no_head():
    model = M.NAT(embed_dim=16, depths=[1, 1], num_heads=[1, 2], kernel_size=3, num_classes=0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 32)


def test_dinat_dilation_schedule():
    assert M.dinat_dilations([3, 4, 6, 5]) == [[1, 8, 1], [1, 4, 1, 4], [1, 2, 1, 2, 1, 2],
                                               [1, 1, 1, 1, 1]]
    for name, depths in (("dinat_mini", [3, 4, 6, 5]), ("dinat_base", [3, 4, 18, 5])):
        model = _meta_model(name)
        expect = [[1 if j % 2 == 0 else d for j in range(n)]
                  for n, d in zip(depths, (8, 4, 2, 1))]
        assert model.dilations == expect
        for i, level in enumerate(model.levels):
            assert [blk.attn.dilation for blk in level.blocks] == [(d, d) for d in expect[i]]
    assert _meta_model("nat_tiny").dilations == [[1] * n for n in [3, 4, 18, 5]]
    # per resolution and kernel size, and explicit lists
    assert M.dinat_dilations([2, 2], kernel_size=3, img_size=32) == [[1, 2], [1, 1]]
    assert M.dinat_dilations([2, 2, 2, 2], kernel_size=5, img_size=(384, 160)) == \
        [[1, 8], [1, 4], [1, 2], [1, 1]]
    custom = [[1, 2, 3], [4, 1, 2, 1], [1] * 6, [1] * 5]
    with torch.device("meta"):
        assert M.dinat_mini(dilations=custom).dilations == custom
        assert M.nat_mini(dilations=custom).dilations == custom
    with pytest.raises(ValueError, match="level 1"):
        M.NAT(depths=[1, 2], num_heads=[1, 2], embed_dim=8, dilations=[[1], [1]])
    with pytest.raises(ValueError, match="dilations"):
        M.NAT(depths=[1, 2], num_heads=[1, 2], embed_dim=8, dilations=[[1]])


def test_too_small_input_raises_naming_the_level():
    model = M.nat_mini(num_classes=10)
    # 64x64 -> level grids 16, 8, 4, 2: level 2 (4x4) cannot hold a 7x7 window
    with pytest.raises(ValueError) as e:
        model(torch.randn(1, 3, 64, 64))
    msg = str(e.value)
    assert "level 2" in msg and "4x4" in msg and "kernel_size=7" in msg and "dilation=1" in msg
    assert "64x64" in msg
    # DiNAT's 224x224 schedule at 112x112: level 0 is 28x28, dilation 8 needs 56
    with torch.device("meta"):
        dinat = M.dinat_mini()
    with pytest.raises(ValueError, match=r"level 0 has spatial resolution 28x28.*"
                                         r"kernel_size=7 with dilation=8"):
        dinat(torch.empty(1, 3, 112, 112, device="meta"))
    # ... which the schedule for that resolution fixes
    with torch.device("meta"):
        ok = M.dinat_mini(img_size=112, kernel_size=3)
        assert ok(torch.empty(1, 3, 112, 112, device="meta")).shape == (1, 1000)
    assert M.level_resolutions(64) == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert M.level_resolutions((8 * 4 + 1, 50), 2) == [(9, 13), (5, 7)]


# --------------------------------------------------------------------------
# libna.viz
# --------------------------------------------------------------------------


def test_viz_slots_match_reference():
    from libna import viz

    for shape, k, d in (((8, 8), 3, 2), ((7, 9), (3, 5), (2, 1)), ((6, 6), 5, 1)):
        for q in ((0, 0), (3, 4), (shape[0] - 1, shape[1] - 1)):
            slots = viz.slot_positions(q, shape, k, d)
            assert slots == reference.neighborhood(q, shape, k, dilation=d)
            mask = viz.neighborhood_mask(q, shape, k, d)
            assert mask.sum() == len(set(slots)) == math.prod(np.broadcast_to(k, 2))
    # a corner query's window is shifted inward, not clipped
    assert viz.neighborhood_mask((0, 0), (8, 8), 3)[:3, :3].all()
    amap = viz.attention_map(np.arange(9.0), (7, 7), (8, 8), 3)
    assert np.nansum(amap) == 36 and amap[7, 7] == 8 and amap[5, 5] == 0


def test_viz_attention_weights_are_the_layers():
    from libna import viz

    torch.manual_seed(0)
    layer = lt.NeighborhoodAttention2D(24, 3, kernel_size=3, dilation=2).eval()
    with torch.no_grad():
        layer.rpb.normal_()
    x = torch.randn(2, 9, 8, 24)
    attn = viz.attention_weights(layer, x)
    assert attn.shape == (2, 9, 8, 3, 9)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 9, 8, 3))
    # attn . v through the output projection reproduces the fused layer
    v = layer.qkv(x).reshape(2, 9, 8, 3, 3, 8)[:, :, :, 2]
    out = lt.na2d_av(attn, v, 3, dilation=2).reshape(2, 9, 8, 24)
    with torch.no_grad():
        torch.testing.assert_close(layer.proj(out), layer(x), atol=1e-5, rtol=1e-5)


def test_viz_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    from libna import viz

    model = M.NAT(embed_dim=16, depths=[2, 1], num_heads=[2, 2], kernel_size=3,
                  dilations=[[1, 2], [1]], num_classes=4, in_chans=1)
    images = torch.randn(2, 1, 32, 32)
    records = viz.record_attention(model, images)
    assert [r.name for r in records] == ["levels.0.blocks.0.attn", "levels.0.blocks.1.attn",
                                         "levels.1.blocks.0.attn"]
    assert records[1].dilation == (2, 2) and records[0].weights.shape == (2, 8, 8, 2, 9)
    assert model.training          # left as it was
    fig = viz.plot_attention(images[1, 0].numpy(), records[:2], [(0, 0), (4, 7)],
                             batch_index=1, path=tmp_path / "attn.png")
    assert len(fig.axes) >= 2 * 6
    viz.plot_attention(None, records[2:], [(1, 1)], per_head=False,
                       path=tmp_path / "mean.png")
    viz.plot_neighborhoods((10, 10), [(0, 0), (5, 5)], 3, dilations=(1, 3),
                           path=tmp_path / "nb.png")
    for name in ("attn.png", "mean.png", "nb.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match="outside"):
        viz.plot_attention(None, records[2:], [(6, 6)])


# --------------------------------------------------------------------------
# The examples
# --------------------------------------------------------------------------


def _run(script, *args, timeout=240):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    pytest.importorskip("sklearn")
    ckpt = tmp_path_factory.mktemp("digits") / "digits_nat.pt"
    # shortened demo: 5 of the 30 epochs (the full run reaches ~0.99 in 1.5-2 min;
    # 5 epochs reach 0.73-0.81 across seeds)
    proc = _run("train_digits.py", "--epochs", 5, "--save", ckpt)
    return proc, ckpt


def test_train_digits_short_run(digits_run):
    proc, ckpt = digits_run
    lines = proc.stdout.strip().splitlines()
    m = re.fullmatch(r"test accuracy: (\d\.\d{3})", lines[-1])
    assert m, lines[-1]
    assert float(m.group(1)) >= 0.6
    assert ckpt.exists()
    assert "training" in proc.stderr          # the progress bar


def test_attention_maps_example(digits_run, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    import importlib.util

    _, ckpt = digits_run
    # in-process (saves a second interpreter start); the script sets 1 thread
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location("attention_maps", EXAMPLES / "attention_maps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--checkpoint", str(ckpt), "--out-dir", str(tmp_path)])   # threads: fixture
    out = capsys.readouterr().out
    for name in ("attention_maps.png", "neighborhoods.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert name in out


@pytest.mark.parametrize("family", ["nat", "dinat"])
def test_torch_compile_of_a_model(family):
    """torch.compile (inductor, fullgraph: no graph break inside the blocks)
    of a small NAT / DiNAT gives the eager logits and gradients."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    config = dict(embed_dim=16, depths=(1, 2), num_heads=(1, 2), kernel_size=5,
                  num_classes=7, drop_path_rate=0.0)
    if family == "dinat":
        model = M.DiNAT(img_size=64, **config)
    else:
        model = M.NAT(**config)
    x = torch.randn(2, 3, 64, 64)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    model.train()
    grads = []
    for fn in (model, compiled):
        model.zero_grad()
        fn(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for eager, traced in zip(*grads):
        torch.testing.assert_close(traced, eager, rtol=1e-3, atol=1e-4)
    assert sum(counters["graph_break"].values()) == 0
