"""``python -m libna.bench --models``: NAT and DiNAT end to end against
timm's Swin-T and ConvNeXt-T.

Every model is built fresh (seed 0, random weights, 1000 classes, drop path
off so that all models run the same work on every step) for every
configuration: inference (``torch.inference_mode``) or one training step
(forward, cross-entropy, backward, SGD update), float32 or bfloat16 autocast
(``torch.autocast('cpu', dtype=torch.bfloat16)``), a batch size, and eager or
``torch.compile`` (inductor; a fresh compile per configuration, static
shapes). Each configuration makes --warmup calls (the first compiles) and
then --repeats timed calls (time.perf_counter); the table gives batch /
median seconds in images per second (with --rounds R, the whole sequence runs
R times and each cell keeps its best round), and the ratios nat_tiny / swin_tiny and
nat_tiny / convnext_tiny of numbers measured in the same run. timm's models
(``pip install timm``, or libna's ``bench`` extra) are created with
``pretrained=False`` and are skipped with a note when timm cannot be
imported."""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import time

import libna

from .machine import machine_lines
from .report import markdown_table

LIBNA_MODELS = ("nat_mini", "nat_tiny", "dinat_tiny")
TIMM_MODELS = {  # our name: timm's name
    "swin_tiny": "swin_tiny_patch4_window7_224",
    "convnext_tiny": "convnext_tiny",
}
ALL_MODELS = LIBNA_MODELS + tuple(TIMM_MODELS)
MODES = ("inference", "train")
DTYPES = ("float32", "bfloat16")
RATIOS = (("nat_tiny", "swin_tiny"), ("nat_tiny", "convnext_tiny"))
GOAL = 1.2  # issue 17: nat_tiny >= 1.2x swin_tiny img/s
NUM_CLASSES = 1000


def name_list(choices):
    """An argparse type: a comma-separated subset of `choices`, in the order given."""
    def parse(text):
        names = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in names if x not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"{text!r}: choose from {','.join(choices)} (comma-separated)")
        return list(dict.fromkeys(names))
    return parse


def timm_status():
    """(timm module or None, why it is not there)."""
    try:
        import timm
    except Exception as error:  # ImportError, or a broken torchvision underneath
        return None, (f"timm is not importable ({type(error).__name__}: {error}); "
                      "pip install timm (or libna[bench]) for the swin_tiny and "
                      "convnext_tiny rows")
    return timm, ""


def libna_kernel_sizes(image_size):
    """Kernel size per level: 7 (the papers'), or for a level smaller than
    7 x 7 at this image size the largest odd size that fits it (2 for a
    2 x 2 level; libna takes no kernel of 1)."""
    from libna.models import level_resolutions
    sizes = []
    for h, w in level_resolutions(image_size, 4):
        fit = min(7, h, w)
        sizes.append(fit if fit % 2 or fit == 2 else fit - 1)
    return sizes


def build_model(name, image_size, timm=None):
    import libna.models
    if name in LIBNA_MODELS:
        kernel = libna_kernel_sizes(image_size)
        kwargs = dict(num_classes=NUM_CLASSES, drop_path_rate=0.0,
                      kernel_size=7 if kernel == [7] * 4 else kernel)
        if name.startswith("dinat"):
            kwargs["img_size"] = image_size
        return getattr(libna.models, name)(**kwargs)
    kwargs = dict(pretrained=False, num_classes=NUM_CLASSES, drop_path_rate=0.0)
    if name == "swin_tiny" and image_size != 224:
        kwargs["img_size"] = image_size
    return timm.create_model(TIMM_MODELS[name], **kwargs)


class CompileTimeout(Exception):
    pass


class _alarm:
    """Raises CompileTimeout in the main thread after `seconds` (0: never)."""

    def __init__(self, seconds):
        self.seconds = int(seconds) if hasattr(signal, "SIGALRM") else 0

    def __enter__(self):
        if self.seconds:
            def expire(signum, frame):
                raise CompileTimeout()
            self.previous = signal.signal(signal.SIGALRM, expire)
            signal.alarm(self.seconds)

    def __exit__(self, *exc):
        if self.seconds:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, self.previous)


