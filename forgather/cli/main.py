"""The `forgather` command: global options, then one subcommand, each in a module of its own.

Subcommand modules are imported only when chosen, so `forgather --help` and `forgather pp` stay free of
torch and Lightning. A subcommand module provides `add_arguments(parser)` and `run(args) -> int`.

The commands that load a config also take the arguments the config declares (its `dynamic_args`): when
the command line has arguments the command does not know (or asks for --help), the config is loaded once
to add them; their values reach the template as `args.dynamic`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from forgather.errors import STRICT_ENV, unrecognized

# name -> (module, one-line help). Order is the order of `forgather --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "ls": ("forgather.cli.ls", "list projects and their configs"),
    "index": ("forgather.cli.index", "summarize a project (meta.yaml, configs, search path)"),
    "meta": ("forgather.cli.meta", "print the project's meta.yaml as read, and the search path it leads to"),
    "tlist": ("forgather.cli.tlist", "list every template on the project's search path, with its file"),
    "pp": ("forgather.cli.pp", "print a config's rendered YAML (template stage)"),
    "graph": ("forgather.cli.graph", "print the node graph (YAML tag syntax or Python)"),
    "config": ("forgather.cli.config", "print the OmegaConf config (Hydra vocabulary)"),
    "targets": ("forgather.cli.targets", "list a config's targets"),
    "trefs": ("forgather.cli.trefs", "list the templates a config is made of (files, or the tree of references)"),
    "code": ("forgather.cli.code", "print Python code that constructs a target"),
    "construct": ("forgather.cli.construct", "construct a target and print it"),
    "train": ("forgather.cli.train", "train a config of the project (python -m forgather.run)"),
    "tb": ("forgather.cli.tb", "start TensorBoard on the project's runs"),
    "control": ("forgather.cli.control", "list running training jobs; status/save/stop/abort them"),
    "new": ("forgather.cli.new", "create a project from examples/template_project (or another example)"),
    "inf": ("forgather.cli.inf", "serve a model with an OpenAI-compatible API, or talk to one (server|client)"),
    "convert": ("forgather.cli.convert", "convert models between Hugging Face and Forgather formats"),
    "export": ("forgather.cli.export", "write a run's checkpoint as a model directory (while it trains, or after)"),
    "data": ("forgather.cli.data", "prepare corpora into token shards for data=streaming"),
    "shell": ("forgather.cli.shell", "an interactive shell over these commands (also: forgather -i)"),
    "completion": ("forgather.cli.completion", "print a bash or zsh tab-completion script: eval \"$(forgather completion bash)\""),
}
# The reference Forgather's commands that have no counterpart of that name here, and what to use instead.
REFERENCE_ONLY_COMMANDS = {
    "dataset": "look at a dataset with `forgather -t CONFIG construct --target train_dataset`; prepare a corpus "
               "with `forgather data prepare`",
    "model": "build a config's model with `forgather -t CONFIG construct --target model` (its code: `code --target model`)",
    "ws": "a workspace is a directory holding a forgather_workspace/ directory (its meta_defaults.yaml); create "
          "projects in it with `forgather new DIR`",
    "project": "create a project with `forgather new DIR` (a copy of examples/template_project)",
    "checkpoint": "write a run's checkpoint as a model directory with `forgather export RUN_DIR`",
    "update-vocab": "add tokens while converting a model: `forgather convert --add-tokens TOKEN ... SRC DST`",
}
# Commands that load the chosen config, and so accept the arguments it declares.
CONFIG_COMMANDS = {"pp", "graph", "config", "targets", "trefs", "code", "construct", "train"}
# Commands whose whole work is printing: a reader that stops early (`| head`) ends them with success.
PRINTING_COMMANDS = {"ls", "index", "meta", "tlist", "pp", "graph", "config", "targets", "trefs", "code", "construct", "completion"}
# Commands that pass the words after `--` to the program they start (`forgather tb -- --bind_all`), untouched.
PASSTHROUGH_COMMANDS = {"tb"}
# Commands whose output -o writes to a file or -e opens in an editor, as the reference Forgather's do; the
# suffix the editor's file gets.
OUTPUT_COMMANDS = {"index": ".txt", "meta": ".yaml", "tlist": ".txt", "pp": ".yaml", "graph": ".yaml",
                   "config": ".yaml", "targets": ".txt", "trefs": ".txt", "code": ".py", "construct": ".txt"}
# A --format that prints another kind of text gives the editor's file its suffix (`trefs --format svg -e`).
FORMAT_SUFFIXES = {"md": ".md", "dot": ".dot", "svg": ".svg", "python": ".py", "fconfig": ".txt", "repr": ".txt"}


# `forgather`'s own options as (flags, add_argument keywords): one table serves the top-level parser and the
# chosen command's, so that they may stand before or after the command (`forgather -t a.yaml pp` or `forgather pp
# -t a.yaml`), as the reference Forgather takes them; its long names (--project-dir, --config-template) are aliases.
GLOBAL_OPTIONS: tuple[tuple[tuple[str, ...], dict], ...] = (
    (("-p", "--project", "--project-dir"), dict(dest="project", default=".", help="project directory (default: current directory)")),
    (("-t", "--config", "--config-template"), dict(dest="config", help="config of the project (name in templates/configs, e.g. base.yaml)")),
    (("--template-path",), dict(action="append", default=[], metavar="DIR", help="extra template directory (repeatable)")),
    (("-i", "--interactive"), dict(action="store_true", help="start the interactive shell")),
    (("--no-dyn",), dict(action="store_true", help="do not read the config's own arguments (dynamic_args)")),
    (("--strict",), dict(action="store_true", help="warnings about likely mistakes (a block no template extends, a repeated YAML key) are errors (FORGATHER_STRICT=1)")),
)
# A repeatable option given after the command lands here, to be added to those given before it: argparse copies
# the command's namespace over the top level's, which would drop the earlier ones.
_AFTER = "after_command_"


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `forgather` parser and one empty subparser a command: `add_command_arguments` fills the chosen one."""
    parser = argparse.ArgumentParser(
        prog="forgather",
        description="Forgather: templates -> YAML -> node graph -> OmegaConf config -> Python objects.",
    )
    for flags, options in GLOBAL_OPTIONS:
        parser.add_argument(*flags, **options)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers = {
        name: commands.add_parser(name, help=help_text, description=help_text, add_help=False)
        for name, (_, help_text) in COMMANDS.items()
    }
    return parser, subparsers


