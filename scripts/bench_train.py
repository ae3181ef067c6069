"""Benchmark a training step through `python -m forgather.run` against a plain Hugging Face loop, one run.

Both train the same 1.24B Llama shape (hidden 2048, 16 layers, 32 heads / 8 KV heads, vocab 128256, tied
embeddings, SwiGLU 8192) on batches of 4 x 2048 tokens in pure bf16 with fused AdamW:
  hf         transformers.LlamaForCausalLM, SDPA attention, logits then cross-entropy, a hand-written loop
  forgather  python -m forgather.run: our model, the configured loss, per-layer torch.compile (compile=true),
             Lightning Trainer(precision=bf16-true); tokens/s from the run's own train/tokens_per_s log (tokens
             over the wall time between logged steps, every `--log-every` steps)
Both are timed the same way: tokens over the wall time of windows of `--log-every` steps (the host waits for
the GPU only at window ends), median of the last two thirds of the windows. Reports tokens/s, MFU against the
H100's 989 TFLOP/s bf16 datasheet peak, and the ratio.

    python scripts/bench_train.py [--steps 60] [--loss fused] [--no-compile] [--only hf|forgather]
        [--set OVERRIDE ...]   (more overrides for the forgather run, e.g. ++loss.chunk_size=2048)
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPE = dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256)
BATCH, SEQ = 4, 2048
PEAK_FLOPS = 989e12


def flops_per_token() -> float:
    """6 x parameters (embedding counted once as the tied head matmul) + causal attention (6 L d T)."""
    d, layers = SHAPE["hidden"], SHAPE["layers"]
    kv = d * SHAPE["kv_heads"] // SHAPE["heads"]
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * SHAPE["intermediate"]
    matmul_params = layers * per_layer + SHAPE["vocab"] * d
    return 6 * matmul_params + 6 * layers * d * SEQ


def bench_hf(steps: int, window: int) -> float:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=SHAPE["hidden"], num_hidden_layers=SHAPE["layers"], num_attention_heads=SHAPE["heads"],
        num_key_value_heads=SHAPE["kv_heads"], intermediate_size=SHAPE["intermediate"], vocab_size=SHAPE["vocab"],
        tie_word_embeddings=True, max_position_embeddings=SEQ, attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, SHAPE["vocab"], (BATCH, SEQ), device="cuda")
    # Timed like the forgather run's log: wall time over windows of `window` steps, synchronized only at the
    # window ends, so the host queues each step while the previous one runs, as in any plain loop.
    rates = []
    torch.cuda.synchronize()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % window == 0:
            torch.cuda.synchronize()
            now = time.perf_counter()
            rates.append(window * BATCH * SEQ / (now - start))
            start = now
    del model, optimizer
    torch.cuda.empty_cache()
    return statistics.median(rates[len(rates) // 3:])


def bench_forgather(
    steps: int, loss: str, optimizer: str, compile_layers: bool, attention_fn: str, log_every: int, extra: list[str]
) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "bench"
        (project / "templates" / "configs").mkdir(parents=True)
        (project / "meta.yaml").write_text("name: bench\n")
        (project / "templates" / "configs" / "llama_1b.yaml").write_text(
            "## The 1.24B Llama shape of bench_train.py on the stdlib corpus, pure bf16.\n"
            "-- set model = 'llama_1b'\n-- set trainer = 'gpu'\n"
            f"-- set loss = '{loss}'\n"
            f"-- set default_block_size = {SEQ}\n-- set default_batch_size = {BATCH}\n"
            "-- extends 'experiment/tiny_llama.yaml'\n"
        )
        command = [
            sys.executable, "-m", "forgather.run", "-p", str(project), "--outputs", tmp, "+experiment=llama_1b",
            f"max_steps={steps}", f"log_every_n_steps={log_every}", "val_check_interval=100000", "limit_val_batches=0",
            "checkpoint_every=100000", f"model.vocab_size={SHAPE['vocab']}", f"optimizer={optimizer}",
            *(["++optimizer.fused=true"] if optimizer == "adamw" else []),  # torch's fused AdamW, as the HF loop
            "gradient_clip_val=null",  # the HF loop does not clip either
            f"compile={'true' if compile_layers else 'false'}", f"attention_fn={attention_fn}", *extra,
        ]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        (metrics,) = Path(tmp).glob("outputs/llama_1b/*/csv/metrics.csv")
        with open(metrics, newline="") as file:
            rates = [float(r["train/tokens_per_s"]) for r in csv.DictReader(file) if r.get("train/tokens_per_s")]
    return statistics.median(rates[len(rates) // 3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--loss", default="fused", help="loss group option for the forgather run")
    parser.add_argument("--optimizer", default="adamw", help="optimizer group option for the forgather run")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--attention", default="flex", help="attention_fn of our model (packed rows: flex masks documents cheaply)")
    parser.add_argument("--only", choices=("hf", "forgather"))
    parser.add_argument("--log-every", type=int, default=10, help="log_every_n_steps of the forgather run (each log is a host sync)")
    parser.add_argument("--set", nargs="*", default=[], metavar="OVERRIDE", help="more overrides for the forgather run")
    args = parser.parse_args()
    results = {}
    if args.only != "forgather":
        results["hf LlamaForCausalLM loop"] = bench_hf(args.steps, args.log_every)
    if args.only != "hf":
        name = (f"forgather.run ({args.loss}, {args.optimizer}, {args.attention}, compile={not args.no_compile}"
                f"{''.join(' ' + o for o in args.set)})")
        results[name] = bench_forgather(args.steps, args.loss, args.optimizer, not args.no_compile, args.attention,
                                        args.log_every, args.set)
    per_token = flops_per_token()
    width = max(48, *(len(name) for name in results))
    print(f"\n{'path':<{width}} {'tokens/s':>10} {'MFU':>7}")
    for name, rate in results.items():
        print(f"{name:<{width}} {rate:>10.0f} {100 * rate * per_token / PEAK_FLOPS:>6.1f}%")
    if len(results) == 2:
        hf, ours = results.values()
        print(f"ratio forgather / hf: {ours / hf:.3f}x   (bar: >= 1.3x)")


if __name__ == "__main__":
    main()
