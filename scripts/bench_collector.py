"""What the collector's freeze saves: the time of a full garbage collection in a training run, just before and
just after `forgather.callbacks.collector.GarbageCollection` freezes what is alive at the end of the first batch.

Runs `python -m forgather.run +experiment=tiny_llama` in this process for a few steps (compiled by default, as on
a GPU: compiling is what makes the heap large), timing a second full pass before the freeze (the first collects the
step's garbage; the second only walks the heap) and one after it.

    python scripts/bench_collector.py [overrides...]     (default: compile=true max_steps=3)
"""

from __future__ import annotations

import gc
import runpy
import sys
import tempfile
import time

from forgather.callbacks import collector


def full_pass_ms() -> float:
    began = time.perf_counter()
    gc.collect()
    return (time.perf_counter() - began) * 1000


def main() -> None:
    measured: dict[str, float] = {}
    freeze_step = collector.GarbageCollection.on_train_batch_end

    def timed(self, trainer, *args, **kwargs):
        first = self.freeze and not self._frozen
        if first:
            gc.collect()
            measured["before"], measured["objects"] = full_pass_ms(), len(gc.get_objects())
        freeze_step(self, trainer, *args, **kwargs)
        if first:
            measured["after"], measured["frozen"] = full_pass_ms(), gc.get_freeze_count()

    collector.GarbageCollection.on_train_batch_end = timed
    overrides = sys.argv[1:] or ["compile=true", "max_steps=3"]
    with tempfile.TemporaryDirectory() as outputs:
        sys.argv = ["forgather.run", "+experiment=tiny_llama", "val_check_interval=100000", "limit_val_batches=0",
                    "--outputs", outputs, *overrides]
        try:
            runpy.run_module("forgather.run", run_name="__main__")
        except SystemExit as done:  # the runner's exit, with its status
            if done.code:
                raise
    print(f"full collection: {measured['before']:.1f} ms over {measured['objects']:,} tracked objects before the "
          f"freeze, {measured['after']:.1f} ms after it ({measured['frozen']:,} frozen)")


if __name__ == "__main__":
    main()
