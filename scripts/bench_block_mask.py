"""Time building the flex-attention BlockMask of packed rows (causal within documents), eager vs compiled.

Every training step builds one mask for its batch (forgather.models.attention.AttentionMask.block_mask); this
measures what that costs at the bench_train shape (4 rows x 2048 tokens, documents of random lengths).

    python scripts/bench_block_mask.py [--rows 4] [--seq 2048] [--iters 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn.attention import flex_attention as flex


def packed_document_ids(rows: int, seq: int, mean_len: int, device: str) -> torch.Tensor:
    starts = torch.rand(rows, seq, device=device) < 1 / mean_len
    starts[:, 0] = True
    return starts.cumsum(dim=-1)


def build(docs: torch.Tensor, compiled: bool) -> flex.BlockMask:
    def causal_in_document(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (docs[b, q_idx] == docs[b, kv_idx])

    rows, seq = docs.shape
    return flex.create_block_mask(causal_in_document, rows, None, seq, seq, device=str(docs.device), _compile=compiled)


def median_ms(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[iters // 5:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--mean-doc", type=int, default=600)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    docs = packed_document_ids(args.rows, args.seq, args.mean_doc, "cuda")
    eager, compiled = build(docs, False), build(docs, True)
    same = all(torch.equal(a, b) for a, b in zip(eager.as_tuple(), compiled.as_tuple()) if isinstance(a, torch.Tensor))
    print(f"masks equal: {same}")
    results = {name: median_ms(lambda c=c: build(docs, c), args.iters) for name, c in (("eager", False), ("compiled", True))}
    for name, ms in results.items():
        print(f"create_block_mask {name:<9} {ms:7.3f} ms (host + device, synchronized)")
    print(f"ratio compiled / eager: {results['compiled'] / results['eager']:.3f}x")


if __name__ == "__main__":
    main()
