"""Training subprocess for tests/test_optim_audit.py: one SGD step (lr 1: the step is the gradient) of the tiny
LM under DDP on the CPU, started once a rank by tests/helpers/ranks.py. Each rank trains on its own rows of one
padded batch (`rank_rows`), `--accumulate` batches of them to the step, and writes its parameters after the step
to `<out>/params-rank<R>.pt`."""

import argparse
import functools
import os

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from forgather.lightning.module import CausalLMModule
from tiny_lm import padded_batch, tiny_model  # this script's directory is first on sys.path


def rank_rows(rank: int) -> list[int]:
    """Rank 0 holds the two padding-heavy rows, rank 1 the two full ones: a mean of rank means weighs rank 0's
    few tokens as much as rank 1's many."""
    return [0, 1] if rank == 0 else [2, 3]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--accumulate", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    batch = padded_batch()
    rows = rank_rows(rank)
    per_batch = len(rows) // args.accumulate
    data = [{key: value[rows[i * per_batch:(i + 1) * per_batch]] for key, value in batch.items()}
            for i in range(args.accumulate)]
    torch.manual_seed(0)
    model = tiny_model()
    module = CausalLMModule(model, optimizer=functools.partial(torch.optim.SGD, lr=1.0))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1,
                         accumulate_grad_batches=args.accumulate, use_distributed_sampler=False, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(data, batch_size=None))
    torch.save([p.detach() for p in model.parameters()], os.path.join(args.out, f"params-rank{rank}.pt"))
    torch.distributed.destroy_process_group()  # before exit: gloo's threads otherwise abort the process now and then


if __name__ == "__main__":
    main()
