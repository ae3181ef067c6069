"""Template-language parity with the reference Forgather: render every config of its projects both ways.

    python scripts/parity_reference.py --reference /work/ref-forgather [-v] [--show N]

For each project under the reference checkout's examples/ and templatelib/ (a directory with a meta.yaml),
the reference's own code reads the project (its meta.yaml is a template, rendered with the workspace's
meta_defaults.yaml) and gives the search path and the configs (`<config_prefix>/**.yaml`). Each config is
then rendered by the reference's environment and by ours (`forgather.template.TemplateEnvironment`) over
that same search path, and the two texts are compared, blank lines and `#` comment lines aside (as issue
13 measured), and exactly.

This measures the template language alone: our project loader is not involved, the globals the
reference's environment has and ours lacks are lent to ours (their names are printed), so the count
does not move with them, and the clock globals (`isotime()` ...) answer one instant, the same in both.
Warnings of ours (a block no ancestor defines) are counted, not printed. The reference is imported from its checkout under another package name
(`forgather_reference`; its modules import each other relatively), so both live in one process.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import sys
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from forgather.template import TemplateEnvironment


def import_reference(checkout: Path):
    """The reference's meta_config and config modules, from `checkout`/src/forgather as `forgather_reference`.

    The package's __init__ (which imports `forgather.project` absolutely) is not run: an empty package
    with the checkout's path stands for it."""
    package = types.ModuleType("forgather_reference")
    package.__path__ = [str(checkout / "src" / "forgather")]
    sys.modules["forgather_reference"] = package
    return importlib.import_module("forgather_reference.meta_config"), importlib.import_module("forgather_reference.config")


CLOCK_GLOBALS = ("isotime", "utcisotime", "filetime", "utcfiletime", "now", "utcnow")


def significant_lines(text: str) -> list[str]:
    """The lines that carry YAML: no blank lines, no `#` comment lines."""
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@dataclass
class Tally:
    configs: int = 0
    reference_failed: int = 0
    same: int = 0
    exact: int = 0
    lent: set[str] = field(default_factory=set)
    warned: int = 0
    differing: list[tuple[str, str, str]] = field(default_factory=list)  # (config path, reference, ours)


def render_ours(search_path: list[str], name: str, reference_globals: dict, tally: Tally) -> str:
    ours = TemplateEnvironment(search_path)
    missing = {key: value for key, value in reference_globals.items() if key not in ours.env.globals}
    tally.lent |= set(missing)
    ours.env.globals.update(missing)
    ours.env.globals.update({key: reference_globals[key] for key in CLOCK_GLOBALS})
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        try:
            return ours.render(name)
        except Exception as error:  # a config ours cannot render counts as a difference, with the reason
            return f"<error> {type(error).__name__}: {error}"
        finally:
            tally.warned += bool(warned)


def compare_project(project_dir: Path, meta_config, config, clock: dict, tally: Tally) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        meta = meta_config.MetaConfig(str(project_dir))
    names = sorted(name for name, _ in _templates(meta))
    reference_globals = meta_config.preprocessor_globals(str(project_dir), meta.workspace_root)
    for name in names:
        template = os.path.join(meta.config_prefix, name)
        tally.configs += 1
        environment = config.ConfigEnvironment(searchpath=meta.searchpath, global_vars=reference_globals | clock)
        try:
            expected = environment.preprocess(template)
        except Exception:
            tally.reference_failed += 1  # broken in the reference itself: nothing to match
            continue
        rendered = render_ours(meta.searchpath, template, dict(environment.pp_environment.globals), tally)
        if rendered == expected:
            tally.exact += 1
        if significant_lines(rendered) == significant_lines(expected):
            tally.same += 1
        else:
            tally.differing.append((str(project_dir / "templates" / template), str(expected), rendered))


def _constant(value):
    return lambda: value


def _templates(meta):
    cwd = os.getcwd()
    os.chdir(meta.project_dir)  # the reference lists templates relative to the working directory
    try:
        return list(meta.find_templates(meta.config_prefix))
    finally:
        os.chdir(cwd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", required=True, type=Path, help="a checkout of jdinalt/forgather")
    parser.add_argument("-v", "--verbose", action="store_true", help="name every config that differs")
    parser.add_argument("--show", type=int, default=0, metavar="N", help="print the first N differences as diffs")
    args = parser.parse_args(argv)
    meta_config, config = import_reference(args.reference.resolve())
    preprocess = importlib.import_module("forgather_reference.preprocess")
    clock = {key: _constant(preprocess.PPEnvironment.default_globals[key]()) for key in CLOCK_GLOBALS}
    tally = Tally()
    roots = [args.reference.resolve() / "examples", args.reference.resolve() / "templatelib"]
    for root in roots:
        for meta_file in sorted(root.rglob("meta.yaml")):
            if "forgather_workspace" in meta_file.parts:
                continue
            try:
                compare_project(meta_file.parent, meta_config, config, clock, tally)
            except Exception as error:  # the reference cannot read this project: say so, go on
                print(f"skipped {meta_file.parent}: the reference fails on it ({type(error).__name__}: {error})")
    compared = tally.configs - tally.reference_failed
    print(f"{tally.same}/{compared} configs render the same (blank and comment lines aside), {tally.exact} exactly;"
          f" {tally.reference_failed} that the reference itself cannot render left out")
    if tally.warned:
        print(f"{tally.warned} configs warned (ours: e.g. a block no ancestor defines)")
    if tally.lent:
        print(f"globals lent to ours from the reference: {', '.join(sorted(tally.lent))}")
    if args.verbose:
        for path, _, rendered in tally.differing:
            print(f"differs: {path}" + (f" ({rendered.splitlines()[0]})" if rendered.startswith("<error>") else ""))
    if args.show:
        import difflib

        for path, expected, rendered in tally.differing[: args.show]:
            diff = difflib.unified_diff(significant_lines(expected), significant_lines(rendered), "reference", "ours", lineterm="", n=1)
            print(f"--- {path}\n" + "\n".join(list(diff)[2:40]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
