"""libna.models.to_hf_state_dict / from_hf_state_dict / load_checkpoint.

These need no transformers: the names transformers uses are spelled out
here (tests/test_transformers_dinat.py checks them against transformers
4.50's own DinatForImageClassification)."""

import json
import struct

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import libna.models as models  # noqa: E402


def _small(layer_scale=0.5, num_classes=5):
    torch.manual_seed(0)
    model = models.NAT(embed_dim=16, mlp_ratio=2.0, depths=[1, 2], num_heads=[2, 4],
                       kernel_size=3, dilations=[[2], [1, 1]], num_classes=num_classes,
                       layer_scale=layer_scale, drop_path_rate=0.0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def test_names_and_exact_round_trip():
    sd = _small().state_dict()
    hf = models.to_hf_state_dict(sd)
    layer = "dinat.encoder.levels.1.layers.1."
    dim = 32
    assert torch.equal(hf[layer + "attention.self.query.weight"],
                       sd["levels.1.blocks.1.attn.qkv.weight"][:dim])
    assert torch.equal(hf[layer + "attention.self.value.bias"],
                       sd["levels.1.blocks.1.attn.qkv.bias"][2 * dim:])
    assert torch.equal(hf[layer + "layer_scale_parameters"],
                       torch.stack([sd["levels.1.blocks.1.gamma1"],
                                    sd["levels.1.blocks.1.gamma2"]]))
    for ours, theirs in [
            ("patch_embed.proj.1.weight", "dinat.embeddings.patch_embeddings.projection.1.weight"),
            ("patch_embed.norm.bias", "dinat.embeddings.norm.bias"),
            ("levels.0.blocks.0.norm1.weight", "dinat.encoder.levels.0.layers.0.layernorm_before.weight"),
            ("levels.0.blocks.0.attn.rpb", "dinat.encoder.levels.0.layers.0.attention.self.rpb"),
            ("levels.0.blocks.0.attn.proj.bias", "dinat.encoder.levels.0.layers.0.attention.output.dense.bias"),
            ("levels.0.blocks.0.norm2.bias", "dinat.encoder.levels.0.layers.0.layernorm_after.bias"),
            ("levels.0.blocks.0.mlp.fc1.weight", "dinat.encoder.levels.0.layers.0.intermediate.dense.weight"),
            ("levels.0.blocks.0.mlp.fc2.weight", "dinat.encoder.levels.0.layers.0.output.dense.weight"),
            ("levels.0.downsample.reduction.weight", "dinat.encoder.levels.0.downsample.reduction.weight"),
            ("levels.0.downsample.norm.weight", "dinat.encoder.levels.0.downsample.norm.weight"),
            ("norm.weight", "dinat.layernorm.weight"),
            ("head.weight", "classifier.weight")]:
        assert torch.equal(hf[theirs], sd[ours]), ours
    # per layer (3): qkv.{weight,bias} -> {query,key,value}.* (+4), gamma1/2 -> one (-1)
    assert len(hf) == len(sd) + 3 * (4 - 1)
    back = models.from_hf_state_dict(hf)
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    nat = models.to_hf_state_dict(sd, prefix="nat")
    assert "nat.layernorm.weight" in nat and "classifier.bias" in nat
    bare = models.to_hf_state_dict(_small(layer_scale=None).state_dict(), prefix="")
    assert "embeddings.norm.weight" in bare
    assert not any("layer_scale" in k for k in bare)
    for variant in (nat, bare):
        again = models.from_hf_state_dict(variant)
        assert all(torch.equal(again[k], v) for k, v in models.from_hf_state_dict(
            models.to_hf_state_dict(again)).items())


def _write_safetensors(path, sd):
    """A minimal safetensors writer (the format: header size, JSON header, data)."""
    names = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16",
             torch.bfloat16: "BF16"}
    header, blobs, offset = {}, [], 0
    for k, v in sd.items():
        raw = v.contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b""
        header[k] = {"dtype": names[v.dtype], "shape": list(v.shape),
                     "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


@pytest.mark.parametrize("kind", ["pth", "bin", "safetensors", "safetensors-package"])
@pytest.mark.parametrize("names", ["shi", "hf"])
def test_load_checkpoint_files(tmp_path, kind, names):
    source = _small()
    x = torch.randn(1, 3, 32, 32)
    want = source(x)
    sd = source.state_dict() if names == "shi" else models.to_hf_state_dict(source.state_dict())
    path = tmp_path / f"ckpt.{kind.split('-')[0]}"
    if kind == "pth":
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    elif kind == "bin":
        torch.save(sd, path)
    elif kind == "safetensors":
        sd = {k: v.to(torch.bfloat16) if k.endswith("rpb") else v for k, v in sd.items()}
        _write_safetensors(path, sd)
    else:
        safetensors_torch = pytest.importorskip("safetensors.torch")
        safetensors_torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    target = _small()
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()
    assert models.load_checkpoint(target, path) is target
    if kind == "safetensors":  # rpb went through bfloat16
        want = _small()
        with torch.no_grad():
            for n, p in want.named_parameters():
                if n.endswith("rpb"):
                    p.copy_(p.to(torch.bfloat16))
        want = want(x)
    torch.testing.assert_close(target(x), want, rtol=0, atol=0)


def test_mismatch_lists_missing_unexpected_and_misshaped(tmp_path):
    sd = _small().state_dict()
    sd.pop("norm.weight")
    sd["levels.0.blocks.0.extra"] = torch.zeros(1)
    sd["head.weight"] = torch.zeros(7, 32)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as info:
        models.load_checkpoint(_small(), tmp_path / "bad.pth")
    message = str(info.value)
    assert "missing keys (1: ['norm.weight'])" in message
    assert "unexpected keys (1: ['levels.0.blocks.0.extra'])" in message
    assert "mis-shaped keys (1: ['head.weight: checkpoint (7, 32), model (5, 32)'])" in message
    # many missing: the first 10 and the count
    torch.save({"head.weight": torch.zeros(5, 32), "head.bias": torch.zeros(5)},
               tmp_path / "head.pth")
    with pytest.raises(ValueError, match=r"missing keys \(\d\d: \[.*\] \.\.\.\)"):
        models.load_checkpoint(_small(), tmp_path / "head.pth")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.pth").write_text("hello, not a checkpoint\n")
    with pytest.raises(ValueError, match=r"notes.pth is not a checkpoint that can be read "
                       r"safely: torch.load\(weights_only=True\) failed"):
        models.load_checkpoint(_small(), tmp_path / "notes.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list.pth is not a checkpoint: found a "
                       r"builtins.list, expected a state dict"):
        models.load_checkpoint(_small(), tmp_path / "list.pth")
    torch.save({"epoch": 1, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(ValueError, match=r"meta.pth is not a checkpoint: found a dict with "
                       r"keys \['epoch', 'lr'\]"):
        models.load_checkpoint(_small(), tmp_path / "meta.pth")
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(ValueError, match=r"x.safetensors is not a safetensors file"):
        models.load_checkpoint(_small(), tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="no such file"):
        models.load_checkpoint(_small(), tmp_path / "missing.pth")


def test_conversion_bad_input():
    with pytest.raises(ValueError, match=r"\[to_hf_state_dict\] 1 key\(s\) are not SHI-Labs "
                       r"NAT/DiNAT parameter names: \['blocks.0.weight'\]"):
        models.to_hf_state_dict({"blocks.0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"\[from_hf_state_dict\] 1 key\(s\) are not "
                       r"transformers NAT/DiNAT parameter names: \['dinat.pooler.weight'\]"):
        models.from_hf_state_dict({"dinat.pooler.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"no attention.self.value.weight; query, key and "
                       r"value are needed together"):
        models.from_hf_state_dict({
            "encoder.levels.0.layers.0.attention.self.query.weight": torch.zeros(2, 2),
            "encoder.levels.0.layers.0.attention.self.key.weight": torch.zeros(2, 2)})
    with pytest.raises(TypeError, match=r"state_dict\['a'\] is a ndarray; expected "
                       r"torch.Tensor values"):
        models.to_hf_state_dict({"a": np.zeros(2)})
