"""Bad input gets a clean ValueError / TypeError whose message names the op,
the argument and the offending value -- never a crash, a hang or a silently
wrong answer. Every row runs against the compiled path (``libna``) and the
pure-NumPy oracle (``libna.reference``), which must raise the same types.

Also here: inputs are never written and outputs never alias them; unusual
but valid inputs (requires_grad tensors, NumPy bfloat16, numpy scalar
arguments, odd memory layouts) work."""

import re

import ml_dtypes
import numpy as np
import pytest
import torch

import libna
from libna import reference


# --- the two implementations -------------------------------------------------
@pytest.fixture(params=["compiled", "reference"])
def mod(request):
    if request.param == "compiled":
        if libna._ops._C is None:
            pytest.skip("libna's compiled core is not loaded")
        return libna
    return reference


@pytest.fixture
def compiled():
    if libna._ops._C is None:
        pytest.skip("libna's compiled core is not loaded")
    return libna


# --- inputs ----------------------------------------------------------------
SPATIAL = {1: (8,), 2: (6, 7), 3: (4, 5, 6)}
HEADS, DIM = 2, 4


def rand(shape, dtype=np.float32):
    return np.random.default_rng(0).standard_normal(shape).astype(dtype)


def qkv(rank, *, batch=1, spatial=None, heads=HEADS, heads_kv=None, dim=DIM, dim_v=None,
        dtype=np.float32):
    spatial = SPATIAL[rank] if spatial is None else spatial
    heads_kv = heads if heads_kv is None else heads_kv
    dim_v = dim if dim_v is None else dim_v
    return (rand((batch, *spatial, heads, dim), dtype),
            rand((batch, *spatial, heads_kv, dim), dtype),
            rand((batch, *spatial, heads_kv, dim_v), dtype))


def shaped(rank, q=None, k=None, v=None, dtype=np.float32):
    """q, k, v of the default shapes, any of them replaced by an explicit shape."""
    dq, dk, dv = qkv(rank, dtype=dtype)
    return (dq if q is None else rand(q, dtype), dk if k is None else rand(k, dtype),
            dv if v is None else rand(v, dtype))


def attn_v(rank, *, window=3 ** 1, heads=HEADS, heads_kv=None, spatial=None, dim_v=DIM,
           dtype=np.float32, v_spatial=None, v_batch=1):
    spatial = SPATIAL[rank] if spatial is None else spatial
    v_spatial = spatial if v_spatial is None else v_spatial
    heads_kv = heads if heads_kv is None else heads_kv
    return (rand((1, *spatial, heads, window), dtype),
            rand((v_batch, *v_spatial, heads_kv, dim_v), dtype))


def with_dtypes(arrays, *dtypes):
    """arrays with the i-th one cast to dtypes[i] (None or absent: unchanged)."""
    dtypes = dtypes + (None,) * (len(arrays) - len(dtypes))
    return tuple(a if d is None else a.astype(d) for a, d in zip(arrays, dtypes))


def tt(*arrays):
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)


def rpb(heads, *kernel, dtype=np.float32):
    return rand((heads, *[2 * k - 1 for k in kernel]), dtype)


class NotAnArray:
    """Neither __array__ nor __dlpack__."""


def lit(s):
    return re.escape(s)


# --- the table ---------------------------------------------------------------
def row(id, fn, build, kwargs, exc, *patterns, prefix=True, marks=()):
    """fn: public function name; build(): positional args; kwargs values may be
    zero-argument callables (built lazily, e.g. rpb); patterns: regexes that
    must all occur in the message. prefix: the message must also start with
    the op's name in brackets, as every libna message does (a generic binding
    or framework error has no such prefix)."""
    return pytest.param(fn, build, kwargs, exc, patterns, prefix, id=id, marks=marks)


Q1 = lit("(1, 8, 2, 4)")  # the default 1D q shape
QUANTIZED_IS_DEPRECATED = pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")

