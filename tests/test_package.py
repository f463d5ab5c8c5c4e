"""The installed package: build info, the `python -m libna` tour, install
locations, thread settings, the NumPy fallback and torch-free operation."""

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import libna

from _run_python import run_python


def test_build_info():
    info = libna.build_info()
    assert info["version"] == libna.__version__
    assert "cpu" in info["backends"]
    assert isinstance(info["cuda_architectures"], list)
    assert info["simd"] and info["compiler"]
    assert isinstance(info["cpu_amx"], bool)
    assert info["num_threads"] == libna.get_num_threads() >= 1


def test_one_version_everywhere():
    """The version is written once, in python/libna/__init__.py; the
    distribution's metadata, the compiled core and the CMake package
    (find_package(libna 0.1) checks libnaConfigVersion.cmake) all carry it."""
    config = (Path(libna.cmake_dir()) / "libnaConfigVersion.cmake").read_text()
    cmake_version = re.search(r'^set\(PACKAGE_VERSION "([^"]*)"\)$', config, re.M).group(1)
    assert importlib.metadata.version("libna") == libna.__version__
    assert cmake_version == libna.__version__
    assert libna.build_info()["version"] == libna.__version__


def test_main_demo_runs():
    result = subprocess.run([sys.executable, "-m", "libna", "--repeats", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "self-check" in result.stdout and "FAILED" not in result.stdout
    assert result.stdout.count(": ok (") == 4
    assert "GFLOP/s" in result.stdout


def test_install_locations():
    for flag, marker in (("--cmake-dir", "libnaConfig.cmake"), ("--include-dir", "libna/na.h")):
        result = subprocess.run([sys.executable, "-m", "libna", flag], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0
        path = result.stdout.strip()
        assert os.path.isfile(os.path.join(path, marker)), path


def test_num_threads_setting_and_env():
    n = libna.get_num_threads()
    try:
        libna.set_num_threads(1)
        assert libna.get_num_threads() == 1
    finally:
        libna.set_num_threads(n)
    with pytest.raises(ValueError, match="num_threads=0"):
        libna.set_num_threads(0)
    with pytest.raises(TypeError, match="num_threads"):
        libna.set_num_threads(2.5)
    result = run_python("import libna; print(libna.get_num_threads())",
                        env={"LIBNA_NUM_THREADS": "3"})
    assert result.stdout.strip() == "3", result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr


# Environment variables are read once per process: each case runs in its own.
_WARNINGS_OF_IMPORT = """
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import libna
        import importlib
        importlib.reload(libna)   # a second look at the environment warns no more
        print(libna.get_num_threads())
        libna.set_num_threads(1)
        import numpy as np
        q = np.random.default_rng(0).standard_normal((1, 9, 9, 2, 8)).astype(np.float32)
        out, lse = libna.na2d(q, q, q, 3, return_lse=True)
        libna.na2d_backward(q, q, q, out, out, lse, 3)   # reads the saved-probs budget
    for w in caught:
        print(w.category.__name__, w.message)
"""


@pytest.mark.parametrize("variable, value, used", [
    ("LIBNA_NUM_THREADS", "abc", "the cores"),
    ("LIBNA_NUM_THREADS", "-3", "the cores"),
    ("LIBNA_NUM_THREADS", "1.5", "the cores"),
    ("LIBNA_NUM_THREADS", "0", "the cores"),
    ("LIBNA_NUM_THREADS", "", "the cores"),
    ("LIBNA_NUM_THREADS", " 2", "the cores"),
    ("LIBNA_NUM_THREADS", "99999999999999999999", "the cores"),
    ("LIBNA_NUM_THREADS", "+-3", "the cores"),
    ("LIBNA_NUM_THREADS", "5000", "1024"),
    ("LIBNA_CPU_SAVED_PROBS_BYTES", "abc", "16777216 (16 MiB, the default)"),
    ("LIBNA_CPU_SAVED_PROBS_BYTES", "-3", "16777216 (16 MiB, the default)"),
    ("LIBNA_CPU_SAVED_PROBS_BYTES", "1.5", "16777216 (16 MiB, the default)"),
    ("LIBNA_CPU_SAVED_PROBS_BYTES", "", "16777216 (16 MiB, the default)"),
    ("LIBNA_CPU_SAVED_PROBS_BYTES", "16M", "16777216 (16 MiB, the default)"),
    ("LIBNA_HOST_CACHE_BYTES", "-1", "268435456 (256 MiB, the default)"),
    ("LIBNA_HOST_CACHE_BYTES", "1G", "268435456 (256 MiB, the default)"),
    ("LIBNA_CPU_ROW_PAIRS", "2", "the kernel set's choice"),
    ("LIBNA_CPU_ROW_PAIRS", "yes", "the kernel set's choice"),
    ("LIBNA_CPU_ROW_PAIRS", "", "the kernel set's choice"),
    ("LIBNA_CPU_PAIR_GROUP", "0", "the kernel set's choice"),
    ("LIBNA_CPU_PAIR_GROUP", "4", "the kernel set's choice"),
    ("LIBNA_CPU_PAIR_GROUP", "three", "the kernel set's choice"),
    ("LIBNA_CPU_AMX", "2", "1 (AMX where the CPU has it)"),
    ("LIBNA_CPU_AMX", "on", "1 (AMX where the CPU has it)"),
])
def test_invalid_environment_value_warns_once(variable, value, used):
    result = run_python(_WARNINGS_OF_IMPORT, env={variable: value})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    warned = [line for line in lines[1:] if variable in line]
    assert len(warned) == 1, result.stdout
    assert warned[0].startswith(f"RuntimeWarning libna: {variable}='{value}' is not "), warned
    cores = min(len(os.sched_getaffinity(0)), 1024)
    used = used.replace("the cores", f"{cores} (the cores this process may use)")
    assert warned[0].endswith(f"; using {used} instead"), warned
    assert "libna" not in result.stderr, result.stderr   # not printed as well
    if variable == "LIBNA_NUM_THREADS":
        assert int(lines[0]) == (1024 if used == "1024" else cores)


@pytest.mark.parametrize("variable, value", [
    ("LIBNA_NUM_THREADS", "2"), ("LIBNA_NUM_THREADS", "1024"), ("LIBNA_NUM_THREADS", "+3"),
    ("LIBNA_CPU_SAVED_PROBS_BYTES", "0"), ("LIBNA_CPU_SAVED_PROBS_BYTES", "1048576"),
    ("LIBNA_CPU_ROW_PAIRS", "0"), ("LIBNA_CPU_ROW_PAIRS", "1"),
    ("LIBNA_CPU_PAIR_GROUP", "1"), ("LIBNA_CPU_PAIR_GROUP", "3"),
    ("LIBNA_CPU_AMX", "0"), ("LIBNA_CPU_AMX", "1"),
    ("LIBNA_HOST_CACHE_BYTES", "0"), ("LIBNA_HOST_CACHE_BYTES", "1073741824"),
])
def test_valid_environment_value_does_not_warn(variable, value):
    result = run_python(_WARNINGS_OF_IMPORT, env={variable: value})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == [], result.stdout
    if variable == "LIBNA_NUM_THREADS":
        assert result.stdout.splitlines()[0] == value.lstrip("+")


def test_numpy_fallback_when_compiled_core_is_missing():
    result = run_python("""
        import sys, warnings
        sys.modules["libna._C"] = None   # makes `from . import _C` fail
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import libna
        print(len(caught), caught[0].category.__name__)
        import numpy as np
        rng = np.random.default_rng(0)
        q = rng.standard_normal((1, 6, 6, 2, 4))
        out = libna.na2d(q, q, q, 3)
        ref = libna.reference.na2d(q, q, q, 3)
        print(out.shape, bool(np.array_equal(out, ref)), libna.build_info()["backends"])
        try:
            libna.na2d(q, q, q, 9)
        except ValueError as e:
            print("ValueError")
    """)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "1 RuntimeWarning"
    assert lines[1] == "(1, 6, 6, 2, 4) True ['numpy-reference']"
    assert lines[2] == "ValueError"


def test_compiled_path_needs_no_torch():
    result = run_python("""
        import sys
        sys.modules["torch"] = None      # any import of torch now fails
        import numpy as np, libna
        rng = np.random.default_rng(0)
        q = rng.standard_normal((1, 8, 2, 4)).astype(np.float32)
        out = libna.na1d(q, q, q, 3)
        attn = libna.na1d_qk(q, q, 3)
        print(type(out).__name__, out.dtype, attn.shape)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ndarray float32 (1, 8, 2, 3)"


def test_works_without_jax():
    """A process where jax cannot be imported still has a working libna, and
    libna.jax says what is missing."""
    result = run_python("""
        import sys
        sys.modules["jax"] = None  # import jax now raises ImportError
        import numpy as np
        import libna
        q = np.random.default_rng(0).standard_normal((1, 6, 2, 4))
        out = libna.na1d(q, q, q, 3, additional_keys=q[:, :2], additional_values=q[:, :2])
        assert out.shape == q.shape and "jax" not in [m.split(".")[0] for m in sys.modules
                                                      if sys.modules[m] is not None]
        try:
            import libna.jax
        except ImportError as error:
            print("ImportError:", error)
    """)
    assert result.returncode == 0, result.stderr
    assert "ImportError: libna.jax needs JAX" in result.stdout


def test_jax_ffi_module_built_when_jaxlib_is_available():
    """The CI build (pip install with jaxlib in the build requirements) ships
    libna._jax_ffi; a LIBNA_JAX=OFF build or a platform without jaxlib does not."""
    pytest.importorskip("jaxlib", reason="jaxlib is not installed")
    if os.environ.get("LIBNA_JAX", "").lower() in ("off", "0", "false", "no"):
        pytest.skip("built with LIBNA_JAX=OFF")
    import importlib.util

    assert importlib.util.find_spec("libna._jax_ffi") is not None
