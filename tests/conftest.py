"""Shared test set-up."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Run every test on one torch thread, and restore the count afterwards.

    The tests use tiny models, which run fastest on one thread; on a busy 2-core machine two OpenMP
    threads spin-wait for each other and tiny models slow down tenfold.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
