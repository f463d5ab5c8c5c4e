"""Pictures of neighborhood attention: which keys a query sees, and how a
trained layer weighs them.

    from libna import viz
    viz.plot_neighborhoods((12, 12), [(0, 0), (5, 6)], kernel_size=5, dilations=(1, 2),
                           path="neighborhoods.png")
    records = viz.record_attention(model, images)            # every 2D NA layer
    viz.plot_attention(images[0, 0], records[:2], [(0, 0), (4, 4)], path="attention.png")

* ``neighborhood_mask`` / ``slot_positions``: the keys of one query (from
  ``libna.reference.window``, libna's own window rule: shifted, never
  padded, at the borders; interleaved groups with dilation).
* ``attention_weights(layer, x)``: the softmax weights of a
  ``NeighborhoodAttention2D`` layer for its input ``x`` [B, H, W, dim], as
  ``[B, H, W, heads, k*k]``, computed on the unfused path
  (``libna.torch.na2d_qk`` then softmax).
* ``record_attention(model, images)``: runs ``model`` and returns the
  weights of each of its 2D NA layers (``AttentionRecord``).
* ``attention_map``: a weight vector scattered back onto the token grid.
* ``plot_neighborhoods``, ``plot_attention``: matplotlib figures, saved as
  PNG when ``path`` is given (matplotlib's object API; no pyplot state, no
  display needed).

Needs matplotlib (``pip install matplotlib``); ``record_attention`` and
``attention_weights`` need PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from . import reference

__all__ = [
    "AttentionRecord", "slot_positions", "neighborhood_mask", "attention_map",
    "attention_weights", "record_attention", "plot_neighborhoods", "plot_attention",
]

IntPair = Union[int, Tuple[int, int]]


def _pair(x) -> Tuple[int, int]:
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"[viz] expected an int or a pair, got {x!r}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


def slot_positions(query, shape, kernel_size: IntPair, dilation: IntPair = 1,
                   is_causal=False) -> List[Optional[Tuple[int, int]]]:
    """Key position (row, col) of each of the ``k0*k1`` attention slots of
    ``query`` on a ``shape`` token grid, in libna's slot order (row-major over
    the per-axis window positions); ``None`` for slots a causal window leaves
    empty."""
    ks, dil = _pair(kernel_size), _pair(dilation)
    causal = _pair(is_causal) if isinstance(is_causal, (tuple, list)) else (is_causal,) * 2
    axes = [reference.window(int(query[a]), int(shape[a]), ks[a], dilation=dil[a],
                             is_causal=bool(causal[a]))[0] for a in range(2)]
    out: List[Optional[Tuple[int, int]]] = []
    for a0 in range(ks[0]):
        for a1 in range(ks[1]):
            if a0 < len(axes[0]) and a1 < len(axes[1]):
                out.append((int(axes[0][a0]), int(axes[1][a1])))
            else:
                out.append(None)
    return out


def neighborhood_mask(query, shape, kernel_size: IntPair, dilation: IntPair = 1,
                      is_causal=False) -> np.ndarray:
    """Boolean [H, W] grid: True where ``query`` attends."""
    mask = np.zeros(tuple(int(s) for s in shape), dtype=bool)
    for pos in slot_positions(query, shape, kernel_size, dilation, is_causal):
        if pos is not None:
            mask[pos] = True
    return mask


def attention_map(weights, query, shape, kernel_size: IntPair, dilation: IntPair = 1,
                  is_causal=False) -> np.ndarray:
    """Scatter one query's slot weights (a vector of ``k0*k1``, or ``[heads, k0*k1]``)
    onto the token grid: [H, W] (or [heads, H, W]), NaN outside the neighborhood."""
    w = np.asarray(weights, dtype=np.float64)
    squeeze = w.ndim == 1
    w = np.atleast_2d(w)
    out = np.full((w.shape[0],) + tuple(int(s) for s in shape), np.nan)
    for t, pos in enumerate(slot_positions(query, shape, kernel_size, dilation, is_causal)):
        if pos is not None:
            out[(slice(None),) + pos] = w[:, t]
    return out[0] if squeeze else out


# --------------------------------------------------------------------------
# Attention weights of trained layers
# --------------------------------------------------------------------------


@dataclass
class AttentionRecord:
    """Softmax weights of one 2D NA layer: ``weights`` [B, H, W, heads, k*k]."""

    name: str
    weights: np.ndarray
    kernel_size: Tuple[int, int]
    dilation: Tuple[int, int]
    is_causal: Tuple[bool, bool]

    @property
    def shape(self) -> Tuple[int, int]:
        return tuple(self.weights.shape[1:3])

    def map(self, query, batch_index: int = 0, head=None) -> np.ndarray:
        """[heads, H, W] weights of ``query`` (or [H, W] for one head / ``head="mean"``)."""
        w = self.weights[batch_index][tuple(query)]          # [heads, k*k]
        if head == "mean":
            w = w.mean(0)
        elif head is not None:
            w = w[head]
        return attention_map(w, query, self.shape, self.kernel_size, self.dilation,
                             self.is_causal)


def attention_weights(layer, x):
    """Attention probabilities of a ``libna.torch.nn.NeighborhoodAttention2D``
    for its input ``x`` [B, H, W, dim]: a tensor [B, H, W, heads, k0*k1] whose
    last axis sums to 1 (the unfused path: ``na2d_qk`` with the layer's scale
    and rpb, then softmax). Attention dropout is not applied."""
    import torch

    from .torch import ops

    if x.dim() != 4:
        raise ValueError(f"[attention_weights] expected x of shape [B, H, W, dim], "
                         f"got {tuple(x.shape)}")
    with torch.no_grad():
        b, h, w = x.shape[:3]
        qkv = layer.qkv(x).reshape(b, h, w, 3, layer.num_heads, layer.head_dim)
        q, k, _ = qkv.unbind(dim=3)
        scores = ops.na2d_qk(q * layer.scale, k, layer.kernel_size, dilation=layer.dilation,
                             is_causal=layer.is_causal, rpb=layer.rpb)
        return scores.softmax(dim=-1)


def record_attention(model, inputs, layers: Optional[Sequence[str]] = None
                     ) -> List[AttentionRecord]:
    """Run ``model(inputs)`` (in eval mode, without gradients) and return the
    attention weights of its ``NeighborhoodAttention2D`` layers (all of them, or
    those whose module names are in ``layers``), in forward order."""
    import torch

    from .torch.nn import NeighborhoodAttention2D

    names = {m: n for n, m in model.named_modules()}
    wanted = [m for m, n in names.items() if isinstance(m, NeighborhoodAttention2D)
              and (layers is None or n in layers)]
    if layers is not None:
        missing = set(layers) - {names[m] for m in wanted}
        if missing:
            raise ValueError(f"[record_attention] no NeighborhoodAttention2D named "
                             f"{sorted(missing)} in the model")
    records = []

    def hook(module, args, output):
        w = attention_weights(module, args[0]).float().cpu().numpy()
        records.append(AttentionRecord(names[module], w, tuple(module.kernel_size),
                                       tuple(module.dilation), tuple(module.is_causal)))

    handles = [m.register_forward_hook(hook) for m in wanted]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(inputs)
    finally:
        for hnd in handles:
            hnd.remove()
        model.train(was_training)
    return records


# --------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------


def _figure(nrows, ncols, cell=2.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(cell * ncols + 0.4, cell * nrows + 0.6), layout="constrained")
    axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False))
    return fig, axes


def _grid_axes(ax, shape):
    h, w = shape
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_xticks(np.arange(-0.5, w, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, h, 1), minor=True)
    ax.grid(which="minor", color="0.75", linewidth=0.4)
    ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
    ax.set_aspect("equal")


def _background(ax, image, shape):
    h, w = shape
    if image is not None:
        img = np.asarray(image, dtype=np.float64)
        ax.imshow(img, cmap="gray_r" if img.ndim == 2 else None, alpha=0.35,
                  extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="nearest")


def _draw_query(ax, query):
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((query[1] - 0.5, query[0] - 0.5), 1, 1, fill=False,
                           edgecolor="red", linewidth=2.0, zorder=5))


def _draw_neighborhood(ax, query, shape, kernel_size, dilation, is_causal, image=None):
    """Keys in blue; dashed: where a window centred on the query (zero-padded,
    as in a convolution) would be -- the difference is libna's border shift."""
    from matplotlib.patches import Rectangle

    ks, dil = _pair(kernel_size), _pair(dilation)
    _grid_axes(ax, shape)
    _background(ax, image, shape)
    mask = neighborhood_mask(query, shape, ks, dil, is_causal)
    overlay = np.where(mask, 1.0, np.nan)
    ax.imshow(overlay, cmap="Blues", vmin=0, vmax=1.4, alpha=0.8,
              extent=(-0.5, shape[1] - 0.5, shape[0] - 0.5, -0.5), interpolation="nearest")
    rows, cols = np.nonzero(mask)
    ax.add_patch(Rectangle((cols.min() - 0.5, rows.min() - 0.5), cols.max() - cols.min() + 1,
                           rows.max() - rows.min() + 1, fill=False, edgecolor="tab:blue",
                           linewidth=1.2, zorder=4))
    if not any(np.atleast_1d(is_causal)):
        half = [(ks[a] // 2) * dil[a] for a in range(2)]
        ax.add_patch(Rectangle((query[1] - half[1] - 0.5, query[0] - half[0] - 0.5),
                               2 * half[1] + 1, 2 * half[0] + 1, fill=False,
                               edgecolor="0.3", linestyle="--", linewidth=1.0, zorder=3,
                               clip_on=True))
    _draw_query(ax, query)


def _label(kernel_size, dilation):
    ks, dil = _pair(kernel_size), _pair(dilation)
    k = f"{ks[0]}" if ks[0] == ks[1] else f"{ks[0]}x{ks[1]}"
    d = f"{dil[0]}" if dil[0] == dil[1] else f"{dil}"
    return f"k={k}, dilation {d}"


def _save(fig, path, dpi):
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig


def plot_neighborhoods(shape, queries, kernel_size: IntPair, dilations: Sequence[IntPair] = (1,),
                       *, is_causal=False, image=None, path=None, dpi: int = 120):
    """One panel per (query, dilation): the query (red), the keys it attends
    (blue, with their bounding box), and dashed, the zero-padded centred window
    it would have without libna's border shift. Returns the matplotlib Figure;
    writes a PNG to ``path`` if given."""
    shape = tuple(int(s) for s in shape)
    queries = [tuple(int(i) for i in q) for q in queries]
    fig, axes = _figure(len(queries), len(dilations))
    ks = _pair(kernel_size)
    for r, q in enumerate(queries):
        for c, d in enumerate(dilations):
            ax = axes[r, c]
            _draw_neighborhood(ax, q, shape, ks, d, is_causal, image)
            ax.set_title(f"query {q}: {_label(ks, d)}", fontsize=8)
    fig.suptitle("neighborhoods (blue) of query tokens (red); dashed: centred window "
                 "without the border shift", fontsize=9)
    return _save(fig, path, dpi)


def plot_attention(image, records: Sequence[AttentionRecord], queries, *, batch_index: int = 0,
                   per_head: bool = True, show_neighborhood: bool = True,
                   cmap: str = "magma", path=None, dpi: int = 120, title: Optional[str] = None):
    """For each query (rows) and each recorded layer: its neighborhood panel
    (if ``show_neighborhood``) and the attention weights over the key tokens,
    one panel per head (``per_head``) or averaged over heads, drawn over the
    image (stretched onto the layer's token grid). Returns the Figure; writes a
    PNG to ``path`` if given."""
    queries = [tuple(int(i) for i in q) for q in queries]
    if not records:
        raise ValueError("[plot_attention] records is empty (no NA layers recorded?)")
    per_layer = (int(show_neighborhood)
                 + (max(r.weights.shape[3] for r in records) if per_head else 1))
    fig, axes = _figure(len(queries), per_layer * len(records))
    for r, q in enumerate(queries):
        for li, rec in enumerate(records):
            c = li * per_layer
            shape = rec.shape
            if any(qi >= s for qi, s in zip(q, shape)):
                raise ValueError(f"[plot_attention] query {q} is outside layer {rec.name}'s "
                                 f"token grid {shape}")
            if show_neighborhood:
                ax = axes[r, c]
                _draw_neighborhood(ax, q, shape, rec.kernel_size, rec.dilation,
                                   rec.is_causal, image)
                ax.set_title(f"{rec.name}\nquery {q}: {_label(rec.kernel_size, rec.dilation)}",
                             fontsize=7)
                c += 1
            heads = rec.weights.shape[3]
            maps = rec.map(q, batch_index) if per_head else rec.map(q, batch_index,
                                                                     head="mean")[None]
            for hi, amap in enumerate(maps):
                ax = axes[r, c + hi]
                _grid_axes(ax, shape)
                _background(ax, image, shape)
                im = ax.imshow(amap, cmap=cmap, vmin=0.0, vmax=float(np.nanmax(amap)),
                               alpha=0.85, interpolation="nearest",
                               extent=(-0.5, shape[1] - 0.5, shape[0] - 0.5, -0.5))
                _draw_query(ax, q)
                ax.set_title(f"head {hi}" if per_head else f"mean of {heads} heads",
                             fontsize=7)
                fig.colorbar(im, ax=ax, shrink=0.7, pad=0.02).ax.tick_params(labelsize=5)
    for ax in axes.flat:
        if not ax.has_data():
            ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path, dpi)