ROWS = [
    # kernel_size out of range
    row("na1d-kernel-1", "na1d", lambda: qkv(1) + (1,), {}, ValueError,
        r"kernel_size", lit("(1,)")),
    row("na1d-kernel-0", "na1d", lambda: qkv(1) + (0,), {}, ValueError,
        r"kernel_size", lit("(0,)")),
    row("na1d-kernel-negative", "na1d", lambda: qkv(1) + (-3,), {}, ValueError,
        r"kernel_size", lit("(-3,)")),
    row("na1d-kernel-gt-length", "na1d", lambda: qkv(1) + (9,), {}, ValueError,
        r"kernel_size", lit("(9,)"), lit("(8,)")),
    row("na2d-kernel-gt-length-axis1", "na2d", lambda: qkv(2) + ((3, 8),), {}, ValueError,
        r"kernel_size", lit("(3, 8)"), lit("(6, 7)")),
    row("na3d-kernel-1-axis2", "na3d", lambda: qkv(3) + ((2, 2, 1),), {}, ValueError,
        r"kernel_size", lit("(2, 2, 1)")),
    row("na1d-kernel-huge-2**64", "na1d", lambda: qkv(1) + (2 ** 64,), {}, ValueError,
        r"kernel_size", lit(str(2 ** 64))),
    # kernel * dilation > length
    row("na1d-kernel-times-dilation-gt-length", "na1d", lambda: qkv(1) + (3,),
        {"dilation": 3}, ValueError, r"dilation", lit("(3,)"), lit("(8,)")),
    row("na2d-kernel-times-dilation-gt-length-axis1", "na2d", lambda: qkv(2) + (3,),
        {"dilation": (1, 3)}, ValueError, r"dilation", lit("(1, 3)")),
    row("na3d-kernel-times-dilation-gt-length", "na3d", lambda: qkv(3) + ((2, 3, 3),),
        {"dilation": (3, 1, 1)}, ValueError, r"dilation", lit("(3, 1, 1)")),
    # kernel * dilation overflows int64: must not wrap around and pass the check
    row("na1d-dilation-overflow-2**62", "na1d", lambda: qkv(1) + (3,),
        {"dilation": 2 ** 62}, ValueError, r"dilation", lit(str(2 ** 62))),
    row("na1d-dilation-overflow-2**63-1", "na1d", lambda: qkv(1) + (2,),
        {"dilation": 2 ** 63 - 1}, ValueError, r"dilation", lit(str(2 ** 63 - 1))),
    row("na1d_qk-dilation-overflow", "na1d_qk", lambda: qkv(1)[:2] + (3,),
        {"dilation": 2 ** 62}, ValueError, r"dilation", lit(str(2 ** 62))),
    row("na1d_av-dilation-overflow", "na1d_av", lambda: attn_v(1, window=3) + (3,),
        {"dilation": 2 ** 62}, ValueError, r"dilation", lit(str(2 ** 62))),
    # stride
    row("na1d-stride-0", "na1d", lambda: qkv(1) + (3,), {"stride": 0}, ValueError,
        r"stride", lit("(0,)")),
    row("na1d-stride-negative", "na1d", lambda: qkv(1) + (3,), {"stride": -1}, ValueError,
        r"stride", lit("(-1,)")),
    row("na1d-stride-gt-kernel", "na1d", lambda: qkv(1) + (3,), {"stride": 4}, ValueError,
        r"stride", lit("(4,)"), r"kernel"),
    row("na2d-stride-gt-kernel-axis1", "na2d", lambda: qkv(2) + (3,), {"stride": (1, 4)},
        ValueError, r"stride", lit("(1, 4)")),
    row("na3d-stride-0-axis0", "na3d", lambda: qkv(3) + (2,), {"stride": (0, 1, 1)},
        ValueError, r"stride", lit("(0, 1, 1)")),
    # dilation
    row("na1d-dilation-0", "na1d", lambda: qkv(1) + (3,), {"dilation": 0}, ValueError,
        r"dilation", lit("(0,)")),
    row("na1d-dilation-negative", "na1d", lambda: qkv(1) + (3,), {"dilation": -2},
        ValueError, r"dilation", lit("(-2,)")),
    row("na3d-dilation-0-axis1", "na3d", lambda: qkv(3) + (2,), {"dilation": (1, 0, 1)},
        ValueError, r"dilation", lit("(1, 0, 1)")),
    # per-axis tuples of the wrong length
    row("na1d-kernel-tuple-len2", "na1d", lambda: qkv(1) + ((3, 3),), {}, ValueError,
        r"kernel_size", lit("(3, 3)")),
    row("na2d-kernel-tuple-len1", "na2d", lambda: qkv(2) + ((3,),), {}, ValueError,
        r"kernel_size", lit("(3,)")),
    row("na2d-kernel-list-len3", "na2d", lambda: qkv(2) + ([3, 3, 3],), {}, ValueError,
        r"kernel_size", r"[\[(]3, 3, 3[\])]"),
    row("na2d-kernel-empty-tuple", "na2d", lambda: qkv(2) + ((),), {}, ValueError,
        r"kernel_size", lit("()")),
    row("na2d-stride-tuple-len3", "na2d", lambda: qkv(2) + (3,), {"stride": (1, 1, 1)},
        ValueError, r"stride", lit("(1, 1, 1)")),
    row("na2d-dilation-tuple-len1", "na2d", lambda: qkv(2) + (3,), {"dilation": (1,)},
        ValueError, r"dilation", lit("(1,)")),
    row("na3d-causal-tuple-len2", "na3d", lambda: qkv(3) + (2,),
        {"is_causal": (True, False)}, ValueError, r"is_causal", lit("(True, False)")),
    row("na3d-kernel-tuple-len4", "na3d", lambda: qkv(3) + ((2, 2, 2, 2),), {}, ValueError,
        r"kernel_size", lit("(2, 2, 2, 2)")),
    # per-axis arguments of the wrong type
    row("na1d-kernel-float", "na1d", lambda: qkv(1) + (3.0,), {}, TypeError,
        r"kernel_size", lit("3.0")),
    row("na1d-kernel-str", "na1d", lambda: qkv(1) + ("3",), {}, TypeError,
        r"kernel_size", lit("'3'")),
    row("na1d-kernel-None", "na1d", lambda: qkv(1) + (None,), {}, TypeError,
        r"kernel_size", r"None"),
    row("na1d-kernel-bool", "na1d", lambda: qkv(1) + (True,), {}, TypeError,
        r"kernel_size", r"True"),
    row("na2d-kernel-tuple-with-float", "na2d", lambda: qkv(2) + ((3, 3.0),), {}, TypeError,
        r"kernel_size", lit("3.0")),
    row("na1d-stride-float", "na1d", lambda: qkv(1) + (3,), {"stride": 1.0}, TypeError,
        r"stride", lit("1.0")),
    row("na1d-dilation-str", "na1d", lambda: qkv(1) + (3,), {"dilation": "1"}, TypeError,
        r"dilation", lit("'1'")),
    row("na1d-causal-int", "na1d", lambda: qkv(1) + (3,), {"is_causal": 1}, TypeError,
        r"is_causal=1\b"),
    row("na1d-causal-str", "na1d", lambda: qkv(1) + (3,), {"is_causal": "True"}, TypeError,
        r"is_causal", lit("'True'")),
    row("na1d-causal-None", "na1d", lambda: qkv(1) + (3,), {"is_causal": None}, TypeError,
        r"is_causal", r"None"),
    row("na2d-causal-tuple-with-int", "na2d", lambda: qkv(2) + (3,),
        {"is_causal": (True, 0)}, TypeError, r"is_causal", r"\b0\b"),
    # scale
    row("na1d-scale-str", "na1d", lambda: qkv(1) + (3,), {"scale": "0.5"}, TypeError,
        r"scale", lit("'0.5'")),
    row("na1d-scale-complex", "na1d", lambda: qkv(1) + (3,), {"scale": 1j}, TypeError,
        r"scale", lit("1j")),
    row("na1d-scale-bool", "na1d", lambda: qkv(1) + (3,), {"scale": True}, TypeError,
        r"scale", r"True"),
    row("na1d-scale-list", "na1d", lambda: qkv(1) + (3,), {"scale": [0.5]}, TypeError,
        r"scale", lit("[0.5]")),
    row("na1d-scale-nan", "na1d", lambda: qkv(1) + (3,), {"scale": float("nan")},
        ValueError, r"scale", r"nan"),
    row("na1d-scale-inf", "na1d", lambda: qkv(1) + (3,), {"scale": np.float64("inf")},
        ValueError, r"scale", r"inf"),
    row("na1d-scale-int-too-large-for-float", "na1d", lambda: qkv(1) + (3,),
        {"scale": 10 ** 400}, ValueError, r"scale", r"1000000000"),
    # return_lse
    row("na1d-return_lse-int", "na1d", lambda: qkv(1) + (3,), {"return_lse": 1}, TypeError,
        r"return_lse", r"\b1\b"),
    row("na1d-return_lse-str", "na1d", lambda: qkv(1) + (3,), {"return_lse": "yes"},
        TypeError, r"return_lse", lit("'yes'")),
    # rank of the inputs does not match the function
    row("na2d-given-1d-inputs", "na2d", lambda: qkv(1) + (3,), {}, ValueError,
        r"\bq\b", Q1, r"\b5\b"),
    row("na3d-given-1d-inputs", "na3d", lambda: qkv(1) + (3,), {}, ValueError,
        r"\bq\b", Q1, r"\b6\b"),
    row("na1d-given-2d-inputs", "na1d", lambda: qkv(2) + (3,), {}, ValueError,
        r"\bq\b", lit("(1, 6, 7, 2, 4)"), r"\b4\b"),
    row("na3d-given-2d-inputs", "na3d", lambda: qkv(2) + (3,), {}, ValueError,
        r"\bq\b", lit("(1, 6, 7, 2, 4)"), r"\b6\b"),
    row("na1d-given-3d-inputs", "na1d", lambda: qkv(3) + (3,), {}, ValueError,
        r"\bq\b", lit("(1, 4, 5, 6, 2, 4)")),
    row("na2d-given-3d-inputs", "na2d", lambda: qkv(3) + (3,), {}, ValueError,
        r"\bq\b", lit("(1, 4, 5, 6, 2, 4)")),
    row("na2d-k-wrong-rank", "na2d", lambda: shaped(2, k=(1, 6, 7, 8)) + (3,), {},
        ValueError, r"\bk\b", lit("(1, 6, 7, 8)")),
    row("na2d-v-wrong-rank", "na2d", lambda: shaped(2, v=(1, 6, 7, 2, 2, 4)) + (3,), {},
        ValueError, r"\bv\b", lit("(1, 6, 7, 2, 2, 4)")),
    row("na1d-q-0-dim", "na1d", lambda: (np.array(1.0, np.float32),) + qkv(1)[1:] + (3,), {},
        ValueError, r"\bq\b", lit("()")),
    row("na1d-q-20-dims", "na1d", lambda: shaped(1, q=(1,) * 20) + (3,), {}, ValueError,
        r"\bq\b", r"\b20\b"),
    # q / k / v shape mismatch
    row("na1d-k-batch-mismatch", "na1d", lambda: shaped(1, k=(2, 8, 2, 4)) + (3,), {},
        ValueError, r"\bk\b", lit("(2, 8, 2, 4)")),
    row("na1d-k-length-mismatch", "na1d", lambda: shaped(1, k=(1, 7, 2, 4)) + (3,), {},
        ValueError, r"\bk\b", lit("(1, 7, 2, 4)")),
    row("na2d-k-spatial-mismatch-axis1", "na2d", lambda: shaped(2, k=(1, 6, 6, 2, 4)) + (3,),
        {}, ValueError, r"\bk\b", lit("(1, 6, 6, 2, 4)")),
    row("na1d-v-batch-mismatch", "na1d", lambda: shaped(1, v=(3, 8, 2, 4)) + (3,), {},
        ValueError, r"\bv\b", lit("(3, 8, 2, 4)")),
    row("na3d-v-spatial-mismatch", "na3d", lambda: shaped(3, v=(1, 4, 5, 5, 2, 4)) + (2,),
        {}, ValueError, r"\bv\b", lit("(1, 4, 5, 5, 2, 4)")),
    row("na1d-k-head-dim-mismatch", "na1d", lambda: shaped(1, k=(1, 8, 2, 8)) + (3,), {},
        ValueError, r"\bk\b", r"head_dim", r"\b8\b"),
    row("na1d-v-heads-differ-from-k", "na1d",
        lambda: shaped(1, k=(1, 8, 1, 4), v=(1, 8, 2, 4)) + (3,), {}, ValueError,
        r"\bv\b", r"heads", lit("(1, 8, 2, 4)")),
    row("na1d-heads-not-divisible", "na1d",
        lambda: shaped(1, q=(1, 8, 3, 4), k=(1, 8, 2, 4), v=(1, 8, 2, 4)) + (3,), {},
        ValueError, r"\bq\b", r"\b3 heads", r"\b2\b"),
    row("na2d-heads-kv-gt-heads", "na2d", lambda: qkv(2, heads=2, heads_kv=4) + (3,), {},
        ValueError, r"\bq\b", r"\b2 heads", r"\b4\b"),
    # zero-size dimensions
    row("na1d-zero-batch", "na1d", lambda: qkv(1, batch=0) + (3,), {}, ValueError,
        r"\bq\b", lit("(0, 8, 2, 4)"), r"zero"),
    row("na2d-zero-spatial", "na2d", lambda: qkv(2, spatial=(0, 7)) + (3,), {}, ValueError,
        r"\bq\b", lit("(1, 0, 7, 2, 4)"), r"zero"),
    row("na1d-zero-heads", "na1d", lambda: qkv(1, heads=0, heads_kv=0) + (3,), {},
        ValueError, r"\bq\b", lit("(1, 8, 0, 4)"), r"zero"),
    row("na1d-zero-head-dim", "na1d", lambda: qkv(1, dim=0) + (3,), {}, ValueError,
        r"\bq\b", lit("(1, 8, 2, 0)"), r"zero"),
    row("na1d-k-zero-heads", "na1d", lambda: shaped(1, k=(1, 8, 0, 4)) + (3,), {},
        ValueError, r"\bk\b", lit("(1, 8, 0, 4)"), r"zero"),
    row("na1d-v-zero-head-dim", "na1d", lambda: shaped(1, v=(1, 8, 2, 0)) + (3,), {},
        ValueError, r"\bv\b", lit("(1, 8, 2, 0)"), r"zero"),
    # dtypes
    row("na1d-k-float64-q-float32", "na1d", lambda: with_dtypes(qkv(1), None, np.float64)
        + (3,), {}, TypeError, r"\bk\b", r"float64", r"float32"),
    row("na1d-v-float16-q-float32", "na1d",
        lambda: with_dtypes(qkv(1), None, None, np.float16) + (3,), {}, TypeError,
        r"\bv\b", r"float16", r"float32"),
    row("na1d-bfloat16-q-float32-k", "na1d",
        lambda: with_dtypes(qkv(1), ml_dtypes.bfloat16, np.float32, np.float32) + (3,), {},
        TypeError, r"\bk\b", r"float32", r"bfloat16"),
    row("na1d-int32", "na1d", lambda: qkv(1, dtype=np.int32) + (3,), {}, TypeError,
        r"\bq\b", r"int32"),
    row("na1d-int64", "na1d", lambda: qkv(1, dtype=np.int64) + (3,), {}, TypeError,
        r"\bq\b", r"int64"),
    row("na1d-k-int8", "na1d", lambda: with_dtypes(qkv(1), None, np.int8) + (3,), {},
        TypeError, r"\bk\b", r"int8"),
    row("na1d-bool", "na1d", lambda: qkv(1, dtype=np.bool_) + (3,), {}, TypeError,
        r"\bq\b", r"bool"),
    row("na1d-complex64", "na1d", lambda: qkv(1, dtype=np.complex64) + (3,), {}, TypeError,
        r"\bq\b", r"complex64"),
    row("na1d-complex128", "na1d", lambda: qkv(1, dtype=np.complex128) + (3,), {}, TypeError,
        r"\bq\b", r"complex128"),
    row("na1d-uint16", "na1d", lambda: qkv(1, dtype=np.uint16) + (3,), {}, TypeError,
        r"\bq\b", r"uint16"),
    row("na1d-v-uint16", "na1d", lambda: with_dtypes(qkv(1), None, None, np.uint16) + (3,),
        {}, TypeError, r"\bv\b", r"uint16"),
    row("na1d-object-dtype", "na1d", lambda: with_dtypes(qkv(1), object) + (3,), {},
        TypeError, r"\bq\b", r"object"),
    row("na1d-longdouble", "na1d", lambda: with_dtypes(qkv(1), np.longdouble) + (3,), {},
        TypeError, r"\bq\b", r"float128|longdouble|float96"),
    row("na1d-float8", "na1d", lambda: with_dtypes(qkv(1), ml_dtypes.float8_e4m3fn) + (3,),
        {}, TypeError, r"\bq\b", r"float8"),
    # rpb
    row("na1d-rpb-causal", "na1d", lambda: qkv(1) + (3,),
        {"is_causal": True, "rpb": lambda: rpb(2, 3)}, ValueError,
        r"rpb", r"is_causal", lit("(True,)")),
    row("na2d-rpb-causal-axis1", "na2d", lambda: qkv(2) + (3,),
        {"is_causal": (False, True), "rpb": lambda: rpb(2, 3, 3)}, ValueError,
        r"rpb", r"is_causal", lit("(False, True)")),
    row("na1d-rpb-stride-2", "na1d", lambda: qkv(1) + (3,),
        {"stride": 2, "rpb": lambda: rpb(2, 3)}, ValueError, r"rpb", r"stride", lit("(2,)")),
    row("na3d-rpb-stride-2-axis2", "na3d", lambda: qkv(3) + (2,),
        {"stride": (1, 1, 2), "rpb": lambda: rpb(2, 2, 2, 2)}, ValueError,
        r"rpb", r"stride", lit("(1, 1, 2)")),
    row("na1d-rpb-wrong-extent", "na1d", lambda: qkv(1) + (3,),
        {"rpb": lambda: rand((2, 3))}, ValueError, r"rpb", lit("(2, 3)"), lit("(2, 5)")),
    row("na1d-rpb-wrong-heads", "na1d", lambda: qkv(1) + (3,),
        {"rpb": lambda: rand((3, 5))}, ValueError, r"rpb", lit("(3, 5)"), lit("(2, 5)")),
    row("na2d-rpb-wrong-rank", "na2d", lambda: qkv(2) + (3,),
        {"rpb": lambda: rand((2, 5))}, ValueError, r"rpb", lit("(2, 5)"), lit("(2, 5, 5)")),
    row("na2d-rpb-1d-of-kernel", "na2d", lambda: qkv(2) + ((3, 2),),
        {"rpb": lambda: rand((2, 5, 5))}, ValueError, r"rpb", lit("(2, 5, 5)"),
        lit("(2, 5, 3)")),
    row("na1d-rpb-float64", "na1d", lambda: qkv(1) + (3,),
        {"rpb": lambda: rpb(2, 3, dtype=np.float64)}, TypeError, r"rpb", r"float64"),
    row("na1d-rpb-list", "na1d", lambda: qkv(1) + (3,),
        {"rpb": lambda: rpb(2, 3).tolist()}, TypeError, r"rpb", r"list"),
    # arrays without DLPack support
    row("na1d-q-list", "na1d", lambda: (qkv(1)[0].tolist(),) + qkv(1)[1:] + (3,), {},
        TypeError, r"\bq\b", r"list"),
    row("na1d-q-str", "na1d", lambda: ("q",) + qkv(1)[1:] + (3,), {}, TypeError,
        r"\bq\b", r"str"),
    row("na1d-q-object", "na1d", lambda: (NotAnArray(),) + qkv(1)[1:] + (3,), {}, TypeError,
        r"\bq\b", r"NotAnArray"),
    row("na1d-q-None", "na1d", lambda: (None,) + qkv(1)[1:] + (3,), {}, TypeError,
        r"\bq\b", r"None"),
    row("na1d-k-list", "na1d", lambda: (qkv(1)[0], qkv(1)[1].tolist(), qkv(1)[2], 3), {},
        TypeError, r"\bk\b", r"list"),
    row("na1d-v-float-scalar", "na1d", lambda: qkv(1)[:2] + (1.5, 3), {}, TypeError,
        r"\bv\b", r"float"),
    row("na1d-v-None", "na1d", lambda: qkv(1)[:2] + (None, 3), {}, TypeError,
        r"\bv\b", r"None"),
    # unfused qk
    row("na1d_qk-kernel-1", "na1d_qk", lambda: qkv(1)[:2] + (1,), {}, ValueError,
        r"kernel_size", lit("(1,)")),
    row("na1d_qk-kernel-gt-length", "na1d_qk", lambda: qkv(1)[:2] + (9,), {}, ValueError,
        r"kernel_size", lit("(9,)")),
    row("na2d_qk-dilation-0", "na2d_qk", lambda: qkv(2)[:2] + (3,), {"dilation": (0, 1)},
        ValueError, r"dilation", lit("(0, 1)")),
    row("na2d_qk-kernel-tuple-len3", "na2d_qk", lambda: qkv(2)[:2] + ((3, 3, 3),), {},
        ValueError, r"kernel_size", lit("(3, 3, 3)")),
    row("na2d_qk-given-1d-inputs", "na2d_qk", lambda: qkv(1)[:2] + (3,), {}, ValueError,
        r"\bq\b", Q1),
    row("na3d_qk-given-2d-inputs", "na3d_qk", lambda: qkv(2)[:2] + (3,), {}, ValueError,
        r"\bq\b", lit("(1, 6, 7, 2, 4)")),
    row("na1d_qk-given-3d-inputs", "na1d_qk", lambda: qkv(3)[:2] + (3,), {}, ValueError,
        r"\bq\b", lit("(1, 4, 5, 6, 2, 4)")),
    row("na1d_qk-k-head-dim-mismatch", "na1d_qk", lambda: shaped(1, k=(1, 8, 2, 5))[:2] + (3,),
        {}, ValueError, r"\bk\b", r"head_dim", r"\b5\b"),
    row("na1d_qk-heads-not-divisible", "na1d_qk",
        lambda: shaped(1, q=(1, 8, 3, 4), k=(1, 8, 2, 4))[:2] + (3,), {}, ValueError,
        r"\bq\b", r"\b3 heads"),
    row("na1d_qk-k-float64", "na1d_qk", lambda: with_dtypes(qkv(1)[:2], None, np.float64)
        + (3,), {}, TypeError, r"\bk\b", r"float64"),
    row("na1d_qk-k-zero-length", "na1d_qk", lambda: shaped(1, k=(1, 0, 2, 4))[:2] + (3,), {},
        ValueError, r"\bk\b", lit("(1, 0, 2, 4)")),
    row("na1d_qk-q-list", "na1d_qk", lambda: (qkv(1)[0].tolist(), qkv(1)[1], 3), {},
        TypeError, r"\bq\b", r"list"),
    row("na1d_qk-causal-int", "na1d_qk", lambda: qkv(1)[:2] + (3,), {"is_causal": 0},
        TypeError, r"is_causal=0\b"),
    row("na1d_qk-rpb-causal", "na1d_qk", lambda: qkv(1)[:2] + (3,),
        {"is_causal": True, "rpb": lambda: rpb(2, 3)}, ValueError, r"rpb", r"is_causal"),
    row("na1d_qk-rpb-wrong-extent", "na1d_qk", lambda: qkv(1)[:2] + (3,),
        {"rpb": lambda: rand((2, 7))}, ValueError, r"rpb", lit("(2, 7)")),
    row("na2d_qk-no-stride-argument", "na2d_qk", lambda: qkv(2)[:2] + (3,), {"stride": 2},
        TypeError, r"stride", prefix=False),
    row("na1d_qk-no-scale-argument", "na1d_qk", lambda: qkv(1)[:2] + (3,), {"scale": 0.5},
        TypeError, r"scale", prefix=False),
    # unfused av
    row("na2d_av-attn-last-dim-wrong", "na2d_av", lambda: attn_v(2, window=8) + (3,), {},
        ValueError, r"\battn\b", lit("(1, 6, 7, 2, 8)"), r"\b9\b"),
    row("na1d_av-attn-last-dim-kernel-not-product", "na1d_av", lambda: attn_v(1, window=4)
        + (3,), {}, ValueError, r"\battn\b", lit("(1, 8, 2, 4)"), r"\b3\b"),
    row("na3d_av-attn-last-dim-wrong", "na3d_av", lambda: attn_v(3, window=6) + ((2, 2, 2),),
        {}, ValueError, r"\battn\b", lit("(1, 4, 5, 6, 2, 6)"), r"\b8\b"),
    row("na1d_av-attn-zero-window", "na1d_av", lambda: attn_v(1, window=0) + (3,), {},
        ValueError, r"\battn\b", lit("(1, 8, 2, 0)")),
    row("na1d_av-kernel-1", "na1d_av", lambda: attn_v(1, window=1) + (1,), {}, ValueError,
        r"kernel_size", lit("(1,)")),
    row("na1d_av-kernel-gt-length", "na1d_av", lambda: attn_v(1, window=9) + (9,), {},
        ValueError, r"kernel_size", lit("(9,)")),
    row("na2d_av-kernel-tuple-len1", "na2d_av", lambda: attn_v(2, window=9) + ((3,),), {},
        ValueError, r"kernel_size", lit("(3,)")),
    row("na1d_av-heads-not-divisible", "na1d_av", lambda: attn_v(1, heads=3, heads_kv=2)
        + (3,), {}, ValueError, r"\battn\b", r"\b3 heads", r"\b2\b"),
    row("na1d_av-v-batch-mismatch", "na1d_av", lambda: attn_v(1, v_batch=2) + (3,), {},
        ValueError, r"\bv\b", lit("(2, 8, 2, 4)")),
    row("na2d_av-v-spatial-mismatch", "na2d_av",
        lambda: attn_v(2, window=9, v_spatial=(6, 6)) + (3,), {}, ValueError,
        r"\bv\b", lit("(1, 6, 6, 2, 4)")),
    row("na2d_av-given-1d-inputs", "na2d_av", lambda: attn_v(1) + (3,), {}, ValueError,
        r"\battn\b", lit("(1, 8, 2, 3)")),
    row("na3d_av-given-2d-inputs", "na3d_av", lambda: attn_v(2, window=8) + (2,), {},
        ValueError, r"\battn\b", lit("(1, 6, 7, 2, 8)")),
    row("na1d_av-given-2d-inputs", "na1d_av", lambda: attn_v(2) + (3,), {}, ValueError,
        r"\battn\b", lit("(1, 6, 7, 2, 3)")),
    row("na1d_av-v-wrong-rank", "na1d_av", lambda: (attn_v(1)[0], rand((1, 8, 4)), 3), {},
        ValueError, r"\bv\b", lit("(1, 8, 4)")),
    row("na1d_av-v-float64", "na1d_av", lambda: with_dtypes(attn_v(1), None, np.float64)
        + (3,), {}, TypeError, r"\bv\b", r"float64", r"float32"),
    row("na1d_av-attn-int32", "na1d_av", lambda: with_dtypes(attn_v(1), np.int32) + (3,), {},
        TypeError, r"\battn\b", r"int32"),
    row("na1d_av-attn-list", "na1d_av", lambda: (attn_v(1)[0].tolist(), attn_v(1)[1], 3), {},
        TypeError, r"\battn\b", r"list"),
    row("na1d_av-dilation-0", "na1d_av", lambda: attn_v(1) + (3,), {"dilation": 0},
        ValueError, r"dilation", lit("(0,)")),
    row("na1d_av-causal-str", "na1d_av", lambda: attn_v(1) + (3,), {"is_causal": "no"},
        TypeError, r"is_causal", lit("'no'")),
    row("na1d_av-no-stride-argument", "na1d_av", lambda: attn_v(1) + (3,), {"stride": 1},
        TypeError, r"stride", prefix=False),
    row("na1d_av-no-rpb-argument", "na1d_av", lambda: attn_v(1) + (3,),
        {"rpb": lambda: rpb(2, 3)}, TypeError, r"rpb", prefix=False),
    # torch tensors
    row("torch-q-numpy-kv", "na1d", lambda: tt(qkv(1)[0]) + qkv(1)[1:] + (3,), {},
        TypeError, r"torch", r"numpy"),
    row("numpy-q-torch-k", "na1d", lambda: (qkv(1)[0],) + tt(qkv(1)[1]) + (qkv(1)[2], 3), {},
        TypeError, r"torch", r"numpy"),
    row("torch-qkv-numpy-rpb", "na1d", lambda: tt(*qkv(1)) + (3,),
        {"rpb": lambda: rpb(2, 3)}, TypeError, r"rpb", r"torch", r"numpy"),
    row("na1d_av-numpy-attn-torch-v", "na1d_av", lambda: (attn_v(1)[0],) + tt(attn_v(1)[1])
        + (3,), {}, TypeError, r"torch", r"numpy"),
    row("torch-int32", "na1d", lambda: tt(*qkv(1, dtype=np.int32)) + (3,), {}, TypeError,
        r"\bq\b", r"int32"),
    row("torch-k-int64", "na1d", lambda: tt(*with_dtypes(qkv(1), None, np.int64)) + (3,), {},
        TypeError, r"\bk\b", r"int64"),
    row("torch-bool", "na1d", lambda: tt(*qkv(1, dtype=np.bool_)) + (3,), {}, TypeError,
        r"\bq\b", r"bool"),
    row("torch-complex64", "na1d", lambda: tt(*qkv(1, dtype=np.complex64)) + (3,), {},
        TypeError, r"\bq\b", r"complex"),
    row("torch-uint16", "na1d", lambda: tuple(t.to(torch.uint16) for t in tt(*qkv(1)))
        + (3,), {}, TypeError, r"\bq\b", r"uint16"),
    row("torch-k-float64-q-float32", "na1d",
        lambda: tt(*with_dtypes(qkv(1), None, np.float64)) + (3,), {}, TypeError,
        r"\bk\b", r"float64", r"float32"),
    row("torch-zero-batch", "na2d", lambda: tt(*qkv(2, batch=0)) + (3,), {}, ValueError,
        r"\bq\b", lit("(0, 6, 7, 2, 4)")),
    row("torch-wrong-rank", "na2d", lambda: tt(*qkv(1)) + (3,), {}, ValueError,
        r"\bq\b", Q1),
    row("torch-kernel-gt-length", "na1d", lambda: tt(*qkv(1)) + (9,), {}, ValueError,
        r"kernel_size", lit("(9,)")),
    row("torch-meta-qkv", "na1d",
        lambda: tuple(torch.empty(a.shape, device="meta") for a in qkv(1)) + (3,), {},
        (ValueError, TypeError, RuntimeError), r"\bq\b", r"meta"),
    row("torch-meta-k-cpu-qv", "na1d",
        lambda: (tt(qkv(1)[0])[0], torch.empty((1, 8, 2, 4), device="meta"),
                 tt(qkv(1)[2])[0], 3), {},
        (ValueError, TypeError, RuntimeError), r"\bk\b", r"meta"),
    row("torch-meta-rpb", "na1d", lambda: tt(*qkv(1)) + (3,),
        {"rpb": lambda: torch.empty((2, 5), device="meta")},
        (ValueError, TypeError, RuntimeError), r"rpb", r"meta"),
    # torch tensors that DLPack cannot export (not strided, quantized)
    row("torch-sparse-q", "na2d", lambda: (tt(qkv(2)[0])[0].to_sparse(),) + tt(*qkv(2)[1:])
        + (3,), {}, TypeError, r"\bq\b", r"torch\.Tensor", r"(?i)sparse|strided"),
    row("torch-mkldnn-v", "na1d", lambda: tt(*qkv(1)[:2]) + (tt(qkv(1)[2])[0].to_mkldnn(), 3),
        {}, TypeError, r"\bv\b", r"(?i)mkldnn|strided"),
    row("torch-quantized", "na1d", lambda: tuple(
        torch.quantize_per_tensor(t, 0.1, 0, torch.qint8) for t in tt(*qkv(1))) + (3,), {},
        TypeError, r"\bq\b", r"(?i)qint", marks=QUANTIZED_IS_DEPRECATED),
    row("merge_attentions-sparse-out", "merge_attentions",
        lambda: ([tt(qkv(1)[0])[0].to_sparse()], [tt(rand((1, 8, 2)))[0]]), {}, TypeError,
        lit("outs[0]"), r"(?i)sparse|strided"),
    row("merge_attentions-outs-int", "merge_attentions", lambda: (5, 5), {}, TypeError,
        r"\bouts\b", r"int"),
    # keywords a function does not take (the reference raises Python's own
    # message, which names the function as well)
    row("na2d-unknown-keyword", "na2d", lambda: qkv(2) + (3,), {"foo": 1}, TypeError,
        r"\bna2d\b", r"foo", prefix=False),
    row("na1d_backward-unknown-keyword", "na1d_backward", lambda: qkv(1), {"foo": 1},
        TypeError, r"\bna1d_backward\b", r"foo", prefix=False),
    # the backward's own name, not its forward's (the core once said [na1d])
    row("na1d_backward-kernel-gt-length", "na1d_backward",
        lambda: qkv(1) + (rand((1, 8, 2, 4)), rand((1, 8, 2, 4)), rand((1, 8, 2)), 9), {},
        ValueError, r"kernel_size", r"\b9\b"),
    row("merge_attentions-unknown-keyword", "merge_attentions",
        lambda: ([qkv(1)[0]], [rand((1, 8, 2))]), {"weights": 1}, TypeError,
        r"\bmerge_attentions\b", r"weights", prefix=False),
]


