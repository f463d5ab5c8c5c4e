"""NAT / DiNAT checkpoints: the SHI-Labs names (libna's) and Hugging Face
transformers' names, and loading local checkpoint files of either kind.

====================================================  ===========================================================
SHI-Labs / libna                                      transformers (``NatModel`` / ``DinatModel``, under ``{prefix}.``)
====================================================  ===========================================================
``patch_embed.proj.{0,1}.*``                          ``embeddings.patch_embeddings.projection.{0,1}.*``
``patch_embed.norm.*``                                ``embeddings.norm.*``
``levels.i.blocks.j.norm1.*``                         ``encoder.levels.i.layers.j.layernorm_before.*``
``levels.i.blocks.j.attn.qkv.*`` (q; k; v rows)       ``encoder.levels.i.layers.j.attention.self.{query,key,value}.*``
``levels.i.blocks.j.attn.rpb``                        ``encoder.levels.i.layers.j.attention.self.rpb``
``levels.i.blocks.j.attn.proj.*``                     ``encoder.levels.i.layers.j.attention.output.dense.*``
``levels.i.blocks.j.norm2.*``                         ``encoder.levels.i.layers.j.layernorm_after.*``
``levels.i.blocks.j.mlp.fc1.*`` / ``mlp.fc2.*``       ``encoder.levels.i.layers.j.intermediate.dense.*`` / ``output.dense.*``
``levels.i.blocks.j.gamma1`` / ``gamma2``             ``encoder.levels.i.layers.j.layer_scale_parameters`` (rows 0, 1)
``levels.i.downsample.{reduction,norm}.*``            ``encoder.levels.i.downsample.{reduction,norm}.*``
``norm.*``                                            ``layernorm.*``
``head.*``                                            ``classifier.*`` (no prefix)
====================================================  ===========================================================

The conversion is exact (tensors are split, stacked or renamed, never
changed) and the two directions are inverse.
"""

import json
import os
import re
import struct
from typing import Dict, Mapping

import torch

__all__ = ["to_hf_state_dict", "from_hf_state_dict", "load_checkpoint", "read_checkpoint"]

_LAYER = re.compile(r"^levels\.(\d+)\.blocks\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^encoder\.levels\.(\d+)\.layers\.(\d+)\.(.+)$")

# per-layer names: SHI-Labs -> transformers (qkv, gamma1/2 are split / stacked)
_LAYER_NAMES = {
    "norm1": "layernorm_before",
    "attn.rpb": "attention.self.rpb",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_TOP_NAMES = {
    "patch_embed.proj": "embeddings.patch_embeddings.projection",
    "patch_embed.norm": "embeddings.norm",
    "norm": "layernorm",
}


def _rename(name: str, table: Mapping[str, str]):
    """name with its longest matching prefix (a whole dotted component) renamed."""
    for old in sorted(table, key=len, reverse=True):
        if name == old or name.startswith(old + "."):
            return table[old] + name[len(old):]
    return None


def _check_state_dict(fn: str, sd) -> None:
    if not isinstance(sd, Mapping):
        raise TypeError(f"[{fn}] state_dict must be a mapping of names to tensors, got "
                        f"{type(sd).__module__}.{type(sd).__qualname__}")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"[{fn}] state_dict[{bad[0]!r}] is a {type(sd[bad[0]]).__name__}; "
                        "expected torch.Tensor values")


def _unconverted(fn: str, names, kind: str):
    names = sorted(names)
    raise ValueError(f"[{fn}] {len(names)} key(s) are not {kind} NAT/DiNAT parameter names: "
                     f"{names[:10]}" + (" ..." if len(names) > 10 else ""))


