"""NAT and DiNAT image classifiers built on libna's neighborhood attention.

    import libna.models
    model = libna.models.nat_mini(num_classes=1000)          # or dinat_tiny, nat_base, ...
    model.load_state_dict(torch.load("nat_mini.pth")["state_dict"])   # original checkpoints
    print(libna.models.flops(model, 224))                    # multiply-adds, ~2.7e9

The parameter names are those of the NAT / DiNAT papers' code, so their
checkpoints load with ``strict=True``. Inputs are ``[B, C, H, W]`` images of
any size for which each level still holds ``kernel_size * dilation`` tokens
along each axis (``level_resolutions`` says what each level sees); see
``libna.models.nat`` for the details and for building small configurations
with ``NAT(...)``.

``to_hf_state_dict`` / ``from_hf_state_dict`` convert state dicts between
these names and Hugging Face transformers' (``DinatModel``, ``NatModel``);
``load_checkpoint(model, path)`` loads a local ``.pth`` / ``.bin`` /
``.safetensors`` file of either kind (``libna.models.checkpoints``).
"""

from ._counting import count_parameters, flops
from .checkpoints import from_hf_state_dict, load_checkpoint, read_checkpoint, to_hf_state_dict
from .nat import (
    NAT, DiNAT, NATLayer, NATBlock, ConvTokenizer, ConvDownsampler, Mlp, DropPath,
    dinat_dilations, level_resolutions,
    nat_mini, nat_tiny, nat_small, nat_base,
    dinat_mini, dinat_tiny, dinat_small, dinat_base,
)

__all__ = [
    "NAT", "DiNAT", "NATLayer", "NATBlock", "ConvTokenizer", "ConvDownsampler", "Mlp",
    "DropPath", "dinat_dilations", "level_resolutions", "flops", "count_parameters",
    "nat_mini", "nat_tiny", "nat_small", "nat_base",
    "dinat_mini", "dinat_tiny", "dinat_small", "dinat_base",
    "to_hf_state_dict", "from_hf_state_dict", "load_checkpoint", "read_checkpoint",
]
