"""libna.jax.distributed: context-parallel NA inside jax.shard_map.

XLA's CPU device count is fixed when jax is imported, so the checks run in a
subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4 and a
timeout (tests/_jax_distributed_worker.py: meshes of 2 and 4 devices, jit
and grad, against the single-device op). The slab plan is checked here on
every short axis.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("jax")
pytest.importorskip("libna.jax")

from libna import reference  # noqa: E402
from libna.jax.distributed import slab_plan  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "_jax_distributed_worker.py")
TIMEOUT_S = 240


def test_slab_plan_reproduces_every_window():
    """Every device's slab of the common length lies in the axis, starts on
    a stride block, holds the rows it is given, and gives each of its
    queries its global window."""
    for peers in (2, 3, 4):
        for block in range(1, 6):
            length = peers * block
            for kernel in range(2, length + 1):
                for dilation in range(1, length // kernel + 1):
                    for stride in range(1, kernel + 1):
                        for causal in (False, True):
                            size, starts, before, after = slab_plan(
                                length, peers, kernel, stride, dilation, causal)
                            where = (length, peers, kernel, stride, dilation, causal)
                            for p, start in enumerate(starts):
                                assert 0 <= start and start + size <= length, where
                                assert start % (stride * dilation) == 0, where
                                assert p * block - before <= start, where
                                assert start + size <= (p + 1) * block + after, where
                                for i in range(p * block, (p + 1) * block):
                                    keys, lo = reference.window(i, length, kernel, stride,
                                                                dilation, causal)
                                    slab_keys, slab_lo = reference.window(
                                        i - start, size, kernel, stride, dilation, causal)
                                    assert [j + start for j in slab_keys] == keys, (where, i)
                                    assert slab_lo + start // dilation == lo, (where, i)


def test_matches_single_device_op_on_4_host_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               OMP_NUM_THREADS="1", LIBNA_NUM_THREADS="1")
    try:
        run = subprocess.run([sys.executable, WORKER], capture_output=True, text=True,
                             timeout=TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"timed out after {TIMEOUT_S} s:\n{error.stdout}\n{error.stderr}")
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