@pytest.mark.parametrize("fn, build, kwargs, exc, patterns, prefix", ROWS)
def test_bad_input(mod, fn, build, kwargs, exc, patterns, prefix):
    args = build()
    kwargs = {name: (value() if callable(value) else value) for name, value in kwargs.items()}
    with pytest.raises(exc) as info:
        getattr(mod, fn)(*args, **kwargs)
    message = str(info.value)
    if prefix:
        assert message.startswith(f"[{fn}]"), f"message does not name the op: {message!r}"
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in message {message!r}"


# --- every public entry point names itself ------------------------------------
def _public_functions():
    """(name, function) of every public function and class of libna,
    libna.torch (with its rank-generic ops) and libna.jax when it imports."""
    import libna.torch

    found = {}
    modules = [(libna, libna.__all__), (libna.torch, libna.torch.__all__),
               (libna.torch.ops, ["na", "na_qk", "na_av"])]
    try:
        import libna.jax
        modules.append((libna.jax, libna.jax.__all__))
    except ImportError:
        pass
    for module, names in modules:
        for name in names:
            fn = getattr(module, name)
            if callable(fn) and not isinstance(fn, type(libna)):
                found[f"{module.__name__}.{name}"] = (name, fn)
    return found


@pytest.mark.parametrize("path", list(_public_functions()))
def test_call_that_does_not_fit_names_the_function(compiled, path):
    name, fn = _public_functions()[path]
    with pytest.raises(TypeError) as info:
        fn(foo=[1, 2])
    message = str(info.value)
    assert message.startswith(f"[{name}] got an unexpected keyword argument foo=[1, 2]; "
                              f"expected {name}("), message
    with pytest.raises(TypeError, match=rf"^\[{name}\] (too many positional|missing)"):
        fn(*range(20))


