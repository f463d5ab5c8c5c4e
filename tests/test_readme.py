"""The README's examples run: every ```python block is executed (NumPy,
composition, PyTorch, JAX), and every code line of the ```cpp block appears
verbatim in examples/cpp/main.cpp, which test_cpp.py builds and runs."""

import re
from pathlib import Path

import pytest

import libna

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(language):
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


PYTHON_BLOCKS = blocks("python")
EMULATOR_BUILT = libna._ops._C is not None and "cuda-emulator" in libna.build_info()["backends"]


def block_id(code):
    imports = re.findall(r"^import ([\w.]+)", code, flags=re.M)
    return "-".join(imports) or "block"


def test_readme_has_examples_for_every_framework():
    joined = "\n".join(PYTHON_BLOCKS)
    for name in ("import numpy", "import torch", "import libna.jax", "additional_keys",
                 "merge_attentions"):
        assert name in joined
    assert blocks("cpp")


@pytest.mark.skipif(libna._ops._C is None, reason="compiled core not loaded")
@pytest.mark.parametrize("code", PYTHON_BLOCKS, ids=[block_id(c) for c in PYTHON_BLOCKS])
def test_python_example_runs(code):
    if "libna.jax" in code:
        pytest.importorskip("jax", reason="JAX is not installed")
        try:
            import libna.jax  # noqa: F401
        except ImportError as error:
            pytest.skip(f"libna.jax is unavailable: {error}")
    if "torch" in code:
        pytest.importorskip("torch", reason="PyTorch is not installed")
    if "cuda_emulator" in code and not EMULATOR_BUILT:
        pytest.skip("libna was built without the CUDA emulator")
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})


def test_cpp_example_matches_examples_cpp():
    source = (ROOT / "examples" / "cpp" / "main.cpp").read_text()
    lines = {line.strip() for line in source.splitlines()}
    (snippet,) = blocks("cpp")
    for line in snippet.splitlines():
        line = line.strip()
        if line and not line.startswith("//"):
            assert line in lines, f"README C++ line not in examples/cpp/main.cpp: {line}"


def test_readme_has_the_wheel_table():
    """README's "Wheels" section gives, for the CPU and the CUDA wheel, the
    size and install time, and what each extra pulls in."""
    wheels = README.split("\n## Wheels\n", 1)[1].split("\n## ", 1)[0]
    assert "| | CPU wheel | CUDA wheel |" in wheels
    rows = {line.split("|")[1].strip() for line in wheels.splitlines()
            if line.startswith("| ") and line.count("|") >= 3}
    assert {"size", "install", "extra", "none", "`jax`", "`examples`", "`test`"} <= rows, rows
    size = next(line for line in wheels.splitlines() if line.startswith("| size |"))
    assert len(re.findall(r"\d+(?:\.\d+)? MB", size)) >= 2, size
