"""libna's C++ core and C++ tests cross-built for aarch64 (warnings as
errors) and run under qemu-user, by scripts/check-aarch64.sh: the portable
kernels, CPU dispatch and kernel-set report as an ARM machine runs them.
Skipped where the cross compiler or qemu is missing (.ci/run installs them)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check-aarch64.sh"
SKIPPED = 77  # the script's exit status without its tools


def test_cpp_tests_pass_on_aarch64_under_qemu():
    missing = [tool for tool in ("cmake", "aarch64-linux-gnu-g++", "qemu-aarch64")
               if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not on PATH (Debian/Ubuntu: apt-get install "
                    "g++-aarch64-linux-gnu qemu-user)")
    # In build/ (ignored by git) so that a developer's rerun is incremental.
    result = subprocess.run(["bash", str(SCRIPT), str(ROOT / "build" / "aarch64")],
                            capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    if result.returncode == SKIPPED:
        pytest.skip(result.stderr.strip())
    assert result.returncode == 0, output[-8000:]
    for name in ("test_core", "test_tiling", "test_mma_layout", "test_core_refuses_avx2"):
        assert f": {name} " in output, output[-4000:]
    assert "100% tests passed" in output, output[-4000:]
