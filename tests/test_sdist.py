"""The sdist holds what `pip install` from it needs (the C++/CUDA sources,
the CMake files, the bindings, the package) and nothing of build/ or .ci/."""

import pathlib
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_sdist_contents(tmp_path):
    pytest.importorskip("scikit_build_core.build",
                        reason="scikit-build-core is not installed (pip install '.[test]')")
    if not (ROOT / "pyproject.toml").exists():
        pytest.skip("not run from a source tree")
    code = ("import sys; from scikit_build_core.build import build_sdist; "
            "print(build_sdist(sys.argv[1]))")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (sdist,) = tmp_path.glob("libna-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("pyproject.toml", "CMakeLists.txt", "README.md", "PKG-INFO",
                   "cpp/include/libna/na.h", "cuda/no_cuda.cpp", "python/CMakeLists.txt",
                   "python/src/bindings.cpp", "python/libna/__init__.py",
                   "python/libna/natten/functional.py", "python/libna/models/checkpoints.py",
                   "tests/data/natten_0_17_5.npz"):
        assert needed in names, f"{needed} is missing from the sdist"
    assert not [n for n in names if n.startswith(("build/", ".ci/", ".git/"))]
