"""libna: neighborhood attention for every DLPack framework.

    import libna
    out = libna.na2d(q, k, v, kernel_size=7)   # q, k, v: [B, H, W, heads, D]

NumPy in gives NumPy out, torch in gives torch out; see ``libna.build_info()``.
"""

from __future__ import annotations

import contextlib as _contextlib
import os as _os
import warnings as _warnings

from . import reference
from ._ops import _C, _C_IMPORT_ERROR, merge_attentions, merge_attentions_backward
from ._ops import _is_int
from ._ops import rank_ops as _rank_ops
from ._public import public as _public

# The one place the version is written: pip (scikit-build-core, see
# pyproject.toml) and CMake read it from this line.
__version__ = "0.1.0"

_OPS = {**_rank_ops(1), **_rank_ops(2), **_rank_ops(3)}
globals().update(_OPS)

if _C is None:
    _warnings.warn(
        f"libna: the compiled core could not be loaded ({_C_IMPORT_ERROR}); using the slow "
        "pure-NumPy reference implementation instead",
        RuntimeWarning,
        stacklevel=2,
    )
else:
    # Invalid LIBNA_* environment values, which the core replaces by defaults.
    for _message in _C.environment_warnings():
        _warnings.warn(f"libna: {_message}", RuntimeWarning, stacklevel=2)

_MAX_NUM_THREADS = _C.max_num_threads if _C is not None else 1024


@_public
def set_num_threads(num_threads: int) -> None:
    """Threads used by libna's CPU kernels (default: LIBNA_NUM_THREADS, else all cores)."""
    if not _is_int(num_threads):
        raise TypeError(f"[set_num_threads] num_threads={num_threads!r} must be an int")
    # Checked here too: the core takes a C int, which a Python int may not fit.
    if not 1 <= num_threads <= _MAX_NUM_THREADS:
        raise ValueError(f"[set_num_threads] num_threads={num_threads} must be between 1 and "
                         f"{_MAX_NUM_THREADS}")
    if _C is not None:
        _C.set_num_threads(int(num_threads))


@_public
def get_num_threads() -> int:
    """Threads used by libna's CPU kernels."""
    return _C.get_num_threads() if _C is not None else 1


@_public
def build_info() -> dict:
    """What this build of libna contains: version, dtypes, backends, CUDA
    architectures, the CPU kernel set ("avx512", "avx2" or "portable", which
    LIBNA_CPU_KERNELS can force), SIMD level, whether the bfloat16 forward
    and backward run on AMX tiles (``cpu_amx``; LIBNA_CPU_AMX=0 turns them off), compiler
    and CPU thread count.
    Raises ValueError if LIBNA_CPU_KERNELS names a set this CPU cannot run."""
    if _C is None:
        return {
            "version": __version__,
            "dtypes": ["float16", "bfloat16", "float32", "float64"],
            "backends": ["numpy-reference"],
            "cuda_architectures": [],
            "cpu_kernels": "none",
            "simd": "none",
            "cpu_amx": False,
            "compiler": "none (compiled core not loaded)",
            "num_threads": 1,
        }
    info = dict(_C.build_info())
    info["num_threads"] = _C.get_num_threads()
    return info


@_public
def host_cache_info() -> dict:
    """The freed host outputs libna keeps for reuse: ``blocks`` and
    ``bytes`` kept now, their ``limit`` (``LIBNA_HOST_CACHE_BYTES``, default
    256 MiB; 0 keeps none) and ``reused``, the outputs served from them so
    far. libna allocates the outputs of CPU ``libna.torch`` calls itself; when
    one of 1 MiB or more dies, its memory is kept and handed to the next
    output of the same size, which then pays no page faults."""
    if _C is None:
        return {"blocks": 0, "bytes": 0, "limit": 0, "reused": 0}
    return _C.host_cache_info()


@_public
def empty_host_cache() -> None:
    """Frees the host outputs libna keeps for reuse (see host_cache_info)."""
    if _C is not None:
        _C.empty_host_cache()


_EMULATED_ARCHS = (75, 80, 86, 89, 90)


@_public
def cuda_emulator(arch: int = 80, *, checks: bool = False):
    """Runs the CUDA backend's kernels on the CPU, for testing without a GPU.

    Inside ``with libna.cuda_emulator(arch=80):``, calls on CPU arrays (NumPy,
    torch CPU tensors, ...) run the CUDA backend's entry points on the host,
    under an emulation of the CUDA execution model (threads, barriers, warp
    shuffles, shared memory, mma.sync and ldmatrix; see cuda/emulator/),
    choosing kernels as a GPU of compute capability ``arch`` would: 75 takes
    the SIMT kernels only, 80, 86, 89 and 90 the tensor-core kernels for
    float16 and bfloat16. ``checks=True`` runs a block's threads in a random
    order between barriers and checks every global access against the call's
    tensors (slower). Results and errors are the CUDA backend's (float64 is
    refused as on a GPU). Process-wide: it affects calls from every thread
    until the block exits. Needs a build with the emulator
    (``pip install -C cmake.define.LIBNA_CUDA_EMULATOR=ON .``); RuntimeError
    otherwise."""
    if isinstance(arch, bool) or not _is_int(arch):
        raise TypeError(f"[cuda_emulator] arch={arch!r} must be an int, one of {_EMULATED_ARCHS}")
    if not isinstance(checks, bool):
        raise TypeError(f"[cuda_emulator] checks={checks!r} must be a bool")
    if _C is None or "cuda-emulator" not in _C.build_info()["backends"]:
        raise RuntimeError(
            "[cuda_emulator] this build of libna has no CUDA emulator; build it with "
            "pip install -C cmake.define.LIBNA_CUDA_EMULATOR=ON . "
            "(or -DLIBNA_CUDA_EMULATOR=ON with CMake)")
    if arch not in _EMULATED_ARCHS:
        raise ValueError(f"[cuda_emulator] arch={arch} is not supported; expected one of "
                         f"{_EMULATED_ARCHS} (75: SIMT kernels only; 80 and up: also tensor cores)")
    return _emulating(int(arch), checks)


@_contextlib.contextmanager
def _emulating(arch: int, checks: bool):
    previous = (_C.cuda_emulator_arch(), _C.cuda_emulator_checks())
    _C.set_cuda_emulator(arch, checks)
    try:
        yield
    finally:
        _C.set_cuda_emulator(*previous)


@_public
def cmake_dir() -> str:
    """Directory holding libnaConfig.cmake, for find_package(libna)."""
    return _os.path.join(_os.path.dirname(__file__), "lib", "cmake", "libna")


@_public
def include_dir() -> str:
    """Directory holding the libna C++ headers."""
    return _os.path.join(_os.path.dirname(__file__), "include")


__all__ = [
    *_OPS,
    "merge_attentions", "merge_attentions_backward",
    "build_info", "set_num_threads", "get_num_threads", "host_cache_info", "empty_host_cache",
    "cmake_dir", "include_dir", "reference", "cuda_emulator",
]
