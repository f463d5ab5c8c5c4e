"""The read-only flag of versioned DLPack (DLPACK_FLAG_BITMASK_READ_ONLY),
from a producer that is not NumPy: a minimal one written here with ctypes,
whose memory is a ctypes buffer and which exports only versioned capsules.

libna reads such arrays as inputs (they are never written), and the binding
refuses one as an output: an allocator that returns a read-only array gets a
RuntimeError before anything is written. The same producer without the flag
is accepted and written, so the refusal is the flag's doing.

(JAX arrays are immutable, but JAX 0.10 exports an unversioned capsule, which
has no flags at all; torch tensors are always writable. libna never asks
either for output memory: its allocator makes fresh arrays.)"""

import ctypes

import numpy as np
import pytest

import libna
from libna import reference

pytestmark = pytest.mark.skipif(libna._ops._C is None, reason="compiled core not loaded")

READ_ONLY = 1 << 0  # DLPACK_FLAG_BITMASK_READ_ONLY
CPU = 1  # kDLCPU
FLOAT = 2  # kDLFloat


# dlpack.h, version 1: DLManagedTensorVersioned and what it holds.
class _Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _Device), ("ndim", ctypes.c_int32),
                ("dtype", _DataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _ManagedTensorVersioned(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32),
                ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p),
                ("flags", ctypes.c_uint64), ("dl_tensor", _Tensor)]


_CAPSULE_NAME = b"dltensor_versioned"
_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class Float32Block:
    """A C-contiguous float32 array in a ctypes buffer of its own. Its
    capsules have no deleter (the DLPack spec allows none): the memory
    lives as long as this object, which each test keeps."""

    def __init__(self, values, read_only):
        values = np.ascontiguousarray(values, dtype=np.float32)
        self.shape = values.shape
        self.read_only = read_only
        self._memory = (ctypes.c_float * values.size)(*values.ravel().tolist())
        self._shape = (ctypes.c_int64 * values.ndim)(*values.shape)
        self._exported = []  # the managed tensors handed out, kept alive with the memory

    def values(self):
        """A copy of the current contents (read through NumPy, for checking)."""
        return np.ctypeslib.as_array(self._memory).reshape(self.shape).copy()

    def __dlpack_device__(self):
        return (CPU, 0)

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        if max_version is None or max_version[0] < 1:
            # An unversioned capsule cannot say "read-only": refused, as the
            # DLPack spec asks of a producer that cannot honour the request.
            raise BufferError("Float32Block exports versioned DLPack (1.0) only")
        managed = _ManagedTensorVersioned(major=1, minor=0,
                                          flags=READ_ONLY if self.read_only else 0)
        managed.dl_tensor.data = ctypes.addressof(self._memory)
        managed.dl_tensor.device = _Device(CPU, 0)
        managed.dl_tensor.ndim = len(self.shape)
        managed.dl_tensor.dtype = _DataType(FLOAT, 32, 1)
        managed.dl_tensor.shape = self._shape
        self._exported.append(managed)
        return _capsule_new(ctypes.addressof(managed), _CAPSULE_NAME, None)


def _qkv(rng):
    return [rng.standard_normal((1, 9, 2, 4)).astype(np.float32) for _ in range(3)]


def test_read_only_arrays_of_another_producer_are_read(rng):
    q, k, v = _qkv(rng)
    blocks = [Float32Block(x, read_only=True) for x in (q, k, v)]
    out, lse = libna.na1d(*blocks, 3, dilation=2, return_lse=True)
    want, want_lse = reference.na1d(q, k, v, 3, dilation=2, return_lse=True)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)
    attn = libna.na1d_qk(blocks[0], blocks[1], 3)
    np.testing.assert_allclose(attn, reference.na1d_qk(q, k, 3), rtol=1e-5, atol=1e-5)
    for block, x in zip(blocks, (q, k, v)):
        np.testing.assert_array_equal(block.values(), x)


@pytest.mark.parametrize("read_only", [True, False], ids=["read-only", "writable"])
def test_read_only_output_is_refused(rng, read_only):
    """libna._C.call("na", ...) writes `out` into whatever its allocator returns:
    a read-only array is refused before any kernel runs; the same memory
    offered writable receives the result."""
    q, k, v = _qkv(rng)
    sentinel = np.full(q.shape, 7.0, np.float32)
    block = Float32Block(sentinel, read_only=read_only)

    def alloc(shape, dtype):
        assert (tuple(shape), dtype) == (q.shape, "float32")
        return block

    call = ("na", [q, k, v, None], 1, [3], [1], [1], [False], None, False, alloc, False, 0)
    if read_only:
        with pytest.raises(RuntimeError, match=r"\[na1d\] the allocator returned an object "
                                               r"that is not a writable DLPack array for "
                                               r"output out"):
            libna._C.call(*call)
        np.testing.assert_array_equal(block.values(), sentinel)
    else:
        out, lse = libna._C.call(*call)
        assert out is block and lse is None
        np.testing.assert_allclose(block.values(), reference.na1d(q, k, v, 3),
                                   rtol=1e-5, atol=1e-5)
