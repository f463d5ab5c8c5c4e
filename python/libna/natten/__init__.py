"""NATTEN's older Python API (0.14 to 0.17), served by libna.

Code written against NATTEN runs on libna by importing this module in
NATTEN's place: directly (``import libna.natten as natten``), or, for code
that must stay unmodified, through ``libna.natten.install()``, after which
``import natten`` and ``from natten.functional import natten2dqkrpb`` find
this module (and ``importlib.metadata.version("natten")`` answers
``__version__``) whenever the real NATTEN is not installed:

    import libna.natten
    libna.natten.install()                 # before transformers is imported
    from transformers import DinatModel   # its NATTEN check now passes

* ``natten.functional``: the unfused ops (heads-first) under their 0.14-0.16
  names (``natten2dqkrpb``, ``natten2dqk``, ``natten2dav``, ...) and their
  0.17 names (``na2d_qk``, ``na2d_av``), and the fused ``na1d/na2d/na3d``
  (heads-last); see ``libna.natten.functional``.
* ``NeighborhoodAttention1D/2D/3D`` with NATTEN 0.17's arguments and
  parameter names (``qkv``, ``rpb``, ``proj``), so its checkpoints load.
* NATTEN 0.17's switches (``use_fused_na``, ``has_cuda``, ...), which record
  their setting and choose nothing (``libna.natten.context``).

Results equal NATTEN 0.17.5's (``tests/test_natten.py`` compares them,
argument by argument, with a fixture recorded from NATTEN 0.17.5).
"""

import warnings

from .._public import public
from ..torch import nn as _nn
from . import context, functional
from ._hook import NattenFinder, installed_finder, real_natten
from .context import *  # noqa: F401,F403  (NATTEN's top-level switches)
from .context import __all__ as _context_all

# The NATTEN release whose API this module serves, tagged as libna's.
__version__ = "0.17.5+libna"

__all__ = [
    "NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D",
    "functional", "context", "install", "uninstall", "is_installed", "__version__",
    *_context_all,
]


def _module(base, rank):
    spatial = {1: "[B, L, dim]", 2: "[B, H, W, dim]", 3: "[B, T, H, W, dim]"}[rank]

    class Module(base):
        __doc__ = (
            f"NATTEN 0.17's ``NeighborhoodAttention{rank}D`` over x {spatial}: its arguments "
            "and defaults (``rel_pos_bias=False``) and parameter names (``qkv``, ``rpb``, "
            "``proj``). ``use_experimental_ops`` is accepted and changes nothing (libna's "
            "ops work under torch.compile anyway).")

        def __init__(self, dim, num_heads, kernel_size, dilation=1, is_causal=False,
                     rel_pos_bias=False, qkv_bias=True, qk_scale=None, attn_drop=0.0,
                     proj_drop=0.0, use_experimental_ops=False):
            super().__init__(dim, num_heads, kernel_size, dilation=dilation,
                             is_causal=is_causal, rel_pos_bias=rel_pos_bias,
                             qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
                             proj_drop=proj_drop)
            self.use_experimental_ops = bool(use_experimental_ops)

    name = f"NeighborhoodAttention{rank}D"
    Module.__name__ = Module.__qualname__ = name
    Module.__module__ = __name__
    Module.__init__ = public(Module.__init__, name, f"natten.{name}")
    return Module


NeighborhoodAttention1D = _module(_nn.NeighborhoodAttention1D, 1)
NeighborhoodAttention2D = _module(_nn.NeighborhoodAttention2D, 2)
NeighborhoodAttention3D = _module(_nn.NeighborhoodAttention3D, 3)


def install() -> bool:
    """Serve ``import natten`` (and ``natten.*``) from this module, and
    ``importlib.metadata.version("natten")`` from ``__version__``, unless the
    real NATTEN is installed.

    Returns True when the hook is in place (also when it already was), False
    when a real NATTEN was found: that one stays, and a RuntimeWarning says
    where it is. Call it before importing code that checks for NATTEN at
    import time (transformers does).
    """
    if installed_finder() is not None:
        return True
    found = real_natten()
    if found is not None:
        warnings.warn(
            f"libna.natten.install() did nothing: a real NATTEN is installed ({found}), and "
            "`import natten` keeps importing it", RuntimeWarning, stacklevel=2)
        return False
    import sys

    sys.meta_path.insert(0, NattenFinder())
    return True


def uninstall() -> bool:
    """Remove the hook (and the ``natten`` modules it served); True if it was
    installed."""
    import sys

    finder = installed_finder()
    if finder is None:
        return False
    sys.meta_path.remove(finder)
    for name in [n for n in sys.modules if n == "natten" or n.startswith("natten.")]:
        if getattr(sys.modules[name], "__name__", "").startswith(__name__):
            del sys.modules[name]
    return True


def is_installed() -> bool:
    """Whether ``install()``'s hook is in place."""
    return installed_finder() is not None