def test_module_call_that_does_not_fit_names_the_class(compiled):
    layer = libna.torch.nn.NeighborhoodAttention1D(8, 2, 3)
    x = torch.randn(1, 8, 8)
    with pytest.raises(TypeError, match=r"^\[NeighborhoodAttention1D\] got an unexpected "
                       r"keyword argument mask=None; expected "
                       r"NeighborhoodAttention1D\.forward\(x\)"):
        layer(x, mask=None)
    with pytest.raises(TypeError, match=r"^\[NeighborhoodAttention1D\] too many positional"):
        layer(x, x)


@pytest.mark.parametrize("value, exc, pattern", [
    (2 ** 40, ValueError, lit(str(2 ** 40))),   # does not fit a C int
    (2 ** 31, ValueError, lit(str(2 ** 31))),
    (10 ** 6, ValueError, lit(str(10 ** 6))),   # fits, but is not a sensible thread count
    (1025, ValueError, r"1025"),
    (0, ValueError, r"num_threads=0\b"),
    (-2 ** 70, ValueError, lit(str(-2 ** 70))),
    (True, TypeError, r"True"),
    (2.0, TypeError, lit("2.0")),
    ("2", TypeError, lit("'2'")),
    (None, TypeError, r"None"),
])
def test_set_num_threads_bad_values(compiled, value, exc, pattern):
    before = libna.get_num_threads()
    with pytest.raises(exc) as info:
        libna.set_num_threads(value)
    message = str(info.value)
    assert message.startswith("[set_num_threads] num_threads="), message
    assert re.search(pattern, message), message
    if exc is ValueError:
        assert "between 1 and 1024" in message, message
    assert libna.get_num_threads() == before


