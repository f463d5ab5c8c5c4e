"""Hugging Face transformers 4.50's DiNAT runs unmodified on libna.natten and
gives the logits of libna's own DiNAT with converted weights
(tests/transformers_dinat.py, in a fresh process).

transformers is not in the test extras; to run this test:

    pip install "transformers==4.50.3" && python -m pytest tests/test_transformers_dinat.py

Later transformers releases reshape q/k/v before calling natten2dqkrpb (4.57:
[B, heads, H*W, d]; 5.x: [B, W, H, heads, d]), so their DiNAT cannot run
correctly on any NATTEN; the test skips them with that reason.
"""

import importlib.metadata
import importlib.util
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("torch")


def _transformers_version():
    if importlib.util.find_spec("transformers") is None:
        return None
    return importlib.metadata.version("transformers")


def test_transformers_dinat_on_libna_natten(tmp_path):
    version = _transformers_version()
    if version is None:
        pytest.skip('transformers is not installed (pip install "transformers==4.50.3")')
    if not version.startswith("4.50."):
        pytest.skip(f"transformers {version}: the proof targets 4.50.x; later releases reshape "
                    "q/k/v before natten2dqkrpb, so their DiNAT is wrong on any NATTEN")
    from libna.natten._hook import real_natten

    if real_natten() is not None:
        pytest.skip("a real NATTEN is installed, and libna.natten.install() never shadows it")
    script = pathlib.Path(__file__).parent / "transformers_dinat.py"
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (
        result.stdout + result.stderr)
