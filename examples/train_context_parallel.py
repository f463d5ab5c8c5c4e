"""Train a small NA transformer data- and context-parallel, on the CPU.

    torchrun --standalone --nproc-per-node 4 examples/train_context_parallel.py
    python examples/train_context_parallel.py --single      # one process, same run

Four processes form a 2 x 2 DeviceMesh ("data", "context") over gloo: the
two ranks of a "context" group hold the top and bottom halves of the same
images (blocks of spatial axis 0), the two "data" groups hold different
halves of the batch. The model is a non-overlapping patch embedding, NA
blocks (LayerNorm, NeighborhoodAttention2D with rpb, LayerNorm, MLP) and a
per-token classifier; every layer but the attention is token-wise, so
``libna.torch.distributed.parallelize`` is the only change the model needs.
DDP over all four ranks averages the gradients; each rank's loss is the mean
over its tokens, so with equal blocks the average is the gradient of the
mean loss over the whole batch, as in the single-process run.

The task is synthetic (labels of each 4x4 patch from its own and its
neighbours' mean intensity, so attention has something to learn). Each step
prints the mean loss over the whole batch; ``--single`` prints the same
numbers up to rounding (tests/test_distributed.py compares them in float64).
"""

import argparse
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import libna.torch.distributed as cp
from libna.torch.nn import NeighborhoodAttention2D


class Block(nn.Module):
    def __init__(self, dim, heads, kernel_size):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = NeighborhoodAttention2D(dim, heads, kernel_size)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyNA(nn.Module):
    """[B, C, H, W] images -> [B, H/patch, W/patch, classes] logits."""

    def __init__(self, in_chans=3, dim=32, heads=4, depth=2, kernel_size=5, patch=4,
                 classes=4):
        super().__init__()
        self.embed = nn.Conv2d(in_chans, dim, patch, stride=patch)
        self.blocks = nn.Sequential(*(Block(dim, heads, kernel_size) for _ in range(depth)))
        self.head = nn.Linear(dim, classes)

    def forward(self, images):
        x = self.embed(images).permute(0, 2, 3, 1)      # channels-last tokens
        return self.head(self.blocks(x))


def data(batch, size, patch, dtype):
    """Images and per-patch labels: bit 0 from the patch's mean, bit 1 from
    the mean of its 3x3 patch neighbourhood."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g, dtype=dtype)
    means = F.avg_pool2d(images.mean(1, keepdim=True), patch)
    around = F.avg_pool2d(means, 3, stride=1, padding=1, count_include_pad=False)
    labels = (means > 0).long() + 2 * (around > 0).long()
    return images, labels[:, 0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="image height and width")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--float64", action="store_true")
    parser.add_argument("--single", action="store_true", help="one process, whole batch")
    args = parser.parse_args()
    dtype = torch.float64 if args.float64 else torch.float32
    patch = 4
    torch.manual_seed(0)
    model = TinyNA(patch=patch).to(dtype)
    images, labels = data(args.batch, args.size, patch, dtype)

    if args.single:
        rank, loss_scale = 0, 1.0
    else:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        if dist.get_world_size() != 4:
            raise SystemExit("run this with 4 processes (a 2 x 2 data x context mesh)")
        mesh = torch.distributed.device_mesh.init_device_mesh(
            "cpu", (2, 2), mesh_dim_names=("data", "context"))
        rank = dist.get_rank()
        d, c = mesh.get_local_rank("data"), mesh.get_local_rank("context")
        # this rank's images and labels: batch half d, image rows half c
        # (whole patches, so the patch embedding works on the block)
        rows, tokens = args.size // 2, args.size // patch // 2
        half = args.batch // 2
        images = images[d * half:(d + 1) * half, :, c * rows:(c + 1) * rows]
        labels = labels[d * half:(d + 1) * half, c * tokens:(c + 1) * tokens]
        cp.parallelize(model, group=mesh.get_group("context"), axis=0)
        model = nn.parallel.DistributedDataParallel(model)
        loss_scale = 1.0 / dist.get_world_size()

    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    for step in range(1, args.steps + 1):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images).flatten(0, 2), labels.flatten())
        loss.backward()
        optimizer.step()
        mean = loss.detach() * loss_scale
        if not args.single:
            dist.all_reduce(mean)
        if rank == 0:
            print(f"step {step} loss {mean.item():.10f}", flush=True)
    if not args.single:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
