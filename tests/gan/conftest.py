"""Every GAN test starts from the same global seed (network initialisation) and runs on one thread (the tensors
are tiny: a second thread only adds overhead, and the CPU is shared)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def seeded_single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
