"""Which array library a call's arrays come from, and how to hand them to
libna's compiled core and give results back in the caller's own type.

The core reads any DLPack array; outputs are allocated by the caller's own
framework (through the ``alloc`` callback the binding calls after it has
validated the inputs), so torch in gives torch out, NumPy in gives NumPy out.
"""

from __future__ import annotations

import functools
import sys

import numpy as np

try:
    from . import _C
except ImportError:  # pragma: no cover - libna then runs on its NumPy reference
    _C = None

_BFLOAT16_NAMES = ("bfloat16",)


def _family(x) -> str | None:
    """'numpy', 'torch', 'jax', 'cupy', 'dlpack' or None (not an array)."""
    if isinstance(x, np.ndarray):
        return "numpy"
    root = type(x).__module__.split(".", 1)[0]
    if root == "torch" and hasattr(x, "__dlpack__"):
        return "torch"
    if root in ("jax", "jaxlib") and hasattr(x, "__dlpack__"):
        return "jax"
    if root == "cupy" and hasattr(x, "__dlpack__"):
        return "cupy"
    if hasattr(x, "__dlpack__"):
        return "dlpack"
    return None


def traced_by_jax(*arrays) -> bool:
    """Whether any of the arrays is a JAX tracer (inside jax.jit/grad/vmap),
    which has no memory to hand over: such calls go to libna.jax."""
    jax = sys.modules.get("jax")
    return jax is not None and any(isinstance(x, jax.core.Tracer) for x in arrays)


def _is_numpy_bfloat16(dtype) -> bool:
    return isinstance(dtype, np.dtype) and dtype.name in _BFLOAT16_NAMES


def _numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        return np.dtype(np.uint16)  # viewed back as ml_dtypes.bfloat16 by `finish`
    return np.dtype(name)


def _capsule(to_dlpack, x):
    """x's DLPack capsule, or x itself when torch cannot export it (sparse,
    quantized, ...), so that the binding says why it cannot read it."""
    try:
        return to_dlpack(x)
    except (RuntimeError, TypeError, BufferError):
        return x


# The NumPy dtypes libna takes as they are, by dtype.char: float16, float32,
# float64 (bfloat16 arrives as ml_dtypes' type, viewed as uint16).
_NUMPY_FLOATS = "efd"
# NumPy dtypes by the names the binding allocates outputs by.
_NUMPY_DTYPES = {name: _numpy_dtype(name)
                 for name in ("float16", "bfloat16", "float32", "float64")}


def _alloc_numpy(shape, dtype_name):
    """The NumPy allocator the binding calls (after validation) per output."""
    return np.empty(shape, _NUMPY_DTYPES[dtype_name])


def plain_numpy(arrays, optional=()) -> bool:
    """Whether every one of `arrays`, and of `optional` that is not None,
    is a NumPy float16/32/64 array: the common NumPy call, whose outputs
    need no conversion (see call_numpy)."""
    for x in arrays:
        if type(x) is not np.ndarray or x.dtype.char not in _NUMPY_FLOATS:
            return False
    for x in optional:
        if x is not None and (type(x) is not np.ndarray or x.dtype.char not in _NUMPY_FLOATS):
            return False
    return True


def call_numpy(op, arrays, rank=0, kernel_size=(), stride=(), dilation=(), is_causal=(),
               scale=None, want_lse=False):
    """The compiled op `op` on arrays that plain_numpy accepts, outputs
    allocated by NumPy, with none of Arrays' checks."""
    return _C.call(op, arrays, rank, kernel_size, stride, dilation, is_causal, scale, want_lse,
                   _alloc_numpy, True, 0)


def _plain_family(named: dict, optional) -> str | None:
    """'numpy' when every array given is a NumPy float16/32/64 array,
    'torch' when every one is a plain CPU torch.Tensor, else None: the common
    calls, which skip the general checks of Arrays."""
    family = tensor = None
    for name, x in named.items():
        if x is None:
            if name not in optional:
                return None
            continue
        kind = type(x)
        if kind is np.ndarray:
            if x.dtype.char not in _NUMPY_FLOATS or family == "torch":
                return None
            family = "numpy"
            continue
        if tensor is None:
            torch = sys.modules.get("torch")  # libna itself never imports torch
            if torch is None:
                return None
            tensor = torch.Tensor
        if kind is not tensor or family == "numpy" or x.device.type != "cpu":
            return None
        family = "torch"
    return family


