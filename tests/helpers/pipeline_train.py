"""`trainer.fit` of an unchanged CausalLMModule on a tiny CausalLM, on one CPU process or pipelined over two.

Run by tests/test_strategy_pipeline_fit.py; `--accumulate` batches (default 1) make one optimizer step. Every
rank writes `<out>/losses-rank<R>.json` (the training loss the module saw at each batch) and
`<out>/state-rank<R>.pt` (its share of the weights when fit ends); `--save-at N` also saves a (sharded)
checkpoint `<out>/step<N>` after optimizer step N; `--resume DIR` resumes from one. The tests start the
ranks side by side with torchrun's environment (helpers/ranks.py); run alone, Lightning starts them.
`--untied` (a separate output head) and `--warmup N` (a learning-rate schedule) are for
tests/test_strategy_pipeline_audit.py.
"""

import argparse
import functools
import json
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from forgather.lightning.module import CausalLMModule
from forgather.loss.naive import NaiveLoss
from forgather.strategies import PipelineParallelStrategy

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_models import SEQ, causal_lm, packed_batch  # noqa: E402


class Record(pl.Callback):
    """Collects the loss of every step; saves a checkpoint after step `save_at`; writes both at the end."""

    def __init__(self, out: Path, save_at: int | None) -> None:
        self.out, self.save_at, self.losses = out, save_at, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        if trainer.global_step == self.save_at:
            trainer.save_checkpoint(self.out / f"step{self.save_at}")

    def on_train_end(self, trainer, module) -> None:
        rank = trainer.global_rank
        Path(self.out, f"losses-rank{rank}.json").write_text(json.dumps(self.losses))
        torch.save(module.state_dict(), self.out / f"state-rank{rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--schedule", default="1F1B")
    parser.add_argument("--pp-size", default="auto", help="ranks a pipeline (fewer than --devices: replicas)")
    parser.add_argument("--save-at", type=int)
    parser.add_argument("--resume")
    parser.add_argument("--accumulate", type=int, default=1, help="batches per optimizer step")
    parser.add_argument("--varied", action="store_true", help="every other batch: half its positions padding")
    parser.add_argument("--untied", action="store_true", help="a separate output head (not the embedding matrix)")
    parser.add_argument("--warmup", type=int, help="steps of a linear learning-rate warmup (LinearLR from 0.1x)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0)
    scheduler = functools.partial(torch.optim.lr_scheduler.LinearLR, start_factor=0.1, total_iters=args.warmup)
    module = CausalLMModule(causal_lm(tie_embeddings=not args.untied), NaiveLoss(),
                            functools.partial(torch.optim.AdamW, lr=1e-2), scheduler if args.warmup else None)
    pp_size = args.pp_size if args.pp_size == "auto" else int(args.pp_size)
    strategy = PipelineParallelStrategy(args.schedule, 4, pp_size) if args.devices > 1 else "auto"
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps,
        gradient_clip_val=0.5, accumulate_grad_batches=args.accumulate, use_distributed_sampler=False, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Record(args.out, args.save_at)],
    )
    batches = args.steps * args.accumulate
    if args.varied:
        data = [packed_batch(seed=1 + i, padded_tail=SEQ // 2 if i % 2 else 0) for i in range(batches)]
    else:
        data = [packed_batch()] * batches
    loader = DataLoader(data, batch_size=None)
    trainer.fit(module, loader, ckpt_path=args.resume)


if __name__ == "__main__":
    main()
