"""NATTEN 0.17's global switches (``natten.use_fused_na()`` and friends).

libna has one implementation of each op on each device, so these switches
choose nothing: they record the setting and report it back, so that code
which sets and queries them runs unchanged. The ``has_*`` queries describe
libna: fused attention, float16 and bfloat16 run everywhere (CPU included);
NATTEN's GEMM-based kernels do not exist here.
"""

from typing import Optional

import torch

__all__ = [
    "are_deterministic_algorithms_enabled", "disable_autotuner", "disable_gemm_na",
    "disable_tf32", "disable_tiled_na", "enable_gemm_na", "enable_tf32", "enable_tiled_na",
    "force_flex_attention", "get_memory_usage_preference", "has_bfloat", "has_cuda", "has_fna",
    "has_fp32_gemm", "has_fp64_gemm", "has_fused_na", "has_gemm", "has_half", "has_tf32_gemm",
    "is_autotuner_enabled", "is_autotuner_enabled_for_backward",
    "is_autotuner_enabled_for_forward", "is_autotuner_thorough_for_backward",
    "is_autotuner_thorough_for_forward", "is_fna_enabled", "is_fused_na_enabled",
    "is_gemm_na_enabled", "is_kv_parallelism_in_fused_na_enabled", "is_memory_usage_default",
    "is_memory_usage_strict", "is_memory_usage_unrestricted", "is_tf32_in_gemm_na_enabled",
    "is_tiled_na_enabled", "set_memory_usage_preference", "use_autotuner",
    "use_deterministic_algorithms", "use_flex_attention", "use_fna", "use_fused_na",
    "use_gemm_na", "use_kv_parallelism_in_fused_na", "use_tf32_in_gemm_na", "use_tiled_na",
]

_state = {
    "fused_na": False, "kv_parallel": False, "flex": False, "force_flex": False,
    "deterministic": False, "autotuner": (False, False, False, False), "memory": "default",
    "tf32": True, "tiled": True, "gemm": False,
}


def use_fused_na(mode: bool = True, kv_parallel: bool = True, use_flex_attention: bool = False,
                 force_flex_attention: bool = False):
    """Records NATTEN's fused-NA switch (and its kv-parallel and flex-attention
    options, which count only with mode); libna's ops are fused either way."""
    _state["fused_na"] = bool(mode)
    _state["kv_parallel"] = bool(mode and kv_parallel)
    _state["flex"] = bool(mode and use_flex_attention)
    _state["force_flex"] = bool(mode and force_flex_attention)


use_fna = use_fused_na


def is_fused_na_enabled() -> bool:
    """Whether ``use_fused_na`` last turned the switch on."""
    return _state["fused_na"]


is_fna_enabled = is_fused_na_enabled


def use_flex_attention():
    """``use_fused_na(True, use_flex_attention=True)``: recorded only."""
    use_fused_na(True, use_flex_attention=True)


def force_flex_attention():
    """``use_fused_na`` with flex attention forced: recorded only."""
    use_fused_na(True, use_flex_attention=True, force_flex_attention=True)


def use_kv_parallelism_in_fused_na(mode: bool = True):
    """Records NATTEN's KV-parallelism switch (nothing changes)."""
    _state["kv_parallel"] = bool(mode)


def is_kv_parallelism_in_fused_na_enabled() -> bool:
    """Whether KV parallelism was last switched on."""
    return _state["kv_parallel"]


def use_deterministic_algorithms(mode: bool = True):
    """Records NATTEN's determinism switch. libna's CPU kernels are always
    deterministic; on CUDA only the rpb gradient uses atomics."""
    _state["deterministic"] = bool(mode)


def are_deterministic_algorithms_enabled() -> bool:
    """Whether ``use_deterministic_algorithms`` last switched it on."""
    return _state["deterministic"]


def use_autotuner(forward_pass: bool = False, backward_pass: bool = False,
                  thorough_mode_forward: bool = False, thorough_mode_backward: bool = False,
                  warmup_steps_forward: int = 5, warmup_steps_backward: int = 5,
                  steps_forward: int = 5, steps_backward: int = 5):
    """Records which passes NATTEN's autotuner would tune (libna has none)."""
    _state["autotuner"] = (bool(forward_pass), bool(backward_pass),
                           bool(thorough_mode_forward), bool(thorough_mode_backward))


def disable_autotuner():
    """Records the autotuner as off for both passes."""
    _state["autotuner"] = (False, False, False, False)