def test_set_num_threads_takes_numpy_ints(compiled):
    before = libna.get_num_threads()
    try:
        libna.set_num_threads(np.int64(1))
        assert libna.get_num_threads() == 1
    finally:
        libna.set_num_threads(before)


# --- libna.torch refuses tensors it cannot read, by name ------------------------
def _torch_qkv(rank=2):
    return tt(*qkv(rank))


@pytest.mark.parametrize("make, exc, pattern", [
    (lambda q, k, v: (q.to_sparse(), k, v), TypeError, r"\[na2d\] q has layout torch\.sparse_coo"),
    (lambda q, k, v: (q, k.to_mkldnn(), v), TypeError,
     r"\[na2d\] k has layout torch\._mkldnn"),
    (lambda q, k, v: tuple(torch.quantize_per_tensor(t, 0.1, 0, torch.qint8) for t in (q, k, v)),
     TypeError, r"\[na2d\] q .*(?i:qint)"),
    (lambda q, k, v: (q, k.to("meta"), v), ValueError,
     r"\[na2d\] k is on device meta but q is on device cpu"),
    (lambda q, k, v: (q.to(torch.complex64), k.to(torch.complex64), v.to(torch.complex64)),
     TypeError, r"\[na2d\] q has dtype complex64"),
    (lambda q, k, v: (q.int(), k.int(), v.int()), TypeError, r"\[na2d\] q has dtype int32"),
    (lambda q, k, v: (q.numpy().astype(object), k, v), TypeError,
     r"\[na2d\] q must be a torch\.Tensor, got numpy\.ndarray"),
    (lambda q, k, v: ([1.0], k, v), TypeError,
     r"\[na2d\] q must be a torch\.Tensor, got builtins\.list"),
    (lambda q, k, v: (q, None, v), TypeError,
     r"\[na2d\] k must be a torch\.Tensor, got builtins\.NoneType"),
], ids=["sparse", "mkldnn", "quantized", "meta-and-cpu", "complex", "int32", "object-array",
        "list", "None"])
