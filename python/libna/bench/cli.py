"""The command line of ``python -m libna.bench``: its options, their
checks and defaults, and the choice between the table, the sweep and a
memory child."""

from __future__ import annotations

import argparse
import os
import sys

import libna

from .memory import memory_child
from .methods import ALL_METHODS
from .models import ALL_MODELS, DTYPES as MODEL_DTYPES, MODES as MODEL_MODES
from .models import name_list, run_models
from .overhead import run_overhead
from .problem import Problem
from .sweep import run_sweep
from .table import run_table

DEFAULTS = {  # rank: (size, kernel)
    1: (3136, 49),
    2: (56, 7),
    3: (16, 5),
}


def _int_list(text):
    try:
        values = [int(x) for x in text.replace("x", ",").split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of ints")
    if not values or any(x < 1 for x in values):
        raise argparse.ArgumentTypeError(f"{text!r} must hold positive ints")
    return values


def _extent(text):
    values = [x for x in text.lower().split("x") if x]
    try:
        values = [int(x) for x in values]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int or AxB[xC]")
    if not values or any(x < 1 for x in values):
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return values


def build_parser():
    import libna.bench  # its docstring describes the command

    parser = argparse.ArgumentParser(
        prog="python -m libna.bench", description=libna.bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, choices=(1, 2, 3), default=2,
                        help="spatial rank: 1 (sequence), 2 (image, default), 3 (volume)")
    parser.add_argument("--size", type=_extent, default=None,
                        help="extent per axis, an int or AxB[xC] (default: 3136 for rank 1, "
                             "56 for rank 2, 16 for rank 3)")
    parser.add_argument("--kernel", type=_extent, default=None,
                        help="kernel size, an int or AxB[xC] (default: 49 / 7 / 5 for "
                             "rank 1 / 2 / 3)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--dim", type=int, default=32, help="head dim (default 32)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                        default="float32", help="input dtype (default float32)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where every method runs (default cpu); cuda times with "
                             "torch.cuda.synchronize after each call and skips the peak-memory "
                             "column")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for libna and torch (default libna.get_num_threads())")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per measurement after one warm-up "
                             "(default 10; 3 with --sweep, 400 with --overhead, 5 with "
                             "--models)")
    parser.add_argument("--backward", action=argparse.BooleanOptionalAction, default=True,
                        help="also time and check the backward pass (default on)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the whole timing sequence this many times, interleaved, and "
                             "keep each row's (each point's, each --models cell's) best round: "
                             "steadier numbers on a shared machine (default 1)")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                        help="measure peak memory in fresh subprocesses (default on)")
    parser.add_argument("--methods", type=lambda s: [x.strip() for x in s.split(",")
                                                     if x.strip()],
                        default=list(ALL_METHODS),
                        help=f"comma-separated subset of {','.join(ALL_METHODS)} "
                             "(default all; libna is always run)")
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--sweep", action="store_true",
                       help="time per token vs token count (kernel --kernel) and vs kernel "
                            "size (extent --size); write PNG plots to --out-dir")
    sweep.add_argument("--sweep-sizes", type=_int_list, default=None,
                       help="extents per axis for the token sweep, e.g. 28,56,112 (default "
                            "28,56,84,112,168,224 for rank 2)")
    sweep.add_argument("--sweep-kernels", type=_int_list, default=None,
                       help="kernel sizes for the kernel sweep (default 3,5,...,13 for rank 2)")
    sweep.add_argument("--sweep-budget", type=float, default=20.0,
                       help="skip a peer at a point predicted to take longer than this many "
                            "seconds in all (default 20)")
    sweep.add_argument("--sweep-min-time", type=float, default=0.5,
                       help="keep timing a point until its calls add up to this many seconds "
                            "(default 0.5; at least --repeats calls)")
    sweep.add_argument("--out-dir", default="docs",
                       help="where --sweep writes its PNG files (default docs/)")
    parser.add_argument("--overhead", action="store_true",
                        help="time small calls (7x7 and NAT's last levels) from NumPy and "
                             "libna.torch next to a same-size add, and exit")
    models = parser.add_argument_group("models")
    models.add_argument("--models", nargs="?", const=list(ALL_MODELS), default=None,
                        type=name_list(ALL_MODELS), metavar="NAMES",
                        help="time whole models end to end (inference and a training step, "
                             "img/s) and exit: NAMES is a comma-separated subset of "
                             f"{','.join(ALL_MODELS)} (default all; swin_tiny and "
                             "convnext_tiny need timm)")
    models.add_argument("--image-size", type=int, default=224,
                        help="input height and width for --models (default 224; below 193 "
                             "the NAT kernels shrink to fit the small levels)")
    models.add_argument("--batches", type=_int_list, default=[8, 1],
                        help="batch sizes for --models (default 8,1)")
    models.add_argument("--dtypes", type=name_list(MODEL_DTYPES), default=list(MODEL_DTYPES),
                        help="float32 and/or bfloat16 (autocast) for --models (default both)")
    models.add_argument("--modes", type=name_list(MODEL_MODES), default=list(MODEL_MODES),
                        help="inference and/or train (one SGD step) for --models "
                             "(default both)")
    models.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time torch.compile'd models (inductor) next to eager "
                             "(default on)")
    models.add_argument("--compile-batches", type=_int_list, default=None,
                        help="compile only at these batch sizes (default all --batches)")
    models.add_argument("--compile-dtypes", type=name_list(MODEL_DTYPES), default=None,
                        help="compile only in these dtypes (default all --dtypes)")
    models.add_argument("--compile-timeout", type=int, default=900,
                        help="give up a compiled configuration whose first call (the "
                             "compile) takes longer than this many seconds (default 900; "
                             "0: no limit)")
    models.add_argument("--warmup", type=int, default=2,
                        help="untimed calls before timing each configuration, the first of "
                             "which compiles (default 2)")
    models.add_argument("--plot", default=None, metavar="PATH",
                        help="write a PNG bar chart of img/s per model to PATH")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return parser


