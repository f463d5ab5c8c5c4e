"""Bytes and time of context-parallel NA (libna.torch.distributed), as
markdown tables for docs/benchmarks.md:

    python scripts/bench_context_parallel.py            # ~1-2 minutes on 2 cores
    python scripts/bench_context_parallel.py --quick    # smaller problems (smoke run)

1. On this machine, for 2D 224x224 (kernel 7) and 3D 16x64x64 (kernel
   (3, 7, 7)), 4 heads of dim 32, float32, sharded along the first spatial
   axis over 2 gloo ranks: the bytes each rank sent in the forward, counted
   (``bytes_sent()``) for the halo and head strategies, next to the halo's
   minimum (the rows the windows reach, ``exchange_bytes``) and to
   all-gathering K and V; and the time of forward + backward on 2 ranks x 1
   thread against 1 process x 2 threads.
2. A projection from ``exchange_bytes`` (no run) for 8 to 64 ranks on a
   4096x4096 image and a 64x256x256 video: the halo's time at a stated link
   bandwidth (forward and backward move the same bytes) against this
   machine's measured compute time per token.

Every rank process runs under a timeout; a hang fails the script.
"""

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist

import libna
import libna.torch as lt
import libna.torch.distributed as cp

HEADS, DIM = 4, 32
LINK_GBPS = 25.0  # GB/s per rank and direction: 200 Gb/s InfiniBand


def problems(quick):
    if quick:
        return [("2D 56x56, k 7", (56, 56), 7), ("3D 8x16x16, k (3, 7, 7)", (8, 16, 16), (3, 7, 7))]
    return [("2D 224x224, k 7", (224, 224), 7),
            ("3D 16x64x64, k (3, 7, 7)", (16, 64, 64), (3, 7, 7))]


def tensors(spatial, block=None, rank=0):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, *spatial, HEADS, DIM, generator=g) for _ in range(3))
    if block is not None:
        q, k, v = (x.narrow(1, rank * block, block) for x in (q, k, v))
    return [x.contiguous().requires_grad_() for x in (q, k, v)]


