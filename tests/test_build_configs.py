"""libna built in configurations other than the wheel's Release, by
scripts/check_build.py (see its presets): RelWithDebInfo (-O2) and Debug
(-O0) run test_core and the numerical Python tests, so that a miscompile at
one optimisation level cannot hide behind -O3; ASan+UBSan (-O0) runs every
C++ test and the numerical, thread and fork Python tests, and fails on any
report; ThreadSanitizer (-O1) runs test_core, whose concurrent callers share
the thread pool, and the CUDA kernels under the emulator (no data race
between emulated threads), and requires a report from each racy self-test
kernel of the emulator. Each builds the core from scratch in a temporary
directory. Skipped, saying why, where the script finds a tool missing (cmake,
a C++ compiler, the sanitizer's runtime, nanobind).

The selected presets run two at a time, from the first of these tests on,
each building with half the CPUs: a preset spends half its time in a
single-threaded pytest slice, which leaves a core to the other's build (on
two cores the four take about two thirds of the time they take in turn)."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_build.py"
SKIPPED = 77  # the script's exit status when a tool is missing
# Each preset's time limit in minutes, the longest preset first (it starts first).
MINUTES = {"asan": 25, "relwithdebinfo": 15, "tsan": 15, "debug": 15}
AT_ONCE = 2


@pytest.fixture(scope="module")
def preset_runs(request):
    """The preset -> Future of its check_build.py run, for the presets this
    session selected, started together."""
    selected = {item.callspec.params["preset"] for item in request.session.items
                if Path(str(item.fspath)) == Path(__file__) and hasattr(item, "callspec")}
    presets = [p for p in MINUTES if p in selected]
    workers = max(1, min(AT_ONCE, len(presets)))
    jobs = max(1, (os.cpu_count() or 1) // workers)

    def run(preset):
        return subprocess.run([sys.executable, str(SCRIPT), preset, "--jobs", str(jobs)],
                              capture_output=True, text=True, timeout=MINUTES[preset] * 60,
                              cwd=ROOT)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {preset: pool.submit(run, preset) for preset in presets}
        try:
            yield futures
        finally:
            for future in futures.values():
                future.cancel()  # those not started, when the session stops early


@pytest.mark.parametrize("preset", list(MINUTES))
def test_build_config(preset, preset_runs):
    result = preset_runs[preset].result()
    if result.returncode == SKIPPED:
        pytest.skip(result.stderr.strip())
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-12000:]
    assert f"{preset}: ok" in result.stdout, output[-4000:]
