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
* ``NeighborhoodAttention1D/2D/3D`` with NATTEN's parameter names (``qkv``,
  ``rpb``, ``proj``), so its checkpoints load, constructed with NATTEN 0.17's
  arguments or 0.14-0.16's (``bias=``, 3D ``kernel_size_d``/``dilation_d``);
  see ``libna.natten.modules``.
* NATTEN 0.17's switches (``use_fused_na``, ``has_cuda``, ...), which record
  their setting and choose nothing (``libna.natten.context``).

Results equal NATTEN 0.17.5's (``tests/test_natten.py`` compares them,
argument by argument, with a fixture recorded from NATTEN 0.17.5).
"""

import warnings

from . import context, functional, modules
from ._hook import NattenFinder, installed_finder, real_natten
from .context import *  # noqa: F401,F403  (NATTEN's top-level switches)
from .context import __all__ as _context_all
from .modules import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D

# The NATTEN release whose API this module serves, tagged as libna's.
__version__ = "0.17.5+libna"

__all__ = [
    "NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D",
    "functional", "context", "modules", "install", "uninstall", "is_installed", "__version__",
    *_context_all,
]


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
