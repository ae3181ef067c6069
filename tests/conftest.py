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


@pytest.fixture(autouse=True)
def _strict_mode_kept():
    """`--strict` sets FORGATHER_STRICT in the process, for the runner's children: undone after the test, or
    every later test in its worker would turn warnings into errors."""
    import os

    before = os.environ.get("FORGATHER_STRICT")
    yield
    if before is None:
        os.environ.pop("FORGATHER_STRICT", None)
    else:
        os.environ["FORGATHER_STRICT"] = before
