"""The sdist holds what `pip install` from it needs (the C++/CUDA sources,
the CMake files, the bindings, the package) and nothing of build/ or .ci/;
and, on request (LIBNA_TEST_SDIST_INSTALL=1), pip installs it into a fresh
virtual environment, where libna imports and computes."""

import os
import pathlib
import subprocess
import sys
import tarfile
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    pytest.importorskip("scikit_build_core.build",
                        reason="scikit-build-core is not installed (pip install '.[test]')")
    if not (ROOT / "pyproject.toml").exists():
        pytest.skip("not run from a source tree")
    out = tmp_path_factory.mktemp("sdist")
    code = ("import sys; from scikit_build_core.build import build_sdist; "
            "print(build_sdist(sys.argv[1]))")
    result = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (path,) = out.glob("libna-*.tar.gz")
    return path


def test_sdist_contents(sdist):
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("pyproject.toml", "CMakeLists.txt", "README.md", "PKG-INFO",
                   "cpp/include/libna/na.h", "cuda/no_cuda.cpp", "python/CMakeLists.txt",
                   "python/src/bindings.cpp", "python/libna/__init__.py",
                   "python/libna/natten/functional.py", "python/libna/models/checkpoints.py",
                   "tests/data/natten_0_17_5.npz"):
        assert needed in names, f"{needed} is missing from the sdist"
    assert not [n for n in names if n.startswith(("build/", ".ci/", ".git/"))]


def test_pip_install_from_sdist_into_a_fresh_venv(sdist, tmp_path):
    """What a user without the repository gets: `pip install libna-X.tar.gz`
    in an empty virtual environment (pip's isolated build fetches
    scikit-build-core, nanobind and jaxlib; numpy comes as a dependency).
    CPU only unless LIBNA_CUDA is set. Minutes of building and a download:
    off unless asked for (docs/release.md records a run)."""
    if os.environ.get("LIBNA_TEST_SDIST_INSTALL") != "1":
        pytest.skip("set LIBNA_TEST_SDIST_INSTALL=1 to build and install the sdist in a fresh "
                    "venv (several minutes; downloads the build requirements)")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    env = dict(os.environ)
    env.setdefault("LIBNA_CUDA", "OFF")
    for variable in ("PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(variable, None)
    install = subprocess.run([str(python), "-m", "pip", "install", str(sdist)], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=3600)
    assert install.returncode == 0, install.stdout[-5000:] + install.stderr[-5000:]
    check = textwrap.dedent("""
        import numpy as np, libna
        q = np.random.default_rng(0).standard_normal((1, 7, 9, 2, 8)).astype(np.float32)
        out = libna.na2d(q, q, q, 3, dilation=(2, 1))
        ref = libna.reference.na2d(q, q, q, 3, dilation=(2, 1))
        print(libna.__file__)
        print(libna.build_info()["backends"], float(np.abs(out - ref).max()))
    """)
    result = subprocess.run([str(python), "-c", check], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    where, info = result.stdout.splitlines()
    assert pathlib.Path(where).resolve().is_relative_to(venv.resolve()), where
    backends, error = info.rsplit(" ", 1)
    assert backends.startswith("['cpu'") and float(error) < 1e-5, info
