"""Hugging Face transformers' DiNAT, unmodified, on libna.natten (run by
tests/test_transformers_dinat.py in a fresh process, because the hook must be
in place before transformers is imported).

    python tests/transformers_dinat.py CHECKPOINT_DIR

1. ``libna.natten.install()``; transformers' ``is_natten_available()`` is
   then True and its DiNAT imports ``natten2dqkrpb`` / ``natten2dav`` from it.
2. A small random ``DinatForImageClassification`` runs forward and backward.
3. Its weights, converted with ``libna.models.from_hf_state_dict``, load into
   libna's ``DiNAT`` (``strict=True``): the logits, the pooled features and
   the input gradient agree with transformers' to float64 rounding.
4. ``to_hf_state_dict`` inverts the conversion exactly, and
   ``load_checkpoint`` loads transformers' ``save_pretrained`` safetensors
   into libna's model and a libna ``.pth`` into transformers' model.
"""

import sys

import libna.natten

assert libna.natten.install(), "a real NATTEN is installed; this proof needs the drop-in"

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import DinatConfig, DinatForImageClassification, DinatModel  # noqa: E402
from transformers.models.dinat import modeling_dinat  # noqa: E402
from transformers.utils import is_natten_available  # noqa: E402

import libna.models as models  # noqa: E402


def main(workdir):
    assert transformers.__version__.startswith("4.50."), transformers.__version__
    assert is_natten_available()
    assert modeling_dinat.natten2dqkrpb is libna.natten.functional.natten2dqkrpb

    torch.manual_seed(0)
    depths, heads, dilations = [2, 2], [2, 4], [[1, 2], [1, 1]]
    config = DinatConfig(embed_dim=16, depths=depths, num_heads=heads, kernel_size=3,
                         dilations=dilations, mlp_ratio=2.0, layer_scale_init_value=0.5,
                         drop_path_rate=0.0, num_labels=5)
    hf = DinatForImageClassification(config).double()
    with torch.no_grad():  # every parameter random, so that a misplaced one shows
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 and p.numel() > 2 else 0))
    hf.eval()

    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    logits = hf(pixel_values=x).logits
    g = torch.randn_like(logits)
    logits.backward(g)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in hf.parameters())
    assert any(p.grad.abs().sum() > 0 for n, p in hf.named_parameters() if n.endswith(".rpb"))

    ours = models.NAT(embed_dim=16, mlp_ratio=2.0, depths=depths, num_heads=heads,
                      kernel_size=3, dilations=dilations, num_classes=5, layer_scale=0.5,
                      drop_path_rate=0.0).double().eval()
    hf_sd = hf.state_dict()
    ours.load_state_dict(models.from_hf_state_dict(hf_sd), strict=True)
    x2 = x.detach().clone().requires_grad_(True)
    our_logits = ours(x2)
    our_logits.backward(g)
    torch.testing.assert_close(our_logits, logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-9, atol=1e-10)

    base = DinatModel(config, add_pooling_layer=True).double().eval()
    bare = models.to_hf_state_dict(ours.state_dict(), prefix="")
    base.load_state_dict({k: v for k, v in bare.items() if not k.startswith("classifier.")},
                         strict=True)
    torch.testing.assert_close(base(pixel_values=x.detach()).pooler_output,
                               ours.forward_features(x.detach()), rtol=1e-10, atol=1e-10)

    back = models.to_hf_state_dict(models.from_hf_state_dict(hf_sd))
    assert sorted(back) == sorted(hf_sd)
    assert all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)

    hf.save_pretrained(workdir)  # model.safetensors, as published checkpoints are
    fresh = models.NAT(embed_dim=16, mlp_ratio=2.0, depths=depths, num_heads=heads,
                       kernel_size=3, dilations=dilations, num_classes=5, layer_scale=0.5,
                       drop_path_rate=0.0).double().eval()
    models.load_checkpoint(fresh, f"{workdir}/model.safetensors")
    torch.testing.assert_close(fresh(x.detach()), logits.detach(), rtol=1e-10, atol=1e-10)
    torch.save({"state_dict": ours.state_dict()}, f"{workdir}/ours.pth")
    hf2 = DinatForImageClassification(config).double().eval()
    models.load_checkpoint(hf2, f"{workdir}/ours.pth")
    torch.testing.assert_close(hf2(pixel_values=x.detach()).logits, logits.detach(),
                               rtol=1e-10, atol=1e-10)
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1])
