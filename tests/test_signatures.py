"""Every public function and class of libna's front ends shows its real
parameters (``inspect.signature``, ``help()``) rather than ``(*args,
**kwargs)``, and has a docstring; the NA ops' parameters are the documented
ones, in every front end."""

import importlib
import inspect
import pydoc

import pytest

# The public modules and, through __all__, their public names.
MODULES = [
    "libna", "libna.reference", "libna.models", "libna.viz",
    "libna.torch", "libna.torch.ops", "libna.torch.nn", "libna.torch.distributed",
    "libna.jax", "libna.jax.distributed",
    "libna.natten", "libna.natten.functional", "libna.natten.context",
]

NA = ("(q, k, v, kernel_size, *, stride=1, dilation=1, is_causal=False, scale=None, rpb=None, "
      "return_lse=False, additional_keys=None, additional_values=None)")
NA_QK = "(q, k, kernel_size, *, dilation=1, is_causal=False, rpb=None)"
NA_AV = "(attn, v, kernel_size, *, dilation=1, is_causal=False)"
NA_BACKWARD = ("(q, k, v, out, dout, lse, kernel_size, *, stride=1, dilation=1, "
               "is_causal=False, scale=None, rpb=None, additional_keys=None, "
               "additional_values=None, dlse=None)")
NA_QK_BACKWARD = "(dattn, q, k, kernel_size, *, dilation=1, is_causal=False, rpb=None)"
NA_AV_BACKWARD = "(dout, attn, v, kernel_size, *, dilation=1, is_causal=False)"
MERGE = "(outs, lses)"


def per_rank(**signatures):
    """{na1d_qk: ..., na2d_qk: ..., ...} from {"na{}d_qk": signature, ...}."""
    return {name.format(rank): signature for name, signature in signatures.items()
            for rank in (1, 2, 3)}


NUMPY_OPS = {
    **per_rank(**{"na{}d": NA, "na{}d_qk": NA_QK, "na{}d_av": NA_AV,
                  "na{}d_backward": NA_BACKWARD, "na{}d_qk_backward": NA_QK_BACKWARD,
                  "na{}d_av_backward": NA_AV_BACKWARD}),
    "merge_attentions": MERGE,
    "merge_attentions_backward": "(outs, lses, out, lse, dout, dlse=None)",
}

# The signatures that README.md and the docstrings give, per front end.
DOCUMENTED = {
    "libna": NUMPY_OPS,
    "libna.reference": NUMPY_OPS,
    "libna.torch": {**per_rank(**{"na{}d": NA, "na{}d_qk": NA_QK, "na{}d_av": NA_AV}),
                    "merge_attentions": MERGE},
    "libna.jax": {**per_rank(**{"na{}d": NA}), "merge_attentions": MERGE},
    "libna.torch.distributed": per_rank(**{"na{}d": (
        "(q, k, v, kernel_size, *, group=None, axis=0, strategy='auto', stride=1, dilation=1, "
        "is_causal=False, scale=None, rpb=None, return_lse=False, additional_keys=None, "
        "additional_values=None, replicated_grad='sum')")}),
    "libna.jax.distributed": per_rank(**{"na{}d": (
        "(q, k, v, kernel_size, *, axis_name, axis=0, stride=1, dilation=1, is_causal=False, "
        "scale=None, rpb=None, return_lse=False, additional_keys=None, "
        "additional_values=None)")}),
    "libna.natten.functional": {
        **per_rank(**{
            "na{}d": ("(query, key, value, kernel_size, dilation=1, is_causal=False, rpb=None, "
                      "scale=None, additional_keys=None, additional_values=None, "
                      "xformers_kwargs=None)"),
            "na{}d_qk": ("(query, key, kernel_size, dilation=1, additional_keys=None, "
                         "is_causal=False, rpb=None)"),
            "na{}d_av": ("(attn, value, kernel_size, dilation=1, additional_values=None, "
                         "is_causal=False)"),
        }),
        # 0.14-0.16 names; the 3D ones also take (kernel_size_d, kernel_size,
        # dilation_d, dilation), hence *args.
        "natten1dqkrpb": "(query, key, rpb, kernel_size, dilation)",
        "natten2dqkrpb": "(query, key, rpb, kernel_size, dilation)",
        "natten3dqkrpb": "(query, key, rpb, *args)",
        "natten2dqk": "(query, key, kernel_size, dilation)",
        "natten2dav": "(attn, value, kernel_size, dilation)",
    },
}


def load(module_name):
    """The module, or a skip when a framework it needs is missing."""
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        pytest.skip(f"{module_name} is unavailable: {error}")


def shown(signature):
    """The signature as help() shows it, less annotations."""
    return str(signature.replace(
        parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
        return_annotation=signature.empty))


def public_callables(module):
    for name in module.__all__:
        obj = getattr(module, name)
        if callable(obj) and not inspect.ismodule(obj):
            yield name, obj


@pytest.mark.parametrize("module_name", MODULES)
def test_public_callables_have_real_signatures_and_docstrings(module_name):
    module = load(module_name)
    problems = []
    for name, obj in public_callables(module):
        signature = inspect.signature(obj)
        kinds = {p.kind for p in signature.parameters.values()}
        if kinds and kinds <= {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}:
            problems.append(f"{name}{signature} hides its parameters")
        if not inspect.getdoc(obj):
            problems.append(f"{name} has no docstring")
    assert not problems, f"{module_name}: " + "; ".join(problems)


@pytest.mark.parametrize("module_name", sorted(DOCUMENTED))
def test_ops_take_the_documented_parameters(module_name):
    module = load(module_name)
    ops = DOCUMENTED[module_name]
    assert set(ops) <= set(module.__all__)
    for name, documented in ops.items():
        op = getattr(module, name)
        assert op.__name__ == name
        assert shown(inspect.signature(op)) == documented, name
        # help() shows the same, under the op's own name
        assert f"{name}{inspect.signature(op)}" in pydoc.plain(pydoc.render_doc(op)), name


@pytest.mark.parametrize("module_name", sorted(set(DOCUMENTED) - {"libna.reference"}))
def test_per_rank_ops_document_their_own_rank(module_name):
    """The per-rank ops are generated from one definition and one docstring
    template per op; each one's docstring names its rank and no other."""
    module = load(module_name)
    for name in DOCUMENTED[module_name]:
        if not name.startswith("na") or name[2] not in "123":
            continue
        doc = inspect.getdoc(getattr(module, name))
        rank = int(name[2])
        others = {1, 2, 3} - {rank}
        assert f"{rank}D" in doc or f"na{rank}d" in doc, (name, doc)
        assert not any(f"{r}D" in doc or f"na{r}d" in doc for r in others), (name, doc)