def is_autotuner_enabled() -> bool:
    """Whether the autotuner was recorded as on for either pass."""
    return any(_state["autotuner"][:2])


def is_autotuner_enabled_for_forward() -> bool:
    """Whether the autotuner was recorded as on for the forward pass."""
    return _state["autotuner"][0]


def is_autotuner_enabled_for_backward() -> bool:
    """Whether the autotuner was recorded as on for the backward pass."""
    return _state["autotuner"][1]


def is_autotuner_thorough_for_forward() -> bool:
    """Whether thorough tuning was recorded for the forward pass."""
    return _state["autotuner"][2]


def is_autotuner_thorough_for_backward() -> bool:
    """Whether thorough tuning was recorded for the backward pass."""
    return _state["autotuner"][3]


def set_memory_usage_preference(pref: str = "default"):
    """Records NATTEN's memory preference: "default", "strict" or
    "unrestricted" (ValueError otherwise)."""
    if pref not in ("default", "strict", "unrestricted"):
        raise ValueError(f"[natten.set_memory_usage_preference] pref={pref!r} must be one of "
                         "'default', 'strict', 'unrestricted'")
    _state["memory"] = pref


def get_memory_usage_preference() -> str:
    """The recorded memory preference ("default" until set)."""
    return _state["memory"]


def is_memory_usage_default() -> bool:
    """Whether the recorded memory preference is "default"."""
    return _state["memory"] == "default"


def is_memory_usage_strict() -> bool:
    """Whether the recorded memory preference is "strict"."""
    return _state["memory"] == "strict"


def is_memory_usage_unrestricted() -> bool:
    """Whether the recorded memory preference is "unrestricted"."""
    return _state["memory"] == "unrestricted"


def use_tf32_in_gemm_na(mode: bool = True):
    """Records NATTEN's TF32 switch for its GEMM kernels (which libna lacks)."""
    _state["tf32"] = bool(mode)


def is_tf32_in_gemm_na_enabled() -> bool:
    """Whether TF32 was last switched on (the default)."""
    return _state["tf32"]


def enable_tf32() -> bool:
    """``use_tf32_in_gemm_na(True)``; returns True."""
    use_tf32_in_gemm_na(True)
    return True


def disable_tf32() -> bool:
    """``use_tf32_in_gemm_na(False)``; returns True."""
    use_tf32_in_gemm_na(False)
    return True


def use_tiled_na(mode: bool = True):
    """Records NATTEN's tiled-kernel switch."""
    _state["tiled"] = bool(mode)


def is_tiled_na_enabled() -> bool:
    """Whether tiled NA was last switched on (the default)."""
    return _state["tiled"]


def enable_tiled_na() -> bool:
    """``use_tiled_na(True)``; returns True."""
    use_tiled_na(True)
    return True


def disable_tiled_na() -> bool:
    """``use_tiled_na(False)``; returns True."""
    use_tiled_na(False)
    return True


def use_gemm_na(mode: bool = True):
    """Records NATTEN's GEMM-kernel switch (libna has no GEMM kernels)."""
    _state["gemm"] = bool(mode)


def is_gemm_na_enabled() -> bool:
    """Whether GEMM NA was last switched on (off by default)."""
    return _state["gemm"]


def enable_gemm_na() -> bool:
    """``use_gemm_na(True)``; returns True."""
    use_gemm_na(True)
    return True


def disable_gemm_na() -> bool:
    """``use_gemm_na(False)``; returns True."""
    use_gemm_na(False)
    return True


def has_cuda() -> bool:
    """Whether libna was built with CUDA and torch sees a GPU."""
    from .. import build_info

    return "cuda" in build_info()["backends"] and torch.cuda.is_available()


def has_half(device_index: Optional[object] = None) -> bool:
    """True: libna runs float16 and bfloat16 on every device (``has_bfloat`` too)."""
    return True


has_bfloat = has_half


def has_fna(device_index: Optional[object] = None) -> bool:
    """True: libna's ops are fused on every device (``has_fused_na`` too)."""
    return True


has_fused_na = has_fna


def has_gemm(device_index: Optional[object] = None) -> bool:
    """False: libna has no GEMM-based kernels (nor ``has_tf32_gemm``,
    ``has_fp32_gemm``, ``has_fp64_gemm``)."""
    return False


has_tf32_gemm = has_fp32_gemm = has_fp64_gemm = has_gemm
