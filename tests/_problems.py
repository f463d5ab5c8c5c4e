"""Random neighbourhood-attention problems for the property tests: hypothesis
strategies for the geometry (rank 1-3, small extents, kernel, stride,
dilation, per-axis causal, rpb, GQA, D_v != D, dtype), the inputs of every
op, and memory layouts that keep an array's values but not its strides.

Array values come from a NumPy generator seeded by hypothesis (drawing
arrays element by element would be slow and shrink nowhere useful); the
geometry is drawn, and shrinks, directly.
"""

import dataclasses

import numpy as np
from hypothesis import strategies as st

import libna
from libna import reference

try:  # optional, as in test_forward.py
    import ml_dtypes
except ImportError:  # pragma: no cover
    ml_dtypes = None

DTYPES = {"float64": np.dtype(np.float64), "float32": np.dtype(np.float32),
          "float16": np.dtype(np.float16)}
if ml_dtypes is not None:
    DTYPES["bfloat16"] = np.dtype(ml_dtypes.bfloat16)

MAX_EXTENT = {1: 24, 2: 8, 3: 5}
MAX_KERNEL = {1: 9, 2: 5, 3: 4}
HEAD_DIMS = [1, 2, 3, 4, 5, 8, 16, 17, 32]


@dataclasses.dataclass(frozen=True)
class Problem:
    spatial: tuple
    kernel: tuple
    stride: tuple
    dilation: tuple
    causal: tuple
    batch: int
    heads: int
    heads_kv: int
    dim: int
    dim_v: int
    use_rpb: bool
    scale: object
    dtype: str
    seed: int

    @property
    def rank(self):
        return len(self.spatial)

    @property
    def np_dtype(self):
        return DTYPES[self.dtype]

    @property
    def lse_dtype(self):
        return np.dtype(np.float64 if self.dtype == "float64" else np.float32)

    def shape(self, name):
        """The shape of q, k, v, rpb, out (also dout) or attn (also dattn)."""
        lead = (self.batch, *self.spatial)
        return {"q": (*lead, self.heads, self.dim), "k": (*lead, self.heads_kv, self.dim),
                "v": (*lead, self.heads_kv, self.dim_v), "out": (*lead, self.heads, self.dim_v),
                "attn": (*lead, self.heads, int(np.prod(self.kernel))),
                "rpb": (self.heads, *[2 * k - 1 for k in self.kernel])}[name]

    def fused_kw(self):
        return dict(stride=self.stride, dilation=self.dilation, is_causal=self.causal,
                    scale=self.scale)

    def unfused_kw(self):
        return dict(dilation=self.dilation, is_causal=self.causal)

    def fn(self, module, op):
        """module.na{rank}d{op}, e.g. fn(libna, "_qk_backward")."""
        return getattr(module, f"na{self.rank}d{op}")

    def with_batch(self, batch):
        return dataclasses.replace(self, batch=batch)