def make_step(model, mode, dtype, batch, image_size, compiled):
    """The call timed for one configuration (a closure over fresh inputs)."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    model.train(mode == "train")
    runner = torch.compile(model, dynamic=False) if compiled else model
    if mode == "inference":
        def step():
            with torch.inference_mode(), autocast:
                return runner(images)
        return step
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(runner(images), labels)
        loss.backward()
        optimizer.step()
        return loss
    return step


def time_configuration(name, mode, dtype, batch, compiled, args, timm):
    """{'img_s', 'first_s', 'parameters'} or {'error'} of one model in one
    configuration."""
    import torch
    from libna.models import count_parameters
    if compiled:
        torch._dynamo.reset()  # a fresh compile, not a recompile of the last one
    torch.manual_seed(0)
    try:
        model = build_model(name, args.image_size, timm)
        step = make_step(model, mode, dtype, batch, args.image_size, compiled)
        start = time.perf_counter()
        with _alarm(args.compile_timeout if compiled else 0):
            step()
        first = time.perf_counter() - start
        for _ in range(args.warmup - 1):
            step()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    except CompileTimeout:
        return {"error": f"compile > {args.compile_timeout} s"}
    except Exception as error:  # report it in the table and carry on
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return {"error": f"{'compile' if compiled else 'eager'} failed: "
                         f"{type(error).__name__}: {message[:160]}"}
    finally:
        if compiled:
            torch._dynamo.reset()
    return {"img_s": batch / statistics.median(times), "first_s": first,
            "parameters": count_parameters(model)}


def best_round(kept, result):
    """The faster of two rounds' results for one cell (the first call from the
    first round that timed one: later compiles of the same graph hit caches)."""
    if kept is None or "img_s" not in kept:
        return result
    if "img_s" not in result or result["img_s"] <= kept["img_s"]:
        return kept
    return dict(result, first_s=kept["first_s"])


def configurations(args):
    """(mode, dtype, batch, compiled) in table order."""
    out = []
    for mode in args.modes:
        for dtype in args.dtypes:
            for batch in args.batches:
                out.append((mode, dtype, batch, False))
                if (args.compile and batch in args.compile_batches
                        and dtype in args.compile_dtypes):
                    out.append((mode, dtype, batch, True))
    return out


def fmt_rate(result):
    if result is None:
        return "-"
    if "error" in result:
        return "failed" if "failed" in result["error"] else "timeout"
    rate = result["img_s"]
    return f"{rate:.1f}" if rate < 100 else f"{rate:.0f}"


def ratio(results, key, numerator, denominator):
    a, b = results.get((numerator, *key)), results.get((denominator, *key))
    if not a or not b or "img_s" not in a or "img_s" not in b:
        return None
    return a["img_s"] / b["img_s"]


def plot_models(path, models, configs, results):
    """A bar chart of img/s per model, one group of bars per configuration,
    inference and training side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(c[0] == m for c in configs)]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.5), squeeze=False)
    width = 0.8 / len(models)
    for ax, mode in zip(axes[0], modes):
        rows = [c for c in configs if c[0] == mode]
        for i, name in enumerate(models):
            rates = [results.get((name, *c), {}).get("img_s", 0.0) for c in rows]
            ax.bar([x + (i - (len(models) - 1) / 2) * width for x in range(len(rows))], rates,
                   width, label=name)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([f"{'bf16' if d == 'bfloat16' else 'fp32'} b{b}\n"
                            f"{'compiled' if c else 'eager'}" for _, d, b, c in rows],
                           fontsize=8)
        ax.set_ylabel("images / s (higher is better)")
        ax.set_title("inference" if mode == "inference" else "training step (fwd+bwd+SGD)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("libna.models vs timm, CPU, missing bar: not run or failed", fontsize=10)
    fig.tight_layout()
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_models(args) -> int:
    timm, timm_note = timm_status()
    models = [m for m in args.models if m in LIBNA_MODELS or timm is not None]
    skipped = [m for m in args.models if m not in models]
    print("# libna benchmark: models end to end")
    for line in machine_lines(args.threads):
        print(line)
    if timm is not None:
        print(f"timm:    {timm.__version__}")
    print(f"image:   {args.image_size}x{args.image_size}, {NUM_CLASSES} classes; "
          f"{args.warmup} warm-up call(s) then the median of {args.repeats} timed call(s); "
          f"img/s = batch / median seconds"
          + (f"; best of {args.rounds} interleaved rounds" if args.rounds > 1 else ""))
    configs = configurations(args)
    print(f"runs:    {len(configs)} configuration(s) x {len(models)} model(s)", flush=True)
    for name in skipped:
        print(f"note: {name} skipped: {timm_note}")
    print()

    results = {}
    for round_index in range(args.rounds):
        if args.rounds > 1:
            print(f"round {round_index + 1} of {args.rounds}", flush=True)
        for config in configs:
            for name in models:
                result = time_configuration(name, *config, args, timm)
                mode, dtype, batch, compiled = config
                state = (f"{result['img_s']:.2f} img/s, first call {result['first_s']:.1f} s"
                         if "img_s" in result else result["error"])
                print(f"  {name:14s} {mode:9s} {dtype:8s} batch {batch:<3d} "
                      f"{'compiled' if compiled else 'eager':8s} {state}", flush=True)
                results[(name, *config)] = best_round(results.get((name, *config)), result)
    parameters = {name: result["parameters"] for (name, *_), result in results.items()
                  if "parameters" in result}

    print()
    print("## images per second (higher is better)")
    print()
    ratio_names = [f"{a}/{b}" for a, b in RATIOS]
    headers = ["mode", "dtype", "batch", "compile", *args.models, *ratio_names]
    rows = []
    for config in configs:
        mode, dtype, batch, compiled = config
        cells = [mode, dtype, batch, "inductor" if compiled else "eager"]
        cells += [fmt_rate(results.get((name, *config))) if name in models else "absent"
                  for name in args.models]
        for a, b in RATIOS:
            value = ratio(results, config, a, b)
            cells.append("-" if value is None else f"{value:.2f}x")
        rows.append(cells)
    print(markdown_table(headers, rows))
    print()
    print("parameters: " + ", ".join(f"{name} {parameters[name] / 1e6:.1f}M"
                                     for name in models if name in parameters))

    compiled_rows = [c for c in configs if c[3]]
    if compiled_rows:
        print()
        print("## first call of each configuration, seconds (compiled: includes the compile)")
        print()
        rows = []
        for config in compiled_rows:
            mode, dtype, batch, _ = config
            cells = [mode, dtype, batch]
            for name in args.models:
                result = results.get((name, *config))
                cells.append("-" if not result or "first_s" not in result
                             else f"{result['first_s']:.0f}")
            rows.append(cells)
        print(markdown_table(["mode", "dtype", "batch", *args.models], rows))

    print()
    for a, b in RATIOS:
        values = [(c, ratio(results, c, a, b)) for c in configs]
        values = [(c, v) for c, v in values if v is not None]
        if not values:
            print(f"{a}/{b}: not measured ({b} or {a} not run)")
            continue
        goal = f" (goal >= {GOAL}x: met in {sum(v >= GOAL for _, v in values)} of " \
               f"{len(values)})" if b == "swin_tiny" else ""
        print(f"{a}/{b}: {min(v for _, v in values):.2f}x to {max(v for _, v in values):.2f}x "
              f"over {len(values)} configuration(s){goal}")
    for name in skipped:
        print(f"note: {name} skipped: {timm_note}")
    for (name, *config), result in results.items():
        if "error" in result:
            mode, dtype, batch, compiled = config
            print(f"note: {name} {mode} {dtype} batch {batch} "
                  f"{'compiled' if compiled else 'eager'}: {result['error']}")
    try:
        print("load average %.2f %.2f %.2f (1/5/15 min) at the end" % os.getloadavg())
    except OSError:
        pass
    if args.plot:
        plot_models(args.plot, models, configs, results)
        print(f"plot: {args.plot}")
    return 0
