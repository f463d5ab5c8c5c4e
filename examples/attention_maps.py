"""Attention maps of the digits DiNAT (see train_digits.py), drawn with libna.viz.

    python examples/train_digits.py --save digits_nat.pt
    python examples/attention_maps.py --checkpoint digits_nat.pt --out-dir docs
    python examples/attention_maps.py --epochs 10 --out-dir /tmp/maps   # trains briefly itself

Writes two PNGs to --out-dir:

* ``attention_maps.png`` -- for a test digit and a corner, an edge and a
  centre token (query, red): per first-level block (dilation 1, then 2) the
  neighborhood the query attends (blue; dashed: the centred window it would
  have without libna's border shift) and the trained softmax weights of each
  head. The first level's 8x8 token grid is the digit's own 8x8 pixel grid.
* ``neighborhoods.png`` -- the window rule alone on a 16x16 grid, kernel 5,
  dilations 1, 2 and 3.
"""

import argparse
import os
import sys
import tempfile

import torch

import libna
from libna import viz

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_digits  # noqa: E402


def load_or_train(checkpoint, epochs, seed):
    if checkpoint is None:
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = os.path.join(tmp, "digits_nat.pt")
            train_digits.main(["--epochs", str(epochs), "--seed", str(seed),
                               "--save", checkpoint])
            state = torch.load(checkpoint, map_location="cpu")
    else:
        state = torch.load(checkpoint, map_location="cpu")
    model = train_digits.build_model(**state.get("config", {}))
    model.load_state_dict(state["state_dict"])
    return model.eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None,
                   help="a model saved by train_digits.py --save (default: train one now)")
    p.add_argument("--epochs", type=int, default=10,
                   help="epochs of training when no --checkpoint is given")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--index", type=int, default=0, help="which test digit to show")
    p.add_argument("--out-dir", default="docs")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    libna.set_num_threads(1)

    model = load_or_train(args.checkpoint, args.epochs, args.seed)
    _, _, x_te, y_te = train_digits.load_digits_split(args.seed)
    digit = x_te[args.index:args.index + 1]                       # [1, 1, 8, 8]
    with torch.no_grad():
        pred = int(model(train_digits.prepare(digit)).argmax(-1))
    records = viz.record_attention(model, train_digits.prepare(digit))
    first_level = [r for r in records if r.name.startswith("levels.0.")]

    os.makedirs(args.out_dir, exist_ok=True)
    queries = [(0, 0), (0, 4), (4, 3)]
    out = os.path.join(args.out_dir, "attention_maps.png")
    viz.plot_attention(
        digit[0, 0].numpy(), first_level, queries, path=out,
        title=f"digits DiNAT, level 0 (8x8 tokens = pixels), test digit {int(y_te[args.index])}"
              f" (predicted {pred}): neighborhoods and per-head attention weights")
    print(f"wrote {out}")
    out2 = os.path.join(args.out_dir, "neighborhoods.png")
    viz.plot_neighborhoods((16, 16), [(0, 0), (1, 8), (8, 7)], kernel_size=5,
                           dilations=(1, 2, 3), path=out2)
    print(f"wrote {out2}")


if __name__ == "__main__":
    main()
