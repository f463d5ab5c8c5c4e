"""libna.torch.distributed: context-parallel NA over torch.distributed.

The slab rule is checked exhaustively on short axes against
libna.reference.window; the op itself runs in 1, 2, 3 (uneven blocks, a
one-row neighbour) and 4 (also a 2 x 2 grid of two sharded axes) gloo
processes (tests/_distributed_worker.py), each compared with the
single-device op on the gathered tensors, forward and backward, plus the
bad calls that must raise the same error on every rank. Every process has a
collective timeout and the whole run a wall-clock one, so a bug fails
instead of hanging. The data-parallel test trains nothing: it compares one
step's gradients of a small NAT under DDP and FSDP2 (eager and compiled) with
one process on the whole batch.
"""

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

import libna.torch.distributed as cp  # noqa: E402
from libna import reference  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "_distributed_worker.py")
DATA_PARALLEL_WORKER = os.path.join(os.path.dirname(__file__), "_data_parallel_worker.py")
TIMEOUT_S = 150


def _slab_cases(max_length):
    for length in range(2, max_length + 1):
        for kernel in range(2, length + 1):
            for dilation in range(1, length // kernel + 1):
                for stride in range(1, kernel + 1):
                    for causal in (False, True):
                        yield length, kernel, stride, dilation, causal


def test_axis_slab_reproduces_every_window():
    """On every block of every short axis, the slab gives each query of the
    block the window it has on the whole axis (keys, and group positions so
    that rpb offsets agree), and the received rows hold all its keys."""
    for length, kernel, stride, dilation, causal in _slab_cases(10):
        for a in range(length):
            for b in range(a + 1, length + 1):
                slab = cp.axis_slab(length, a, b, kernel, stride, dilation, causal)
                where = (length, a, b, kernel, stride, dilation, causal, slab)
                assert 0 <= slab.start <= slab.rows_start <= a < b <= slab.rows_stop, where
                assert slab.rows_stop <= slab.stop <= length, where
                assert slab.start % (stride * dilation) == 0, where
                assert slab.stop - slab.start >= kernel * dilation, where
                for i in range(a, b):
                    keys, lo = reference.window(i, length, kernel, stride, dilation, causal)
                    slab_keys, slab_lo = reference.window(
                        i - slab.start, slab.stop - slab.start, kernel, stride, dilation, causal)
                    assert [j + slab.start for j in slab_keys] == keys, (where, i)
                    assert slab_lo + slab.start // dilation == lo, (where, i)
                    assert slab.rows_start <= keys[0] and keys[-1] < slab.rows_stop, (where, i)


def test_axis_slab_receives_only_what_windows_reach():
    # k=3 on 20 rows, block [8, 12): the windows reach [7, 13)
    assert cp.axis_slab(20, 8, 12, 3) == cp.AxisSlab(7, 13, 7, 13)
    # at the border windows shift inward: block [0, 2) reaches [0, 5) with k=5
    assert cp.axis_slab(20, 0, 2, 5) == cp.AxisSlab(0, 5, 0, 5)
    # causal: only rows before the block
    assert cp.axis_slab(20, 8, 12, 3, is_causal=True) == cp.AxisSlab(6, 12, 6, 12)


def test_exchange_bytes():
    """The byte model, by hand: 16 rows in two blocks of 8, k=3, 2 heads of
    dim 4, float32. Halo: one K/V row each way (2 heads x (4 + 4) x 4 bytes).
    Heads: the other rank's head of 8 rows of q (4) and k|v (8), and out
    (4) of the other block's 8 rows back."""
    arguments = dict(heads=2, heads_kv=2, head_dim=4)
    assert cp.exchange_bytes("halo", (16,), {0: [8, 8]}, 3, **arguments) == [64, 64]
    assert cp.exchange_bytes("heads", (16,), {0: [8, 8]}, 3, **arguments) == [
        8 * (4 + 8) * 4 + 8 * 4 * 4] * 2
    # causal: only the second block receives (the first sends) 2 rows
    assert cp.exchange_bytes("halo", (16,), {0: [8, 8]}, 3, is_causal=True,
                             **arguments) == [128, 0]
    # kernel = length on 4 ranks, 4 heads: the halo is every other block
    # (12 rows), twice what "heads" moves, which "auto" therefore picks
    four = dict(heads=4, heads_kv=4, head_dim=4)
    assert cp.exchange_bytes("halo", (16,), {0: [4] * 4}, 16, **four) == [12 * 4 * 8 * 4] * 4
    assert cp.exchange_bytes("heads", (16,), {0: [4] * 4}, 16, **four) == [
        3 * 4 * (4 + 8) * 4 + 12 * 4 * 4] * 4


def test_module_context_parallel_argument():
    from libna.torch.nn import NeighborhoodAttention2D
    with pytest.raises(TypeError, match=r"context_parallel=\{'groups': None\} must be None or"):
        NeighborhoodAttention2D(8, 2, 3, context_parallel={"groups": None})
    layer = cp.parallelize(torch.nn.Sequential(NeighborhoodAttention2D(8, 2, 3)), axis=1)
    assert layer[0].context_parallel == {"group": None, "axis": 1, "strategy": "auto"}
    if not (dist.is_available() and dist.is_initialized()):
        with pytest.raises(RuntimeError, match="no initialised process group"):
            layer(torch.zeros(1, 4, 4, 8))


def test_without_process_group_raises():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    q = torch.zeros(1, 8, 1, 4)
    with pytest.raises(RuntimeError, match="no initialised process group"):
        cp.na1d(q, q, q, 3)


def run_ranks(script, world, tmp_path, *args, timeout=TIMEOUT_S):
    """Starts `world` processes of `script` (RANK WORLD INIT_FILE *args) on
    this machine and fails with their output if any fails or the run
    exceeds `timeout` seconds (then every process is killed)."""
    init_file = tmp_path / "init"
    env = dict(os.environ, OMP_NUM_THREADS="1", LIBNA_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, script, str(r), str(world), str(init_file),
                               *args],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env)
             for r in range(world)]
    outputs, failed = [], False
    for r, p in enumerate(procs):
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            out, _ = p.communicate()
            out += f"\nrank {r}: timed out after {timeout} s"
            failed = True
        outputs.append(out)
        failed |= p.returncode != 0
    assert not failed, "\n".join(outputs)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_matches_single_device_op(world, tmp_path):
    """Forward, lse and every gradient on each rank's blocks (world 1:
    bitwise equal to the plain op), both strategies, the bytes sent, and
    collective errors."""
    run_ranks(WORKER, world, tmp_path)


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp", "ddp compile", "fsdp compile"])
def test_data_parallel_nat(wrapper, tmp_path):
    """A small NAT under DDP / FSDP2 fully_shard (eager and torch.compile)
    on 2 gloo ranks has the gradients of one process on the whole batch."""
    run_ranks(DATA_PARALLEL_WORKER, 2, tmp_path, *wrapper.split())


EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples",
                       "train_context_parallel.py")


def _losses(command, timeout=TIMEOUT_S):
    env = dict(os.environ, OMP_NUM_THREADS="1", LIBNA_NUM_THREADS="1")
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as error:  # subprocess.run kills it
        pytest.fail(f"{command} timed out after {timeout} s:\n{error.stdout}\n{error.stderr}")
    assert run.returncode == 0, run.stdout + run.stderr
    losses = [float(line.split()[-1]) for line in run.stdout.splitlines()
              if line.startswith("step ")]
    assert losses, run.stdout + run.stderr
    return losses


def test_example_train_context_parallel():
    """examples/train_context_parallel.py under torchrun on a 2 x 2 data x
    context mesh of 4 gloo processes has the losses of the single-process
    run, step by step (float64)."""
    arguments = [EXAMPLE, "--steps", "4", "--float64"]
    single = _losses([sys.executable, *arguments, "--single"])
    parallel = _losses([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", "4", *arguments])
    assert len(single) == len(parallel) == 4
    assert parallel == pytest.approx(single, rel=1e-12), (single, parallel)
