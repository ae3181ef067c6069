"""`forgather config`: the OmegaConf config (Hydra vocabulary) that construction and snapshots use."""

from __future__ import annotations

import argparse
import re

from forgather.cli.common import load


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resolve", action="store_true", help="resolve ${...} interpolations")


def run(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationResolutionError

    loaded = load(args)
    try:
        text = OmegaConf.to_yaml(loaded.config, resolve=args.resolve)
    except InterpolationResolutionError as error:  # a !var without a default: its value comes only with a run
        named = re.search(r"Missing mandatory value: ([\w.-]+)", str(error.msg))
        reason = f"no value given for {named.group(1)!r}" if named else str(error.msg).splitlines()[0]
        raise loaded.located(f"--resolve: {error.full_key}: {reason}; give the !var a default "
                             f"(!var {{name: ..., default: ...}}), or print the config without --resolve",
                             loaded.line_of(error.full_key)) from error
    print(text, end="")
    return 0
