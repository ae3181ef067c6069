"""`forgather -i`: an interactive shell to browse projects and run the inspection commands.

A `cmd.Cmd` with readline completion of commands, directories, config names, targets and overrides. Each
command runs the module the CLI runs (`forgather.cli.<name>.run`) on the arguments that module's own parser
reads, inside the shell's current directory, so the shell and the CLI cannot drift apart:

    ls [DIR]                                     projects at and below DIR, with their configs
    cd [DIR]                                     change directory; one with a meta.yaml is the current project
    configs / index                              the current project's configs / its summary
    pp | graph | config | targets [CONFIG] ...   the stages of a config (the project's default config if omitted)
    code | construct [CONFIG] [TARGET] ...       Python source for, or the objects of, a target
    train [CONFIG] [OVERRIDES] ...               the runner, as `forgather -t CONFIG train`

The shell imports no torch; a command that builds objects imports what it needs when it runs. A failing
command prints its error and the shell goes on. The command history is kept between sessions, in
Forgather's cache directory (`shell_history`).
"""

from __future__ import annotations

import argparse
import cmd
import contextlib
import importlib
import os
import shlex
import sys
from typing import IO

from forgather.cli.main import COMMANDS
from forgather.project import META_FILE, Project
from forgather.template import TemplateError

# Config commands whose second word names a target.
_TARGET_COMMANDS = ("code", "construct")
HISTORY_LENGTH = 1000


def history_file() -> str:
    """Where the shell keeps its command history between sessions (in Forgather's cache directory)."""
    from forgather.data.cache import cache_dir

    return str(cache_dir() / "shell_history")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    ForgatherShell(args.project, args.template_path).cmdloop()
    return 0


def _words(line: str) -> list[str]:
    """The words of a command line; an unclosed quote (half-typed while completing) ends a word."""
    try:
        return shlex.split(line)
    except ValueError:
        return line.split()


