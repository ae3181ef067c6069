"""Forgather's pieces in a plain Lightning script: no templates, no configs, the user's own module and Trainer.

The model is Forgather's `CausalLM` assembled in Python, the loss `ChunkedLoss` (fused linear cross-entropy:
the [tokens, vocab] logits never exist at once), the optimizer `Adafactor`, the callbacks `Snapshot` (what
the run needs to be reproduced) and `JobControl` (`forgather control status/save/stop/abort`), and with
`--pipeline` the strategy `PipelineParallelStrategy`: two CPU processes, the layers cut into two stages.
It learns a toy task, continuing sequences that count up, and writes `OUT_DIR/losses.json` (the training
loss at every step) and `OUT_DIR/snapshot/`.

    python plain_lightning_train.py OUT_DIR [--steps 30] [--pipeline]
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from forgather.callbacks.job_control import JobControl
from forgather.callbacks.snapshot import Snapshot
from forgather.loss import ChunkedLoss
from forgather.models.attention import Attention
from forgather.models.causal_lm import CausalLM
from forgather.models.feedforward import SwiGLU
from forgather.models.layers import PreLNLayer
from forgather.models.norm import RMSNorm
from forgather.models.rope import RotaryEmbedding
from forgather.optim import Adafactor
from forgather.strategies import PipelineParallelStrategy

HPARAMS = {"vocab_size": 64, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "seq_len": 32, "batch_size": 8, "lr": 1e-2}


def build_model(vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, **_) -> CausalLM:
    """A small Llama: pre-LN layers of grouped-query attention and SwiGLU, RMSNorm, RoPE, tied head."""
    layer = functools.partial(
        PreLNLayer,
        attention_factory=functools.partial(Attention, num_heads=num_heads, num_kv_heads=num_heads // 2),
        feedforward_factory=functools.partial(SwiGLU, intermediate_size=2 * hidden_size),
        norm_factory=RMSNorm,
    )
    rope = RotaryEmbedding(hidden_size // num_heads, theta=10000.0)
    return CausalLM(vocab_size, hidden_size, num_layers, layer, RMSNorm, rope=rope)


def counting_data(vocab_size: int, seq_len: int, batch_size: int, **_) -> DataLoader:
    """Rows that count up (mod vocab) from different starts: each next token follows from the last."""
    rows = (torch.arange(seq_len) + torch.arange(4 * batch_size)[:, None] * 3) % vocab_size
    return DataLoader([{"input_ids": row} for row in rows], batch_size=batch_size)


class CountingLM(pl.LightningModule):
    """The user's own LightningModule around Forgather's model, loss and optimizer."""

    def __init__(self, model: CausalLM, lr: float) -> None:
        super().__init__()
        self.model = model
        self.loss = ChunkedLoss(chunk_size=64, compile=False)  # compile=True fuses each chunk (worth it on GPU)
        self.lr = lr
        self.losses: list[float] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens = batch["input_ids"]
        hidden = self.model.hidden_states(tokens)  # [B, T, H]; the loss applies the head and shifts the labels
        loss = self.loss(hidden, self.model.lm_head_weight, tokens)
        self.log("train/loss", loss, prog_bar=True)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return Adafactor(self.parameters(), lr=self.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--pipeline", action="store_true", help="two processes, two pipeline stages (1F1B)")
    args = parser.parse_args()
    # A pipeline stage's rank reads the whole batch and splits it into microbatches (batch_size / 4 rows each).
    strategy = PipelineParallelStrategy("1F1B", n_microbatches=4) if args.pipeline else "auto"

    pl.seed_everything(0, verbose=False)
    module = CountingLM(build_model(**HPARAMS), HPARAMS["lr"])
    callbacks = [
        Snapshot(args.out_dir, config={**HPARAMS, "steps": args.steps, "pipeline": args.pipeline}, sources={"train.py": __file__}),
        JobControl(run_dir=args.out_dir),
    ]
    trainer = pl.Trainer(
        accelerator="cpu", devices=2 if args.pipeline else 1, strategy=strategy, max_steps=args.steps, callbacks=callbacks,
        # One pipeline has no data-parallel replicas: both stages read the loader's batches, in its order
        # (Lightning's distributed sampler would shuffle them).
        use_distributed_sampler=False, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, counting_data(**HPARAMS))
    if trainer.is_global_zero:  # every stage sees the pipeline's loss; one process writes it
        (args.out_dir / "losses.json").write_text(json.dumps(module.losses))


if __name__ == "__main__":
    main()
