#!/usr/bin/env python3
"""Builds libna in another configuration than the wheel's (another CMake build
type, sanitizers) and runs the C++ tests and a slice of the Python suite
against that build; exits non-zero when a build step or a test fails, or when
a sanitizer reports anything.

    python scripts/check_build.py relwithdebinfo   # -O2: test_core, the numerical Python tests
    python scripts/check_build.py debug            # -O0: the same
    python scripts/check_build.py asan             # ASan+UBSan at -O0: all C++ tests, the
                                                   # numerical Python tests, threads and fork
    python scripts/check_build.py tsan             # ThreadSanitizer at -O1: test_core, and the
                                                   # CUDA kernels under the emulator, where it
                                                   # finds races between emulated threads
    python scripts/check_build.py asan --long      # ... also torch, frameworks, models, reference
    python scripts/check_build.py asan --pytest tests/test_forward.py -k float32

The build is CMake's own (not pip's): the core and the nanobind extension are
configured in a work directory with LIBNA_CUDA=OFF and LIBNA_JAX=OFF,
installed into <work>/prefix/libna beside a copy of python/libna (the layout
of the wheel), and the Python tests import libna from there through
PYTHONPATH. The C++ tests (tests/cpp) are built against that install, with
its build type; a sanitized libna exports its -fsanitize flags, so they are
instrumented too. tests/test_build_configs.py runs the presets in CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The Python tests that compare the compiled kernels with libna.reference or
# with each other: every rank, dtype and window feature, forward and backward,
# fused and unfused, strided and unaligned layouts, non-finite inputs, the
# bad-input paths, and the portable kernels (LIBNA_CPU_KERNELS=portable).
NUMERICAL = ("tests/test_forward.py", "tests/test_backward.py", "tests/test_composition.py",
             "tests/test_bad_input.py", "tests/test_properties.py", "tests/test_nan_locality.py",
             "tests/test_softmax_edges.py", "tests/test_cpu_kernels.py", "tests/test_amx.py",
             "tests/test_amx_backward.py")
# Under the sanitizers also threads and fork, and the CUDA kernels under the
# emulator (its fibers switch stacks, which AddressSanitizer is told of).
SANITIZED = NUMERICAL + ("tests/test_concurrency.py", "tests/test_cuda_emulator.py")
# --long: also the framework adapters and models (with the "long" hypothesis
# profile, which --long sets for every preset).
LONG = SANITIZED + ("tests/test_torch.py", "tests/test_frameworks.py", "tests/test_models.py",
                    "tests/test_reference.py")


@dataclasses.dataclass(frozen=True)
class Preset:
    build_type: str
    # Replaces the build type's CMAKE_CXX_FLAGS_<CONFIG> (its optimisation level).
    config_flags: str = ""
    sanitize: str = ""
    cpp_tests: tuple = ("test_core", "test_tiling", "test_mma_layout")
    pytest: tuple = ()  # empty: no Python extension is built
    long_pytest: tuple = ()  # --long runs these instead
    emulator: bool = False  # also build the CUDA emulator (LIBNA_CUDA_EMULATOR)
    # Self-test kernels of the emulator (na.h, cuda_emulator_self_test) that
    # lack a barrier or an atomic: the sanitizer must report a data race in
    # each (that the race detection works), and none in test_cuda_emulator.
    racy_kernels: tuple = ()

    @property
    def python(self):
        return bool(self.pytest or self.long_pytest)

    def cmake_args(self):
        args = [f"-DCMAKE_BUILD_TYPE={self.build_type}"]
        if self.config_flags:
            args.append(f"-DCMAKE_CXX_FLAGS_{self.build_type.upper()}={self.config_flags}")
        if self.emulator:
            args.append("-DLIBNA_CUDA_EMULATOR=ON")
        return args


PRESETS = {
    "relwithdebinfo": Preset("RelWithDebInfo", cpp_tests=("test_core",), pytest=NUMERICAL,
                             long_pytest=LONG),
    "debug": Preset("Debug", cpp_tests=("test_core",), pytest=NUMERICAL, long_pytest=LONG),
    # -O0 and line tables only (-g1): UBSan's checks in the kernels' inlined
    # templates take two minutes a unit to compile at -O1 (three times -O0's),
    # and reports need no more; nothing is optimised away from the checks, and
    # RelWithDebInfo and the wheel's Release cover the optimised builds.
    # Debug keeps assert() on.
    "asan": Preset("Debug", "-O0 -g1", "address,undefined",
                   cpp_tests=("test_core", "test_tiling", "test_mma_layout", "test_cuda_emulator"),
                   pytest=SANITIZED, long_pytest=LONG, emulator=True),
    # Each emulated CUDA thread is a fiber that ThreadSanitizer tells apart:
    # a shared- or global-memory access that no barrier or atomic orders
    # against another thread's is a data race (cuda/emulator/emulator.cpp).
    "tsan": Preset("Debug", "-O1 -g1", "thread", cpp_tests=("test_core", "test_cuda_emulator"),
                   emulator=True, racy_kernels=("neighbour_read_racy",
                                                "overwrite_after_read_racy", "count_racy")),
}


SKIPPED = 77  # exit status when a tool is missing


class Failed(Exception):
    pass


def missing_tool(preset, work):
    """Why this machine cannot build `preset`, or None."""
    if shutil.which("cmake") is None:
        return "cmake is not on PATH"
    # The compiler CMake will pick.
    cxx = os.environ.get("CXX") or next(filter(shutil.which, ("c++", "g++", "clang++")), None)
    if cxx is None or shutil.which(cxx.split()[0]) is None:
        return "no C++ compiler (c++, g++, clang++ or $CXX) is on PATH"
    if preset.sanitize:
        probe = work / "sanitizer-probe.cpp"
        probe.write_text("int main() { return 0; }\n")
        result = subprocess.run([*cxx.split(), f"-fsanitize={preset.sanitize}", str(probe),
                                 "-o", str(probe.with_suffix(""))], capture_output=True, text=True)
        if result.returncode != 0:
            return (f"{cxx} cannot link a -fsanitize={preset.sanitize} program (is its runtime "
                    f"installed?): {tail(result.stderr, 5)}")
    if preset.python and subprocess.run([sys.executable, "-m", "nanobind", "--cmake_dir"],
                                        capture_output=True).returncode != 0:
        return "nanobind is not installed (pip install \".[test]\" installs it)"
    return None


def step(title, cmd, timeout, env=None, cwd=None):
    """Runs `cmd`, printing its output only when it fails."""
    start = time.monotonic()
    print(f"== {title}: {' '.join(map(str, cmd))}", flush=True)
    try:
        result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                                timeout=timeout, env=env, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        raise Failed(f"{title} took over {timeout} s")
    print(f"   {time.monotonic() - start:.0f} s", flush=True)
    if result.returncode != 0:
        raise Failed(f"{title} exited with {result.returncode}\n{tail(result.stdout)}\n"
                     f"{tail(result.stderr)}")
    return result.stdout


def tail(text, lines=150):
    return "\n".join((text or "").splitlines()[-lines:])


def generator_args():
    return ["-G", "Ninja"] if shutil.which("ninja") else []


def sanitizer_env(reports, python):
    """Runtime options that make every report an error and write it to a file
    under `reports` (so that none is lost in a subprocess's output)."""
    env = dict(os.environ)
    log = f"log_path={reports / 'report'}"
    # The interpreter and its extensions are not built with LeakSanitizer in
    # mind (interned objects live until exit): leaks count in the C++ tests only.
    leaks = "detect_leaks=0" if python else "detect_leaks=1"
    env["ASAN_OPTIONS"] = f"halt_on_error=1:abort_on_error=0:{leaks}:{log}"
    env["UBSAN_OPTIONS"] = f"halt_on_error=1:print_stacktrace=1:{log}"
    env["TSAN_OPTIONS"] = f"halt_on_error=1:second_deadlock_stack=1:{log}"
    return env


def sanitizer_runtimes(library):
    """The sanitizer runtimes that `library` links, for LD_PRELOAD: an
    uninstrumented python must load them before anything else."""
    out = subprocess.run(["ldd", str(library)], capture_output=True, text=True).stdout
    return [line.split("=>")[1].split()[0] for line in out.splitlines()
            if "=>" in line and any(f"lib{s}san" in line for s in ("a", "ub", "t"))]


def report_text(reports):
    return "\n".join(p.read_text() for p in sorted(reports.glob("report*")))


def check_no_reports(reports):
    if report_text(reports):
        raise Failed("a sanitizer reported errors")


def build_libna(preset, work, jobs):
    build, prefix = work / "build", work / "prefix"
    configure = ["cmake", "-S", ROOT, "-B", build, *generator_args(), *preset.cmake_args(),
                 f"-DLIBNA_SANITIZE={preset.sanitize}",
                 "-DLIBNA_CUDA=OFF", "-DLIBNA_JAX=OFF", "-DCMAKE_INSTALL_LIBDIR=lib",
                 f"-DLIBNA_PYTHON={'ON' if preset.python else 'OFF'}",
                 f"-DPython_EXECUTABLE={sys.executable}"]
    step("configure libna", configure, 300)
    step("build libna", ["cmake", "--build", build, "--parallel", jobs], 1800)
    # The wheel's layout: the package's Python files with _C, lib/ and include/.
    package = prefix / "libna"
    shutil.copytree(ROOT / "python" / "libna", package, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    step("install libna", ["cmake", "--install", build, "--prefix", package], 300)
    return prefix


def run_cpp_tests(preset, work, prefix, env, jobs):
    build = work / "cpp-tests"
    step("configure tests/cpp",
         ["cmake", "-S", ROOT / "tests" / "cpp", "-B", build, *generator_args(),
          *preset.cmake_args(), f"-Dlibna_DIR={prefix / 'libna' / 'lib' / 'cmake' / 'libna'}"], 300)
    step("build tests/cpp", ["cmake", "--build", build, "--parallel", jobs,
                             "--target", *preset.cpp_tests], 900)
    for test in preset.cpp_tests:
        print(step(test, [build / test], 900, env=env).splitlines()[-1])
    for kernel in preset.racy_kernels:
        expect_race(build / "test_cuda_emulator", kernel, work, env)


def expect_race(program, kernel, work, env):
    """Runs the racy self-test `kernel` and fails unless the sanitizer
    reports a data race in it."""
    reports = work / f"race-{kernel}"
    shutil.rmtree(reports, ignore_errors=True)
    reports.mkdir()
    env = dict(env, TSAN_OPTIONS=f"halt_on_error=1:log_path={reports / 'report'}")
    print(f"== race in {kernel}: {program.name} race {kernel}", flush=True)
    result = subprocess.run([str(program), "race", kernel], capture_output=True, text=True,
                            timeout=300, env=env)
    text = report_text(reports)
    if result.returncode == 0 or "data race" not in text or "self_test.cpp" not in text:
        raise Failed(f"the race in the self-test kernel {kernel} went unreported (exit "
                     f"{result.returncode}):\n{tail(result.stdout)}\n{tail(result.stderr)}\n"
                     f"{tail(text)}")
    print("   reported", flush=True)


def run_pytest(prefix, args, env):
    env = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(prefix),
                                                             env.get("PYTHONPATH")])))
    where = step("import libna", [sys.executable, "-c", "import libna; print(libna.__file__)"],
                 120, env=env, cwd=ROOT).strip()
    if not where.startswith(str(prefix)):
        raise Failed(f"libna was imported from {where}, not from the build in {prefix}")
    out = step("pytest", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
               1800, env=env, cwd=ROOT)
    print(out.splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", choices=PRESETS)
    parser.add_argument("--long", action="store_true",
                        help="run the preset's longer Python slice, with the long hypothesis "
                             "profile")
    parser.add_argument("--pytest", nargs=argparse.REMAINDER,
                        help="run these pytest arguments instead of the preset's slice")
    parser.add_argument("--work-dir", type=Path,
                        help="build here and keep it (default: a temporary directory)")
    parser.add_argument("--jobs", default=str(min(os.cpu_count() or 1, 2)),
                        help="parallel build jobs (default: %(default)s)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    pytest_args = args.pytest or (preset.long_pytest if args.long else preset.pytest)
    if args.long:
        os.environ["LIBNA_HYPOTHESIS_PROFILE"] = "long"
    if pytest_args and not preset.python:
        parser.error(f"the {args.preset} preset builds no Python extension")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"libna-{args.preset}-") as tmp:
        work = (args.work_dir or Path(tmp)).resolve()
        reports = work / "sanitizer-reports"
        shutil.rmtree(reports, ignore_errors=True)
        reports.mkdir(parents=True)
        missing = missing_tool(preset, work)
        if missing:
            print(f"check_build: {args.preset} skipped: {missing}", file=sys.stderr)
            return SKIPPED
        try:
            prefix = build_libna(preset, work, args.jobs)
            run_cpp_tests(preset, work, prefix, sanitizer_env(reports, python=False),
                          args.jobs)
            check_no_reports(reports)
            if pytest_args:
                env = sanitizer_env(reports, python=True)
                runtimes = sanitizer_runtimes(prefix / "libna" / "lib" / "libna.so")
                if runtimes:
                    env["LD_PRELOAD"] = " ".join(runtimes)
                run_pytest(prefix, pytest_args, env)
                check_no_reports(reports)
        except Failed as e:
            print(f"FAILED: {e}", file=sys.stderr)
            if report_text(reports):  # also those of a test that failed on them
                print(f"sanitizer reports:\n{report_text(reports)}", file=sys.stderr)
            return 1
    print(f"{args.preset}: ok ({time.monotonic() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
