"""Shared fixtures."""

import pytest


@pytest.fixture
def one_thread():
    """Run a test on one CPU thread: small tensors gain nothing from more, and the box has two cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
