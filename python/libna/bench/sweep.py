"""--sweep: time per token against the token count and against the kernel
size, skipping peers that would exceed the time or memory budget, printed
as tables and drawn as PNG plots."""

from __future__ import annotations

import os

from .machine import cpu_model, machine_lines, proc_kib
from .methods import ALL_METHODS, CUDA_ONLY, METHOD_CLASSES, natten_available
from .problem import Problem, make_inputs
from .report import fmt_ms, markdown_table
from .timing import time_method

SWEEP_SIZES = {1: [784, 3136, 12544, 50176], 2: [28, 56, 84, 112, 168, 224],
               3: [8, 12, 16, 24, 32]}
SWEEP_KERNELS = {1: [9, 25, 49, 81, 121, 169], 2: [3, 5, 7, 9, 11, 13], 3: [3, 5, 7]}


def mem_available():
    available = proc_kib("/proc/meminfo", "MemAvailable")
    return 8 * 2 ** 30 if available is None else available


def estimated_bytes(name, p: Problem, backward):
    es = {"float32": 4, "float16": 2, "bfloat16": 2}[p.dtype]
    nkhd = p.tokens * p.window * p.heads * p.dim
    if name == "gather":
        fwd = 2 * nkhd * es + 2 * p.tokens * p.window * p.heads * 4
        return fwd * (3 if backward else 1)
    if name == "sdpa-mask":
        return p.positions ** 2  # the bool mask; the CPU flash kernel tiles the scores
    return 0


def work(name, p: Problem):
    """Proportional to the method's running time (for extrapolation)."""
    if name in ("sdpa-mask", "sdpa-full"):
        return p.batch * p.positions ** 2 * p.heads * p.dim
    return p.tokens * p.window * p.heads * p.dim


def run_sweep(args) -> int:
    import torch
    rank = args.rank
    print("# libna sweep: time per token")
    for line in machine_lines(args.threads):
        print(line)
    sizes = args.sweep_sizes or SWEEP_SIZES[rank]
    kernels = args.sweep_kernels or SWEEP_KERNELS[rank]
    base_size = args.size
    kernel = args.kernel
    print(f"token sweep: extents {sizes} per axis, kernel {kernel[0]}; kernel sweep: kernels "
          f"{kernels} at {'x'.join(map(str, base_size))}; B={args.batch}, {args.heads} heads, "
          f"D {args.dim}, {args.dtype}; best of >= {args.repeats} timed calls (and >= "
          f"{args.sweep_min_time:g} s) after 2 warm-up calls; the sweep runs {args.rounds} "
          f"time(s), each point keeps its best; peers skipped "
          f"beyond ~{args.sweep_budget:g} s per point or half the available memory",
          flush=True)
    methods = [m for m in args.methods if m in ALL_METHODS and m not in CUDA_ONLY]
    notes = []
    if "natten" in methods:
        ok, why = natten_available()
        if not ok:
            methods.remove("natten")
            notes.append(f"natten: skipped: {why}")
    passes = ["fwd", "bwd"] if args.backward else ["fwd"]
    series = {
        "tokens": [Problem(rank, (s,) * rank, kernel, args.batch, args.heads, args.dim,
                           args.dtype) for s in sizes if s >= kernel[0]],
        "kernel": [Problem(rank, base_size, (kk,) * rank, args.batch, args.heads, args.dim,
                           args.dtype) for kk in kernels if kk <= min(base_size)],
    }
    results = {sweep: {ps: {m: [] for m in methods} for ps in passes} for sweep in series}
    mem_limit = mem_available() / 2
    # --rounds R runs the whole sweep R times (spread over time, so that a
    # burst of load on a shared machine hits one round only) and keeps each
    # point's best; the skip decisions of the first round hold for the rest
    dead = {}  # (sweep, pass, method) -> index of the first skipped point
    for rnd in range(args.rounds):
        for sweep, problems in series.items():
            last = {}  # (pass, method) -> (time, work) of the previous point
            for i, p in enumerate(problems):
                q, k, v, dout = make_inputs(p)
                for name in methods:
                    for ps in passes:
                        key = (sweep, ps, name)
                        tag = f"[{sweep}] {ps} {name:9s} {p.short():>14s}"
                        if args.rounds > 1:
                            tag += f" ({rnd + 1}/{args.rounds})"
                        if key in dead and i >= dead[key]:
                            if rnd == 0:
                                print(f"{tag}: skipped (skipped at a smaller point)", flush=True)
                            continue
                        why = None
                        need = estimated_bytes(name, p, ps == "bwd")
                        if rnd == 0 and need > mem_limit:
                            why = f"skipped: needs ~{need / 2**30:.1f} GiB"
                        elif rnd == 0 and (ps, name) in last:
                            t0, w0 = last[(ps, name)]
                            predicted = t0 * work(name, p) / w0
                            calls = args.repeats + 2
                            if predicted * calls * args.rounds > args.sweep_budget:
                                why = f"skipped: predicted {predicted:.2g} s per call"
                        if why is None:
                            try:
                                m = METHOD_CLASSES[name](p)
                                m.setup()
                                best, _ = time_method(m, ps, q, k, v, dout, args.repeats,
                                                      warmup=2, min_time=args.sweep_min_time)
                                del m
                            except Exception as error:
                                why = f"failed: {type(error).__name__}: {str(error)[:120]}"
                        if why:
                            notes.append(f"{sweep} {ps} {name} at {p.short()}: {why}")
                            dead[key] = i
                            print(f"{tag}: {why}", flush=True)
                            continue
                        last[(ps, name)] = (best, work(name, p))
                        pts = results[sweep][ps][name]
                        if rnd == 0:
                            pts.append((p, best))
                        else:
                            j = next(j for j, (pp, _) in enumerate(pts) if pp is p)
                            best = min(best, pts[j][1])
                            pts[j] = (p, best)
                        print(f"{tag}: {fmt_ms(best)} ms, {best / p.tokens * 1e6:.3g} us/token"
                              + (" (best so far)" if rnd else ""), flush=True)
                del q, k, v, dout
    print()
    for sweep, problems in series.items():
        for ps in passes:
            rows = []
            for p in problems:
                row = [p.short(), str(p.tokens)]
                for name in methods:
                    hit = [t for pp, t in results[sweep][ps][name] if pp is p]
                    row.append(f"{hit[0] / p.tokens * 1e6:.3g}" if hit else "-")
                rows.append(row)
            print(f"## {ps}, us per token, {'vs token count' if sweep == 'tokens' else 'vs kernel size'}")
            print()
            print(markdown_table(["problem", "tokens", *methods], rows))
            print()
    if notes:
        print("notes:")
        for n in notes:
            print(f"- {n}")
    files = plot_sweep(args, series, results, methods, passes)
    for f in files:
        print(f"wrote {f}")
    return 0


