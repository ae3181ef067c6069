"""`forgather data prepare`: tokenize corpora into token shards for `data=streaming` (forgather.data.prepare).

    forgather data prepare --source 'crawl/*.jsonl' --source extra.parquet --tokenizer TOKENIZER_DIR --out DIR

Without `--source` the embedded stdlib corpus is prepared. A DIR that exists was prepared before: it is kept
when its key (sources, tokenizer, settings) matches, and refused when not. Heavy modules load only in `run`.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    prepare = actions.add_parser("prepare", help="tokenize sources into shards (parallel, atomic, keyed)")
    prepare.add_argument("--source", action="append", default=[], metavar="GLOB",
                         help="jsonl/json, txt/md, parquet files or saved datasets; repeatable (default: stdlib)")
    prepare.add_argument("--tokenizer", required=True, metavar="PATH",
                         help="a tokenizer saved with save_pretrained (directory) or a tokenizer.json")
    prepare.add_argument("--out", required=True, metavar="DIR", help="the prepared directory to write")
    prepare.add_argument("--field", default="text", help="the text's field (jsonl) or column (parquet, dataset)")
    prepare.add_argument("--val-fraction", type=float, default=0.02, help="share of documents for validation")
    prepare.add_argument("--seed", type=int, default=0, help="seeds the validation split")
    prepare.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: every core)")
    prepare.add_argument("--on-bad-line", choices=("stop", "skip"), default="stop",
                         help="a malformed jsonl line: stop with its file:line (default), or skip and count it")


def run(args: argparse.Namespace) -> int:
    from forgather.data.prepare import PreparedCorpus, summary, read_manifest
    from forgather.data.tokenizer import load_tokenizer

    corpus = PreparedCorpus(args.out, args.source or None, args.field, args.val_fraction, args.seed, args.workers,
                            args.on_bad_line)
    path = corpus.prepare(load_tokenizer(args.tokenizer))
    print(f"{path}: {summary(read_manifest(path))}")
    return 0
