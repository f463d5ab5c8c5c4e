"""``NeighborhoodAttention1D/2D/3D`` as NATTEN 0.14 to 0.17 constructed them.

The modules are libna's (``libna.torch.nn``), with NATTEN's parameter names
(``qkv``, ``rpb``, ``proj``) in every release, so checkpoints of any of them
load. What changed between releases is how the constructor is called:

* 0.17: ``(dim, num_heads, kernel_size, dilation=1, is_causal=False,
  rel_pos_bias=False, qkv_bias=True, qk_scale=None, attn_drop=0.0,
  proj_drop=0.0, use_experimental_ops=False)``, per-axis tuples allowed;
* 0.14.5 to 0.15.1 (there is no 0.16 release), 1D and 2D:
  ``(dim, num_heads, kernel_size, dilation=1, bias=True, qkv_bias=True,
  qk_scale=None, attn_drop=0.0, proj_drop=0.0)``, ints only, ``dilation=None``
  meaning 1; 3D (0.15): ``(dim, num_heads, kernel_size, kernel_size_d=None,
  dilation=1, dilation_d=None, bias=True, ...)``, the depth axis apart.

A call is read against both. Keywords tell them apart (``bias``,
``kernel_size_d``, ``dilation_d`` are the older ones; ``is_causal``,
``rel_pos_bias``, ``use_experimental_ops`` 0.17's), and so do the types of
positional arguments (0.17's fifth is ``is_causal``, the older one's
``bias``). A positional call that fits both and means different things under
each raises TypeError naming both signatures; so does one that fits neither.

The relative positional bias defaults differ (0.14-0.16 ``bias=True``, 0.17
``rel_pos_bias=False``). A module built without saying either way follows
0.17 (no bias) until it loads a state dict that has one: then it takes the
bias on, as the older release would have built it. Said explicitly, the
setting is kept, and a checkpoint that disagrees fails to load (``rpb``
missing or unexpected), as in NATTEN.
"""

import inspect
import numbers

import torch
from torch import nn

from .._ops import _is_bool, _is_int
from ..torch import nn as _nn

__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]

_P = inspect.Parameter

# Kinds of value each slot accepts, used to tell the signatures apart.
_INT, _INT_OR_NONE, _INT_OR_TUPLE = "an int", "an int or None", "an int or a tuple of ints"
_BOOL, _BOOL_OR_TUPLE = "a bool", "a bool or a tuple of bools"
_REAL, _REAL_OR_NONE = "a real number", "a real number or None"


def _is_real(value):
    return isinstance(value, numbers.Real) and not _is_bool(value)


_FITS = {
    _INT: _is_int,
    _INT_OR_NONE: lambda v: v is None or _is_int(v),
    _INT_OR_TUPLE: lambda v: _is_int(v) or (isinstance(v, (tuple, list))
                                            and all(_is_int(x) for x in v)),
    _BOOL: _is_bool,
    _BOOL_OR_TUPLE: lambda v: _is_bool(v) or (isinstance(v, (tuple, list))
                                              and all(_is_bool(x) for x in v)),
    _REAL: _is_real,
    _REAL_OR_NONE: lambda v: v is None or _is_real(v),
}

_NATTEN_017 = (
    ("dim", _INT, _P.empty), ("num_heads", _INT, _P.empty), ("kernel_size", _INT_OR_TUPLE, _P.empty),
    ("dilation", _INT_OR_TUPLE, 1), ("is_causal", _BOOL_OR_TUPLE, False),
    ("rel_pos_bias", _BOOL, False), ("qkv_bias", _BOOL, True), ("qk_scale", _REAL_OR_NONE, None),
    ("attn_drop", _REAL, 0.0), ("proj_drop", _REAL, 0.0), ("use_experimental_ops", _BOOL, False),
)
_TAIL_014 = (("bias", _BOOL, True), ("qkv_bias", _BOOL, True), ("qk_scale", _REAL_OR_NONE, None),
             ("attn_drop", _REAL, 0.0), ("proj_drop", _REAL, 0.0))
_NATTEN_014 = {
    1: (("dim", _INT, _P.empty), ("num_heads", _INT, _P.empty), ("kernel_size", _INT, _P.empty),
        ("dilation", _INT_OR_NONE, 1)) + _TAIL_014,
    3: (("dim", _INT, _P.empty), ("num_heads", _INT, _P.empty), ("kernel_size", _INT, _P.empty),
        ("kernel_size_d", _INT_OR_NONE, None), ("dilation", _INT_OR_NONE, 1),
        ("dilation_d", _INT_OR_NONE, None)) + _TAIL_014,
}
_NATTEN_014[2] = _NATTEN_014[1]