@st.composite
def problems(draw, dtypes=tuple(DTYPES), batch=st.integers(1, 2), rpb=None, stride=True):
    """A valid geometry. rpb=None draws whether it has an rpb, which needs
    every axis non-causal with stride 1 (drawn first: after the axes, few
    problems would allow one); stride=False keeps stride 1 (the unfused ops
    have none)."""
    rank = draw(st.integers(1, 3))
    use_rpb = draw(st.booleans()) if rpb is None else rpb
    spatial, kernel, strides, dilation, causal = [], [], [], [], []
    for _ in range(rank):
        k = draw(st.integers(2, MAX_KERNEL[rank]))
        d = draw(st.integers(1, MAX_EXTENT[rank] // k))
        spatial.append(draw(st.integers(k * d, MAX_EXTENT[rank])))
        kernel.append(k)
        strides.append(draw(st.integers(1, k)) if stride and not use_rpb else 1)
        dilation.append(d)
        causal.append(not use_rpb and draw(st.booleans()))
    heads_kv = draw(st.integers(1, 2))
    return Problem(
        spatial=tuple(spatial), kernel=tuple(kernel), stride=tuple(strides),
        dilation=tuple(dilation), causal=tuple(causal), batch=draw(batch),
        heads=heads_kv * draw(st.integers(1, 3)), heads_kv=heads_kv,
        dim=draw(st.sampled_from(HEAD_DIMS)), dim_v=draw(st.sampled_from(HEAD_DIMS)),
        use_rpb=use_rpb, scale=draw(st.one_of(st.none(), st.floats(0.05, 1.5))),
        dtype=draw(st.sampled_from(dtypes)), seed=draw(st.integers(0, 2**32 - 1)))


# --- inputs of every op ------------------------------------------------------
def qkv_rpb(p, rng):
    """q, k, v, rpb (None without rpb) in float64, exactly representable in
    the problem's dtype, so that every implementation sees the same values."""
    return {name: rounded(rng.standard_normal(p.shape(name)), p.np_dtype)
            if name != "rpb" or p.use_rpb else None for name in ("q", "k", "v", "rpb")}


def rounded(x, dtype):
    return None if x is None else x.astype(dtype).astype(np.float64)


def cast(arrays, dtypes):
    """Each float64 array in its dtype (dtypes: by name); None stays None."""
    return {n: None if x is None else x.astype(dtypes[n]) for n, x in arrays.items()}


class Op:
    """One public op: the float64 inputs of a problem (`make`), the call of
    libna or the reference on them (`run`, a tuple of outputs), and the
    names of its inputs and outputs."""

    def __init__(self, name, inputs, outputs, make, run, dtypes=None):
        self.name, self.inputs, self.outputs = name, inputs, outputs
        self.make, self.run = make, run
        self.dtypes = dtypes or {}  # per-input dtype overrides (lse)

    def input_dtypes(self, p):
        return {n: self.dtypes.get(n, lambda p: p.np_dtype)(p) for n in self.inputs}

    def output_names(self, p):
        return [n for n in self.outputs if n != "drpb" or p.use_rpb]


def _backward_inputs(p, rng):
    a = qkv_rpb(p, rng)
    out, lse = p.fn(reference, "")(a["q"], a["k"], a["v"], p.kernel, rpb=a["rpb"],
                                   return_lse=True, **p.fused_kw())
    a["out"], a["lse"] = rounded(out, p.np_dtype), rounded(lse, p.lse_dtype)
    a["dout"] = rounded(rng.standard_normal(p.shape("out")), p.np_dtype)
    return a


def _qk_inputs(p, rng):
    a = qkv_rpb(p, rng)
    a["dattn"] = rounded(rng.standard_normal(p.shape("attn")), p.np_dtype)
    return a


def _av_inputs(p, rng):
    a = qkv_rpb(p, rng)
    a["attn"] = rounded(rng.random(p.shape("attn")), p.np_dtype)
    a["dout"] = rounded(rng.standard_normal(p.shape("out")), p.np_dtype)
    return a


OPS = {op.name: op for op in [
    Op("forward", ("q", "k", "v", "rpb"), ("out", "lse"), qkv_rpb,
       lambda m, p, a: p.fn(m, "")(a["q"], a["k"], a["v"], p.kernel, rpb=a["rpb"],
                                   return_lse=True, **p.fused_kw())),
    Op("backward", ("q", "k", "v", "out", "dout", "lse", "rpb"), ("dq", "dk", "dv", "drpb"),
       _backward_inputs,
       lambda m, p, a: p.fn(m, "_backward")(a["q"], a["k"], a["v"], a["out"], a["dout"],
                                            a["lse"], p.kernel, rpb=a["rpb"], **p.fused_kw()),
       dtypes={"lse": lambda p: p.lse_dtype}),
    Op("qk", ("q", "k", "rpb"), ("attn",), _qk_inputs,
       lambda m, p, a: (p.fn(m, "_qk")(a["q"], a["k"], p.kernel, rpb=a["rpb"],
                                       **p.unfused_kw()),)),
    Op("av", ("attn", "v"), ("out",), _av_inputs,
       lambda m, p, a: (p.fn(m, "_av")(a["attn"], a["v"], p.kernel, **p.unfused_kw()),)),
    Op("qk_backward", ("dattn", "q", "k", "rpb"), ("dq", "dk", "drpb"), _qk_inputs,
       lambda m, p, a: p.fn(m, "_qk_backward")(a["dattn"], a["q"], a["k"], p.kernel,
                                               rpb=a["rpb"], **p.unfused_kw())),
    Op("av_backward", ("dout", "attn", "v"), ("dattn", "dv"), _av_inputs,
       lambda m, p, a: p.fn(m, "_av_backward")(a["dout"], a["attn"], a["v"], p.kernel,
                                               **p.unfused_kw())),
]}
UNFUSED = ("qk", "av", "qk_backward", "av_backward")


def op_inputs(op, p):
    """The op's inputs for problem p: float64 values (the reference's) and
    the same values in the op's dtypes (libna's)."""
    full = op.make(p, np.random.default_rng(p.seed))
    f64 = {n: full[n] for n in op.inputs}
    return f64, cast(f64, op.input_dtypes(p))


def run_libna(op, p, arrays):
    """libna's outputs as a dict by name, after checking their dtypes."""
    outputs = dict(zip(op.output_names(p), op.run(libna, p, arrays)))
    for name, x in outputs.items():
        expected = p.lse_dtype if name == "lse" else p.np_dtype
        assert x.dtype == expected, (name, x.dtype)
    return outputs


def run_reference(op, p, arrays):
    return dict(zip(op.output_names(p), op.run(reference, p, arrays)))


def bits(x):
    """x's bit pattern (bitwise comparisons that treat NaN like any value)."""
    return np.ascontiguousarray(x).view(f"u{x.dtype.itemsize}")


# --- memory layouts -----------------------------------------------------------
SAME_VALUES = ("strided", "flipped", "transposed", "offset")
LAYOUTS = SAME_VALUES + ("broadcast",)


def relayout(x, layout, axis):
    """A view of x's values in another memory layout along `axis`
    ("broadcast" repeats the first slice along axis with stride 0)."""
    if layout == "strided":
        shape = list(x.shape)
        shape[axis] *= 3
        big = np.zeros(shape, x.dtype)
        index = (slice(None),) * axis + (slice(1, None, 3),)
        big[index] = x
        return big[index]
    if layout == "flipped":
        return np.flip(np.flip(x, axis).copy(), axis)
    if layout == "transposed":  # `axis` moves to the front in memory
        perm = [axis] + [a for a in range(x.ndim) if a != axis]
        return np.ascontiguousarray(x.transpose(perm)).transpose(np.argsort(perm))
    if layout == "offset":  # one element past an aligned start
        buf = np.zeros(x.size + 1, x.dtype)
        view = buf[1:].reshape(x.shape)
        view[...] = x
        return view
    if layout == "broadcast":
        return np.broadcast_to(np.take(x, [0], axis=axis), x.shape)
    raise AssertionError(layout)


@st.composite
def layouts(draw, names, kinds=LAYOUTS):
    """For each input name, up to two (layout, axis seed) transforms."""
    step = st.tuples(st.sampled_from(kinds), st.integers(0, 7))
    return {n: draw(st.lists(step, min_size=0, max_size=2)) for n in names}


def apply_layouts(arrays, plan):
    out = {}
    for name, x in arrays.items():
        for layout, seed in plan.get(name, ()):
            if x is not None:
                x = relayout(x, layout, seed % x.ndim)
        out[name] = x
    return out
