"""Training subprocess driven by tests/test_job_control.py.

A plain Lightning Trainer (Lightning's ModelCheckpoint left on) fits a tiny regression model with
`JobControl`, sleeping a little each step so the test can send commands. Each rank writes
`<run_dir>/pid-rank<R>` (its process id) when training starts and `<run_dir>/result-rank<R>.json`
({"step", "outcome"}) when fit returns; exit code 0, 3 after an abort, or
the stop signal's code (128 + N) after a stop by a signal.
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
import pytorch_lightning as pl
from torch.utils.data import DataLoader, IterableDataset

from forgather.callbacks.job_control import JobAborted, JobControl, JobStopped

ABORTED_EXIT_CODE = 3


class RandomRegression(IterableDataset):
    """Endless random (x, y) pairs: the epoch never ends, so only our commands end training early."""

    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        while True:
            x = torch.randn(4, generator=generator)
            yield x, x.sum(dim=0, keepdim=True)


class TinyRegression(pl.LightningModule):
    def __init__(self, sleep_s: float) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.sleep_s = sleep_s

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train/loss", loss)
        time.sleep(self.sleep_s)
        return loss

    def on_train_start(self):
        # A test may signal one rank alone: each rank names its process.
        Path(self.trainer.default_root_dir, f"pid-rank{self.global_rank}").write_text(str(os.getpid()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--sleep", type=float, default=0.05)
    args = parser.parse_args()

    torch.set_num_threads(1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_steps=args.max_steps,
        default_root_dir=args.run_dir,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[JobControl(job_id=args.job_id)],
    )
    outcome, code = "finished", 0
    try:
        trainer.fit(TinyRegression(args.sleep), DataLoader(RandomRegression(), batch_size=8))
    except JobAborted:
        outcome, code = "aborted", ABORTED_EXIT_CODE
    except JobStopped as stopped:
        outcome, code = f"stopped: {stopped.checkpoint}", stopped.exit_code
    result = {"step": trainer.global_step, "outcome": outcome}
    Path(args.run_dir, f"result-rank{trainer.global_rank}.json").write_text(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # before exit: gloo's threads otherwise abort now and then
    return code


if __name__ == "__main__":
    raise SystemExit(main())
