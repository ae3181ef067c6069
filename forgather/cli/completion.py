"""`forgather completion bash|zsh`: tab completion of the `forgather` command in bash and zsh.

    eval "$(forgather completion bash)"    # in ~/.bashrc
    eval "$(forgather completion zsh)"     # in ~/.zshrc, after compinit

The printed script asks `forgather completion --line LINE` (LINE: the command line up to the cursor) for the
words that may follow, one a line, whole words: subcommands and their options (read from the parsers
themselves); config names after -t; `--cfg`'s parts; for `train` (the runner's arguments) `+experiment=NAME`,
`group=option` and the config's keys; for `control` the registered jobs' ids and PIDs. Where none fits (a path
after -p), the shell completes file names. A keystroke must answer at once: nothing here imports torch, and a
config that does not render still completes everything else.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

# bash splits words at '=' and ':' (COMP_WORDBREAKS) where we complete whole `key=value` words: it passes the
# word as it sees it (--word), and each candidate is cut down to what replaces that word.
BASH = r"""_forgather_complete() {
    local IFS=$'\n' word="${COMP_WORDS[COMP_CWORD]}"
    [[ "$word" =~ ^[[:space:]]*$ ]] && word=""
    COMPREPLY=($(forgather completion --line "${COMP_LINE:0:COMP_POINT}" --word "$word" 2>/dev/null))
    # `key=` continues the word: no space after it.
    local found
    for found in "${COMPREPLY[@]}"; do
        [[ "$found" == *= ]] || return 0
    done
    [[ ${#COMPREPLY[@]} -gt 0 ]] && compopt -o nospace
}
complete -o default -F _forgather_complete forgather
"""

ZSH = r"""_forgather_complete() {
    local -a found spaced unspaced
    found=(${(f)"$(forgather completion --line "${BUFFER[1,CURSOR]}" 2>/dev/null)"})
    if (( ! $#found )); then
        _files
        return
    fi
    local word
    for word in $found; do
        if [[ $word == *= ]]; then unspaced+=("$word"); else spaced+=("$word"); fi
    done
    (( $#spaced )) && compadd -Q -- $spaced
    (( $#unspaced )) && compadd -Q -S '' -- $unspaced
}
compdef _forgather_complete forgather
"""

SCRIPTS = {"bash": BASH, "zsh": ZSH}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shell", nargs="?", choices=sorted(SCRIPTS), help="print the completion script for this shell")
    parser.add_argument("--line", help="print the completions of this command line (what the scripts call)")
    parser.add_argument("--word", help=argparse.SUPPRESS)  # bash's view of the word being completed


def run(args: argparse.Namespace) -> int:
    if args.line is not None:
        for word in candidates(args.line):
            print(_as_bash_replacement(word, args.line, args.word) if args.word is not None else word)
        return 0
    if args.shell is None:
        raise ValueError("name the shell: `forgather completion bash` or `forgather completion zsh`")
    print(SCRIPTS[args.shell], end="")
    return 0


def candidates(line: str) -> list[str]:
    """The whole words that may replace the last (partial) word of `line`, sorted."""
    *before, current = split_words(line)
    state = _walk(before[1:])  # before[0] is the program's name
    return sorted({word for word in state.propose(current) if word.startswith(current)})


def split_words(line: str) -> list[str]:
    """The shell words of a partly typed line; the last is the one being completed ('' after a space).
    An unclosed quote (a word half-typed) closes at the end."""
    for closing in ("", '"', "'"):
        with contextlib.suppress(ValueError):
            words = shlex.split(line + closing)
            break
    else:
        words = line.split()
    if not line or line[-1].isspace() and not closing:
        words.append("")
    return words or [""]


def _as_bash_replacement(word: str, line: str, bash_word: str) -> str:
    """What replaces bash's current word: bash saw only the part after the last '=' or ':' (its word breaks)."""
    current = split_words(line)[-1]
    if current.endswith(bash_word):
        return bash_word + word[len(current) :]
    return word


@dataclass
class _State:
    """Where the words before the cursor left the parse: the innermost parser, the subcommands that led to
    it, option values given, positionals, and an option still waiting for its value."""

    parser: argparse.ArgumentParser
    path: list[str] = field(default_factory=list)
    values: dict[str, list[str]] = field(default_factory=dict)
    positionals: list[str] = field(default_factory=list)
    pending: argparse.Action | None = None

    def value(self, dest: str, default: str | None = None) -> str | None:
        return self.values.get(dest, [default])[-1]

    def propose(self, current: str) -> list[str]:
        if self.pending is not None:
            return self._option_values(self.pending)
        subcommands = _subcommands(self.parser)
        flag, equals, _ = current.partition("=")
        action = self.parser._option_string_actions.get(flag) if current.startswith("--") and equals else None
        if action is not None and action.nargs != 0:  # `--format=t`: the value, in the word of its option
            return [f"{flag}={value}" for value in self._option_values(action)]
        if current.startswith("-"):
            return [flag for action in self.parser._actions for flag in action.option_strings]
        if subcommands is not None:
            return list(subcommands.choices)
        positionals = [action for action in self.parser._actions if not action.option_strings]
        if len(self.positionals) < len(positionals) and positionals[len(self.positionals)].choices:
            return [str(choice) for choice in positionals[len(self.positionals)].choices]
        if self.path[:1] == ["train"]:
            return _override_words(self, current)
        if self.path[:1] == ["control"] and self.path[1:] not in (["list"], ["cleanup"]) and not self.positionals:
            return _job_words()
        return []

    def _option_values(self, action: argparse.Action) -> list[str]:
        if action.choices:
            return [str(choice) for choice in action.choices]
        if action.dest == "cfg":
            from forgather.run import CFG_PARTS

            return list(CFG_PARTS)
        if action.dest == "config":
            return _project_configs(self)
        return []  # a path or a number: the shell's own completion


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    # argparse keeps its actions private; reading them is how a parser can be walked at all.
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _walk(words: list[str]) -> _State:
    """Parse `words` as far as they go, loading each subcommand's arguments as it is entered."""
    from forgather.cli.main import add_command_arguments, build_parser

    parser, top_level = build_parser()
    state = _State(parser)
    words = iter(words)
    for word in words:
        flag = word.split("=", 1)[0] if word.startswith("--") else word
        action = state.parser._option_string_actions.get(flag)
        if action is not None:
            if action.nargs != 0:
                value = word.split("=", 1)[1] if flag != word else next(words, None)
                if value is None:
                    state.pending = action
                    break
                state.values.setdefault(action.dest, []).append(value)
            continue
        subcommands = _subcommands(state.parser)
        if subcommands is not None and word in subcommands.choices:
            state.parser = subcommands.choices[word]
            if not state.path:
                add_command_arguments(top_level[word], word)
            state.path.append(word)
            state.positionals = []
        else:
            state.positionals.append(word)
    return state


def _project(state: _State):
    from forgather.project import META_FILE, Project

    root = Path(state.value("project", ".")).resolve()
    return Project.load(str(root)) if (root / META_FILE).is_file() else Project(str(root), {})


def _project_configs(state: _State) -> list[str]:
    with contextlib.suppress(Exception):
        return list(_project(state).configs())
    return []


def override_words(text: str, groups: dict[str, list[str]], config_keys: Callable[[], Iterable[str]]) -> list[str]:
    """Completions of one override word: `group=option` once the `=` is typed; before it the groups (not the
    template directories) and the config's keys, each ending in `=` (after `+`, `++`, `~` as typed). Shared by
    the shell completion here and `forgather -i`. `config_keys` may raise: a config that does not render offers
    the groups alone."""
    from forgather.run import TEMPLATE_DIRS

    prefix = text[: len(text) - len(text.lstrip("+~"))]
    key, equals, value = text[len(prefix) :].partition("=")
    if equals:
        return [f"{prefix}{key}={option}" for option in groups.get(key, []) if option.startswith(value)]
    keys = {group for group in groups if "/" not in group and group not in (*TEMPLATE_DIRS, "experiment")}
    if prefix.startswith("+"):
        keys.add("experiment")  # +experiment=NAME
    with contextlib.suppress(Exception):
        keys |= set(config_keys())
    suffix = "" if prefix == "~" else "="
    return sorted(f"{prefix}{k}{suffix}" for k in keys if k.startswith(key))


def _override_words(state: _State, current: str) -> list[str]:
    """For the runner: override words over the runner's groups and the experiment the line names."""
    from forgather.run import Runner, build_parser

    options = build_parser().parse_args([])
    options.project, options.template_path = state.value("project"), state.values.get("template_path", [])
    try:
        runner = Runner.create(options, [])
    except Exception:  # not a project: nothing of its own to offer
        return []
    return override_words(current, runner.groups, lambda: _config_keys(runner, state))


def _config_keys(runner, state: _State) -> list[str]:
    """The keys of the experiment the line names (-t or +experiment=), with its group choices applied."""
    from forgather import overrides as ovr

    choices = {}
    for word in state.positionals:
        key, equals, value = word.lstrip("+").partition("=")
        if equals and (key in runner.groups and value in runner.groups[key]):
            choices[key] = value
    if "experiment" not in choices and state.value("config"):
        choices["experiment"] = PurePosixPath(state.value("config")).with_suffix("").as_posix()
    _, loaded = runner.load(choices)
    return ovr.config_paths(loaded.config)


def _job_words() -> list[str]:
    from forgather.callbacks import job_registry

    with contextlib.suppress(OSError):
        return [word for job in job_registry.list_jobs() for word in (job.job_id, str(job.pid))]
    return []
