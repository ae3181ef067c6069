"""Training subprocess for tests/test_divergence.py: plain Lightning, DDP on the CPU, one rank's weights made
NaN just before the step-8 checkpoint (the other rank's stay finite, as a sharded model's would); the ranks
must stop together there without writing it.

Each rank writes `<run_dir>/result-rank<R>.json` ({"step", "outcome"}) and exits 0 when fit returns, 2 when it
raises TrainingDiverged (through forgather.errors.report, which only rank 0 lets speak).
"""

import argparse
import json
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from control_train import RandomRegression  # this script's directory is first on sys.path
from forgather.callbacks.divergence import StopOnDivergence, TrainingDiverged
from forgather.errors import report
from forgather.lightning.model_checkpoint import ModelCheckpoint


class Poison(pl.Callback):
    """One rank's weight made NaN at the end of a step (Lightning runs checkpoint callbacks after this one)."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            with torch.no_grad():
                pl_module.layer.weight[0, 0] = float("nan")


class TinyRegression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--poison-rank", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=20, default_root_dir=args.run_dir,
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Poison(args.poison_rank, step=8), StopOnDivergence(),
                   ModelCheckpoint(dirpath=Path(args.run_dir, "checkpoints"), every_n_train_steps=4, save_top_k=-1)],
    )
    outcome, code = "finished", 0
    try:
        trainer.fit(TinyRegression(), DataLoader(RandomRegression(), batch_size=8))
    except TrainingDiverged as error:
        outcome, code = "diverged", report(error)
    Path(args.run_dir, f"result-rank{trainer.global_rank}.json").write_text(json.dumps({"step": trainer.global_step, "outcome": outcome}))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # before exit: gloo's threads otherwise abort now and then
    return code


if __name__ == "__main__":
    raise SystemExit(main())