@QUANTIZED_IS_DEPRECATED
def test_torch_adapter_names_unreadable_tensors(compiled, make, exc, pattern):
    import libna.torch

    with pytest.raises(exc, match=pattern):
        libna.torch.na2d(*make(*_torch_qkv()), 3)


def test_torch_adapter_other_entry_points(compiled):
    import libna.torch

    q, k, v = _torch_qkv(1)
    with pytest.raises(TypeError, match=r"^\[na1d_qk\] k has layout torch\.sparse_coo"):
        libna.torch.na1d_qk(q, k.to_sparse(), 3)
    with pytest.raises(TypeError, match=r"^\[na1d_av\] attn has layout torch\.sparse_coo"):
        libna.torch.na1d_av(torch.randn(1, 8, 2, 3).to_sparse(), v, 3)
    lse = torch.randn(1, 8, 2)
    with pytest.raises(TypeError, match=r"^\[merge_attentions\] outs\[0\] has layout"):
        libna.torch.merge_attentions([q.to_sparse()], [lse])
    with pytest.raises(TypeError, match=r"^\[merge_attentions\] outs must be a list or tuple"):
        libna.torch.merge_attentions(q, [lse])
    with pytest.raises(ValueError, match=r"^\[merge_attentions\] outs and lses .* 1 outs and 2"):
        libna.torch.merge_attentions([q], [lse, lse])
    for rank in ("2", 4, True, 2.0):
        with pytest.raises(ValueError,
                           match=rf"^\[na\] rank={re.escape(repr(rank))} must be 1, 2 or 3"):
            libna.torch.ops.na(rank, q, k, v, 3)


