"""A training step never makes the host wait for the device, the steps whose metrics are written included.

On a GPU the host queues a step's kernels while the previous step runs; any operation that reads a tensor's
value on the host (`.item()`, `bool(t)`, `.tolist()`, `.cpu()`, `nonzero` ...) drains that queue and leaves the
GPU idle while the host catches up. This test watches every tensor operation of real training steps through
the runner (the GPU bench's settings: packed rows with flex attention, the chunked loss, fused AdamW, no
clipping) with a TorchFunctionMode, on the CPU, and allows no such read on any step but one kind: the
module's DeferredMetrics reads, a step after it copied them without waiting, the host copies of a written
step's metrics (on a GPU, pinned copies whose event has completed). Writes count too: a tensor made from host data on a device (`torch.tensor(0.1,
device=...)`, what Lightning's `self.log` does with a float) is a copy from pageable memory, which waits for
every queued kernel just as a read does.
"""

from __future__ import annotations

import collections
import traceback

import pytorch_lightning as pl
from torch.overrides import TorchFunctionMode

import forgather.overrides as ovr
from forgather.lightning.steps import writes_metrics
from forgather.run import Runner, build_parser
from test_run import PROJECT

READS_ON_HOST = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "equal", "cpu",
                 "numpy", "is_nonzero", "__format__", "__repr__", "masked_select", "unique", "argwhere"}
FROM_HOST_DATA = {"tensor", "as_tensor", "scalar_tensor"}  # with a device: a synchronous copy to it
# Reads of tensors that are host tensors wherever the run trains: Lightning makes the training loader's iterator
# there at an epoch's start, and torch's sampler draws its seed from a CPU generator (`.item()`).
HOST_TENSOR_SITES = ("pytorch_lightning/utilities/combined_loader.py",)
# DeferredMetrics.flush reads the host copies of a written step's metrics, a step after capture made them.
DEFERRED_SITE = ("forgather/lightning/steps.py", "flush")


class HostReads(TorchFunctionMode):
    """Counts the host-reading operations by (name, the innermost caller outside torch)."""

    def __init__(self, seen: collections.Counter):
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS_ON_HOST or (name in FROM_HOST_DATA and (kwargs or {}).get("device") is not None):
            caller = next((f for f in reversed(traceback.extract_stack()[:-1]) if "/torch/" not in f.filename
                           and f.filename != __file__), None)
            if caller is not None and (caller.filename.endswith(DEFERRED_SITE[0]) and caller.name == DEFERRED_SITE[1]):
                self.seen[("deferred", name)] += 1
            elif caller is None or not caller.filename.endswith(HOST_TENSOR_SITES):
                self.seen[(name, f"{caller.filename}:{caller.lineno}" if caller else "?")] += 1
        return func(*args, **(kwargs or {}))


class WatchSteps(pl.Callback):
    """Watches each training batch after the first under HostReads, from its start to the next batch's start
    (or the end of training): what Lightning does after the callbacks' batch-end hooks (its logger connector
    turns progress-bar metrics into numbers there) counts too. Sorts what it saw by logged / unlogged step."""

    def __init__(self):
        self.unlogged, self.logged, self.steps = collections.Counter(), collections.Counter(), 0
        self.mode = None
        self.paused = False

    def _close(self, trainer):
        if self.mode is not None:
            if not self.paused:
                self.mode.__exit__(None, None, None)
            self.mode, self.paused = None, False
            self.steps += 1
            (self.logged if writes_metrics(trainer) else self.unlogged).update(self.seen)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._close(trainer)  # the previous batch, whose optimizer step global_step still counts
        if trainer.global_step >= 1:
            self.seen = collections.Counter()
            self.mode = HostReads(self.seen)
            self.mode.__enter__()

    def on_validation_start(self, trainer, pl_module):
        # Validation reads its own numbers (and callbacks read them at its end), not a training step's; what is
        # left of the step after it is Lightning's bookkeeping.
        if self.mode is not None and not self.paused:
            self.mode.__exit__(None, None, None)
            self.paused = True

    def on_train_end(self, trainer, pl_module):
        # The last step is not watched: fit's end saves last.ckpt and the run's final metrics, waits on purpose.
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.mode = None


def test_training_steps_never_read_a_device_tensor_on_the_host(tmp_path):
    args = build_parser().parse_args([
        "-p", PROJECT, "--outputs", str(tmp_path), "+experiment=micro", "max_steps=9", "log_every_n_steps=4",
        "attention_fn=flex", "loss=chunked", "++optimizer.fused=true", "gradient_clip_val=null",
        "checkpoint_every=100000"])  # saving a checkpoint waits on purpose (the GPU bench saves none)
    runner = Runner.create(args, ["test"])
    watch = WatchSteps()
    runner.run_point(ovr.parse(args.overrides, runner.groups, False)[0], callbacks=[watch])
    assert watch.steps == 7  # steps 2 to 8
    reads = watch.unlogged + watch.logged
    deferred = {place: n for place, n in reads.items() if place[0] == "deferred"}
    # the watch sees reads where there are some: the deferred metrics' of step 4, read at step 5
    assert sum(deferred.values()) >= 4, deferred
    waits = {place: n for place, n in reads.items() if place[0] != "deferred"}
    assert not waits, f"host reads or copies from host data in training steps: {waits}"
