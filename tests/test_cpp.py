"""Builds the C++ example (examples/cpp) and the C++ tests (tests/cpp) against
the installed package with CMake (and the example also as a scikit-build-core
project that finds libna through its cmake.root entry point), runs them, and
checks their output."""

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import libna

ROOT = Path(__file__).resolve().parents[1]


def _cxx_compiler():
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx.split()[0])
    return next(filter(None, map(shutil.which, ("c++", "g++", "clang++"))), None)


@pytest.fixture(scope="module")
def cmake():
    exe = shutil.which("cmake")
    if exe is None:
        pytest.skip("cmake is not on PATH")
    if _cxx_compiler() is None:
        pytest.skip("no C++ compiler (c++, g++, clang++ or $CXX) is on PATH")
    return exe


def build(cmake, source, build_dir, target):
    """Configures and builds `source` against the installed libna; returns the
    path of the executable `target`."""
    configure = [cmake, "-S", str(source), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                 f"-Dlibna_DIR={libna.cmake_dir()}"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    for cmd in (configure, [cmake, "--build", str(build_dir), "--parallel", "2"]):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (
            f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
    exe = build_dir / target
    assert exe.is_file(), f"{exe} was not built"
    return exe


@pytest.fixture(scope="module")
def cpp_tests(cmake, tmp_path_factory):
    """tests/cpp built once against the installed libna: its build directory."""
    build_dir = tmp_path_factory.mktemp("cpp-tests")
    build(cmake, ROOT / "tests" / "cpp", build_dir, "test_core")
    return build_dir


def run(exe, env=None):
    result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, **(env or {})))
    assert result.returncode == 0, (
        f"{exe.name} exited with {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def check_example_output(out):
    lines = out.splitlines()
    assert lines[0].startswith(f"libna {libna.__version__} (backends: cpu"), out
    checks = [line for line in lines if "max |out err|" in line]
    assert len(checks) == 3 and all(line.endswith(": ok") for line in checks), out
    assert lines[-1] == "all cases match the naive loop", out


def test_cpp_example(cmake, tmp_path):
    check_example_output(
        run(build(cmake, ROOT / "examples" / "cpp", tmp_path / "example", "na2d_example")).stdout)


def test_cpp_example_as_scikit_build_core_project(cmake, tmp_path):
    """examples/cpp/pyproject.toml lists libna in its build-system.requires;
    scikit-build-core then finds it through libna's cmake.root entry point
    (libna_ROOT), with no libna_DIR and with its site-packages search off, so
    that nothing else could have found it. Built with this environment's
    packages (no isolation, nothing downloaded); the program runs from the
    wheel's layout next to the installed libna package."""
    pytest.importorskip("scikit_build_core",
                        reason="scikit-build-core is not installed (pip install '.[test]')")
    build_dir, dist, site = tmp_path / "build", tmp_path / "dist", tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "wheel", str(ROOT / "examples" / "cpp"), "--no-deps",
           "--no-build-isolation", "--check-build-dependencies", "--wheel-dir", str(dist),
           "-C", f"build-dir={build_dir}", "-C", "search.site-packages=false"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    cache = (build_dir / "CMakeCache.txt").read_text()
    package = Path(libna.__file__).resolve().parent
    found = dict(re.findall(r"^(libna_ROOT|libna_DIR):PATH=(.*)$", cache, re.M))
    assert Path(found["libna_ROOT"]).resolve() == package, found
    assert Path(found["libna_DIR"]).resolve() == Path(libna.cmake_dir()).resolve(), found
    (wheel,) = dist.glob("libna_example-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    (site / "libna").symlink_to(package, target_is_directory=True)
    exe = site / "libna_example" / "na2d_example"
    exe.chmod(0o755)
    check_example_output(run(exe).stdout)


def test_cpp_core(cpp_tests):
    exe = cpp_tests / "test_core"
    out = run(exe).stdout
    lines = out.splitlines()
    for name in ("axis_window", "converters", "validation", "half_precision", "threads",
                 "composition", "cpu_kernels", "vectorised_vs_scalar", "concurrent_callers",
                 "dtypes", "plan"):
        assert f"{name}: ok" in lines, out
    assert "FAILED" not in out, out
    summary = lines[-1].split()
    assert summary[1:] == ["passed,", "0", "failed"] and int(summary[0]) > 50, out
    # Without Python, invalid environment values are reported on stderr, once.
    stderr = run(exe, env={"LIBNA_NUM_THREADS": "many",
                           "LIBNA_CPU_SAVED_PROBS_BYTES": "-1"}).stderr.splitlines()
    assert [line for line in stderr if "LIBNA_" in line] == [
        "libna: warning: LIBNA_NUM_THREADS='many' is not an integer from 1 to 1024; using "
        f"{min(len(os.sched_getaffinity(0)), 1024)} (the cores this process may use) instead",
        "libna: warning: LIBNA_CPU_SAVED_PROBS_BYTES='-1' is not a whole number of bytes "
        "(0 or more); using 16777216 (16 MiB, the default) instead",
    ], stderr


def test_cpp_tiling(cpp_tests):
    """The CUDA kernels' tile schedule, run on the host over the feature grid:
    every kept (query, key) pair is a reference neighbour, each exactly once."""
    out = run(cpp_tests / "test_tiling").stdout
    lines = out.splitlines()
    for name in ("rank1", "rank2", "rank3"):
        assert any(line.startswith(f"{name}: ok") for line in lines), out
    assert "FAILED" not in out, out
    summary = lines[-1].split()
    assert summary[1:] == ["passed,", "0", "failed"] and int(summary[0]) > 10000, out


def test_cpp_mma_layout(cpp_tests):
    """The tensor-core kernels' fragment layouts (PTX ISA m16n8k16, ldmatrix)
    and shared-memory addressing, run on a simulated warp against plain
    matrix arithmetic: the forward's S, online-softmax row statistics, O and
    lse; the backward's D, S, dP, dS, dq (query side) and S^T, dP^T, P^T,
    dS^T, dk, dv (key side)."""
    out = run(cpp_tests / "test_mma_layout").stdout
    lines = out.splitlines()
    for name in ("layouts", "warp", "backward", "block"):
        assert f"{name}: ok" in lines, out
    assert "FAILED" not in out, out
    summary = lines[-1].split()
    assert summary[1:] == ["passed,", "0", "failed"] and int(summary[0]) > 40, out


def test_cpp_cuda_emulator(cpp_tests):
    """The CUDA backend under the CUDA emulator through the C++ API: the
    emulator's self-test kernels, and SIMT and tensor-core forward/backward
    against the CPU backend (scripts/check_build.py tsan also runs it under
    ThreadSanitizer)."""
    if "cuda-emulator" not in libna.build_info()["backends"]:
        pytest.skip("libna was built without the CUDA emulator")
    out = run(cpp_tests / "test_cuda_emulator").stdout
    lines = out.splitlines()
    for name in ("self_test_kernels", "cuda_backend"):
        assert f"{name}: ok" in lines, out
    summary = lines[-1].split()
    assert summary[1:] == ["passed,", "0", "failed"] and int(summary[0]) > 400, out
