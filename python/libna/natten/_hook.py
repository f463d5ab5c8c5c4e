"""The ``import natten`` hook behind ``libna.natten.install()``.

A meta-path finder that answers two questions for the name ``natten``:

* ``importlib.util.find_spec("natten")`` and ``import natten`` /
  ``from natten.functional import ...``: the spec of the matching
  ``libna.natten`` module (the same module object, under both names);
* ``importlib.metadata.version("natten")`` (and ``distribution``,
  ``distributions``): a distribution whose metadata names ``natten`` at
  ``libna.natten.__version__``.

Availability checks such as transformers 4.x's ``is_natten_available()`` ask
both, and cache the answer at import, so the hook must be in place before
they run.
"""

import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import re
import sys

_TOP = "natten"
_TARGET = "libna.natten"


# Where older NATTEN kept its modules: natten.natten{1,2,3}d (0.14-0.17, the
# last deprecated) and natten.na{1,2,3}d (0.17), each holding
# NeighborhoodAttention{1,2,3}D; the drop-in has them all in one module.
_MODULE_PATHS = {f"{_TOP}.{prefix}{rank}d": _TARGET + ".modules"
                 for prefix in ("natten", "na") for rank in (1, 2, 3)}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class _AliasLoader(importlib.abc.Loader):
    """Loads ``natten.X`` as the already imported ``libna.natten.X``."""

    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self.own_spec = module.__spec__
        return module

    def exec_module(self, module):
        # Executed when libna.natten.X was imported; importlib has just set
        # its __spec__ to natten.X's, which would make its relative imports
        # resolve against `natten`: restore it.
        module.__spec__ = self.own_spec


class NattenDistribution(importlib.metadata.Distribution):
    """Metadata of the drop-in, as ``importlib.metadata`` reads a package's."""

    def read_text(self, filename):
        from . import __version__

        if filename in ("METADATA", "PKG-INFO"):
            return (f"Metadata-Version: 2.1\nName: {_TOP}\nVersion: {__version__}\n"
                    "Summary: NATTEN's Python API served by libna (libna.natten.install())\n")
        if filename == "top_level.txt":
            return f"{_TOP}\n"
        return None

    def locate_file(self, path):
        import pathlib

        return pathlib.Path(__file__).parent / path


class NattenFinder(importlib.metadata.DistributionFinder):
    """Meta-path finder that serves ``natten`` and ``natten.*`` from libna.natten."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TOP and not fullname.startswith(_TOP + "."):
            return None
        alias = _MODULE_PATHS.get(fullname, _TARGET + fullname[len(_TOP):])
        try:
            module = importlib.import_module(alias)
        except ModuleNotFoundError as error:
            if error.name == alias:
                return None  # natten.X that the drop-in does not have
            raise
        spec = importlib.machinery.ModuleSpec(
            fullname, _AliasLoader(alias), is_package=hasattr(module, "__path__"))
        if hasattr(module, "__path__"):
            spec.submodule_search_locations = list(module.__path__)
        return spec

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
        name = getattr(context, "name", None)
        if name is None or _normalise(name) == _TOP:
            return iter([NattenDistribution()])
        return iter([])

    def invalidate_caches(self):
        pass


def installed_finder():
    """The finder in sys.meta_path, or None."""
    for finder in sys.meta_path:
        if isinstance(finder, NattenFinder):
            return finder
    return None


def real_natten():
    """Where a NATTEN other than this drop-in is found, or None."""
    module = sys.modules.get(_TOP)
    if module is not None:
        if getattr(module, "__name__", None) == _TARGET:
            return None
        return getattr(module, "__file__", None) or repr(module)
    for finder in sys.meta_path:
        if isinstance(finder, NattenFinder) or not hasattr(finder, "find_spec"):
            continue
        try:
            spec = finder.find_spec(_TOP, None)
        except (ImportError, ValueError):
            continue
        if spec is not None:
            return spec.origin or (list(spec.submodule_search_locations or []) or [_TOP])[0]
    return None
