"""Peak memory of one full-finetune training step of a 7B Llama shape at long context, on one GPU.

The memory-saving combination, each piece from the library: bf16 weights; Adafactor (factored second
moments, no first moment) stepped inside backward, so each gradient is freed as soon as it is used
(`OptimizerInBackward` + `TritonAdafactor`); activation checkpointing per layer (`activation_checkpointing`);
a fused linear cross-entropy (`FusedLoss`: no logits tensor). Reports the peak allocated memory of a step
at each context length, and the largest length that stays within the budget (default 24 GiB).

    python scripts/bench_memory.py [--lengths 16384 24576 32768] [--budget-gib 24] [--mlp-chunk 4096]
    python scripts/bench_memory.py --tiny --device cpu        (a smoke test of the script itself)
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from forgather.models.causal_lm import CausalLM
from llama_model import llama

LLAMA_7B = dict(vocab=32000, hidden=4096, layers=32, heads=32, intermediate=11008)
TINY = dict(vocab=512, hidden=64, layers=2, heads=4, intermediate=128)


def build_model(shape: dict, mlp_chunk: int | None = None) -> CausalLM:
    return llama(shape["vocab"], shape["hidden"], shape["layers"], shape["heads"], shape["intermediate"],
                 theta=10000.0, mlp_chunk=mlp_chunk, activation_checkpointing=True)


def step_peak(model: CausalLM, loss_fn, optimizer, length: int, device: str) -> tuple[float, float]:
    """(peak GiB above nothing, seconds) of forward + loss + backward with the optimizer stepping inside."""
    ids = torch.randint(0, model.lm_head_weight.shape[0], (1, length), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    loss = loss_fn(model.hidden_states(ids), model.lm_head_weight, ids)
    optimizer.step(lambda: loss.backward())
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30, time.perf_counter() - start
    return float("nan"), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 24576, 32768, 40960])
    parser.add_argument("--budget-gib", type=float, default=24.0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny shape, to check the script on a CPU")
    parser.add_argument("--mlp-chunk", type=int, default=None,
                        help="SwiGLU chunk_tokens: the MLP's activations recomputed per chunk of this many tokens")
    args = parser.parse_args()
    shape = TINY if args.tiny else LLAMA_7B
    torch.manual_seed(0)
    with torch.device(args.device):
        model = build_model(shape, args.mlp_chunk).to(torch.bfloat16)
    if args.device == "cuda":
        from forgather.loss.fused import FusedLoss
        from forgather.optim import TritonAdafactor as Adafactor
    else:
        from forgather.loss.chunked import ChunkedLoss as FusedLoss
        from forgather.optim import Adafactor
    from forgather.optim.in_backward import OptimizerInBackward

    optimizer = OptimizerInBackward(model.parameters(), functools.partial(Adafactor, lr=1e-5))
    loss_fn = FusedLoss()
    parameters = sum(p.numel() for p in model.parameters())
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    print(f"model: {parameters / 1e9:.2f}B parameters, {weights_gib:.2f} GiB of bf16 weights; device {args.device}; "
          f"MLP chunk {args.mlp_chunk or 'none'}")
    print(f"{'context':>8} {'peak GiB':>9} {'step s':>7}  within {args.budget_gib:g} GiB")
    fits = []
    for length in args.lengths:
        try:
            peak, seconds = step_peak(model, loss_fn, optimizer, length, args.device)
        except torch.OutOfMemoryError:
            print(f"{length:>8} {'OOM':>9}")
            torch.cuda.empty_cache()
            continue
        ok = not peak > args.budget_gib
        fits += [length] if ok else []
        print(f"{length:>8} {peak:>9.2f} {seconds:>7.2f}  {'yes' if ok else 'no'}")
    print(f"largest context within {args.budget_gib:g} GiB: {max(fits) if fits else 'none'} tokens")


if __name__ == "__main__":
    main()
