"""`forgather data prepare`: tokenize corpora into token shards for `data=streaming` (forgather.data.prepare).

    forgather data prepare --source 'crawl/*.jsonl' --source extra.parquet --tokenizer TOKENIZER_DIR --out DIR
    forgather data prepare +experiment=NAME data=streaming data_sources='[crawl/*.jsonl]' [overrides]
    forgather -t CONFIG data prepare data=streaming [overrides]

Without `--source` the embedded stdlib corpus is prepared. A DIR that exists was prepared before: it is kept
when its key (sources, tokenizer, settings) matches, and refused when not. The second and third forms prepare
what that experiment would train on: its datamodule's `prepare_data()`, with its own tokenizer and settings and
the runner's overrides, so that the run finds the shards ready. Heavy modules load only in `run`.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    prepare = actions.add_parser("prepare", help="tokenize sources into shards (parallel, atomic, keyed)")
    prepare.add_argument("--source", action="append", default=[], metavar="GLOB",
                         help="jsonl/json, txt/md, parquet files or saved datasets; repeatable (default: stdlib)")
    prepare.add_argument("overrides", nargs="*", default=[],
                         help="prepare an experiment's data: +experiment=NAME (or forgather -t CONFIG) and overrides")
    prepare.add_argument("--tokenizer", metavar="PATH",
                         help="a tokenizer saved with save_pretrained (directory) or a tokenizer.json")
    prepare.add_argument("--out", metavar="DIR", help="the prepared directory to write")
    prepare.add_argument("--field", default="text", help="the text's field (jsonl) or column (parquet, dataset)")
    prepare.add_argument("--val-fraction", type=float, default=0.02, help="share of documents for validation")
    prepare.add_argument("--seed", type=int, default=0, help="seeds the validation split")
    prepare.add_argument("--workers", type=int, default=None,
                         help="tokenizer processes (default: every core); the shards do not depend on it")
    prepare.add_argument("--on-bad-line", choices=("stop", "skip"), default="stop",
                         help="a malformed jsonl line: stop with its file:line (default), or skip and count it")


def run(args: argparse.Namespace) -> int:
    from forgather.data.prepare import PreparedCorpus, read_manifest, summary

    if args.overrides or args.config:
        path = _prepare_experiment(args)
    else:
        from forgather.data.tokenizer import load_tokenizer

        if not (args.tokenizer and args.out):
            raise ValueError("data prepare: give --tokenizer and --out (with --source), or an experiment: "
                             "+experiment=NAME data=streaming ...")
        corpus = PreparedCorpus(args.out, args.source or None, args.field, args.val_fraction, args.seed,
                                args.workers, args.on_bad_line)
        path = corpus.prepare(load_tokenizer(args.tokenizer))
    print(f"{path}: {summary(read_manifest(path))}")
    return 0


def _prepare_experiment(args: argparse.Namespace):
    """Prepare the data of the experiment the runner would build from the same arguments; the prepared path."""
    from pathlib import PurePosixPath

    from forgather import overrides as ovr
    from forgather.data.prepare import PreparedCorpus
    from forgather.run import Runner, build_parser

    flags = {"tokenizer": "--tokenizer", "out": "--out", "workers": "--workers"}
    given = [flag for name, flag in flags.items() if getattr(args, name)] + (["--source"] if args.source else [])
    if given:
        raise ValueError(f"data prepare: {given[0]} is for a corpus named on the command line; an experiment's "
                         "data is set by its config: data_sources=[...], data_path=DIR, prepare_workers=N")
    argv = list(args.overrides)
    if args.project:
        argv += ["-p", args.project]
    for path in args.template_path:
        argv += ["--template-path", path]
    if args.config:
        argv.append(f"+experiment={PurePosixPath(args.config).with_suffix('').as_posix()}")
    options = build_parser().parse_intermixed_args(argv)
    runner = Runner.create(options, [])
    (point,) = ovr.parse(options.overrides, runner.groups, False)
    experiment, loaded, config, _ = runner.job(point)
    datamodule = loaded.construct("datamodule", config)
    if not isinstance(getattr(datamodule, "documents", None), PreparedCorpus):
        raise ValueError(f"data prepare: experiment {experiment!r} does not stream from shards; add data=streaming")
    return datamodule.documents.prepare(datamodule.tokenizer)  # what the datamodule's prepare_data does
