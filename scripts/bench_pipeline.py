"""Benchmark pipeline parallelism: PipelineParallelStrategy vs one GPU vs a hand-written pipelining loop.

Two ranks of one host (the script starts torchrun itself when not run under it). Three runs, one after the
other, on the same model (Llama shape, untied head, so that no variant syncs a tied embedding), the same
batches (`--microbatches` x `--rows` rows of `--seq` tokens) and the same microbatch shape:
  one GPU      rank 0 alone: forward + backward of every microbatch (gradient accumulation), AdamW step.
  hand-written torch.distributed.pipelining written out by hand: two PipelineStage modules, the schedule,
               AdamW; no Lightning.
  strategy     `trainer.fit` of an unchanged CausalLMModule with PipelineParallelStrategy (same schedule and
               split point).
Tokens/s is the batch's tokens over the median step time (after `--warmup` steps). The bars (issue 6):
strategy >= 1.7x one GPU at 8+ microbatches, and >= 0.95x the hand-written loop.

    python scripts/bench_pipeline.py --preset 1b --microbatches 8 16 [--schedule 1F1B] [--out results.json]
    python scripts/bench_pipeline.py --cpu     # dry run: gloo, a tiny model, a few steps; proves the script
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import get_schedule_class
from torch.utils.data import DataLoader

from forgather.lightning.module import CausalLMModule
from forgather.models.causal_lm import CausalLM
from forgather.strategies.pipeline import PipelineParallelStrategy
from forgather.strategies.pipeline_split import balanced_split_points
from llama_model import llama

# hidden, layers, heads, kv heads, feed-forward, vocabulary
PRESETS = {
    "tiny": (64, 4, 4, 2, 128, 256),
    "1b": (2048, 16, 32, 8, 8192, 128256),  # Llama 3.2 1B shape: 1.50B parameters untied
    "3b": (3072, 28, 24, 8, 8192, 128256),  # Llama 3.2 3B shape: 3.61B parameters untied
}
BARS = {"one GPU": 1.7, "hand-written": 0.95}


def build_model(preset: str) -> CausalLM:
    hidden, layers, heads, kv_heads, ffn, vocab = PRESETS[preset]
    torch.manual_seed(0)
    return llama(vocab, hidden, layers, heads, ffn, kv_heads=kv_heads)


def build_loss(args: argparse.Namespace) -> nn.Module:
    if args.cpu:
        from forgather.loss.naive import NaiveLoss

        return NaiveLoss()
    from forgather.loss.chunked import ChunkedLoss

    return ChunkedLoss()


def batches(args: argparse.Namespace, microbatches: int, count: int) -> list[dict[str, torch.Tensor]]:
    """`count` batches of random tokens, the same on every rank."""
    vocab = PRESETS[args.preset][-1]
    generator = torch.Generator().manual_seed(1)
    rows = microbatches * args.rows
    return [{"input_ids": torch.randint(0, vocab, (rows, args.seq), generator=generator)} for _ in range(count)]


def optimizer_factory(device: torch.device) -> functools.partial:
    return functools.partial(torch.optim.AdamW, lr=1e-4, fused=device.type == "cuda")


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Wall time of each step (the device synchronized at both ends)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times, self._start = device, [], 0.0

    def start(self) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def stop(self) -> None:
        synchronize(self.device)
        self.times.append(time.perf_counter() - self._start)

    def tokens_per_s(self, tokens: int, warmup: int) -> float:
        return tokens / statistics.median(self.times[warmup:])


# The three runs


def run_one_device(args: argparse.Namespace, microbatches: int, device: torch.device) -> float:
    model, loss = build_model(args.preset).to(device), build_loss(args)
    optimizer = optimizer_factory(device)(model.parameters())
    timer = StepTimer(device)
    for batch in batches(args, microbatches, args.warmup + args.steps):
        timer.start()
        for ids in batch["input_ids"].to(device).chunk(microbatches):
            with autocast(device):
                value = loss(model.hidden_states(ids), model.lm_head_weight, ids) / microbatches
            value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timer.stop()
    return timer.tokens_per_s(batch["input_ids"].numel(), args.warmup)


class HandStage(nn.Module):
    """Layers `layers` of the model; the embedding on the first stage, norm and head on the second."""

    def __init__(self, model: CausalLM, layers: range, first: bool) -> None:
        super().__init__()
        self.first = first
        self.embed = model.embed if first else None
        self.layers = nn.ModuleList(model.layers[index] for index in layers)
        self.norm, self.head = (None, None) if first else (model.norm, model.lm_head)
        self.layer_inputs = model.layer_inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rope, mask = self.layer_inputs(x if self.first else x[..., 0])
        x = self.embed(x) if self.first else x
        for layer in self.layers:
            x = layer(x, rope, mask)
        return x if self.first else self.norm(x)


def run_hand_written(args: argparse.Namespace, microbatches: int, device: torch.device, split: int) -> float:
    rank = dist.get_rank()
    model, loss = build_model(args.preset), build_loss(args)
    layers = range(0, split) if rank == 0 else range(split, len(model.layers))
    stage_module = HandStage(model, layers, first=rank == 0).to(device)
    stage = PipelineStage(stage_module, rank, 2, device)

    def loss_fn(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return loss(hidden, stage_module.head.weight, labels)

    schedule = get_schedule_class(args.schedule)(stage, microbatches, loss_fn=loss_fn)
    optimizer = optimizer_factory(device)(stage_module.parameters())
    timer = StepTimer(device)
    for batch in batches(args, microbatches, args.warmup + args.steps):
        ids = batch["input_ids"].to(device)
        timer.start()
        with autocast(device):
            if rank == 0:
                schedule.step(ids)
            else:
                schedule.step(target=ids)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timer.stop()
    return timer.tokens_per_s(ids.numel(), args.warmup)


class TimeSteps(pl.Callback):
    def __init__(self, device: torch.device) -> None:
        self.timer = StepTimer(device)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.timer.start()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.timer.stop()


def run_strategy(args: argparse.Namespace, microbatches: int, device: torch.device, split: int) -> float:
    module = CausalLMModule(build_model(args.preset), build_loss(args), optimizer_factory(device))
    timing = TimeSteps(device)
    strategy = PipelineParallelStrategy(args.schedule, microbatches, split_points=[split], gather_at_end=False)
    trainer = pl.Trainer(
        accelerator=device.type if device.type == "cpu" else "gpu", devices=2, strategy=strategy,
        precision="32-true" if args.cpu else "bf16-mixed", max_steps=args.warmup + args.steps,
        use_distributed_sampler=False, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[timing],
    )
    data = batches(args, microbatches, args.warmup + args.steps)
    trainer.fit(module, DataLoader(data, batch_size=None))
    return timing.timer.tokens_per_s(data[0]["input_ids"].numel(), args.warmup)


# Driver


def benchmark(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cpu") if args.cpu else torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("gloo" if args.cpu else "nccl")
    split = args.split or balanced_split_points(PRESETS[args.preset][1], 2, _head_cost(args.preset))[0]
    results = []
    for microbatches in args.microbatches:
        one = run_one_device(args, microbatches, device) if dist.get_rank() == 0 else 0.0
        dist.barrier()
        hand = run_hand_written(args, microbatches, device, split)
        strategy = run_strategy(args, microbatches, device, split)
        results.append({"microbatches": microbatches, "tokens_per_step": microbatches * args.rows * args.seq,
                        "split": split, "one GPU": one, "hand-written": hand, "strategy": strategy})
    return results


def _head_cost(preset: str) -> float:
    """The head's size in layers (hidden x vocab over one layer's weights), without building the model."""
    hidden, _, heads, kv_heads, ffn, vocab = PRESETS[preset]
    head_dim = hidden // heads
    layer = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim + 3 * hidden * ffn
    return hidden * vocab / layer


def report(args: argparse.Namespace, results: list[dict]) -> None:
    device = "CPU (gloo, dry run)" if args.cpu else torch.cuda.get_device_name(0)
    print(f"\npipeline benchmark: preset {args.preset}, schedule {args.schedule}, {args.rows} rows x {args.seq} "
          f"tokens a microbatch, 2 ranks, {device}")
    print(f"{'microbatches':>12} {'split':>5} {'one GPU':>12} {'hand-written':>13} {'strategy':>12} "
          f"{'vs one GPU':>11} {'vs hand':>8}")
    for row in results:
        ratios = {name: row["strategy"] / row[name] for name in BARS}
        marks = {name: "ok" if ratios[name] >= bar else "LOW" for name, bar in BARS.items()}
        print(f"{row['microbatches']:>12} {row['split']:>5} {row['one GPU']:>12.0f} {row['hand-written']:>13.0f} "
              f"{row['strategy']:>12.0f} {ratios['one GPU']:>6.2f}x {marks['one GPU']:<3} "
              f"{ratios['hand-written']:>4.2f}x {marks['hand-written']}")
    print("bars: strategy >= 1.7x one GPU (at 8+ microbatches), >= 0.95x the hand-written loop; tokens/s")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": device, "args": vars(args), "results": results}, indent=2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU (gloo, tiny model, few steps)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--schedule", choices=["GPipe", "1F1B"], default="1F1B")
    parser.add_argument("--microbatches", type=int, nargs="+", default=None)
    parser.add_argument("--rows", type=int, default=None, help="rows a microbatch")
    parser.add_argument("--seq", type=int, default=None, help="tokens a row")
    parser.add_argument("--split", type=int, help="first layer of the second stage (default: balanced)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", help="also write the results here as JSON")
    args = parser.parse_args(argv)
    defaults = (dict(preset="tiny", microbatches=[4], rows=2, seq=32, warmup=1, steps=2) if args.cpu else
                dict(preset="1b", microbatches=[8, 16], rows=2, seq=2048, warmup=3, steps=10))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main() -> None:
    if "LOCAL_RANK" not in os.environ:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   os.path.abspath(__file__), *sys.argv[1:]]
        raise SystemExit(subprocess.run(command).returncode)
    args = parse_args()
    torch.set_num_threads(1 if args.cpu else torch.get_num_threads())
    results = benchmark(args)
    if dist.get_rank() == 0:
        report(args, results)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