def _shown(slots) -> str:
    return "(" + ", ".join(name if default is _P.empty else f"{name}={default!r}"
                           for name, _, default in slots) + ")"


class _Reading:
    """A call read against one NATTEN signature: the module configuration it
    means, or why it does not fit."""

    def __init__(self, release, slots, args, kwargs):
        self.release, self.slots = release, slots
        self.given, self.problem = {}, None
        names = [name for name, _, _ in slots]
        if len(args) > len(slots):
            self.problem = f"takes at most {len(slots)} arguments, got {len(args)} positional"
            return
        for (name, kind, _), value in zip(slots, args):
            if not _FITS[kind](value):
                self.problem = f"its argument {name} must be {kind}, got {value!r}"
                return
            self.given[name] = value
        kinds = {name: kind for name, kind, _ in slots}
        for name, value in kwargs.items():
            if name not in names:
                self.problem = f"it has no argument {name}"
                return
            if name in self.given:
                self.problem = f"{name} is given both by position and by keyword"
                return
            # 0.17's keywords are checked by libna's module, which names them
            if release != "0.17" and not _FITS[kinds[name]](value):
                self.problem = f"its argument {name} must be {kinds[name]}, got {value!r}"
                return
            self.given[name] = value
        missing = [name for name, _, default in slots if default is _P.empty
                   and name not in self.given]
        if missing:
            self.problem = f"its argument {missing[0]} is missing"

    def config(self, rank):
        """Keywords of libna's module; rel_pos_bias None when the call left it
        to the default (which differs between releases)."""
        given, slots = self.given, {name: default for name, _, default in self.slots}
        value = {name: given.get(name, default) for name, default in slots.items()}
        if value["dilation"] is None:  # 0.14-0.16 took None for 1; 0.17 is read alike
            value["dilation"] = 1
        config = {name: value[name] for name in ("dim", "num_heads", "qkv_bias", "qk_scale",
                                                 "attn_drop", "proj_drop")}
        if self.release == "0.17":
            config.update(kernel_size=value["kernel_size"], dilation=value["dilation"],
                          is_causal=value["is_causal"], rel_pos_bias=given.get("rel_pos_bias"),
                          use_experimental_ops=value["use_experimental_ops"])
        else:
            kernel_size, dilation = value["kernel_size"], value["dilation"]
            if rank == 3:  # NATTEN: `kernel_size_d or kernel_size`, `dilation_d or dilation`
                kernel_size = (value["kernel_size_d"] or kernel_size, kernel_size, kernel_size)
                dilation = (value["dilation_d"] or dilation, dilation, dilation)
            config.update(kernel_size=kernel_size, dilation=dilation, is_causal=False,
                          rel_pos_bias=given.get("bias"), use_experimental_ops=False)
        return config


def _same_module(a, b, rank) -> bool:
    """Whether two configurations build the same module (an unsaid
    rel_pos_bias agrees with False, the default a checkpoint cannot contradict
    unless it has a bias)."""
    def per_axis(value):
        return tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank

    for name in a:
        x, y = a[name], b[name]
        if name in ("kernel_size", "dilation", "is_causal"):
            x, y = per_axis(x), per_axis(y)
        elif name == "rel_pos_bias":
            x, y = bool(x), bool(y)
        if x != y:
            return False
    return True


def _resolve(name, rank, args, kwargs):
    """libna's module keywords for a NATTEN 0.14-0.17 constructor call."""
    signatures = {"0.17": _NATTEN_017, "0.14-0.16": _NATTEN_014[rank]}
    expected = " or ".join(f"NATTEN {release}'s {name}{_shown(slots)}"
                           for release, slots in signatures.items())
    readings = [_Reading(release, slots, args, kwargs) for release, slots in signatures.items()]
    fitting = [r for r in readings if r.problem is None]
    if not fitting:
        why = "; ".join(f"not NATTEN {r.release}'s: {r.problem}" for r in readings)
        raise TypeError(f"[{name}] the call fits no NATTEN signature ({why}); expected "
                        f"{expected}")
    configs = [r.config(rank) for r in fitting]
    if len(fitting) == 2 and not _same_module(*configs, rank):
        meanings = [f"argument {i + 1} ({args[i]!r}) is {a} in NATTEN 0.17, {b} in 0.14-0.16"
                    for i, ((a, _, _), (b, _, _)) in enumerate(zip(*(r.slots for r in fitting)))
                    if i < len(args) and a != b]
        raise TypeError(
            f"[{name}] positional arguments after (dim, num_heads, kernel_size) mean different "
            f"modules in NATTEN 0.17 and 0.14-0.16 ({'; '.join(meanings)}); pass them by "
            f"keyword; expected {expected}")
    config = configs[0]
    if len(fitting) == 2 and config["rel_pos_bias"] is None:
        config["rel_pos_bias"] = configs[1]["rel_pos_bias"]
    if len(args) >= 3 and _is_int(args[1]) and _is_int(args[2]) and _is_int(args[0]) \
            and args[1] > 0 and args[0] % args[1] != 0 and args[2] > 0 and args[0] % args[2] == 0:
        raise TypeError(
            f"[{name}] num_heads={args[1]} does not divide dim={args[0]}, but the third "
            f"argument ({args[2]}) would: NATTEN 0.13 and early 0.14 took (dim, kernel_size, "
            f"num_heads, ...); pass them by keyword; expected {expected}")
    return config


