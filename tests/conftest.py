import numpy as np
import pytest

import libna


def pytest_report_header():
    # Which CPU kernels ran is part of what a run proves (LIBNA_CPU_KERNELS).
    info = libna.build_info()
    return f"libna cpu kernels: {info['cpu_kernels']} (simd {info['simd']})"


@pytest.fixture
def rng():
    return np.random.default_rng(0)