def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor], *, prefix: str = "dinat"
                     ) -> Dict[str, torch.Tensor]:
    """A SHI-Labs / libna NAT or DiNAT state dict in Hugging Face transformers'
    names: ``prefix="dinat"`` for ``DinatForImageClassification`` (``"nat"``
    for ``NatForImageClassification``, ``""`` for the bare ``DinatModel`` /
    ``NatModel``); ``head.*`` becomes ``classifier.*``.
    """
    fn = "to_hf_state_dict"
    _check_state_dict(fn, state_dict)
    if not isinstance(prefix, str):
        raise TypeError(f"[{fn}] prefix={prefix!r} must be a str ('dinat', 'nat' or '')")
    base = prefix + "." if prefix else ""
    out, gammas, qkv, unknown = {}, {}, {}, []
    for name, value in state_dict.items():
        if name.startswith("head."):
            out["classifier" + name[len("head"):]] = value
            continue
        m = _LAYER.match(name)
        if m is None:
            new = _rename(name, _TOP_NAMES)
            if new is None and name.startswith("levels.") and ".downsample." in name:
                new = "encoder." + name
            if new is None:
                unknown.append(name)
            else:
                out[base + new] = value
            continue
        level, block, rest = m.groups()
        layer = f"{base}encoder.levels.{level}.layers.{block}."
        if rest in ("gamma1", "gamma2"):
            gammas.setdefault(layer, {})[rest] = value
        elif rest in ("attn.qkv.weight", "attn.qkv.bias"):
            qkv[(layer, rest.rsplit(".", 1)[1])] = value
        else:
            new = _rename(rest, _LAYER_NAMES)
            if new is None:
                unknown.append(name)
            else:
                out[layer + new] = value
    if unknown:
        _unconverted(fn, unknown, "SHI-Labs")
    for (layer, kind), value in qkv.items():
        if value.shape[0] % 3:
            raise ValueError(f"[{fn}] {layer}attn.qkv.{kind} has {value.shape[0]} rows; "
                             "expected 3 * dim (query, key and value)")
        for part, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0)):
            out[f"{layer}attention.self.{part}.{kind}"] = chunk.clone()
    for layer, pair in gammas.items():
        if set(pair) != {"gamma1", "gamma2"}:
            raise ValueError(f"[{fn}] layer {layer} has {sorted(pair)} but layer scale needs "
                             "both gamma1 and gamma2")
        out[layer + "layer_scale_parameters"] = torch.stack([pair["gamma1"], pair["gamma2"]])
    return out


def _hf_prefix(state_dict) -> str:
    for prefix in ("dinat.", "nat."):
        if any(k.startswith(prefix) for k in state_dict):
            return prefix
    return ""


