"""The default run: every method checked against its reference, timed
method after method on the same inputs, its peak memory measured, and the
results printed as markdown tables with notes."""

from __future__ import annotations

import libna

from .correctness import (TOLERANCE, full_reference_affordable, max_abs_err,
                          reference_affordable, reference_outputs, tolerance)
from .machine import machine_lines
from .memory import measure_memory
from .methods import (ALL_METHODS, CUDA_ONLY, METHOD_CLASSES, SAME_OPERATOR, LibnaMethod,
                      natten_available, swin_geometry)
from .problem import Problem, make_inputs
from .report import fmt_ms, markdown_table
from .timing import matmul_ceiling, time_method


def run_table(args, p: Problem) -> int:
    import torch
    threads = args.threads
    print("# libna benchmark")
    for line in machine_lines(threads):
        print(line)
    if p.device == "cuda":
        print(f"gpu:     {torch.cuda.get_device_name()} (torch CUDA {torch.version.cuda}); "
              f"libna CUDA architectures {','.join(libna.build_info()['cuda_architectures'])}")
    print(f"problem: {p.describe()}")
    print(flush=True)

    methods = [m for m in args.methods if m in ALL_METHODS]
    skipped = {}
    have_natten, natten_note = natten_available()
    if "natten" in methods and not have_natten:
        skipped["natten"] = natten_note
    for name, why in CUDA_ONLY.items():
        if name in methods and p.device != "cuda":
            skipped[name] = why
    q, k, v, dout = make_inputs(p)
    backward = args.backward

    # libna first: it is the reference for the correctness column
    libna_m = LibnaMethod(p)
    libna_out = libna_m.forward(q, k, v)
    libna_grads = libna_m.backward_runner(q, k, v, dout)() if backward else None

    results = {}  # name -> dict
    failures = []
    for name in methods:
        if name in skipped:
            continue
        m = METHOD_CLASSES[name](p)
        r = {"note": m.note}
        try:
            m.setup()
            with torch.no_grad():
                out = m.forward(q, k, v)
            grads = m.backward_runner(q, k, v, dout)() if backward else None
        except Exception as error:  # report and carry on with the other methods
            skipped[name] = f"failed: {type(error).__name__}: {str(error)[:160]}"
            continue
        if name == "sdpa-full" and not full_reference_affordable(p):
            r["err_label"] = "not checked (libna k=extent too slow)"
        elif name == "libna" and not reference_affordable(p):
            r["err_label"] = "not checked (float64 reference too slow)"
        else:
            label, ref_out, ref_grads = reference_outputs(name, p, q, k, v, dout, backward)
            if ref_out is None:
                ref_out, ref_grads = libna_out, libna_grads
            r["err_label"] = label
            r["fwd_err"] = max_abs_err(out, ref_out)
            r["fwd_ok"] = r["fwd_err"] <= tolerance(p, ref_out)
            if backward:
                errs = [max_abs_err(g, rg) for g, rg in zip(grads, ref_grads)]
                r["bwd_err"] = max(errs)
                r["bwd_ok"] = all(e <= tolerance(p, rg) for e, rg in zip(errs, ref_grads))
            if not r["fwd_ok"] or not r.get("bwd_ok", True):
                failures.append(name)
        del out, grads
        results[name] = r
        print(f"checked {name}: max abs err fwd {r.get('fwd_err', float('nan')):.2e}"
              + (f", bwd {r.get('bwd_err', float('nan')):.2e}" if backward else ""),
              flush=True)

    # timing, method after method on the same inputs; with --rounds R the
    # whole sequence runs R times and each row keeps its best round
    passes = ["fwd", "bwd"] if backward else ["fwd"]
    ceiling = 0.0
    for rnd in range(args.rounds):
        for name, r in results.items():
            m = METHOD_CLASSES[name](p)
            m.setup()
            for ps in passes:
                timing = time_method(m, ps, q, k, v, dout, args.repeats)
                if ps not in r or timing[0] < r[ps][0]:
                    r[ps] = timing
            del m
            rounds = f" (round {rnd + 1}/{args.rounds})" if args.rounds > 1 else ""
            print(f"timed {name}{rounds}: fwd {fmt_ms(r['fwd'][0])} ms"
                  + (f", bwd {fmt_ms(r['bwd'][0])} ms" if backward else "")
                  + (" (best so far)" if rnd else ""), flush=True)
        ceiling = max(ceiling, matmul_ceiling(args.repeats, p))

    memory = {}
    if args.memory:
        print("measuring peak memory in fresh subprocesses ...", flush=True)
        memory = measure_memory(p, list(results), backward, threads)
    print()

    sections = [("fwd", "forward", 1)] + ([("bwd", "backward", 2)] if backward else [])
    for key, title, mult in sections:
        flops = mult * p.fwd_flops()
        base = results.get("libna", {}).get(key, (None,))[0]
        rows = []
        for name, r in results.items():
            best, median = r[key]
            err = r.get(f"{key}_err")
            err_s = "-" if err is None else f"{err:.1e}" + ("" if r[f"{key}_ok"] else " FAIL")
            mem = memory.get(name, {})
            mem_s = ("error" if "error" in mem else f"{mem[key]:.1f}" if key in mem else "-")
            speed = f"{best / base:.2f}x" if base else "-"
            rows.append([name, fmt_ms(best), fmt_ms(median), f"{flops / best / 1e9:.3g}",
                         err_s, mem_s, speed])
        for name, why in skipped.items():
            rows.append([name, "-", "-", "-", "-", "-", "-"])
        print(f"## {title} ({p.describe()}, {threads} threads)")
        print()
        print(markdown_table(["method", "best ms", "median ms", "GFLOP/s", "max abs err",
                              "peak extra MiB", "libna speed-up"], rows))
        print()
    ceiling_what = (f"4096^3 {p.dtype} on {torch.cuda.get_device_name()}" if p.device == "cuda"
                    else "1024^3 float32")
    print(f"machine ceiling: torch.matmul {ceiling_what} = {ceiling:.1f} GFLOP/s; ", end="")
    if "libna" in results:
        libna_gf = p.fwd_flops() / results["libna"]["fwd"][0] / 1e9
        print(f"libna forward = {libna_gf:.1f} GFLOP/s = {100 * libna_gf / ceiling:.0f}% of it"
              + (f" ({p.dtype} inputs)" if p.dtype != "float32" else ""))
    else:
        print()
    print()
    print("notes:")
    rounds = (f"; the whole timing sequence ran {args.rounds} times and each row keeps "
              "its best round" if args.rounds > 1 else "")
    print(f"- times: best and median of {args.repeats} calls after 1 warm-up call{rounds}; "
          "backward = gradient pass only (forward excluded)")
    print(f"- GFLOP/s = NA FLOPs / best time; forward NA FLOPs = 4 * tokens * prod(kernel) * "
          f"D * heads = {p.fwd_flops() / 1e9:.3f} GFLOP, backward counted as 2x forward; "
          "dense methods get no credit for the extra work they do")
    if "sdpa-full" in results or "sdpa-mask" in results:
        dense = 4 * p.batch * p.positions ** 2 * p.dim * p.heads
        print(f"- sdpa-mask/sdpa-full compute all N^2 scores: {dense / 1e9:.3f} GFLOP forward "
              f"({dense / p.fwd_flops():.0f}x the NA work)")
    print("- libna speed-up = that row's best time / libna's best time (>1: libna is faster)")
    print("- peak extra MiB: peak RSS (VmHWM; ru_maxrss off Linux) of a fresh process that "
          "builds the inputs and runs the method, minus that of one that only builds the "
          "inputs and allocates the outputs; backward: forward with autograd + gradient pass" +
          ("" if args.memory else " (not measured: --no-memory)"))
    for name, r in results.items():
        if r.get("err_label", "vs libna") != "vs libna":
            print(f"- {name}: {r['note']}; max abs err {r['err_label']}")
        elif name in SAME_OPERATOR:
            print(f"- {name}: {r['note']}; max abs err vs libna")
        if "error" in memory.get(name, {}):
            print(f"- {name}: memory measurement failed: {memory[name]['error']}")
    if "swin" in results and swin_geometry(p)[0] != p.spatial:
        print(f"- swin: extent zero-padded to {swin_geometry(p)[0]} (whole windows)")
    for name, why in skipped.items():
        print(f"- {name}: skipped: {why}")
    print(f"- tolerance: {TOLERANCE[p.dtype]:g} x max(1, max|reference|) ({p.dtype})")
    if failures:
        print(f"FAILED: {', '.join(failures)} disagree with libna beyond tolerance")
        return 1
    else:
        print("correctness: every method agrees with libna, and libna with the float64 reference "
              "where checked, within tolerance")
    return 0