STYLE = {"libna": dict(color="C3", marker="o", linewidth=2.2),
         "gather": dict(color="C0", marker="s"),
         "sdpa-mask": dict(color="C1", marker="^"),
         "sdpa-full": dict(color="C7", marker="v", linestyle=":"),
         "swin": dict(color="C2", marker="D", linestyle="--"),
         "natten": dict(color="C4", marker="P")}


def plot_sweep(args, series, results, methods, passes):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(args.out_dir, exist_ok=True)
    files = []
    prefix = f"bench_na{args.rank}d"
    titles = {"fwd": "forward", "bwd": "backward (gradient pass)"}
    for sweep in series:
        fig, axes = plt.subplots(1, len(passes), figsize=(6.2 * len(passes), 4.6),
                                 squeeze=False)
        for ax, ps in zip(axes[0], passes):
            for name in methods:
                pts = results[sweep][ps][name]
                if not pts:
                    continue
                xs = [p.tokens if sweep == "tokens" else p.kernel[0] for p, _ in pts]
                ys = [t / p.tokens * 1e6 for p, t in pts]
                ax.plot(xs, ys, label=name, **STYLE.get(name, {}))
            ax.set_yscale("log")
            if sweep == "tokens":
                ax.set_xscale("log")
                ax.set_xlabel("tokens (k = %s)" % args.kernel[0])
            else:
                ax.set_xlabel(f"kernel size (extent {'x'.join(map(str, args.size))})")
            ax.set_ylabel("time per token [µs]")
            ax.set_title(titles[ps])
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"na{args.rank}d, {args.heads} heads, D {args.dim}, {args.dtype}, "
                     f"{args.threads} threads, {cpu_model()}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(args.out_dir, f"{prefix}_sweep_{sweep}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files
