"""`forgather config`: the OmegaConf config (Hydra vocabulary) that construction and snapshots use."""

from __future__ import annotations

import argparse

from forgather.cli.common import load


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resolve", action="store_true", help="resolve ${...} interpolations")


def run(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    print(OmegaConf.to_yaml(load(args).config, resolve=args.resolve), end="")
    return 0
