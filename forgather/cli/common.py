"""What the subcommands share: loading the chosen config (with the values of the arguments it declares in
its `dynamic_args`), and reporting errors readably."""

from __future__ import annotations

import argparse
import os
import sys

from forgather.project import LoadedConfig, Project, add_dynamic_arguments

# Errors a user causes and can fix: printed as one located message, no traceback.
_USER_ERRORS = ("TemplateError", "ConstructError", "GraphError", "ImportSpecError", "OverrideError")


def load(args: argparse.Namespace) -> LoadedConfig:
    project = Project.find(args.project)
    return project.load_config(args.config, tuple(args.template_path), **getattr(args, "dynamic", {}))


def declare_config_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """Add the arguments the chosen config declares (its `dynamic_args`) to a subcommand's parser."""
    return add_dynamic_arguments(parser, load(args))


def report_error(error: BaseException) -> int:
    """Print an error for the user; FORGATHER_TRACEBACK=1 shows the traceback as well.

    Exit codes: 2 for a mistake in the input, 3 for a run aborted through `forgather control abort`."""
    if type(error).__name__ == "JobAborted":
        print(f"aborted: {error}", file=sys.stderr)
        return 3
    if os.environ.get("FORGATHER_TRACEBACK") or type(error).__name__ not in (*_USER_ERRORS, "FileNotFoundError", "ValueError", "KeyError"):
        raise error
    print(f"error: {error}", file=sys.stderr)
    return 2
