"""Destroy a gloo process group at interpreter exit, before Python's own teardown.

A process that exits with its gloo group alive aborts now and then ("terminate called without an active
exception", exit code -6) after its work has finished: gloo's C++ worker threads still hold tensors whose
Python references die during finalization. A job scheduler then reports a finished run as failed. PyTorch
asks scripts to call `destroy_process_group()` at the end of main; Lightning's strategies do not (a trainer may
fit again), so ours registers it for exit. Gloo only: destroying an NCCL group may wait on peers that already
left (the reason PyTorch did not register this itself), and NCCL's own destructor only warns.
"""

from __future__ import annotations

import atexit
import functools


@functools.cache  # registered once a process
def destroy_gloo_group_at_exit() -> None:
    atexit.register(_destroy_gloo_group)


def _destroy_gloo_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
        dist.destroy_process_group()
