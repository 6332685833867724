import os
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

# The kernels compile in the test process at first use, not in the background (batchnorm.kernels._warmup):
# tests check the numba kernels from their first call; tests/kernels/test_kernels_warmup.py turns it on.
os.environ.setdefault("BATCHNORM_WARMUP", "0")

# CI runs at least 200 Hypothesis examples per property; locally the same unless overridden.
settings.register_profile("ci", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=50, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield


# -- the lab's tests (test_lab_*.py) --------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    """The bundled digits data set, loaded once per module."""
    from batchnorm.lab.data import load_dataset

    return load_dataset()


@pytest.fixture
def lab_runtime():
    """As the lab runs: one thread, the composite torch backend (the CLI's default --backend, which
    keeps these tests independent of numba compilation); the session's settings come back after."""
    import batchnorm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with batchnorm.use_backend("torch"):
            yield
    finally:
        torch.set_num_threads(threads)