@functools.lru_cache(maxsize=None)
def _torch_exports():
    """(torch dtypes by name, torch's C DLPack exporter, torch.empty, its
    DLPack importer of capsules), looked up once (an import statement per
    call costs about a microsecond). The importer is torch's C function where
    it has one: torch.utils.dlpack.from_dlpack checks for an array object
    before it calls it, a fifth of its cost for a capsule."""
    import torch
    from torch.utils.dlpack import from_dlpack, to_dlpack

    dtypes = {name: getattr(torch, name) for name in ("float16", "bfloat16", "float32", "float64")}
    return dtypes, to_dlpack, torch.empty, getattr(torch._C, "_from_dlpack", from_dlpack)


def _call_torch_host(op, capsules, rank, kernel_size, stride, dilation, is_causal, scale,
                     want_lse):
    """_C.call on DLPack capsules of CPU torch tensors, the outputs allocated
    by libna (libna::host_allocate, which reuses freed large ones) and
    imported by torch."""
    return _C.call(op, capsules, rank, kernel_size, stride, dilation, is_causal, scale, want_lse,
                   None, False, 0, _torch_exports()[3])


def call_torch_cpu(op, tensors, rank=0, kernel_size=(), stride=(), dilation=(), is_causal=(),
                   scale=None, want_lse=False, into=()):
    """The compiled op `op` on plain, dense CPU torch tensors of libna's
    dtypes (None for absent optional ones): the common eager call, with none
    of Arrays' checks (the caller made them).
    Tensors that require grad export as they are (torch's C exporter does not
    refuse them; only Tensor.__dlpack__ does). The outputs are allocated by
    libna and imported over DLPack, which costs a quarter of torch.empty;
    they are ordinary CPU tensors (as from torch.from_numpy: their storage
    cannot be resized in place). `into`: tensors (views, any strides) that the
    first outputs are written into, in the op's output order; the rest are
    allocated by torch."""
    dtypes, to_dlpack, empty, _ = _torch_exports()
    capsules = [None if x is None else to_dlpack(x) for x in tensors]
    if not into:
        return _call_torch_host(op, capsules, rank, kernel_size, stride, dilation, is_causal,
                                scale, want_lse)
    given = list(into)

    def alloc(shape, dtype_name):
        dtype = dtypes[dtype_name]
        if not given:
            out = empty(*shape, dtype=dtype) if shape else empty((), dtype=dtype)
            return out, to_dlpack(out)
        out = given.pop(0)
        if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
            raise RuntimeError(f"[{op}] an output of shape {tuple(shape)} and dtype {dtype_name} "
                               f"was to be written into a tensor of shape {tuple(out.shape)} "
                               f"and dtype {out.dtype}")
        return out, to_dlpack(out)

    return _C.call(op, capsules, rank, kernel_size, stride, dilation, is_causal, scale, want_lse,
                   alloc, False, 0)