def from_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A Hugging Face transformers NAT / DiNAT state dict (``dinat.*``,
    ``nat.*`` or bare-model keys, plus ``classifier.*``) in the SHI-Labs
    names that libna's models use: the inverse of ``to_hf_state_dict``."""
    fn = "from_hf_state_dict"
    _check_state_dict(fn, state_dict)
    prefix = _hf_prefix(state_dict)
    back_top = {v: k for k, v in _TOP_NAMES.items()}
    back_layer = {v: k for k, v in _LAYER_NAMES.items()}
    out, qkv, unknown = {}, {}, []
    for name, value in state_dict.items():
        if name.startswith("classifier."):
            out["head" + name[len("classifier"):]] = value
            continue
        if prefix and not name.startswith(prefix):
            unknown.append(name)
            continue
        key = name[len(prefix):]
        m = _HF_LAYER.match(key)
        if m is None:
            new = _rename(key, back_top)
            if new is None and key.startswith("encoder.levels.") and ".downsample." in key:
                new = key[len("encoder."):]
            if new is None:
                unknown.append(name)
            else:
                out[new] = value
            continue
        level, block, rest = m.groups()
        layer = f"levels.{level}.blocks.{block}."
        parts = rest.split(".")
        if rest == "layer_scale_parameters":
            if value.dim() != 2 or value.shape[0] != 2:
                raise ValueError(f"[{fn}] {name} has shape {tuple(value.shape)}; expected "
                                 "(2, dim): the attention's and the MLP's layer scale")
            out[layer + "gamma1"], out[layer + "gamma2"] = value[0].clone(), value[1].clone()
        elif parts[:2] == ["attention", "self"] and parts[2:3] in (["query"], ["key"],
                                                                   ["value"]):
            qkv.setdefault((layer, parts[-1]), {})[parts[2]] = value
        else:
            new = _rename(rest, back_layer)
            if new is None:
                unknown.append(name)
            else:
                out[layer + new] = value
    if unknown:
        _unconverted(fn, unknown, "transformers")
    for (layer, kind), parts in qkv.items():
        missing = [p for p in ("query", "key", "value") if p not in parts]
        if missing:
            raise ValueError(f"[{fn}] layer {layer} has no attention.self.{missing[0]}.{kind}; "
                             "query, key and value are needed together")
        out[f"{layer}attn.qkv.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]], dim=0)
    return out


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def _read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """A .safetensors file (8-byte little-endian header size, JSON header,
    raw little-endian data) as tensors, without the safetensors package."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"[load_checkpoint] {path}: {len(data)} bytes, too short for a "
                         "safetensors file")
    (size,) = struct.unpack("<Q", data[:8])
    try:
        if size > len(data) - 8:
            raise ValueError
        header = json.loads(data[8:8 + size])
        if not isinstance(header, dict):
            raise ValueError
    except ValueError:
        raise ValueError(f"[load_checkpoint] {path} is not a safetensors file (its first 8 "
                         f"bytes give a header of {size} bytes, which is not a JSON object "
                         "inside the file)") from None
    body = memoryview(data)[8 + size:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ValueError(f"[load_checkpoint] {path}: tensor {name!r} has dtype "
                             f"{info.get('dtype')!r}, which libna cannot read; expected one of "
                             f"{sorted(_SAFETENSORS_DTYPES)}")
        start, end = info["data_offsets"]
        raw = bytearray(body[start:end])
        flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        out[name] = flat.reshape(info["shape"])
    return out


def _unwrap(obj, path):
    """The state dict inside what torch.load returned: the object itself, or
    its "state_dict" / "model" / "module" / "model_state_dict" entry;
    DistributedDataParallel's "module." prefix removed."""
    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor)
                                                   for v in obj.values()):
            break
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in ("state_dict", "model", "model_state_dict", "module")
                          if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is not None:
                obj = inner
                continue
        break
    if not (isinstance(obj, Mapping) and obj
            and all(isinstance(v, torch.Tensor) for v in obj.values())):
        if isinstance(obj, Mapping):
            found = (f"a dict with keys {sorted(map(str, obj))[:10]}" if obj
                     else "an empty dict")
        else:
            found = f"a {type(obj).__module__}.{type(obj).__qualname__}"
        raise ValueError(f"[load_checkpoint] {path} is not a checkpoint: found {found}, "
                         "expected a state dict (names to tensors), possibly under "
                         "'state_dict' or 'model'")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def read_checkpoint(path) -> Dict[str, torch.Tensor]:
    """The state dict of a local checkpoint file: ``.safetensors``, or a
    ``torch.save`` file (``.pth``, ``.pt``, ``.bin``, ...) read with
    ``weights_only=True``; raises ValueError naming the file and what it holds
    when it is not one."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"[load_checkpoint] no such file: {path}")
    with open(path, "rb") as f:
        head = f.read(9)
    if path.endswith(".safetensors") or (len(head) == 9 and head[8:9] == b"{"):
        return _unwrap(_read_safetensors(path), path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001  (torch raises many kinds here)
        raise ValueError(
            f"[load_checkpoint] {path} is not a checkpoint that can be read safely: "
            f"torch.load(weights_only=True) failed with {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}") from None
    return _unwrap(obj, path)


def _is_hf(names) -> bool:
    return any(".patch_embeddings." in n or n.startswith("embeddings.") or ".encoder.levels." in n
               or n.startswith("encoder.levels.") for n in names)


def _listing(names):
    names = sorted(names)
    return f"{len(names)}: {names[:10]}" + (" ..." if len(names) > 10 else "")


def load_checkpoint(model: torch.nn.Module, path, *, strict: bool = True):
    """Load a local NAT / DiNAT checkpoint file (``.pth``, ``.bin``,
    ``.safetensors``; SHI-Labs or Hugging Face transformers names) into
    ``model``, converting the names to the model's kind (libna's models, or a
    transformers ``NatModel`` / ``DinatModel`` / ``...ForImageClassification``).

    Raises ValueError listing the missing, unexpected and mis-shaped keys (the
    first 10 of each and their count) when the checkpoint does not match the
    model; with ``strict=False`` missing and unexpected keys are allowed.
    Returns the model. Nothing is downloaded.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"[load_checkpoint] model must be a torch.nn.Module, got "
                        f"{type(model).__module__}.{type(model).__qualname__}")
    sd = read_checkpoint(path)
    target = model.state_dict()
    want_hf, have_hf = _is_hf(target), _is_hf(sd)
    if have_hf and not want_hf:
        sd = from_hf_state_dict(sd)
    elif want_hf and not have_hf:
        sd = to_hf_state_dict(sd, prefix=_hf_prefix(target).rstrip("."))
    elif want_hf and have_hf and _hf_prefix(sd) != _hf_prefix(target):
        sd = to_hf_state_dict(from_hf_state_dict(sd), prefix=_hf_prefix(target).rstrip("."))
    missing = set(target) - set(sd)
    unexpected = set(sd) - set(target)
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)}, model {tuple(target[k].shape)}"
                    for k in set(sd) & set(target) if sd[k].shape != target[k].shape)
    problems = []
    if missing and strict:
        problems.append(f"missing keys ({_listing(missing)})")
    if unexpected and strict:
        problems.append(f"unexpected keys ({_listing(unexpected)})")
    if shapes:
        problems.append(f"mis-shaped keys ({len(shapes)}: {shapes[:10]}"
                        + (" ..." if len(shapes) > 10 else "") + ")")
    if problems:
        raise ValueError(f"[load_checkpoint] {os.fspath(path)} does not match "
                         f"{type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict({k: v for k, v in sd.items() if k in target}, strict=strict)
    return model