def add_command_arguments(subparser: argparse.ArgumentParser, command: str):
    """Import the module of `command` and add its arguments to its subparser, then `forgather`'s own options
    that the command does not define itself; returns the module."""
    module = importlib.import_module(COMMANDS[command][0])
    subparser.add_argument("-h", "--help", action="help", help="show this help message and exit")
    module.add_arguments(subparser)
    if command in OUTPUT_COMMANDS:
        output = subparser.add_mutually_exclusive_group()
        output.add_argument("-o", "--output-file", metavar="FILE", help="write the output to FILE (whole or not at all)")
        output.add_argument("-e", "--edit", action="store_true", help="open the output in $VISUAL or $EDITOR")
    group = subparser.add_argument_group("options of forgather (also before the command)")
    for flags, options in GLOBAL_OPTIONS:
        free = [flag for flag in flags if flag not in subparser._option_string_actions]
        if len(free) == len(flags):  # a command's own option of that name (train's --strict) keeps its meaning
            dest = options.get("dest") or flags[-1].lstrip("-").replace("-", "_")
            if options.get("action") == "append":
                dest = _AFTER + dest
            group.add_argument(*free, **{**options, "dest": dest, "default": argparse.SUPPRESS})
    return module


def parse_known(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """parser.parse_known_args, with the repeatable options given after the command added to those before it."""
    args, extras = parser.parse_known_args(argv)
    for name in [name for name in vars(args) if name.startswith(_AFTER)]:
        dest = name[len(_AFTER):]
        setattr(args, dest, [*getattr(args, dest), *getattr(args, name)])
        delattr(args, name)
    return args, extras


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, subparsers = build_parser()
    word = _command_word(argv)
    if word in REFERENCE_ONLY_COMMANDS:
        print(f"error: forgather {word} is the reference Forgather's command; here, {REFERENCE_ONLY_COMMANDS[word]}",
              file=sys.stderr)
        return 2
    known, _ = parser.parse_known_args(argv)
    if known.interactive and known.command is None:
        argv = [*argv, "shell"]
        known.command = "shell"
    if known.command is None:
        parser.print_help()
        return 0
    passthrough: list[str] = []
    if known.command in PASSTHROUGH_COMMANDS and "--" in argv:
        argv, passthrough = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    subparser = subparsers[known.command]
    module = add_command_arguments(subparser, known.command)
    known = _with_global_options(known, argv)
    if known.strict:
        os.environ[STRICT_ENV] = "1"  # an environment variable, so that the runner's processes inherit it
    try:
        dests = _declare_config_arguments(parser, subparser, known, argv)
        args, extras = parse_known(parser, argv)
        # Overrides may stand anywhere among the options, as `python -m forgather.run` (an intermixed parse)
        # takes them; argparse takes one run of positionals per subcommand and hands back the later ones.
        if extras and isinstance(getattr(args, "overrides", None), list) and not any(e.startswith("-") for e in extras):
            args.overrides += extras
        elif extras:  # argparse's way out (usage, exit code 2), naming the close options
            parser.error(unrecognized(extras, [parser, subparser]))
        if not os.path.isdir(args.project):  # else each command says only that it found no project there
            from forgather.errors import UserError

            raise UserError(f"-p {args.project}: no such directory; give a project directory (one with a meta.yaml)")
        args.dynamic = _dynamic_values(args, dests)
        args.argv = argv  # the words as given: which options the line set, for a command that needs to know
        args.passthrough = passthrough
        if getattr(args, "output_file", None) is not None or getattr(args, "edit", False):
            return _run_into_file(module, args)
        return module.run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader closed the pipe (`forgather pp | head -5`). No traceback: stdout goes to /dev/null, so that
        # the interpreter's last flush does not fail again; a printing command has done what its reader wanted
        # (0: a `set -o pipefail` pipeline does not fail on the reader's choice), any other ends as a process
        # killed by SIGPIPE would (141).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0 if known.command in PRINTING_COMMANDS else 141
    except Exception as error:  # one readable line for the user's mistakes; tracebacks only on request
        from forgather.errors import report

        return report(error)


def _command_word(argv: list[str]) -> str | None:
    """The first word of the line that is neither one of forgather's own options nor its value: the command."""
    valued = {flag for flags, options in GLOBAL_OPTIONS if options.get("action") != "store_true" for flag in flags}
    words = iter(argv)
    for word in words:
        if word in valued:
            next(words, None)
        elif word == "--":
            return None
        elif not word.startswith("-"):
            return word
    return None


def _with_global_options(known: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """`known` with forgather's own options read wherever they stand on the line, before the command's
    arguments are parsed (which may need the config they name, and must not stop at a command's --help or
    its missing positionals). A parser of those options alone: everything else is left over."""
    options = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flags, settings in GLOBAL_OPTIONS:
        options.add_argument(*flags, **settings)
    return argparse.Namespace(**{**vars(known), **vars(options.parse_known_args(argv)[0])})


def _run_into_file(module, args: argparse.Namespace) -> int:
    """Run a printing command with its output going to -o FILE (written through a temporary file renamed into
    place, so a failing command leaves an existing FILE as it was) or, with -e, to a file opened in the user's
    editor. What the command would have printed is captured whole: these commands print text, not streams."""
    import contextlib
    import io
    import shlex
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    from forgather.data.cache import atomic_write

    path = _output_path(args.output_file, args.command) if args.output_file is not None else None
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        code = module.run(args)
    if code != 0:  # no file from a command that failed; what it printed goes where it would have
        sys.stdout.write(captured.getvalue())
        return code
    if path is not None:
        mode = path.stat().st_mode & 0o7777 if path.exists() else None
        atomic_write(path, lambda tmp: tmp.write_text(captured.getvalue()))
        if mode is not None:  # atomic_write's new file is 0644: keep the permissions the user gave the old one
            os.chmod(path, mode)
        print(f"wrote {path}", file=sys.stderr)
        return 0
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or shutil.which("vi")
    if not editor:
        from forgather.errors import UserError

        raise UserError("-e: no editor found; set $EDITOR (or $VISUAL), or write the output with -o FILE")
    config = Path(args.config).stem + "_" if args.config else ""
    folder = Path(tempfile.mkdtemp(prefix="forgather-"))
    suffix = FORMAT_SUFFIXES.get(getattr(args, "format", None), OUTPUT_COMMANDS[args.command])
    path = folder / f"{config}{args.command}{suffix}"
    path.write_text(captured.getvalue())
    print(f"opening {path} in {editor}", file=sys.stderr)
    return subprocess.call([*shlex.split(editor), str(path)])


def _output_path(given: str, command: str) -> Path:
    """The file -o names, checked before the command runs: a directory, or a path through a file, is no place
    for it (else an IsADirectoryError or FileExistsError from the write, after the work is done)."""
    from pathlib import Path

    from forgather.data.cache import file_in_the_way
    from forgather.errors import UserError

    if not given:  # `-o "$OUT"` with OUT unset: not the terminal, which the user chose against
        raise UserError(f"-o '': no file named; give a file to write, e.g. -o {command}{OUTPUT_COMMANDS[command]}")
    path = Path(given).expanduser()
    if path.is_symlink():  # write its target, as the shell's `>` does: replacing the link would leave that stale
        path = path.resolve()
    if path.is_dir():
        example = path / f"{command}{OUTPUT_COMMANDS[command]}"
        raise UserError(f"-o {given}: is a directory; give a file to write, e.g. -o {example}")
    blocking = file_in_the_way(path)
    if blocking is not None:
        raise UserError(f"-o {given}: {blocking} is a file, not a directory; give a path whose folders are directories (or new)")
    return path


def _declare_config_arguments(parser: argparse.ArgumentParser, subparser: argparse.ArgumentParser, known: argparse.Namespace, argv: list[str]) -> list[str]:
    """Add the chosen config's declared arguments to `subparser` when the command line may use them."""
    if known.command not in CONFIG_COMMANDS or known.no_dyn:
        return []
    wants_help = "-h" in argv or "--help" in argv
    if not wants_help and not parser.parse_known_args(argv)[1]:
        return []
    from forgather.cli.common import declare_config_arguments

    try:
        return declare_config_arguments(subparser, known)
    except Exception:
        if wants_help:  # help still works for a config that does not load; the command itself reports why
            return []
        raise


def _dynamic_values(args: argparse.Namespace, dests: list[str]) -> dict:
    if not dests:
        return {}
    from forgather.project import dynamic_values

    return dynamic_values(args, dests)


if __name__ == "__main__":
    sys.exit(main())
