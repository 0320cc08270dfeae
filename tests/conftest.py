"""Shared test setup: one torch thread per process.

The tests run many tiny tensor ops (a 4 x 4 patch grid, batches of 16); with several threads each
op spends more time waking threads than computing, and the 2-process DDP tests would oversubscribe
the cores."""

import torch

torch.set_num_threads(1)
