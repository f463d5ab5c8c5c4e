"""Calls of NATTEN's functional API and modules, for comparing libna.natten
with NATTEN 0.17.5 argument by argument (tests/test_natten.py).

Each case calls the functions of a ``natten``-like module ``N`` exactly as
user code would (positional or keyword, ints or per-axis tuples, legacy or
0.17 names) on float64 inputs, and returns its outputs; ``run`` adds the
gradients of every input for a fixed random upstream gradient.

Recording the fixture, with the Python of a NATTEN 0.17.5 install (e.g. the
one ``../shared/tools/natten-peers.sh`` builds):

    $PEERS/natten017/bin/python tests/natten_cases.py tests/data/natten_0_17_5.npz

NATTEN 0.17.5 has neither the 0.14-0.16 names nor fused kernels on the CPU,
so when recording from it, ``natten2dqkrpb(q, k, rpb, ks, d)`` is
``na2d_qk(q, k, ks, d, rpb=rpb)`` (what 0.17 documents as its replacement)
and the fused ``na2d`` is NATTEN's own unfused ``softmax(na2d_qk(q * scale,
k, rpb=rpb))`` then ``na2d_av``, in heads-last layout.
"""

import sys

import numpy as np

SEED = 1234
B, HEADS, D = 1, 2, 4
SPATIAL = {1: (11,), 2: (7, 9), 3: (4, 6, 7)}


def _inputs(torch, rank, seed, *, rpb_kernel=None, extra=0, heads_last=False):
    rng = np.random.default_rng(seed)
    shape = ((B, *SPATIAL[rank], HEADS, D) if heads_last else (B, HEADS, *SPATIAL[rank], D))
    t = {n: rng.standard_normal(shape) for n in ("q", "k", "v")}
    if rpb_kernel is not None:
        t["rpb"] = rng.standard_normal((HEADS, *(2 * k - 1 for k in rpb_kernel)))
    if extra:
        xshape = (B, extra, HEADS, D) if heads_last else (B, HEADS, extra, D)
        t["xk"], t["xv"] = rng.standard_normal(xshape), rng.standard_normal(xshape)
    return {n: torch.tensor(a, dtype=torch.float64) for n, a in t.items()}


def _pipeline(qk, av):
    """attn = qk(t); out = av(softmax(attn), t): both recorded."""
    def case(N, t):
        attn = qk(N, t)
        return {"attn": attn, "out": av(N, attn.softmax(-1), t)}
    return case


