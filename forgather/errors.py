"""The one error reporter of the project, for `forgather` and `python -m forgather.run` (and each sweep point).

A mistake the user can fix is printed as one line on stderr, no traceback:

    error: <file:line or config key>: <what went wrong> ; <what to do>

(a template error adds the extends/include chain that led there, one `  from FILE:LINE` line each). What
counts as such a mistake: a `UserError` (the base of every stage's error: template, graph, override,
construct), a `ValueError`/`KeyError`/`FileNotFoundError` raised by our own checks, and an `OSError` of a
full disk, a quota, a read-only file system or a denied permission, found anywhere in the error's chain
(a library may wrap it in an error of its own). Notes added with `add_note` (the override that set a
failing key) are appended to the line. Anything else is a bug: its traceback is printed.
FORGATHER_DEBUG=1 prints the traceback of every error.

Exit codes: 2 for a mistake, 3 for a run aborted through `forgather control abort`, 128 + N for a run stopped by
signal N after its checkpoint (143 for SIGTERM, 130 for Ctrl-C), 1 for anything else.
A misspelled command-line option is named with the close ones (`unrecognized`, `HintingParser`).
This module imports nothing heavy: the CLI reports errors before torch is ever loaded.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import os
import sys
import traceback
from typing import Callable, Iterable, Iterator, TextIO

DEBUG_ENV = "FORGATHER_DEBUG"
# Strict mode turns the checks the reference Forgather's projects must pass (a block no ancestor defines, a
# repeated YAML key) from warnings into errors: `--strict`, or FORGATHER_STRICT=1.
STRICT_ENV = "FORGATHER_STRICT"


def strict_mode() -> bool:
    return os.environ.get(STRICT_ENV, "") not in ("", "0")

# Errors raised by our own input checks, worded for the user.
_PLAIN_MISTAKES = (ValueError, KeyError, FileNotFoundError)

# errno -> what to do about it.
_ENVIRONMENT = {
    errno.ENOSPC: "free some space, or write elsewhere (--outputs DIR)",
    errno.EDQUOT: "free some space under your quota, or write elsewhere (--outputs DIR)",
    errno.EROFS: "write elsewhere (--outputs DIR)",
    errno.EACCES: "you may not write there: fix its permissions, or write elsewhere (--outputs DIR)",
    errno.EPERM: "you may not write there: fix its permissions, or write elsewhere (--outputs DIR)",
}


class UserError(Exception):
    """A mistake the user can fix (bad input, an unsuitable machine); its message says where and what to do."""


class MachineError(UserError, RuntimeError):
    """The machine lacks what the config asks for (a CUDA GPU, enough memory); the message says what to change."""


def causes(error: BaseException) -> Iterator[BaseException]:
    """`error`, then what it was raised from (or during), down to the first cause."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _environment_error(error: BaseException) -> OSError | None:
    return next((e for e in causes(error) if isinstance(e, OSError) and e.errno in _ENVIRONMENT), None)


def describe(error: BaseException) -> str | None:
    """The one-line report of a user's mistake (without the `error: ` prefix), or None for a bug."""
    found = None if isinstance(error, UserError) else _environment_error(error)  # our own wording comes first
    if found is not None:
        where = found.filename2 or found.filename or ""  # a failed copy or move names its destination second
        hint = _ENVIRONMENT[found.errno]
        if found.errno in (errno.ENOSPC, errno.EDQUOT) and str(where).endswith(".ckpt"):
            # A checkpoint: the run has a directory and whole checkpoints to go on from, not a new place to pick.
            hint = ("free some space, then go on with --resume RUN_DIR: the checkpoints written before are whole (each is "
                    "written aside and renamed into place) ; a run's keep_checkpoints=N keeps only its newest N step checkpoints")
        return f"{where}: {found.strerror} ; {hint}" if where else f"{found.strerror} ; {hint}"
    if not isinstance(error, (UserError, *_PLAIN_MISTAKES)):
        return _dataloader_worker_died(error)
    text = _raised_in_worker(error, str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error))
    first, *chain = text.split("\n")  # a template error's `  from FILE:LINE` lines stay below
    return "\n".join([" ; ".join([first, *getattr(error, "__notes__", ())]), *chain])


