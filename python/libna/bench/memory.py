"""Peak memory of each method, measured in fresh subprocesses (each runs
``python -m libna.bench --memory-child METHOD``) against a baseline child
that only builds the inputs and allocates the outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import libna

from .machine import proc_kib
from .methods import METHOD_CLASSES
from .problem import Problem, make_inputs

CHILD_ENV = {"OPENBLAS_NUM_THREADS": "1"}


def memory_child(p: Problem, method: str, backward: bool, threads: int) -> int:
    """Runs in a fresh interpreter; prints {"fwd": bytes, "bwd": bytes}."""
    import resource
    import torch
    libna.set_num_threads(threads)
    torch.set_num_threads(threads)

    def peak():
        # Linux keeps a process's ru_maxrss across fork + exec, so a child of
        # a big parent would report the parent's peak: read the high-water
        # mark of this process's own memory (VmHWM) where there is one.
        high_water_mark = proc_kib("/proc/self/status", "VmHWM")
        if high_water_mark is not None:
            return high_water_mark
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kB elsewhere
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    q, k, v, dout = make_inputs(p)
    result = {}
    if method == "baseline":
        keep = [torch.ones_like(q)]  # out
        result["fwd"] = peak()
        if backward:
            keep += [torch.ones(q.shape[:-1], dtype=torch.float32)]  # lse
            keep += [torch.ones_like(x) for x in (q, k, v)]  # dq, dk, dv
            result["bwd"] = peak()
    else:
        m = METHOD_CLASSES[method](p)
        m.setup()
        with torch.no_grad():
            out = m.forward(q, k, v)
        result["fwd"] = peak()
        del out
        if backward:
            grads = m.backward_runner(q, k, v, dout)()
            result["bwd"] = peak()
            del grads
    print(json.dumps(result))
    return 0


def measure_memory(p, methods, backward, threads, parallel=2):
    """{method: {"fwd": MiB, "bwd": MiB} or {"error": str}}."""
    env = dict(os.environ, **CHILD_ENV)
    jobs = ["baseline", *methods]
    raw = {}
    pending = list(jobs)
    running = []

    def launch(name):
        cmd = [sys.executable, "-m", "libna.bench", "--memory-child", name,
               "--threads", str(threads), *p.argv()]
        cmd.append("--backward" if backward else "--no-backward")
        return name, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env)

    while pending or running:
        while pending and len(running) < parallel:
            running.append(launch(pending.pop(0)))
        name, proc = running.pop(0)
        out, err = proc.communicate()
        if proc.returncode == 0:
            try:
                raw[name] = json.loads(out.strip().splitlines()[-1])
            except (ValueError, IndexError):
                raw[name] = {"error": f"bad output {out[-200:]!r}"}
        else:
            last = (err.strip().splitlines() or ["?"])[-1]
            raw[name] = {"error": f"exit {proc.returncode}: {last[:120]}"}
    base = raw.get("baseline", {})
    result = {}
    for name in methods:
        r = raw.get(name, {})
        if "error" in r or "error" in base:
            result[name] = {"error": r.get("error") or base.get("error")}
            continue
        result[name] = {key: max(0.0, (r[key] - base[key]) / 2 ** 20)
                        for key in ("fwd", "bwd") if key in r and key in base}
    return result