def _cases():
    c = {}
    # --- 0.17 names, unfused, heads-first ---------------------------------
    c["na1d_qk_av"] = (1, dict(), _pipeline(
        lambda N, t: N.functional.na1d_qk(t["q"], t["k"], 5),
        lambda N, a, t: N.functional.na1d_av(a, t["v"], 5)))
    c["na1d_dilated_rpb"] = (1, dict(rpb_kernel=(3,)), _pipeline(
        lambda N, t: N.functional.na1d_qk(t["q"], t["k"], 3, 3, rpb=t["rpb"]),
        lambda N, a, t: N.functional.na1d_av(a, t["v"], 3, 3)))
    c["na1d_causal"] = (1, dict(), _pipeline(
        lambda N, t: N.functional.na1d_qk(t["q"], t["k"], 5, 2, is_causal=True),
        lambda N, a, t: N.functional.na1d_av(a, t["v"], kernel_size=5, dilation=2,
                                             is_causal=True)))
    c["na1d_additional"] = (1, dict(extra=3), _pipeline(
        lambda N, t: N.functional.na1d_qk(t["q"], t["k"], 5, 1, t["xk"]),
        lambda N, a, t: N.functional.na1d_av(a, t["v"], 5, 1, t["xv"])))
    c["na2d_qk_av"] = (2, dict(), _pipeline(
        lambda N, t: N.functional.na2d_qk(t["q"], t["k"], 5),
        lambda N, a, t: N.functional.na2d_av(a, t["v"], 5)))
    c["na2d_tuples_rpb"] = (2, dict(rpb_kernel=(5, 3)), _pipeline(
        lambda N, t: N.functional.na2d_qk(t["q"], t["k"], (5, 3), (1, 2), None, False, t["rpb"]),
        lambda N, a, t: N.functional.na2d_av(a, t["v"], (5, 3), (1, 2))))
    c["na2d_causal_mixed"] = (2, dict(), _pipeline(
        lambda N, t: N.functional.na2d_qk(t["q"], t["k"], 3, dilation=(2, 1),
                                          is_causal=(True, False)),
        lambda N, a, t: N.functional.na2d_av(a, t["v"], 3, dilation=(2, 1),
                                             is_causal=(True, False))))
    c["na2d_causal_additional"] = (2, dict(extra=2), _pipeline(
        lambda N, t: N.functional.na2d_qk(t["q"], t["k"], 3, 1, additional_keys=t["xk"],
                                          is_causal=True),
        lambda N, a, t: N.functional.na2d_av(a, t["v"], 3, 1, additional_values=t["xv"],
                                             is_causal=True)))
    c["na2d_rpb_additional"] = (2, dict(rpb_kernel=(3, 3), extra=2), _pipeline(
        lambda N, t: N.functional.na2d_qk(t["q"], t["k"], 3, 2, additional_keys=t["xk"],
                                          rpb=t["rpb"]),
        lambda N, a, t: N.functional.na2d_av(a, t["v"], 3, 2, additional_values=t["xv"])))
    c["na3d_qk_av"] = (3, dict(rpb_kernel=(3, 3, 3)), _pipeline(
        lambda N, t: N.functional.na3d_qk(t["q"], t["k"], 3, rpb=t["rpb"]),
        lambda N, a, t: N.functional.na3d_av(a, t["v"], 3, 1)))
    c["na3d_causal_dilated"] = (3, dict(), _pipeline(
        lambda N, t: N.functional.na3d_qk(t["q"], t["k"], (3, 3, 3), (1, 2, 2),
                                          is_causal=(True, False, True)),
        lambda N, a, t: N.functional.na3d_av(a, t["v"], (3, 3, 3), (1, 2, 2),
                                             is_causal=(True, False, True))))
    # --- 0.14-0.16 names ---------------------------------------------------
    c["natten1d_legacy"] = (1, dict(rpb_kernel=(5,)), _pipeline(
        lambda N, t: N.functional.natten1dqkrpb(t["q"], t["k"], t["rpb"], 5, 2),
        lambda N, a, t: N.functional.natten1dav(a, t["v"], 5, 2)))
    c["natten2d_legacy"] = (2, dict(rpb_kernel=(3, 3)), _pipeline(
        lambda N, t: N.functional.natten2dqkrpb(t["q"], t["k"], t["rpb"], 3, 2),
        lambda N, a, t: N.functional.natten2dav(a, t["v"], 3, 2)))
    c["natten2d_legacy_no_rpb"] = (2, dict(), _pipeline(
        lambda N, t: N.functional.natten2dqk(t["q"], t["k"], 5, 1),
        lambda N, a, t: N.functional.natten2dav(a, t["v"], 5, 1)))
    c["natten3d_legacy"] = (3, dict(rpb_kernel=(3, 3, 3)), _pipeline(
        lambda N, t: N.functional.natten3dqkrpb(t["q"], t["k"], t["rpb"], 3, 1),
        lambda N, a, t: N.functional.natten3dav(a, t["v"], 3, 1)))
    c["natten3d_legacy_depth"] = (3, dict(rpb_kernel=(3, 3, 3)), _pipeline(
        lambda N, t: N.functional.natten3dqkrpb(t["q"], t["k"], t["rpb"], 3, 3, 1, 2),
        lambda N, a, t: N.functional.natten3dav(a, t["v"], 3, 3, 1, 2)))
    # --- fused, heads-last -------------------------------------------------
    c["na1d_fused"] = (1, dict(heads_last=True), lambda N, t: {
        "out": N.functional.na1d(t["q"], t["k"], t["v"], 5, 2)})
    c["na2d_fused_rpb_scale"] = (2, dict(heads_last=True, rpb_kernel=(5, 3)), lambda N, t: {
        "out": N.functional.na2d(t["q"], t["k"], t["v"], (5, 3), rpb=t["rpb"], scale=0.3)})
    c["na2d_fused_causal"] = (2, dict(heads_last=True), lambda N, t: {
        "out": N.functional.na2d(t["q"], t["k"], t["v"], 3, (1, 2), (False, True))})
    c["na3d_fused"] = (3, dict(heads_last=True), lambda N, t: {
        "out": N.functional.na3d(t["q"], t["k"], t["v"], 3, dilation=(1, 1, 2),
                                 is_causal=(True, False, False))})
    return c


CASES = _cases()