def _dataloader_worker_died(error: BaseException) -> str | None:
    """torch's "DataLoader worker (pid(s) N) exited unexpectedly" (and the signal that ended it, which its own
    cause names) as what to do: a worker killed outright is most often the out-of-memory killer's doing, a bus
    error a full /dev/shm (a container's default is 64 MB); None for any other error."""
    texts = [str(e) for e in causes(error) if isinstance(e, RuntimeError)]
    if not any(text.startswith("DataLoader worker (pid") for text in texts):
        return None
    died = next((t for t in texts if "killed by signal" in t or "exited unexpectedly with exit code" in t), texts[0])
    died = died.split(". ")[0].rstrip(". ")
    if "signal: Killed" in died:
        why = ("most often the kernel's out-of-memory killer (`dmesg` says): lower the DataLoader's num_workers "
               "(+datamodule.num_workers=N) or the batch size")
    elif "signal: Bus error" in died:
        why = ("its shared memory ran out (/dev/shm; a container's is 64 MB by default): give it more (docker "
               "--shm-size=8g) or set num_workers=0 (+datamodule.num_workers=0)")
    else:
        why = "rerun with num_workers=0 (+datamodule.num_workers=0) to see the error in this process"
    return f"{died}: {why}"


def _raised_in_worker(error: BaseException, text: str) -> str:
    """The message a mistake raised in a DataLoader worker process had there (a damaged data file), not torch's
    re-raised "Caught UserError in DataLoader worker process 0." followed by the worker's whole traceback."""
    kind = type(error)
    marker = f"\n{kind.__module__}.{kind.__qualname__}: " if kind.__module__ != "builtins" else f"\n{kind.__qualname__}: "
    if text.startswith(f"Caught {kind.__name__} in DataLoader worker process ") and marker in text:
        return text.rsplit(marker, 1)[1].rstrip("\n")
    return text


def report(error: BaseException, stream: TextIO | None = None) -> int:
    """Print `error` for the user (see the module docstring) and return the process exit code."""
    stream = stream or sys.stderr
    if type(error).__name__ == "JobAborted":  # callbacks/job_control.py: a requested stop, not a failure
        print(f"aborted: {error}", file=stream)
        return 3
    # An error every rank raises alike (a stop signal, a diverged run) carries its rank: rank 0 says it.
    exit_code = getattr(error, "exit_code", 2)
    if getattr(error, "rank", 0) != 0:
        return exit_code
    if type(error).__name__ == "JobStopped":  # callbacks/job_control.py: a stop signal, checkpoint saved
        print(f"stopped: {error}", file=stream, flush=True)
        return exit_code
    line = describe(error)
    if line is None or os.environ.get(DEBUG_ENV):
        traceback.print_exception(error, file=stream)
    if line is None:
        return 1
    print(f"error: {line}", file=stream, flush=True)
    return 2


def did_you_mean(word: str, candidates: Iterable[str], n: int = 3, cutoff: float = 0.6,
                 show: Callable[[str], str] = repr) -> str:
    """"did you mean 'a' or 'b'?" for the candidates close to `word` (difflib; each written by `show`), or ""
    when none is: every misspelled name the project reports is suggested through here."""
    # a name offered twice (an option of both `forgather` and its command) is suggested once
    close = difflib.get_close_matches(word, list(dict.fromkeys(candidates)), n=n, cutoff=cutoff)
    return f"did you mean {' or '.join(show(c) for c in close)}?" if close else ""


# -- command lines: a misspelled option ----------------------------------------------------------------------
# Python's argparse names an unrecognized option but suggests nothing before Python 3.14 (`suggest_on_error`);
# these add the suggestion, for `forgather` and `python -m forgather.run`.


def unrecognized(extras: list[str], parsers: list[argparse.ArgumentParser]) -> str:
    """argparse's "unrecognized arguments: ..." message, with the close options of `parsers` for each
    misspelled one."""
    options = [option for parser in parsers for action in parser._actions for option in action.option_strings]
    hints = []
    for extra in extras:
        name = extra.split("=", 1)[0]
        # not the option itself: an option known to another parser than the one that met it is no misspelling
        hint = did_you_mean(name, [o for o in options if o != name], n=2, cutoff=0.7, show=str) if name.startswith("-") else ""
        if hint:
            hints.append(f"{name}: {hint}")
    return f"unrecognized arguments: {' '.join(extras)}" + (f" ({'; '.join(hints)})" if hints else "")


class HintingParser(argparse.ArgumentParser):
    """An ArgumentParser whose unrecognized-arguments error suggests the close options."""

    def error(self, message: str):  # type: ignore[override]
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            message = unrecognized(message[len(prefix):].split(" "), [self])
        super().error(message)
