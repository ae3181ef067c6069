"""`forgather train`: the runner (`python -m forgather.run`) for a config of the current project.

    forgather -t tiny.yaml train lr=1e-3   ==  python -m forgather.run -p . --outputs . +experiment=tiny lr=1e-3
It takes every option of the runner (one parser, `forgather.run.add_arguments`); -p and --template-path are
options of `forgather` itself, and -t names the experiment. Runs and exported models go into the project
(outputs/, multirun/, output_models/) unless --outputs says otherwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import PurePosixPath


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from forgather.run import add_arguments as add_run_arguments

    add_run_arguments(parser, project_options=False)
    parser.set_defaults(outputs=None)  # None: the project directory


def run_arguments(args: argparse.Namespace) -> list[str]:
    """The `python -m forgather.run` arguments this command stands for."""
    from forgather.run import run_argv

    argv = ["-p", args.project, "--outputs", args.outputs or args.project]
    for path in args.template_path:
        argv += ["--template-path", path]
    # A snapshot brings its own config: -t (a template) applies to runs from the templates only.
    if args.config and not (args.resume or args.from_snapshot):
        argv.append(f"+experiment={PurePosixPath(args.config).with_suffix('').as_posix()}")
    options = argparse.Namespace(**{**vars(args), "outputs": None})  # given above
    if getattr(args, "dynamic", None):
        argv += ["--dynamic-args", json.dumps(args.dynamic)]
    return argv + run_argv(options) + list(args.overrides)


def run(args: argparse.Namespace) -> int:
    from forgather.run import main

    argv = getattr(args, "argv", [])
    if "--" in argv and any(word.startswith("-") for word in argv[argv.index("--") + 1:]):
        from forgather.errors import UserError

        # The reference Forgather passed these to torchrun; overrides (`key=value`) after `--` are taken as usual.
        raise UserError("forgather train -- ARGS: there is no torchrun to pass them to (Lightning starts the processes); "
                        "choose GPUs with -d 0,1 or ++trainer.devices=N, nodes with ++trainer.num_nodes=N")

    return main(run_arguments(args))
