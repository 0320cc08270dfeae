"""Shared test setup: one torch thread per process.

The tests run many tiny tensor ops (a 4 x 4 patch grid, batches of 16); with several threads each
op spends more time waking threads than computing, and the 2-process DDP tests would oversubscribe
the cores."""

import torch

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip where no GPU is visible (the CPU suite); they run on a GPU."""
    import pytest

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