class Arrays:
    """The arrays of one op call, all from one framework."""

    def __init__(self, op: str, named: dict,
                 optional=("rpb", "additional_keys", "additional_values")):
        self.op = op
        self.stream = 0
        self._device = None
        plain = _plain_family(named, optional)
        if plain is not None:  # checked enough; the binding checks the rest
            self.family = plain
            self.uint16_is_bfloat16 = plain == "numpy"
            if plain == "numpy":
                self.inputs = named
            else:
                self._device = "cpu"
                # PyTorch refuses to export tensors that require grad over DLPack.
                self.inputs = {name: None if x is None else x.detach() if x.requires_grad else x
                               for name, x in named.items()}
            return
        families = {}
        for name, x in named.items():
            if x is None:
                if name in optional:
                    continue
                raise TypeError(f"[{op}] {name} must be an array, got None")
            family = _family(x)
            if family is None:
                raise TypeError(
                    f"[{op}] {name} must be an array that supports DLPack (NumPy, PyTorch, "
                    f"JAX, CuPy, ...), got {type(x).__module__}.{type(x).__qualname__}"
                )
            families[name] = family
        kinds = set(families.values())
        if not kinds <= {"numpy", "torch"} and traced_by_jax(*named.values()):
            raise TypeError(
                f"[{op}] got JAX tracers (a call inside jax.jit, jax.grad or jax.vmap); under "
                "JAX transformations use libna.na1d/na2d/na3d or merge_attentions, which run "
                "as XLA custom calls (libna.jax)")
        if len(kinds) > 1:
            listing = ", ".join(f"{n}: {f}" for n, f in families.items())
            raise TypeError(f"[{op}] all arrays must come from one framework, got {listing}")
        self.family = kinds.pop() if kinds else "numpy"
        # NumPy has no bfloat16 of its own and cannot export ml_dtypes'
        # bfloat16 over DLPack, so bfloat16 NumPy arrays (inputs, and the
        # outputs of every framework that allocates with NumPy) travel as
        # uint16 views, which the binding then reads as bfloat16. Genuine
        # uint16 inputs are refused here before they could be misread.
        self.uint16_is_bfloat16 = self.family not in ("torch", "cupy")
        prepare = getattr(self, "_prepare_" + self.family, self._prepare_other)
        self.inputs = {name: None if x is None else prepare(name, x) for name, x in named.items()}

    def call(self, op, inputs, rank=0, kernel_size=(), stride=(), dilation=(), is_causal=(),
             scale=None, want_lse=False):
        """The compiled op `op` on `inputs` (prepared arrays, or outputs of an
        earlier call of this one), its outputs allocated in this framework."""
        if self.family == "torch":
            # A DLPack capsule from torch's C exporter imports several times
            # faster than a call of Tensor.__dlpack__ (a Python method).
            to_dlpack = _torch_exports()[1]
            inputs = [None if x is None else _capsule(to_dlpack, x) for x in inputs]
            if self._device == "cpu":
                return _call_torch_host(op, inputs, rank, kernel_size, stride, dilation,
                                        is_causal, scale, want_lse)
            alloc = self._alloc_torch
        elif self.family == "numpy":
            alloc = _alloc_numpy
        else:
            alloc = self.alloc
        return _C.call(op, inputs, rank, kernel_size, stride, dilation, is_causal, scale,
                       want_lse, alloc, self.uint16_is_bfloat16, self.stream)

    def _alloc_torch(self, shape, dtype_name):
        dtypes, to_dlpack, empty, _ = _torch_exports()
        out = empty(shape, dtype=dtypes[dtype_name], device=self._device)
        return out, to_dlpack(out)

    def _refuse_uint16(self, name):
        raise TypeError(f"[{self.op}] {name} has dtype uint16; expected float16, bfloat16, "
                        "float32 or float64")

    def _prepare_numpy(self, name, x):
        char = x.dtype.char
        if char in _NUMPY_FLOATS:
            return x
        if char == "H":
            self._refuse_uint16(name)
        if _is_numpy_bfloat16(x.dtype):
            return x.view(np.uint16)
        raise TypeError(f"[{self.op}] {name} has dtype {x.dtype}; expected float16, bfloat16, "
                        "float32 or float64")

    def _prepare_torch(self, name, x):
        device = x.device
        if device.type == "cuda":
            import torch

            self.stream = torch.cuda.current_stream(device).cuda_stream
        elif device.type != "cpu":
            raise ValueError(f"[{self.op}] {name} is on device '{device}'; libna supports CPU "
                             "and CUDA tensors")
        self._device = device
        # PyTorch refuses to export tensors that require grad over DLPack.
        return x.detach() if x.requires_grad else x

    def _prepare_cupy(self, name, x):
        import cupy

        self._device = x.device
        self.stream = cupy.cuda.get_current_stream().ptr
        return x

    def _prepare_other(self, name, x):
        if str(getattr(x, "dtype", "")).rsplit(".", 1)[-1] == "uint16":
            self._refuse_uint16(name)
        return x

    def alloc(self, shape, dtype_name):
        """Called by the binding (after validation) for each output."""
        if self.family == "torch":
            return self._alloc_torch(shape, dtype_name)
        if self.family == "cupy":
            import cupy

            with self._device:
                return cupy.empty(shape, dtype=dtype_name)
        return _alloc_numpy(shape, dtype_name)

    def finish(self, out, like):
        """An output in the caller's own array type."""
        if out is None:
            return None
        if self.family in ("torch", "cupy"):
            return out
        if out.dtype == np.uint16:  # a bfloat16 output held as uint16
            import ml_dtypes

            out = out.view(ml_dtypes.bfloat16)
        if self.family == "jax":
            import jax.numpy as jnp

            return jnp.asarray(out)
        if self.family == "dlpack" and hasattr(like, "__array_namespace__"):
            return like.__array_namespace__().from_dlpack(out)
        return out
