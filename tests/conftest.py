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


@pytest.fixture(scope="session", autouse=True)
def _ctrl_c_as_in_a_terminal():
    """The tests of Ctrl-C (an interrupted sweep, a second SIGINT to a job) need SIGINT to raise
    KeyboardInterrupt here and in the processes started. A shell without job control starts a background
    command (`pytest ... &`, a CI script's) with SIGINT ignored, which Python and every child then keep:
    those tests failed there, every time. Handled here, children start with SIGINT's default again."""
    import signal

    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, signal.SIG_IGN)
