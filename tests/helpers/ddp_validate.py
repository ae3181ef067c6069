"""Validation subprocess for tests/test_data_module.py: the tiny LM validated on TextDataModule's validation
blocks, on one process or as one rank of a DDP run on the CPU (started by tests/helpers/ranks.py); rank 0 writes
the val/loss Lightning reports to `<out>/val-<devices>.json`."""

import argparse
import json
import os
from pathlib import Path

import pytorch_lightning as pl
import torch

from forgather.data.corpus import pydoc_topics
from forgather.data.tokenizer import train_bpe_tokenizer
from forgather.lightning.datamodule import TextDataModule
from forgather.lightning.module import CausalLMModule
from tiny_lm import tiny_model  # this script's directory is first on sys.path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    documents = [text for _, text in pydoc_topics()][:12]
    tokenizer = train_bpe_tokenizer(documents, vocab_size=300, cache=False)
    # 16-token blocks, batches of 4: the validation blocks do not divide between two ranks nor into batches
    data = TextDataModule(tokenizer, documents, block_size=16, batch_size=4, val_fraction=0.3, seed=0,
                          max_tokens=3000, cache=False)
    torch.manual_seed(0)
    model = tiny_model(vocab_size=len(tokenizer))
    trainer = pl.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                         logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.validate(CausalLMModule(model), datamodule=data)
    blocks = len(data.val_dataset)
    if trainer.is_global_zero:
        (args.out / f"val-{args.devices}.json").write_text(json.dumps({"val/loss": metrics["val/loss"], "blocks": blocks}))
    if args.devices > 1:
        torch.distributed.destroy_process_group()  # before exit: gloo's threads otherwise abort now and then


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