def check_models_args(parser, args):
    """argparse errors (exit 2) for --models options that cannot run."""
    if args.image_size < 33:
        parser.error("--image-size must be >= 33: NAT's last level, 1/32 of the image a "
                     "side, needs 2 tokens a side")
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first call compiles; it is never timed)")
    if args.compile_timeout < 0:
        parser.error("--compile-timeout must be >= 0")
    for name in ("compile_batches", "compile_dtypes"):
        chosen = getattr(args, name)
        available = getattr(args, name.split("_")[1])
        if chosen is None:
            setattr(args, name, list(available))
        elif not set(chosen) <= set(available):
            option = "--" + name.replace("_", "-")
            parser.error(f"{option} {','.join(map(str, chosen))} must be among "
                         f"--{name.split('_')[1]} {','.join(map(str, available))}")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.models is not None:
        check_models_args(parser, args)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # for anything started from here
    rank = args.rank
    size, kernel = DEFAULTS[rank]
    args.size = args.size or [size]
    args.kernel = args.kernel or [kernel]
    for name in ("size", "kernel"):
        value = getattr(args, name)
        if len(value) == 1:
            value = value * rank
        if len(value) != rank:
            print(f"error: --{name} {'x'.join(map(str, value))} needs 1 or {rank} values "
                  f"for rank {rank}", file=sys.stderr)
            return 2
        setattr(args, name, value)
    if any(k > s for k, s in zip(args.kernel, args.size)) and not args.sweep:
        print(f"error: --kernel {args.kernel} exceeds --size {args.size}", file=sys.stderr)
        return 2
    if args.repeats is None:
        args.repeats = (400 if args.overhead else 3 if args.sweep else
                        5 if args.models is not None else 10)
    if min(args.repeats, args.rounds, args.batch, args.heads, args.dim) < 1:
        print("error: --repeats, --rounds, --batch, --heads and --dim must be >= 1",
              file=sys.stderr)
        return 2
    bad = [m for m in args.methods if m not in ALL_METHODS]
    if bad:
        print(f"error: unknown method(s) {bad}; choose from {', '.join(ALL_METHODS)}",
              file=sys.stderr)
        return 2
    if "libna" not in args.methods:
        args.methods = ["libna", *args.methods]
    args.methods = [m for m in ALL_METHODS if m in args.methods]
    if args.threads is None:
        args.threads = libna.get_num_threads()
    if args.threads < 1:
        print("error: --threads must be >= 1", file=sys.stderr)
        return 2
    import torch
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("error: --device cuda needs a CUDA device visible to PyTorch", file=sys.stderr)
            return 2
        if "cuda" not in libna.build_info()["backends"]:
            print("error: --device cuda needs libna built with CUDA", file=sys.stderr)
            return 2
        if args.sweep:
            print("error: --sweep runs on the CPU only (for now)", file=sys.stderr)
            return 2
        args.memory = False  # peak RSS of child processes says nothing about GPU memory
    libna.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    p = Problem(rank, args.size, args.kernel, args.batch, args.heads, args.dim, args.dtype,
                args.device)
    if args.memory_child:
        return memory_child(p, args.memory_child, args.backward, args.threads)
    if args.overhead:
        return run_overhead(args)
    if args.models is not None:
        return run_models(args)
    if args.sweep:
        return run_sweep(args)
    return run_table(args, p)
