"""Benchmark the data path: prepare throughput, streaming read throughput, and peak memory at 1x and 8x corpus.

    .venv/bin/python scripts/bench_data.py [--tokens 20e6] [--workers 2] [--out /tmp/forgather_bench_data]

1. The corpus: the embedded stdlib corpus, its documents repeated in a fresh seeded order each time, written as
   jsonl until about `--tokens` tokens (the tutorial's BPE tokenizer, vocabulary 4096).
2. Prepare: `forgather.data.prepare.prepare` with `--workers` processes, beside the baseline: one process
   calling the `tokenizers` library's `encode_batch` over the same documents (which itself uses every core
   through the library's thread pool), both in tokens/s of wall time and tokens per CPU-second (the per-core
   rate, which other load on the machine does not change).
3. Stream: packed blocks (block sizes 2048 and 128) from one DataLoader worker, in tokens/s.
4. Memory: a fresh process streams a whole epoch of the 1x corpus, another of the 8x corpus, through the
   training loader with one worker; peak RSS (max resident set, main process + worker). The 8x corpus is the 1x
   corpus's shards copied 8 times (`--prepare-8x` prepares it from 8x the documents instead, 8x slower).
Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

STREAM_CODE = """
import resource, sys, time
from forgather.data.loader import LoaderPosition
from forgather.data.stream import PackedShards, streaming_loader
dataset = PackedShards(sys.argv[1], "train", int(sys.argv[2]))
loader = streaming_loader(dataset, 0, LoaderPosition(), batch_size=8, num_workers=1)
batches = iter(loader)
tokens = next(batches)["input_ids"].numel()  # the worker's start is not reading
start = time.perf_counter()
for batch in batches:
    tokens += batch["input_ids"].numel()
seconds = time.perf_counter() - start
self_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
worker_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(tokens, seconds, self_kib, worker_kib)
"""


def write_corpus(path: Path, tokens: float, tokenizer) -> tuple[list[str], int]:
    """Stdlib documents, reshuffled per repeat, until about `tokens` tokens; returns (texts, token count)."""
    from forgather.data.corpus import stdlib_documents

    documents = stdlib_documents()
    encoded = tokenizer.backend_tokenizer.encode_batch(documents, add_special_tokens=False)
    repeats = max(1, round(tokens / sum(len(e.ids) + 1 for e in encoded)))
    rng, texts = random.Random(0), []
    for _ in range(repeats):
        texts += rng.sample(documents, len(documents))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for text in texts:
            out.write(json.dumps({"text": text}) + "\n")
    return texts, repeats


def baseline(texts: list[str], tokenizer) -> tuple[int, float, float]:
    """(tokens, wall seconds, CPU seconds of all threads) of one process encoding `texts` with encode_batch."""
    backend = tokenizer.backend_tokenizer
    start, cpu, total = time.perf_counter(), time.process_time(), 0
    for i in range(0, len(texts), 512):
        total += sum(len(e.ids) + 1 for e in backend.encode_batch(texts[i : i + 512], add_special_tokens=False))
    return total, time.perf_counter() - start, time.process_time() - cpu


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def copy_scaled(prepared: Path, out: Path, factor: int) -> None:
    """A prepared directory whose train split is `prepared`'s shards, `factor` times."""
    manifest = json.loads((prepared / "manifest.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    (out / "train").mkdir(parents=True)
    shards = []
    for copy in range(factor):
        for shard in manifest["shards"]["train"]:
            name = f"train/{copy}-{Path(shard['file']).name}"
            shutil.copyfile(prepared / shard["file"], out / name)
            shards.append({**shard, "file": name})
    (out / "manifest.json").write_text(json.dumps({**manifest, "shards": {"train": shards, "val": []}}))


def stream(path: Path, block_size: int) -> tuple[int, float, int]:
    """(tokens, seconds, peak RSS in MiB of main + worker) of a fresh process streaming one epoch."""
    output = subprocess.run([sys.executable, "-c", STREAM_CODE, str(path), str(block_size)],
                            capture_output=True, text=True, check=True).stdout.split()
    tokens, seconds, self_kib, worker_kib = int(output[0]), float(output[1]), int(output[2]), int(output[3])
    return tokens, seconds, (self_kib + worker_kib) // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=float, default=20e6, help="size of the 1x corpus (default 20M)")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=Path("/tmp/forgather_bench_data"))
    parser.add_argument("--prepare-8x", action="store_true", help="prepare the 8x corpus instead of copying shards")
    args = parser.parse_args()

    from forgather.data.prepare import prepare, summary
    from forgather.data.tokenizer import stdlib_tokenizer

    tokenizer = stdlib_tokenizer(4096)
    shutil.rmtree(args.out, ignore_errors=True)
    texts, repeats = write_corpus(args.out / "corpus" / "x1.jsonl", args.tokens, tokenizer)
    base_tokens, base_seconds, base_cpu = baseline(texts, tokenizer)
    del texts
    start, cpu = time.perf_counter(), children_cpu() + time.process_time()
    manifest = prepare([args.out / "corpus" / "x1.jsonl"], tokenizer, args.out / "x1", num_workers=args.workers,
                       val_fraction=0.0, progress=False)
    prep_seconds = time.perf_counter() - start
    prep_cpu = children_cpu() + time.process_time() - cpu
    prep_tokens = sum(s["tokens"] for s in manifest["shards"]["train"])
    print(f"1x: {summary(manifest)} ({repeats} shuffled repeats of the stdlib corpus)", file=sys.stderr)
    if args.prepare_8x:
        write_corpus(args.out / "corpus" / "x8.jsonl", 8 * args.tokens, tokenizer)
        prepare([args.out / "corpus" / "x8.jsonl"], tokenizer, args.out / "x8", num_workers=args.workers,
                val_fraction=0.0, progress=False)
    else:
        copy_scaled(args.out / "x1", args.out / "x8", 8)

    cores = os.cpu_count()
    rows = [
        ("prepare, encode_batch baseline (1 process, library threads)", base_tokens / base_seconds,
         f"{base_tokens / base_cpu / 1e6:.2f}M tok per CPU-second"),
        (f"prepare, forgather ({args.workers} worker processes)", prep_tokens / prep_seconds,
         f"{prep_tokens / prep_cpu / 1e6:.2f}M tok per CPU-second (spawn and imports included), "
         f"{prep_tokens / 1e6:.1f}M tokens"),
    ]
    for block_size in (2048, 128):
        tokens, seconds, _ = stream(args.out / "x1", block_size)
        rows.append((f"stream, 1 DataLoader worker, block {block_size}", tokens / seconds, f"{tokens / 1e6:.1f}M tokens"))
    memory = {}
    for name in ("x1", "x8"):
        tokens, seconds, rss = stream(args.out / name, 2048)
        memory[name] = (tokens, rss)
    print(f"| measurement ({cores} cores) | tokens/s | notes |\n| --- | --- | --- |")
    for name, rate, notes in rows:
        print(f"| {name} | {rate / 1e6:.2f}M | {notes} |")
    (t1, r1), (t8, r8) = memory["x1"], memory["x8"]
    print(f"| peak RSS streaming 1x ({t1 / 1e6:.0f}M tokens) vs 8x ({t8 / 1e6:.0f}M tokens), block 2048 | "
          f"{r1} MiB vs {r8} MiB | {100 * (r8 - r1) / r1:+.1f}% |")


if __name__ == "__main__":
    main()
