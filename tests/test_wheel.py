"""The installed wheel as a release would ship it (docs/release.md).

pyproject.toml asks for the stable ABI (wheel.py-api = "cp312"): built with
CPython 3.12 or newer the wheel is tagged cp312-abi3 and its extension
modules are .abi3.so files that import only the limited API (checked with
abi3audit --strict where it is installed); built with an older CPython it
falls back to a wheel for that one version (cp311-cp311, ...). Either way
the tag and the modules' file names must agree with each other.

The CMake side: nanobind quietly builds a version-specific module when it
cannot keep STABLE_ABI, so python/CMakeLists.txt stops the build instead
when scikit-build-core asked for abi3; configuring the project as
scikit-build-core does shows both (the build step is not needed: ninja lists
the commands it would run)."""

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import libna

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(libna.__file__).resolve().parent
MODULES = ("_C", "_jax_ffi")
NO_CORE = "compiled core not loaded"
# A CPython of at least 3.12 for the abi3 configuration check, where the
# test's own interpreter is older: .ci/run names pyenv's when it has one.
ABI3_PYTHON_VARIABLE = "LIBNA_ABI3_PYTHON"


def stable_abi_expected():
    """Whether this interpreter builds abi3 wheels of libna (CPython 3.12+,
    not free-threaded)."""
    return (sys.implementation.name == "cpython" and sys.version_info >= (3, 12)
            and not sysconfig.get_config_var("Py_GIL_DISABLED"))


def installed_modules():
    """{name: path} of the libna extension modules that are installed."""
    specs = {name: importlib.util.find_spec(f"libna.{name}") for name in MODULES}
    return {name: Path(spec.origin) for name, spec in specs.items() if spec is not None}


def wheel_tag():
    text = importlib.metadata.distribution("libna").read_text("WHEEL")
    if text is None:
        pytest.skip("libna was not installed from a wheel (no WHEEL metadata)")
    tags = [line.split(":", 1)[1].strip() for line in text.splitlines()
            if line.startswith("Tag:")]
    assert len(tags) == 1, tags
    return tags[0]


@pytest.mark.skipif(libna._C is None, reason=NO_CORE)
def test_wheel_tag_and_module_names_agree():
    python, abi, platform = wheel_tag().split("-")
    modules = installed_modules()
    assert "_C" in modules, modules
    assert platform == "any" or platform.startswith(("linux", "manylinux", "macosx", "win")), \
        platform
    if stable_abi_expected():
        assert (python, abi) == ("cp312", "abi3")
        ending = ".pyd" if sys.platform == "win32" else ".abi3.so"
        assert all(path.name == name + ending for name, path in modules.items()), modules
    else:
        version = f"cp{sys.version_info.major}{sys.version_info.minor}"
        assert python == version and abi.startswith(version), (python, abi)
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        assert all(path.name == name + suffix for name, path in modules.items()), modules