def _module_case(N, torch, rank, seed):
    """NeighborhoodAttention{rank}D with NATTEN 0.17's arguments: the recorded
    state dict loads into libna's, and both give the same output."""
    rng = np.random.default_rng(seed)
    cls = getattr(N, f"NeighborhoodAttention{rank}D")
    kernel = {1: 5, 2: (5, 3), 3: 3}[rank]
    dilation = {1: 2, 2: (1, 2), 3: 1}[rank]
    module = cls(dim=8, num_heads=2, kernel_size=kernel, dilation=dilation, rel_pos_bias=True,
                 qkv_bias=True).double()
    state = {n: torch.tensor(rng.standard_normal(tuple(p.shape)), dtype=torch.float64)
             for n, p in module.state_dict().items()}
    module.load_state_dict(state, strict=True)
    x = torch.tensor(rng.standard_normal((B, *SPATIAL[rank], 8)), dtype=torch.float64,
                     requires_grad=True)
    out = module(x)
    g = torch.tensor(rng.standard_normal(tuple(out.shape)), dtype=torch.float64)
    out.backward(g)
    result = {"input_sum/x": x.detach().sum()}
    result.update({f"input_sum/state/{n}": s.sum() for n, s in state.items()})
    result.update({"out": out.detach(), "grad/x": x.grad})
    result.update({f"grad/{n}": p.grad for n, p in module.named_parameters()})
    return result


def run(N, torch):
    """{case/key: float64 array} for every case (inputs, outputs, gradients)."""
    results = {}
    for index, (name, (rank, options, case)) in enumerate(sorted(CASES.items())):
        t = _inputs(torch, rank, SEED + index, **options)
        for x in t.values():
            x.requires_grad_(True)
        outs = case(N, t)
        rng = np.random.default_rng(SEED + 1000 + index)
        loss = 0
        for key, out in sorted(outs.items()):
            g = torch.tensor(rng.standard_normal(tuple(out.shape)), dtype=out.dtype)
            loss = loss + (torch.where(torch.isinf(out), 0, out) * g).sum()
            results[f"{name}/{key}"] = out.detach().numpy()
        loss.backward()
        for key, x in t.items():
            # the inputs are regenerated from the seed; a checksum catches drift
            results[f"{name}/input_sum/{key}"] = np.array(float(x.detach().sum()))
            results[f"{name}/grad/{key}"] = x.grad.numpy()
    for rank in (1, 2, 3):
        for key, value in _module_case(N, torch, rank, SEED + 2000 + rank).items():
            results[f"module{rank}d/{key}"] = value.numpy()
    return results


class _Natten017:
    """NATTEN 0.17.5 as the cases call it: its own module, plus the 0.14-0.16
    names and the fused ops (which it lacks on the CPU) written with its
    unfused ops."""

    def __init__(self, natten):
        import types

        import torch

        F = natten.functional
        self.functional = types.SimpleNamespace(**{
            n: getattr(F, n) for n in dir(F) if n.startswith("na") and n[3:4] == "d"})
        for r in (1, 2, 3):
            setattr(self, f"NeighborhoodAttention{r}D",
                    getattr(natten, f"NeighborhoodAttention{r}D"))
        ns = self.functional

        def legacy(r):
            qk, av = getattr(F, f"na{r}d_qk"), getattr(F, f"na{r}d_av")

            def depth(args):
                if len(args) == 4:
                    kd, k, dd, d = args
                    return (kd, k, k), (dd, d, d)
                return args

            setattr(ns, f"natten{r}dqkrpb",
                    lambda q, k, rpb, *a: qk(q, k, *depth(a), rpb=rpb))
            setattr(ns, f"natten{r}dqk", lambda q, k, *a: qk(q, k, *depth(a)))
            setattr(ns, f"natten{r}dav", lambda attn, v, *a: av(attn, v, *depth(a)))

            def fused(q, k, v, kernel_size, dilation=1, is_causal=False, rpb=None,
                      scale=None):
                scale = scale or q.shape[-1] ** -0.5
                first = [q.movedim(-2, 1) for q in (q, k, v)]
                attn = qk(first[0] * scale, first[1], kernel_size, dilation,
                          is_causal=is_causal, rpb=rpb)
                out = av(torch.softmax(attn, -1), first[2], kernel_size, dilation,
                         is_causal=is_causal)
                return out.movedim(1, -2)

            setattr(ns, f"na{r}d", fused)

        for r in (1, 2, 3):
            legacy(r)


def main(path):
    import natten
    import torch

    if not natten.__version__.startswith("0.17."):
        raise SystemExit(f"natten {natten.__version__} is not NATTEN 0.17")
    results = run(_Natten017(natten), torch)
    results["natten_version"] = np.array(natten.__version__)
    np.savez_compressed(path, **results)
    print(f"{len(results)} arrays from natten {natten.__version__} -> {path}")


if __name__ == "__main__":
    main(sys.argv[1])
