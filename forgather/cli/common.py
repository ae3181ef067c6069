"""What the subcommands share: loading the chosen config. (Errors are reported by forgather.errors.report.)"""

from __future__ import annotations

import argparse

from forgather.project import LoadedConfig, Project


def load(args: argparse.Namespace) -> LoadedConfig:
    project = Project.load(args.project)
    return project.load_config(args.config, tuple(args.template_path))
