"""Multiply-add counting for the models (``libna.models.flops``)."""

import math

import torch
from torch import nn

from ..torch.nn import _NeighborhoodAttention

__all__ = ["flops", "count_parameters"]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (works on the meta device too)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _in_channels(model):
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return m.in_channels
    return 3


def _input_shape(input_size, channels):
    if isinstance(input_size, int):
        return (1, channels, input_size, input_size)
    size = tuple(int(s) for s in input_size)
    if len(size) == 2:
        return (1, channels) + size
    if len(size) == 3:
        return (1,) + size
    if len(size) == 4:
        return size
    raise ValueError(f"[flops] input_size={input_size!r} must be an int (square image), "
                     "(H, W), (C, H, W) or (B, C, H, W)")


def flops(model: nn.Module, input_size=224, *, include_norms: bool = False,
          by_module: bool = False):
    """Multiply-adds of one forward pass of ``model`` on an input of ``input_size``
    (an int for a square image, ``(H, W)``, ``(C, H, W)`` or ``(B, C, H, W)``;
    without a batch axis the batch is 1, without channels they are the first
    convolution's input channels).

    Counted: convolutions (``out.numel() * C_in/groups * kh * kw``), linear layers
    (``out.numel() * in_features``) and neighborhood attention analytically,
    ``2 * tokens * dim * prod(kernel_size)`` for the q.k scores and the weighted
    sum over v (the rpb add, softmax, activations and pooling are not counted,
    as in the NAT papers' fvcore figures; causal windows are counted full).
    ``include_norms=True`` adds LayerNorm / BatchNorm at 5 ops per element
    (fvcore's convention). The model is not run for real: a forward pass on the
    meta device (its parameters swapped for meta tensors with
    ``torch.func.functional_call``) only propagates shapes, so this is fast
    for any model size; the model's own parameters are left untouched.

    Returns the total (an int), or with ``by_module=True`` a dict
    ``{module name: multiply-adds}`` too, as ``(total, dict)``.
    """
    shape = _input_shape(input_size, _in_channels(model))
    counts = {}
    names = {m: n for n, m in model.named_modules()}

    def add(module, value):
        name = names.get(module, type(module).__name__)
        counts[name] = counts.get(name, 0) + int(value)

    def hook(module, inputs, output):
        if isinstance(module, _NeighborhoodAttention):
            x = inputs[0]
            tokens = math.prod(x.shape[:-1])
            add(module, 2 * tokens * module.dim * math.prod(module.kernel_size))
        elif isinstance(module, nn.modules.conv._ConvNd):
            add(module, output.numel() * (module.in_channels // module.groups)
                * math.prod(module.kernel_size))
        elif isinstance(module, nn.Linear):
            add(module, output.numel() * module.in_features)
        elif include_norms and isinstance(module, (nn.LayerNorm, nn.modules.batchnorm._NormBase,
                                                   nn.GroupNorm)):
            add(module, 5 * output.numel())

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    was_training = model.training
    try:
        model.eval()
        tensors = {n: torch.empty_like(t, device="meta")
                   for n, t in (*model.named_parameters(), *model.named_buffers())}
        x = torch.empty(shape, device="meta")
        with torch.no_grad():
            torch.func.functional_call(model, tensors, (x,), strict=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    total = sum(counts.values())
    return (total, counts) if by_module else total
