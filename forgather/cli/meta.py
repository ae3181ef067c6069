"""`forgather meta`: the project's meta.yaml as read (rendered, then parsed), and what follows from it.

The reference Forgather's `meta` command. `index` summarizes a project for a reader; this prints the values
themselves, as YAML, for debugging a templated meta.yaml (`-- extends "meta_defaults.yaml"`): the keys it
gave, then the project directory, workspace root, default config and template search path they lead to.
"""

from __future__ import annotations

import argparse

from forgather.cli.common import warn_about_meta
from forgather.project import Project


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    import yaml

    project = Project.find(args.project)
    warn_about_meta(project)
    derived = {
        "project_dir": project.root,
        "workspace_root": project.workspace_root or project.root,
        "config_prefix": project.config_prefix,
        "default_config": project.default_config,
        "search_path": project.search_path(args.template_path),
        "model_src": project.model_src,
        "system_path": project.system_path,
    }
    print("# meta.yaml, as read")
    print(yaml.safe_dump(project.meta, sort_keys=False, allow_unicode=True).rstrip() if project.meta else "{}")
    print("# what it leads to")
    print(yaml.safe_dump(derived, sort_keys=False, allow_unicode=True).rstrip())
    return 0