def timed(fn, q, k, v, repeats):
    """Median seconds of forward + backward."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        fn(q, k, v).sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def worker(rank, world, init_file, quick, repeats):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    for name, spatial, kernel in problems(quick):
        block = spatial[0] // world
        q, k, v = tensors(spatial, block, rank)
        op = getattr(cp, f"na{len(spatial)}d")
        row = [name]
        for strategy in ("halo", "heads"):
            cp.reset_bytes_sent()
            op(q, k, v, kernel, strategy=strategy)
            row.append(cp.bytes_sent())
        dist.barrier()
        row.append(timed(lambda q, k, v: op(q, k, v, kernel, strategy="halo"), q, k, v,
                         repeats))
        print("RESULT", rank, repr(row), flush=True)
    dist.destroy_process_group()


def run_workers(world, quick, repeats, timeout):
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, __file__, "--worker", "--world", str(world),
                   "--init", os.path.join(tmp, "init"), "--repeats", str(repeats)]
        command += ["--quick"] if quick else []
        env = dict(os.environ, OMP_NUM_THREADS="1", LIBNA_NUM_THREADS="1")
        procs = [subprocess.Popen(command + ["--rank", str(r)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env=env)
                 for r in range(world)]
        results = {}
        for r, p in enumerate(procs):
            try:
                out, _ = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                for other in procs:
                    other.kill()
                raise SystemExit(f"rank {r} timed out after {timeout} s")
            if p.returncode != 0:
                raise SystemExit(f"rank {r} failed:\n{out}")
            for line in out.splitlines():
                if line.startswith("RESULT "):
                    _, rank, row = line.split(" ", 2)
                    results.setdefault(int(rank), []).append(eval(row))  # our own repr
        return results


def fmt_bytes(n):
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def measured(args):
    world = 2
    results = run_workers(world, args.quick, args.repeats, args.timeout)
    torch.set_num_threads(2)
    single_times = {}
    for name, spatial, kernel in problems(args.quick):
        op = getattr(lt, f"na{len(spatial)}d")
        single_times[name] = timed(lambda q, k, v: op(q, k, v, kernel), *tensors(spatial),
                                   args.repeats)
    print(f"### Bytes per rank, {world} ranks (forward; the backward sends as many again)\n")
    print("| problem | rank | halo, counted | halo minimum (windows' rows) | all-gather K/V "
          "| heads, counted | heads, model |")
    print("|---|---|---|---|---|---|---|")
    per_token = {}
    for i, (name, spatial, kernel) in enumerate(problems(args.quick)):
        block = spatial[0] // world
        blocks = {0: [block] * world}
        arguments = dict(heads=HEADS, heads_kv=HEADS, head_dim=DIM)
        minimum = cp.exchange_bytes("halo", spatial, blocks, kernel, **arguments)
        heads_model = cp.exchange_bytes("heads", spatial, blocks, kernel, **arguments)
        kv_block = block * (torch.Size(spatial[1:]).numel()) * HEADS * 2 * DIM * 4
        for rank in range(world):
            _, halo, heads, _ = results[rank][i]
            print(f"| {name} | {rank} | {fmt_bytes(halo)} | {fmt_bytes(minimum[rank])} | "
                  f"{fmt_bytes(kv_block * (world - 1))} | {fmt_bytes(heads)} | "
                  f"{fmt_bytes(heads_model[rank])} |")
    print(f"\n### Time of forward + backward (median of {args.repeats})\n")
    print("| problem | 2 ranks x 1 thread (slowest rank) | 1 process x 2 threads | ratio |")
    print("|---|---|---|---|")
    for i, (name, spatial, kernel) in enumerate(problems(args.quick)):
        ranks = max(results[r][i][3] for r in range(world))
        single = single_times[name]
        per_token[name] = single * 2 / torch.Size(spatial).numel()  # one core's s per token
        print(f"| {name} | {ranks * 1e3:.0f} ms | {single * 1e3:.0f} ms | "
              f"{ranks / single:.2f} |")
    return per_token


def projection(per_token):
    """Halo share of a step from the byte model and the measured compute."""
    cases = [("2D 4096x4096, k 7", (4096, 4096), 7, "2D"),
             ("3D 64x256x256, k (3, 7, 7)", (64, 256, 256), (3, 7, 7), "3D")]
    print(f"\n### Projection: halo strategy, {LINK_GBPS:.0f} GB/s per rank\n")
    print("Halo bytes per rank from `exchange_bytes` (forward + backward, busiest rank), "
          "sent at the link rate, against the compute time of a rank's tokens at this "
          "machine's measured rate per token and core (forward + backward), one core per "
          "rank; the last column shows a device 1000 times faster (a GPU, roughly).\n")
    print("| problem | ranks | tokens per rank | halo per rank (fwd + bwd) | halo time "
          "| compute time (this CPU) | halo share | share at 1000x this compute rate |")
    print("|---|---|---|---|---|---|---|---|")
    for name, spatial, kernel, kind in cases:
        rate = next(v for k, v in per_token.items() if k.startswith(kind))
        for ranks in (8, 16, 32, 64):
            block = spatial[0] // ranks
            sent = 2 * max(cp.exchange_bytes("halo", spatial, {0: [block] * ranks}, kernel,
                                             heads=HEADS, heads_kv=HEADS, head_dim=DIM))
            tokens = torch.Size(spatial).numel() // ranks
            halo_s = sent / (LINK_GBPS * 1e9)
            compute_s = tokens * rate
            print(f"| {name} | {ranks} | {tokens} | {fmt_bytes(sent)} | "
                  f"{halo_s * 1e3:.2f} ms | {compute_s:.1f} s | "
                  f"{100 * halo_s / (halo_s + compute_s):.3f}% | "
                  f"{100 * halo_s / (halo_s + compute_s / 1000):.1f}% |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--init", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.rank, args.world, args.init, args.quick, args.repeats)
        return
    info = libna.build_info()
    print(f"libna {info['version']}, CPU kernels {info.get('cpu_kernels')}, torch "
          f"{torch.__version__}, {os.cpu_count()} CPUs\n")
    projection(measured(args))


if __name__ == "__main__":
    main()