@pytest.mark.parametrize("kwargs, exc, pattern", [
    ({"qk_scale": "0.5"}, TypeError, r"qk_scale='0\.5'"),
    ({"attn_drop": 1.5}, ValueError, r"attn_drop=1\.5 must be a probability"),
    ({"proj_drop": -0.1}, ValueError, r"proj_drop=-0\.1 must be a probability"),
    ({"attn_drop": "0.1"}, TypeError, r"attn_drop='0\.1'"),
    ({"proj_drop": float("nan")}, ValueError, r"proj_drop=nan"),
    ({"dim": True}, TypeError, r"dim=True must be an int"),
    ({"kernel_size": 2 ** 64}, ValueError, r"kernel_size=.*out of range"),
])
def test_module_arguments_name_the_class(compiled, kwargs, exc, pattern):
    import libna.torch

    args = {"dim": 8, "num_heads": 2, "kernel_size": 3, **kwargs}
    with pytest.raises(exc, match=r"^\[NeighborhoodAttention2D\] " + pattern):
        libna.torch.nn.NeighborhoodAttention2D(**args)


def test_module_input_errors_name_the_class(compiled):
    import libna.torch

    layer = libna.torch.nn.NeighborhoodAttention2D(8, 2, 3)
    with pytest.raises(TypeError, match=r"^\[NeighborhoodAttention2D\] x must be a torch\.Tensor"):
        layer(np.zeros((1, 6, 7, 8), np.float32))
    with pytest.raises(ValueError, match=r"^\[NeighborhoodAttention2D\] .*dim=8.*\(1, 6, 7, 5\)"):
        layer(torch.randn(1, 6, 7, 5))


