"""A free TCP port, for whatever starts a server on this host: the serving tests and benches, rank 0's store in the
distributed tests, torchtitan's single-rank process group in scripts/bench_train.py. Standard library only."""

from __future__ import annotations

import random
import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now: where a test or a benchmark starts a server (or rank 0 its store).

    Drawn below Linux's ephemeral range (32768-60999 by default) where one is free: the kernel hands ports of
    that range to outgoing connections, so one that bind(0) returned and the probe released can be taken by
    another process's connection before the server binds it; a port drawn below it is taken only by a bind."""
    draw = random.Random()
    for _ in range(50):
        port = draw.randrange(20000, 32768)
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        return port
    with socket.socket() as probe:  # all fifty taken: any port the OS gives
        probe.bind((host, 0))
        return probe.getsockname()[1]
