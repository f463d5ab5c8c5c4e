"""The machine and software a run measured: CPU model and flags, memory,
libna's build, torch, numpy and python versions, threads and load."""

from __future__ import annotations

import datetime
import os
import platform

import numpy as np

import libna


def proc_kib(path, field):
    """Bytes of the `field:  N kB` line of a /proc file (/proc/meminfo,
    /proc/self/status); None where there is no such file or line."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")
                            if x in flags]
    except OSError:
        pass
    return []


def machine_lines(threads):
    import torch
    info = libna.build_info()
    avail = ""
    try:
        with open("/proc/meminfo") as f:
            mem = {l.split(":")[0]: l.split(":")[1].strip() for l in f}
        avail = f", RAM {int(mem['MemTotal'].split()[0]) / 2**20:.1f} GiB"
    except (OSError, KeyError, ValueError):
        pass
    flags = cpu_flags()
    try:
        load = "load average %.2f %.2f %.2f (1/5/15 min) at start" % os.getloadavg()
    except OSError:
        load = "load average unknown"
    return [
        f"date:    {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"machine: {cpu_model()}, {os.cpu_count()} logical cores"
        f"{' (' + ' '.join(flags) + ')' if flags else ''}{avail}, {platform.system()} "
        f"{platform.machine()}",
        f"libna:   {info.get('version')} backends={','.join(info.get('backends', []))} "
        f"simd={info.get('simd')} amx={'on' if info.get('cpu_amx') else 'off'} "
        f"compiler={info.get('compiler')}",
        f"torch:   {torch.__version__}, numpy {np.__version__}, python "
        f"{platform.python_version()}",
        f"threads: {threads} (libna and torch); OPENBLAS_NUM_THREADS="
        f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}; {load}",
    ]