def _module(base, rank):
    spatial = {1: "[B, L, dim]", 2: "[B, H, W, dim]", 3: "[B, T, H, W, dim]"}[rank]
    name = f"NeighborhoodAttention{rank}D"
    names_017 = {n for n, _, _ in _NATTEN_017}
    older = [n for n, _, _ in _NATTEN_014[rank] if n not in names_017]

    class Module(base):
        __doc__ = (
            f"NATTEN's ``{name}`` over x {spatial}, as NATTEN 0.17 and 0.14-0.16 built it: "
            "parameter names ``qkv``, ``rpb``, ``proj``; 0.17's arguments, and the older "
            f"ones ({', '.join(older)}), by keyword or in their old "
            "positions where the call is unambiguous (see ``libna.natten.modules``). "
            "``use_experimental_ops`` is accepted and changes nothing.")

        def __init__(self, *args, **kwargs):
            config = _resolve(name, rank, args, kwargs)
            rel_pos_bias = config.pop("rel_pos_bias")
            use_experimental_ops = config.pop("use_experimental_ops")
            super().__init__(rel_pos_bias=bool(rel_pos_bias), **config)
            self.use_experimental_ops = bool(use_experimental_ops)
            # None: left to the default, so a checkpoint with a bias may turn it on
            self.rel_pos_bias_setting = rel_pos_bias

        if rank < 3:
            def forward(self, x):
                # NATTEN 0.14-0.16 zero-padded a 1D/2D input shorter than the
                # window (kernel_size * dilation) at the end of each axis and
                # cropped the output; 0.17 refused it. Padded, it runs here too.
                window = [k * d for k, d in zip(self.kernel_size, self.dilation)]
                extents = x.shape[1:1 + rank]
                short = [max(0, w - n) for w, n in zip(window, extents)]
                if x.dim() != rank + 2 or not any(short):
                    return super().forward(x)
                padding = [0, 0]
                for missing in reversed(short):
                    padding += [0, missing]
                out = super().forward(torch.nn.functional.pad(x, padding))
                return out[(slice(None), *(slice(0, n) for n in extents))]

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                                  missing_keys, unexpected_keys, error_msgs):
            # Said explicitly, the setting stays (a checkpoint that disagrees
            # has "rpb" missing or unexpected); left unsaid, NATTEN 0.14-0.16's
            # default (bias=True) is taken on when the state dict has one.
            if prefix + "rpb" in state_dict and self.rpb is None \
                    and self.rel_pos_bias_setting is None and not any(self.is_causal):
                weight = self.qkv.weight
                self.rpb = nn.Parameter(torch.zeros(
                    self.num_heads, *(2 * k - 1 for k in self.kernel_size),
                    device=weight.device, dtype=weight.dtype))
                self.rel_pos_bias = True
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                          missing_keys, unexpected_keys, error_msgs)

    # What inspect.signature and help() show: 0.17's arguments, then the older
    # ones, keyword-only here (positionally they are read as described above).
    parameters = [_P("self", _P.POSITIONAL_OR_KEYWORD)]
    parameters += [_P(n, _P.POSITIONAL_OR_KEYWORD, default=d) for n, _, d in _NATTEN_017]
    # bias=None: left unsaid, as explained in libna.natten.modules
    parameters += [_P(n, _P.KEYWORD_ONLY, default=None) for n in older]
    Module.__init__.__signature__ = inspect.Signature(parameters)
    Module.__name__ = Module.__qualname__ = name
    Module.__module__ = "libna.natten"
    return Module


NeighborhoodAttention1D = _module(_nn.NeighborhoodAttention1D, 1)
NeighborhoodAttention2D = _module(_nn.NeighborhoodAttention2D, 2)
NeighborhoodAttention3D = _module(_nn.NeighborhoodAttention3D, 3)