@pytest.mark.skipif(libna._C is None, reason=NO_CORE)
def test_modules_pass_abi3audit():
    if not stable_abi_expected():
        pytest.skip(f"Python {sys.version_info.major}.{sys.version_info.minor} builds "
                    "version-specific modules (abi3 needs CPython 3.12+)")
    if importlib.util.find_spec("abi3audit") is None:
        pytest.skip("abi3audit is not installed (pip install abi3audit)")
    paths = [str(p) for p in installed_modules().values()]
    result = subprocess.run([sys.executable, "-m", "abi3audit", "--strict", "--summary",
                             "--assume-minimum-abi3", "3.12", *paths],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 ABI violations" in result.stdout + result.stderr, result.stdout + result.stderr


def test_core_library_is_shipped_once():
    """A wheel cannot hold symbolic links: libna.so.0.1.0 with its links
    libna.so.0 and libna.so would be three full copies (CMakeLists.txt
    leaves the library unversioned in wheel builds)."""
    lib = PACKAGE / "lib"
    names = sorted(p.name for p in lib.iterdir() if p.name.startswith("libna.")
                   or p.name.endswith((".dll", ".dylib")))
    assert names in (["libna.so"], ["libna.dylib"], ["na.dll"]), names


# --- the CMake side: configure as scikit-build-core does -------------------------
def configure(tmp_path, python, nanobind_dir):
    """Configures the project (CPU only, no JAX module) with `python` as
    scikit-build-core does for an abi3 wheel; returns the process and the
    build directory."""
    build = tmp_path / "build"
    cmd = ["cmake", "-S", str(ROOT), "-B", str(build), "-G", "Ninja",
           "-DLIBNA_PYTHON=ON", "-DLIBNA_CUDA=OFF", "-DLIBNA_JAX=OFF",
           f"-DPython_EXECUTABLE={python}", f"-Dnanobind_DIR={nanobind_dir}",
           "-DSKBUILD_SABI_COMPONENT=Development.SABIModule", "-DSKBUILD_SABI_VERSION=3.12"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300), build


@pytest.fixture(scope="module")
def nanobind_dir():
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not on PATH")
    if importlib.util.find_spec("nanobind") is None:
        pytest.skip("nanobind is not installed (pip install '.[test]')")
    import nanobind

    return nanobind.cmake_dir()


def find_abi3_python():
    """A CPython 3.12+ with its headers: this one, else $LIBNA_ABI3_PYTHON,
    else python3.12 ... python3.15 on PATH."""
    if stable_abi_expected():
        return sys.executable
    candidates = [os.environ.get(ABI3_PYTHON_VARIABLE)]
    candidates += [shutil.which(f"python3.{minor}") for minor in range(12, 16)]
    probe = ("import sys, sysconfig, os; print(sys.implementation.name == 'cpython' and "
             "sys.version_info >= (3, 12) and not sysconfig.get_config_var('Py_GIL_DISABLED') "
             "and os.path.isfile(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))")
    for candidate in filter(None, candidates):
        try:
            result = subprocess.run([candidate, "-c", probe], capture_output=True, text=True,
                                    timeout=60)
        except OSError:
            continue
        if result.returncode == 0 and result.stdout.strip() == "True":
            return candidate
    pytest.skip(f"no CPython 3.12+ with its headers was found (set {ABI3_PYTHON_VARIABLE}, or "
                "put python3.12 on PATH; docs/release.md)")


def test_abi3_configuration_with_python_3_12(tmp_path, nanobind_dir):
    """With CPython 3.12+, _C is an .abi3.so module compiled against the
    limited API (the nanobind library it links defines Py_LIMITED_API)."""
    result, build = configure(tmp_path, find_abi3_python(), nanobind_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "libna: Python module _C.abi3.so" in result.stdout, result.stdout
    commands = subprocess.run(["ninja", "-C", str(build), "-t", "commands", "_C"],
                              capture_output=True, text=True, timeout=60)
    assert commands.returncode == 0, commands.stderr
    lines = commands.stdout.splitlines()
    (compile_bindings,) = [line for line in lines if line.endswith("/python/src/bindings.cpp")]
    assert "-DPy_LIMITED_API=0x030C0000" in compile_bindings, compile_bindings
    assert " -o python/_C.abi3.so " in lines[-1], lines[-1]


def test_abi3_request_that_nanobind_cannot_keep_stops_the_build(tmp_path, nanobind_dir):
    """Asked for abi3 by an interpreter older than 3.12, nanobind would build
    a version-specific module into a wheel tagged abi3: the configuration
    fails, naming the module and its suffix."""
    if stable_abi_expected():
        pytest.skip("needs a Python older than 3.12 (this one keeps the stable ABI)")
    result, _ = configure(tmp_path, sys.executable, nanobind_dir)
    assert result.returncode != 0, result.stdout
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    assert ("the wheel is tagged abi3 (SKBUILD_SABI_COMPONENT=Development.SABIModule) but "
            f"nanobind built _C with the version-specific suffix '{suffix}'") in \
        " ".join(result.stderr.split()), result.stderr


def test_nanobind_floor_speaks_versioned_dlpack():
    """pyproject.toml asks for nanobind 2.10.1 or newer wherever it names it
    (the build requirement and the test extra): the first release that speaks
    versioned DLPack, whose read-only flag tests/test_readonly_dlpack.py checks
    with a producer other than NumPy."""
    import re

    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11+")
    pyproject = ROOT / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("not run from a source tree")
    config = tomllib.loads(pyproject.read_text())
    requirements = list(config["build-system"]["requires"])
    for extra in config["project"].get("optional-dependencies", {}).values():
        requirements += extra
    floors = [re.fullmatch(r"nanobind\s*>=\s*([\d.]+)", r.strip()) for r in requirements
              if re.match(r"nanobind\b", r.strip())]
    assert floors and all(floors), [r for r in requirements if "nanobind" in r]
    assert all(tuple(map(int, m.group(1).split("."))) >= (2, 10, 1) for m in floors), \
        [m.group(0) for m in floors]
    assert any(re.match(r"nanobind\b", r) for r in config["build-system"]["requires"])
