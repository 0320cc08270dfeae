"""Shared test setup: one torch thread per process.

The tests run many tiny tensor ops (a 4 x 4 patch grid, batches of 16); with several threads each
op spends more time waking threads than computing, and the 2-process DDP tests would oversubscribe
the cores."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one thread, whatever an earlier in-process train.main / bench.main set
    (config.fit_threads sizes torch's threads to the machine when OMP_NUM_THREADS is not set)."""
    torch.set_num_threads(1)
    yield


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip where no GPU is visible (the CPU suite); they run on a GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
