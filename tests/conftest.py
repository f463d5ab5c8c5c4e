import os

import numpy as np
import pytest

import libna

try:
    from hypothesis import HealthCheck, Phase, settings
except ImportError:  # the property tests skip themselves without hypothesis
    pass
else:
    # The property tests' profiles; LIBNA_HYPOTHESIS_PROFILE picks one. "ci"
    # (the default) is derandomised (the same examples on every run) and
    # small, and does not shrink a failing example (shrinking a failure of
    # the NaN-locality tests can take minutes); "long" explores far more,
    # at random, and shrinks what fails.
    _common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                         HealthCheck.data_too_large])
    settings.register_profile("ci", max_examples=250, derandomize=True, database=None,
                              phases=(Phase.explicit, Phase.generate), print_blob=False,
                              **_common)
    settings.register_profile("long", max_examples=1000, print_blob=True, **_common)
    settings.load_profile(os.environ.get("LIBNA_HYPOTHESIS_PROFILE", "ci"))


def pytest_report_header():
    # Which CPU kernels ran is part of what a run proves (LIBNA_CPU_KERNELS).
    info = libna.build_info()
    return f"libna cpu kernels: {info['cpu_kernels']} (simd {info['simd']})"


@pytest.fixture
def rng():
    return np.random.default_rng(0)
