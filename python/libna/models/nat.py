"""Neighborhood Attention Transformer (NAT) and Dilated NAT (DiNAT).

The architecture and the parameter names follow the NAT / DiNAT papers'
classification models, so their ImageNet checkpoints load with
``model.load_state_dict(state_dict, strict=True)``:

* ``patch_embed`` -- overlapping tokenizer: two 3x3 stride-2 convolutions
  (``proj.0``: in_chans -> dim/2, ``proj.1``: dim/2 -> dim) and a LayerNorm
  (``norm``); overall stride 4.
* ``levels.{i}`` -- ``blocks.{j}`` (``norm1``, ``attn`` = neighborhood
  attention with ``qkv``, ``rpb`` [heads, 2k-1, 2k-1] and ``proj``, ``norm2``,
  ``mlp.fc1``, ``mlp.fc2``, and ``gamma1`` / ``gamma2`` with layer scale),
  then ``downsample`` (``reduction``: 3x3 stride-2 convolution without bias
  that doubles the channels, ``norm``) on every level but the last.
* ``norm``, average pool, ``head``.

Activations stay channels-last ``[B, H, W, C]`` inside the network; the
model takes and the tokenizer consumes the usual ``[B, C, H, W]`` image.

Input resolution is flexible, with one constraint: neighborhood attention on
a level of spatial extent ``H x W`` needs ``kernel_size * dilation <= H`` and
``<= W`` for each of its blocks. The tokenizer divides the input by 4 and
each downsampler by 2 (rounding up), so level ``i`` sees
``ceil(H_in / 2**(i + 2))``. With the default kernel size 7, the four-level
models need at least 7 x 7 tokens at the last level, i.e. an input of at
least 193 x 193 (224 x 224 in the papers). For small inputs pass a smaller
``kernel_size`` (an int, or one per level), fewer levels (``depths``) and/or
smaller ``dilations``; a violation raises a ``ValueError`` naming the level,
its resolution, the kernel size and the dilation.
"""

import math
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from ..torch.nn import NeighborhoodAttention2D

__all__ = [
    "NAT", "DiNAT", "NATLayer", "NATBlock", "ConvTokenizer", "ConvDownsampler", "Mlp",
    "DropPath", "dinat_dilations", "level_resolutions",
    "nat_mini", "nat_tiny", "nat_small", "nat_base",
    "dinat_mini", "dinat_tiny", "dinat_small", "dinat_base",
]


# --------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class ConvTokenizer(nn.Module):
    """Overlapping tokenizer: [B, C, H, W] -> [B, H/4, W/4, dim] (channels-last)."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 64, norm_layer=nn.LayerNorm):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, kernel_size=3, stride=2, padding=1),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1),
        )
        self.norm = norm_layer(embed_dim)

    def forward(self, x):
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvDownsampler(nn.Module):
    """3x3 stride-2 convolution (no bias) doubling the channels, then LayerNorm;
    channels-last in and out."""

    def __init__(self, dim: int, norm_layer=nn.LayerNorm):
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = norm_layer(2 * dim)

    def forward(self, x):
        x = self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.norm(x)


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, act_layer=nn.GELU,
                 drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class NATLayer(nn.Module):
    """Pre-norm transformer block with 2D neighborhood attention."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 7, dilation: int = 1,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale=None,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm,
                 layer_scale: Optional[float] = None):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.mlp_ratio = mlp_ratio
        self.norm1 = norm_layer(dim)
        self.attn = NeighborhoodAttention2D(
            dim, num_heads, kernel_size, dilation=dilation, qkv_bias=qkv_bias,
            qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.layer_scale = layer_scale is not None
        if self.layer_scale:
            self.gamma1 = nn.Parameter(float(layer_scale) * torch.ones(dim))
            self.gamma2 = nn.Parameter(float(layer_scale) * torch.ones(dim))

    def forward(self, x):
        if not self.layer_scale:
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x)))


class NATBlock(nn.Module):
    """One level: ``depth`` NATLayers, then (optionally) a downsampler."""

    def __init__(self, dim: int, depth: int, num_heads: int, kernel_size: int = 7,
                 dilations: Optional[Sequence[int]] = None, downsample: bool = True,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale=None,
                 drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: Union[float, Sequence[float]] = 0.0, norm_layer=nn.LayerNorm,
                 layer_scale: Optional[float] = None, index: int = 0):
        super().__init__()
        self.dim = dim
        self.depth = depth
        self.index = index
        self.kernel_size = kernel_size
        self.dilations = [1] * depth if dilations is None else [int(d) for d in dilations]
        if len(self.dilations) != depth:
            raise ValueError(
                f"[NAT] level {index}: dilations={list(dilations)} has {len(self.dilations)} "
                f"entries but the level has depth={depth} blocks")
        if isinstance(drop_path, (int, float)):
            drop_path = [float(drop_path)] * depth
        self.blocks = nn.ModuleList([
            NATLayer(dim, num_heads, kernel_size, dilation=self.dilations[j],
                     mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop,
                     attn_drop=attn_drop, drop_path=drop_path[j], norm_layer=norm_layer,
                     layer_scale=layer_scale)
            for j in range(depth)
        ])
        self.downsample = ConvDownsampler(dim, norm_layer=norm_layer) if downsample else None

    def check_resolution(self, height: int, width: int, input_size=None) -> None:
        """ValueError unless every block's kernel_size * dilation fits in height x width."""
        k = self.kernel_size
        for j, d in enumerate(self.dilations):
            if k * d > height or k * d > width:
                where = "" if input_size is None else (
                    f"with input {input_size[0]}x{input_size[1]}, ")
                raise ValueError(
                    f"[NAT] {where}level {self.index} has spatial resolution {height}x{width}, but "
                    f"its block {j} uses kernel_size={k} with dilation={d}, which needs at "
                    f"least kernel_size*dilation={k * d} tokens along each axis; use a larger "
                    "input, or pass a smaller kernel_size / dilations (or fewer levels) "
                    "when building the model")

    def forward(self, x):
        self.check_resolution(int(x.shape[1]), int(x.shape[2]))
        for blk in self.blocks:
            x = blk(x)
        if self.downsample is None:
            return x
        return self.downsample(x)


# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------


def level_resolutions(img_size, num_levels: int = 4) -> List[tuple]:
    """Token grid (H, W) of each level for an input of ``img_size`` (int or (H, W))."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    out = []
    h, w = math.ceil(h / 4), math.ceil(w / 4)
    for _ in range(num_levels):
        out.append((h, w))
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return out


def _per_level(name, value, num_levels):
    if isinstance(value, int) and not isinstance(value, bool):
        return [value] * num_levels
    value = list(value)
    if len(value) != num_levels:
        raise ValueError(f"[NAT] {name}={value} must be an int or have one entry per level "
                         f"({num_levels})")
    return value


def dinat_dilations(depths: Sequence[int], kernel_size: Union[int, Sequence[int]] = 7,
                    img_size=224) -> List[List[int]]:
    """DiNAT's schedule: per level, blocks alternate dilation 1 and the largest
    dilation that fits the level's resolution at ``img_size`` (``floor(L / k)``).

    For depths [3, 4, 6, 5], kernel 7 and 224 x 224 input:
    ``[[1, 8, 1], [1, 4, 1, 4], [1, 2, 1, 2, 1, 2], [1, 1, 1, 1, 1]]``.
    """
    kernel_size = _per_level("kernel_size", kernel_size, len(depths))
    out = []
    for depth, k, (h, w) in zip(depths, kernel_size, level_resolutions(img_size, len(depths))):
        dmax = max(1, min(h, w) // k)
        out.append([1 if j % 2 == 0 else dmax for j in range(depth)])
    return out


class NAT(nn.Module):
    """Neighborhood Attention Transformer.

    Args:
        embed_dim: channels of the first level (doubled at every level).
        mlp_ratio: MLP hidden width / dim.
        depths, num_heads: per level.
        kernel_size: neighborhood size, an int or one per level.
        dilations: ``None`` (dilation 1 everywhere) or one list of per-block
            dilations per level (see ``dinat_dilations``).
        drop_path_rate: stochastic depth, rising linearly to this value.
        layer_scale: ``None`` or the initial value of ``gamma1``/``gamma2``.
        in_chans, num_classes: input channels; classes (0: no head,
            ``forward`` returns the pooled features).
    """

    def __init__(self, embed_dim: int = 64, mlp_ratio: float = 3.0,
                 depths: Sequence[int] = (3, 4, 6, 5), num_heads: Sequence[int] = (2, 4, 8, 16),
                 drop_path_rate: float = 0.2, in_chans: int = 3,
                 kernel_size: Union[int, Sequence[int]] = 7,
                 dilations: Optional[Sequence[Sequence[int]]] = None, num_classes: int = 1000,
                 qkv_bias: bool = True, qk_scale=None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, norm_layer=nn.LayerNorm,
                 layer_scale: Optional[float] = None):
        super().__init__()
        depths = [int(d) for d in depths]
        num_levels = len(depths)
        num_heads = _per_level("num_heads", num_heads, num_levels)
        kernel_size = _per_level("kernel_size", kernel_size, num_levels)
        if dilations is not None:
            dilations = [list(d) for d in dilations]
            if len(dilations) != num_levels:
                raise ValueError(f"[NAT] dilations has {len(dilations)} levels; expected "
                                 f"{num_levels} (one list of per-block dilations per level)")
        self.num_classes = num_classes
        self.num_levels = num_levels
        self.embed_dim = embed_dim
        self.depths = depths
        self.kernel_size = kernel_size
        self.num_features = int(embed_dim * 2 ** (num_levels - 1))
        self.mlp_ratio = mlp_ratio

        self.patch_embed = ConvTokenizer(in_chans, embed_dim, norm_layer=norm_layer)
        self.pos_drop = nn.Dropout(p=drop_rate)
        n = sum(depths)
        dpr = [drop_path_rate * j / (n - 1) if n > 1 else 0.0 for j in range(n)]
        self.levels = nn.ModuleList()
        for i in range(num_levels):
            self.levels.append(NATBlock(
                dim=int(embed_dim * 2 ** i), depth=depths[i], num_heads=num_heads[i],
                kernel_size=kernel_size[i],
                dilations=None if dilations is None else dilations[i],
                downsample=i < num_levels - 1, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate,
                drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])], norm_layer=norm_layer,
                layer_scale=layer_scale, index=i))
        self.norm = norm_layer(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @property
    def dilations(self) -> List[List[int]]:
        return [list(level.dilations) for level in self.levels]

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def no_weight_decay_keywords(self):
        return {"rpb"}

    def check_input_size(self, height: int, width: int) -> None:
        """ValueError if an input of height x width is too small for some level."""
        for level, (h, w) in zip(self.levels, level_resolutions((height, width),
                                                                self.num_levels)):
            level.check_resolution(h, w, (height, width))

    def forward_features(self, x):
        if x.dim() != 4:
            raise ValueError(f"[NAT] expected an image batch [B, C, H, W], got shape "
                             f"{tuple(x.shape)}")
        self.check_input_size(int(x.shape[2]), int(x.shape[3]))
        x = self.pos_drop(self.patch_embed(x))
        for level in self.levels:
            x = level(x)
        x = self.norm(x).flatten(1, 2)                 # [B, H*W, C]
        return self.avgpool(x.transpose(1, 2)).flatten(1)

    def forward(self, x):
        return self.head(self.forward_features(x))


class DiNAT(NAT):
    """Dilated Neighborhood Attention Transformer: NAT whose blocks alternate
    dilation 1 with the largest dilation that fits each level.

    ``dilations=None`` uses ``dinat_dilations(depths, kernel_size, img_size)``
    (by default for 224 x 224 input: 8, 4, 2, 1); pass an explicit per-level
    list of per-block dilations to override it.
    """

    def __init__(self, *, dilations=None, img_size=224, **kwargs):
        if dilations is None:
            dilations = dinat_dilations(kwargs.get("depths", (3, 4, 6, 5)),
                                        kwargs.get("kernel_size", 7), img_size)
        super().__init__(dilations=dilations, **kwargs)


# --------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------

_CONFIGS = {
    "mini": dict(depths=[3, 4, 6, 5], num_heads=[2, 4, 8, 16], embed_dim=64, mlp_ratio=3,
                 drop_path_rate=0.2, layer_scale=None),
    "tiny": dict(depths=[3, 4, 18, 5], num_heads=[2, 4, 8, 16], embed_dim=64, mlp_ratio=3,
                 drop_path_rate=0.2, layer_scale=None),
    "small": dict(depths=[3, 4, 18, 5], num_heads=[3, 6, 12, 24], embed_dim=96, mlp_ratio=2,
                  drop_path_rate=0.3, layer_scale=1e-5),
    "base": dict(depths=[3, 4, 18, 5], num_heads=[4, 8, 16, 32], embed_dim=128, mlp_ratio=2,
                 drop_path_rate=0.5, layer_scale=1e-5),
}

_UNSET = object()


def _build(cls, size, num_classes, in_chans, kernel_size, drop_path_rate, layer_scale,
           **kwargs):
    cfg = dict(_CONFIGS[size])
    if drop_path_rate is not _UNSET:
        cfg["drop_path_rate"] = drop_path_rate
    if layer_scale is not _UNSET:
        cfg["layer_scale"] = layer_scale
    return cls(num_classes=num_classes, in_chans=in_chans, kernel_size=kernel_size,
               **cfg, **kwargs)


def _variant(cls, size, doc):
    def build(num_classes: int = 1000, in_chans: int = 3, kernel_size=7,
              drop_path_rate=_UNSET, layer_scale=_UNSET, **kwargs):
        return _build(cls, size, num_classes, in_chans, kernel_size, drop_path_rate,
                      layer_scale, **kwargs)

    cfg = _CONFIGS[size]
    prefix = "nat" if cls is NAT else "dinat"
    build.__name__ = build.__qualname__ = f"{prefix}_{size}"
    build.__doc__ = (
        f"{doc}-{size.capitalize()}: depths {cfg['depths']}, heads {cfg['num_heads']}, "
        f"dim {cfg['embed_dim']}, mlp ratio {cfg['mlp_ratio']}, layer scale "
        f"{cfg['layer_scale']}, drop path {cfg['drop_path_rate']} (defaults; override with "
        "the keyword arguments). Other keyword arguments go to the "
        f"{cls.__name__} constructor"
        + (" (e.g. dilations=..., img_size=...)." if cls is DiNAT else " (e.g. dilations=...).")
    )
    return build


nat_mini = _variant(NAT, "mini", "NAT")
nat_tiny = _variant(NAT, "tiny", "NAT")
nat_small = _variant(NAT, "small", "NAT")
nat_base = _variant(NAT, "base", "NAT")
dinat_mini = _variant(DiNAT, "mini", "DiNAT")
dinat_tiny = _variant(DiNAT, "tiny", "DiNAT")
dinat_small = _variant(DiNAT, "small", "DiNAT")
dinat_base = _variant(DiNAT, "base", "DiNAT")