class ForgatherShell(cmd.Cmd):
    """The shell. `stdin`/`stdout` as for `cmd.Cmd` (a given stdin reads commands without readline)."""

    intro = "Forgather shell: `help` lists the commands, TAB completes, `quit` leaves."

    def __init__(
        self, directory: str = ".", template_paths: list[str] | tuple[str, ...] = (), stdin: IO[str] | None = None,
        stdout: IO[str] | None = None,
    ) -> None:
        super().__init__(stdin=stdin, stdout=stdout)
        self.use_rawinput = stdin is None
        self.start = self.directory = os.path.abspath(directory)
        self.template_paths = [os.path.abspath(p) for p in template_paths]
        self._set_prompt()

    def cmdloop(self, intro: str | None = None) -> None:
        while True:
            try:
                super().cmdloop(intro)
                return
            except KeyboardInterrupt:  # Ctrl-C at the prompt drops the line typed, as Python's REPL does
                print("^C", file=self.stdout)
                intro = ""

    # -- state ------------------------------------------------------------------------------------------

    @property
    def project(self) -> Project | None:
        """The project in the current directory, if it is one (and its meta.yaml reads)."""
        if not os.path.isfile(os.path.join(self.directory, META_FILE)):
            return None
        try:
            return Project.load(self.directory)
        except TemplateError:
            return None

    def _set_prompt(self) -> None:
        project = self.project
        label = project.name if project else os.path.basename(self.directory) or self.directory
        self.prompt = f"forgather ({label})> "

    # -- running the CLI's modules ----------------------------------------------------------------------

    def invoke(self, command: str, argv: list[str], config: str | None = None) -> int:
        """Run `forgather [-t config] COMMAND argv...` from the current directory; returns its exit code."""
        module = importlib.import_module(COMMANDS[command][0])
        parser = argparse.ArgumentParser(prog=command, description=COMMANDS[command][1])
        module.add_arguments(parser)
        with contextlib.redirect_stdout(self.stdout), contextlib.chdir(self.directory):
            try:
                args = parser.parse_args(argv)
                args.project, args.config, args.template_path = ".", config, self.template_paths
                status = module.run(args)
            except SystemExit as exit_:  # argparse has printed the usage error, or --help
                status = exit_.code if isinstance(exit_.code, int) else 2
            except KeyboardInterrupt:
                print("interrupted")
                status = 130
            except Exception as error:  # the shell survives whatever one command does
                status = _report(error)
        return status

    def _split_config(self, words: list[str]) -> tuple[str | None, list[str]]:
        """(CONFIG, the rest): the first word is the config when it names one; else the default config."""
        project = self.project
        if words and project is not None and (words[0] in self._config_names(project) or words[0].endswith((".yaml", ".yml"))):
            return words[0], words[1:]
        return None, words

    @staticmethod
    def _config_names(project: Project) -> set[str]:
        names = set(project.configs())
        return names | {os.path.splitext(name)[0] for name in names}

    def _config_command(self, command: str, line: str) -> None:
        config, rest = self._split_config(_words(line))
        if command in _TARGET_COMMANDS and rest and not rest[0].startswith("-"):
            rest = ["--target", rest[0], *rest[1:]]
        self.invoke(command, rest, config)

    # -- commands ---------------------------------------------------------------------------------------

    def do_ls(self, line: str) -> None:
        """ls [DIR]: projects at and below DIR (default: here), each with its configs and their descriptions."""
        self.invoke("ls", ["-r", *_words(line)])

    def do_cd(self, line: str) -> None:
        """cd [DIR]: change directory (no DIR: back to where the shell started); a project directory becomes
        the current project."""
        words = _words(line)
        target = os.path.normpath(os.path.join(self.directory, os.path.expanduser(words[0]))) if words else self.start
        if not os.path.isdir(target):
            print(f"error: no directory {target}", file=self.stdout)
            return
        self.directory = target
        self._set_prompt()
        project = self.project
        if project is not None:
            print(f"{project.name}: {project.description}", file=self.stdout)

    def do_configs(self, line: str) -> None:
        """configs: the current project's configs, with their descriptions."""
        if self._require_project():
            self.invoke("ls", [])

    def do_index(self, line: str) -> None:
        """index: the current project's summary (meta.yaml, configs, template search path, model source)."""
        if self._require_project():
            self.invoke("index", [])

    def do_pp(self, line: str) -> None:
        """pp [CONFIG] [--jinja]: the rendered YAML (template stage)."""
        self._config_command("pp", line)

    def do_graph(self, line: str) -> None:
        """graph [CONFIG] [--format yaml|python]: the node graph."""
        self._config_command("graph", line)

    def do_config(self, line: str) -> None:
        """config [CONFIG] [--resolve]: the OmegaConf config (Hydra vocabulary)."""
        self._config_command("config", line)

    def do_targets(self, line: str) -> None:
        """targets [CONFIG]: the config's targets."""
        self._config_command("targets", line)

    def do_code(self, line: str) -> None:
        """code [CONFIG] [TARGET]: Python code whose construct() builds TARGET (default: main if the config has one, else every target)."""
        self._config_command("code", line)

    def do_construct(self, line: str) -> None:
        """construct [CONFIG] [TARGET] [--call]: build TARGET (default: main if the config has one, else every target) and print it."""
        self._config_command("construct", line)

    def do_train(self, line: str) -> None:
        """train [CONFIG] [OVERRIDES] [-m] [--cfg] [--dry-run] [-d GPUS]: train, as `forgather -t CONFIG train`."""
        self._config_command("train", line)

    def do_quit(self, line: str) -> bool:
        """quit: leave the shell (also `exit` or Ctrl-D)."""
        return True

    do_exit = do_quit

    def do_help(self, arg: str) -> None:
        """help [COMMAND]: the commands, or one command with its options."""
        super().do_help(arg)
        if arg in COMMANDS and hasattr(self, f"do_{arg}"):
            parser = argparse.ArgumentParser(prog=arg, add_help=False)
            importlib.import_module(COMMANDS[arg][0]).add_arguments(parser)
            options = parser.format_help().partition("\n\n")[2]
            if options.strip():
                print(options.rstrip(), file=self.stdout)

    def emptyline(self) -> bool:
        return False  # cmd.Cmd would repeat the last command: a surprise when that was `train`

    def default(self, line: str) -> bool:
        if line == "EOF":  # Ctrl-D, or the end of piped input (handled here to keep it out of `help`)
            print(file=self.stdout)
            return True
        print(f"unknown command: {line.split()[0]} (`help` lists the commands)", file=self.stdout)
        return False

    def _require_project(self) -> bool:
        try:
            Project.load(self.directory)
        except (OSError, TemplateError) as error:
            print(f"error: {error} (`ls` finds projects, `cd` enters one)", file=self.stdout)
            return False
        return True

    # -- readline: history and completion ---------------------------------------------------------------

    def preloop(self) -> None:
        if self.use_rawinput:
            with contextlib.suppress(ImportError):
                import readline

                # Words, not path segments or `key=value` halves, are what the completers complete.
                readline.set_completer_delims(" \t\n")
                with contextlib.suppress(OSError):
                    readline.read_history_file(history_file())

    def postloop(self) -> None:
        if self.use_rawinput:
            with contextlib.suppress(ImportError, OSError):
                import readline

                readline.set_history_length(HISTORY_LENGTH)
                readline.write_history_file(history_file())

    def complete_cd(self, text: str, line: str, begidx: int, endidx: int) -> list[str]:
        return self.directories_matching(text)

    complete_ls = complete_cd

    def _complete_config_line(self, text: str, line: str, begidx: int, endidx: int) -> list[str]:
        """The word after a config command: a config name, then a target (code, construct) or an override
        (train)."""
        command, *before = _words(line[:begidx])  # the words before the one being completed
        config, rest = self._split_config(before)
        if not before:
            return self.configs_matching(text)
        if command in _TARGET_COMMANDS and not rest:
            return self.targets_matching(config, text)
        if command == "train":
            return self.overrides_matching(config, text)
        return []

    complete_pp = complete_graph = complete_config = complete_targets = _complete_config_line
    complete_code = complete_construct = complete_train = _complete_config_line

    def directories_matching(self, text: str) -> list[str]:
        """Directories (ending in '/') whose path starts with `text`, relative to the current directory."""
        head, tail = os.path.split(text)
        parent = os.path.join(self.directory, os.path.expanduser(head))
        try:
            names = sorted(e.name for e in os.scandir(parent) if e.is_dir() and not e.name.startswith((".", "__")))
        except OSError:
            return []
        names += [".."] if tail.startswith(".") else []
        return [os.path.join(head, name) + "/" for name in names if name.startswith(tail)]

    def configs_matching(self, text: str) -> list[str]:
        project = self.project
        return [name for name in project.configs() if name.startswith(text)] if project else []

    def targets_matching(self, config: str | None, text: str) -> list[str]:
        project = self.project
        try:
            targets = project.load_config(config, tuple(self.template_paths)).graph.targets if project else []
        except Exception:  # a config that does not render has nothing to complete
            return []
        return [target for target in targets if target.startswith(text)]

    def overrides_matching(self, config: str | None, text: str) -> list[str]:
        """`group=option` for the groups on the search path; `key=` for the config's value keys."""
        from forgather import overrides as ovr
        from forgather.cli.completion import override_words

        project = self.project
        if project is None:
            return []
        groups = ovr.find_groups(project.search_path(self.template_paths))
        return override_words(
            text, groups, lambda: ovr.config_paths(project.load_config(config, tuple(self.template_paths)).config)
        )


def _report(error: Exception) -> int:
    """The CLI's error report: one line for a user's mistake, a traceback for anything else."""
    from forgather.errors import report

    return report(error)