# --- devices (a second device is only reachable with a GPU) -------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_cuda_tensors_mixed(compiled):
    q, k, v = tt(*qkv(1))
    with pytest.raises(ValueError, match=r"\[na1d\] k .*cuda.*cpu|\[na1d\] k .*cpu.*cuda"):
        compiled.na1d(q, k.cuda(), v, 3)


# --- unusual but valid input works ---------------------------------------------
def test_requires_grad_torch_tensors_work(compiled):
    q, k, v = tt(*qkv(2))
    for t in (q, k, v):
        t.requires_grad_(True)
    out = compiled.na2d(q, k, v, 3)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 6, 7, 2, 4)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    expected = reference.na2d(q.detach().numpy(), k.detach().numpy(), v.detach().numpy(), 3)
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    attn = compiled.na2d_qk(q, k, 3)
    assert isinstance(attn, torch.Tensor) and attn.shape == (1, 6, 7, 2, 9)
    assert isinstance(compiled.na2d_av(attn.detach().requires_grad_(True), v, 3), torch.Tensor)
    assert all(t.requires_grad for t in (q, k, v))


def test_numpy_bfloat16_works(mod):
    q, k, v = qkv(1, dtype=ml_dtypes.bfloat16)
    bias = rpb(2, 3, dtype=ml_dtypes.bfloat16)
    out, lse = mod.na1d(q, k, v, 3, rpb=bias, return_lse=True)
    assert out.dtype == ml_dtypes.bfloat16 and out.shape == (1, 8, 2, 4)
    assert lse.dtype == np.float32 and lse.shape == (1, 8, 2)
    f64 = [a.astype(np.float64) for a in (q, k, v, bias)]
    expected = reference.na1d(*f64[:3], 3, rpb=f64[3])
    np.testing.assert_allclose(out.astype(np.float64), expected, rtol=2e-2, atol=2e-2)
    attn = mod.na1d_qk(q, k, 3)
    assert attn.dtype == ml_dtypes.bfloat16
    assert mod.na1d_av(attn, v, 3).dtype == ml_dtypes.bfloat16


def test_numpy_scalar_and_list_arguments_work(mod):
    q, k, v = qkv(2)
    out = mod.na2d(q, k, v, [np.int64(3), np.int32(2)], stride=np.int16(1),
                   dilation=(np.uint8(1), 2), is_causal=(np.bool_(True), False),
                   scale=np.float32(0.5), return_lse=np.bool_(False))
    expected = reference.na2d(q, k, v, (3, 2), dilation=(1, 2), is_causal=(True, False),
                              scale=0.5)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["negative-strides", "broadcast-zero-stride", "fortran",
                                    "sliced", "read-only"])
def test_unusual_memory_layouts_give_the_right_answer(mod, layout):
    q, k, v = qkv(2, spatial=(6, 14))
    if layout == "negative-strides":
        q, k, v = (a[:, ::-1, ::-1] for a in (q, k, v))
    elif layout == "broadcast-zero-stride":
        k = np.broadcast_to(k[:, :1], k.shape)
    elif layout == "fortran":
        q, k, v = (np.asfortranarray(a) for a in (q, k, v))
    elif layout == "sliced":
        q, k, v = (a[:, :, ::2] for a in (q, k, v))
    else:
        for a in (q, k, v):
            a.flags.writeable = False
    out = mod.na2d(q, k, v, 3, dilation=(1, 2))
    expected = reference.na2d(*(np.ascontiguousarray(a) for a in (q, k, v)), 3,
                              dilation=(1, 2))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


# --- outputs are fresh, inputs untouched ---------------------------------------
def _calls(rank):
    def fused(m, q, k, v, bias, attn):
        return m.__dict__[f"na{rank}d"](q, k, v, 3, rpb=bias, return_lse=True)

    def fused_strided_causal(m, q, k, v, bias, attn):
        return (m.__dict__[f"na{rank}d"](q, k, v, 3, stride=2, is_causal=True),)

    def qk(m, q, k, v, bias, attn):
        return (m.__dict__[f"na{rank}d_qk"](q, k, 3, rpb=bias),)

    def av(m, q, k, v, bias, attn):
        return (m.__dict__[f"na{rank}d_av"](attn, v, 3),)

    return {"fused-rpb-lse": fused, "fused-stride-causal": fused_strided_causal,
            "qk-rpb": qk, "av": av}


def _as_numpy(x):
    return x.detach().numpy() if isinstance(x, torch.Tensor) else x


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("call", ["fused-rpb-lse", "fused-stride-causal", "qk-rpb", "av"])
@pytest.mark.parametrize("mod,kind", [
    *((m, kind) for m in (libna, reference) for kind in ("float32", "float64", "bfloat16")),
    (libna, "torch"),  # the reference is NumPy-only
], ids=lambda x: getattr(x, "__name__", x))
def test_inputs_unchanged_and_outputs_fresh(mod, rank, call, kind):
    dtype = {"float32": np.float32, "float64": np.float64, "bfloat16": ml_dtypes.bfloat16,
             "torch": np.float32}[kind]
    spatial = {1: (9,), 2: (5, 6), 3: (4, 4, 5)}[rank]
    q, k, v = qkv(rank, spatial=spatial, dtype=dtype)
    bias = rpb(HEADS, *(3,) * rank, dtype=dtype)
    attn = rand((1, *spatial, HEADS, 3 ** rank), dtype)
    if kind == "torch":
        q, k, v, bias, attn = tt(q, k, v, bias, attn)
    inputs = [q, k, v, bias, attn]
    before = [_as_numpy(a).tobytes() for a in inputs]
    outputs = list(_calls(rank)[call](mod, *inputs))
    for a, b in zip(inputs, before):
        assert _as_numpy(a).tobytes() == b, "an input was written"
    for out in outputs:
        assert type(out) is type(q)
        for a in inputs:
            assert not np.shares_memory(_as_numpy(out), _as_numpy(a)), \
                "an output shares memory with an input"
    if len(outputs) == 2:
        assert not np.shares_memory(_as_numpy(outputs[0]), _as_numpy(outputs[1]))
    # a second call gives a new buffer, not the first one again
    again = _calls(rank)[call](mod, *inputs)[0]
    assert not np.shares_memory(_as_numpy(again), _as_numpy(outputs[0]))
    np.testing.assert_array_equal(_as_numpy(again).astype(np.float64),
                                  _as_numpy(outputs[0]).astype(np.float64))
