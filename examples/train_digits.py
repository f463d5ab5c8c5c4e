"""Train a small (Di)NAT on scikit-learn's bundled 8x8 digits, on the CPU.

    pip install scikit-learn tqdm            # or: pip install "libna[examples]"
    python examples/train_digits.py          # ~1-2 minutes on 2 cores
    python examples/train_digits.py --epochs 1 --limit 256     # smoke run
    python examples/train_digits.py --save digits_nat.pt       # keep the weights

The data set ships with scikit-learn (1797 images, no download). Images are
upsampled 8x8 -> 32x32, so that the stride-4 tokenizer of libna.models.NAT
gives an 8x8 token grid: one token per original pixel. The model is built
from the same classes as nat_mini & co.: two levels (8x8 and 4x4 tokens),
kernel size 3, and DiNAT's dilation schedule for a 32x32 input (blocks
alternate dilation 1 and 2 on the 8x8 level; 1 on the 4x4 level), about
0.1M parameters.

The progress bar goes to stderr; the last line on stdout is
``test accuracy: 0.xxx`` (360 held-out images).
"""

import argparse
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import libna

from libna.models import DiNAT, count_parameters

#: The digits model: DiNAT(**CONFIG).
CONFIG = dict(embed_dim=32, depths=[2, 2], num_heads=[2, 4], mlp_ratio=2.0, kernel_size=3,
              img_size=32, in_chans=1, num_classes=10, drop_path_rate=0.05)
IMG_SIZE = 32


def build_model(**overrides):
    """The small DiNAT used by this demo (and by attention_maps.py)."""
    return DiNAT(**{**CONFIG, **overrides})


def load_digits_split(seed=0):
    """Digits as float32 tensors in [0, 1], [N, 1, 8, 8], split 80/20 (stratified)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None]
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed,
                                              stratify=y)
    return (torch.from_numpy(x_tr), torch.from_numpy(y_tr),
            torch.from_numpy(x_te), torch.from_numpy(y_te))


def prepare(x):
    """[N, 1, 8, 8] in [0, 1] -> [N, 1, 32, 32], standardised."""
    x = F.interpolate(x, size=(IMG_SIZE, IMG_SIZE), mode="bilinear", align_corners=False)
    return (x - 0.3) / 0.4


def augment(x, generator):
    """Random shifts of up to one original pixel (4 upsampled pixels) per axis."""
    pad = 4
    n = x.shape[0]
    padded = F.pad(x, (pad, pad, pad, pad), value=float(x.min()))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(IMG_SIZE)[None])[:, :, None]      # [n, S, 1]
    cols = (dx[:, None] + torch.arange(IMG_SIZE)[None])[:, None, :]      # [n, 1, S]
    return padded[:, 0][torch.arange(n)[:, None, None], rows, cols][:, None]


class _Progress:
    """tqdm if installed, else a plain stderr progress line."""

    def __init__(self, total, desc):
        try:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            self._bar = None
        self.total, self.n, self.desc, self.postfix = total, 0, desc, ""

    def set_postfix_str(self, s):
        if self._bar is not None:
            self._bar.set_postfix_str(s)
        self.postfix = s

    def update(self, k=1):
        self.n += k
        if self._bar is not None:
            self._bar.update(k)
        else:
            done = int(30 * self.n / self.total)
            print(f"\r{self.desc} [{'#' * done}{'.' * (30 - done)}] {self.n}/{self.total} "
                  f"{self.postfix}", end="", file=sys.stderr, flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()
        else:
            print(file=sys.stderr)


@torch.no_grad()
def evaluate(model, x, y, batch_size=256):
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += (model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum().item()
    return correct / len(x)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--limit", type=int, default=None,
                   help="train on only the first N training images (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch and libna (default 1: this model's matrices "
                        "are too small to gain from more, and on a busy machine OpenMP "
                        "oversubscription makes extra threads much slower)")
    p.add_argument("--save", default=None, help="write the trained model to this file")
    p.add_argument("--no-augment", action="store_true")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
        libna.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_tr, y_tr, x_te, y_te = load_digits_split(args.seed)
    if args.limit is not None:
        x_tr, y_tr = x_tr[:args.limit], y_tr[:args.limit]
    x_tr, x_te = prepare(x_tr), prepare(x_te)

    model = build_model()
    print(f"DiNAT for digits: {count_parameters(model) / 1e6:.3f}M parameters, "
          f"dilations {model.dilations}, {len(x_tr)} training / {len(x_te)} test images",
          flush=True)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim <= 1 or name.endswith("rpb") else decay).append(param)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    steps_per_epoch = max(1, -(-len(x_tr) // args.batch_size))
    total = args.epochs * steps_per_epoch
    warmup = min(steps_per_epoch, total // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup
        else 0.5 * (1 + np.cos(np.pi * (s - warmup) / max(1, total - warmup))))

    start = time.perf_counter()
    bar = _Progress(total, "training")
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        seen = correct = 0
        loss_sum = 0.0
        for i in range(0, len(x_tr), args.batch_size):
            idx = perm[i:i + args.batch_size]
            xb, yb = x_tr[idx], y_tr[idx]
            if not args.no_augment:
                xb = augment(xb, gen)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(idx)
            correct += (logits.argmax(-1) == yb).sum().item()
            loss_sum += loss.item() * len(idx)
            bar.set_postfix_str(f"epoch {epoch + 1}/{args.epochs} loss {loss_sum / seen:.3f} "
                                f"train acc {correct / seen:.3f}")
            bar.update()
    bar.close()
    elapsed = time.perf_counter() - start

    if args.save:
        torch.save({"config": CONFIG, "state_dict": model.state_dict()}, args.save)
        print(f"saved {args.save}")
    acc = evaluate(model, x_te, y_te)
    print(f"trained {args.epochs} epochs in {elapsed:.1f} s")
    print(f"test accuracy: {acc:.3f}")
    return acc


if __name__ == "__main__":
    main()
