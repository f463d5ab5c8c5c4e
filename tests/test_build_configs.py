"""libna built in configurations other than the wheel's Release, by
scripts/check_build.py (see its presets): RelWithDebInfo (-O2) and Debug
(-O0) run test_core and the numerical Python tests, so that a miscompile at
one optimisation level cannot hide behind -O3; ASan+UBSan (-O1) runs every
C++ test and the numerical, thread and fork Python tests, and fails on any
report; ThreadSanitizer (-O1) runs test_core, whose concurrent callers share
the thread pool, and the CUDA kernels under the emulator (no data race
between emulated threads), and requires a report from each racy self-test
kernel of the emulator. Each builds the core from scratch in a temporary directory
(half a minute to four minutes on two cores). Skipped, saying why, where the
script finds a tool missing (cmake, a C++ compiler, the sanitizer's runtime,
nanobind)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_build.py"
SKIPPED = 77  # the script's exit status when a tool is missing


@pytest.mark.parametrize("preset,minutes", [
    ("relwithdebinfo", 15), ("debug", 15), ("asan", 25), ("tsan", 15)])
def test_build_config(preset, minutes):
    result = subprocess.run([sys.executable, str(SCRIPT), preset],
                            capture_output=True, text=True, timeout=minutes * 60, cwd=ROOT)
    if result.returncode == SKIPPED:
        pytest.skip(result.stderr.strip())
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-12000:]
    assert f"{preset}: ok" in result.stdout, output[-4000:]
