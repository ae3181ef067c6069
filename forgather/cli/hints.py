"""Close matches for a misspelled command-line option, for `forgather` and `python -m forgather.run`.

Python's argparse names an unrecognized option but suggests nothing before Python 3.14 (`suggest_on_error`);
this adds the suggestion for the versions we support. Imports only the standard library."""

from __future__ import annotations

import argparse
import difflib


def unrecognized(extras: list[str], parsers: list[argparse.ArgumentParser]) -> str:
    """argparse's "unrecognized arguments: ..." message, with the close options of `parsers` for each
    misspelled one."""
    options = [option for parser in parsers for action in parser._actions for option in action.option_strings]
    hints = []
    for extra in extras:
        name = extra.split("=", 1)[0]
        close = difflib.get_close_matches(name, options, n=2, cutoff=0.7) if name.startswith("-") else []
        if close:
            hints.append(f"{name}: did you mean {' or '.join(close)}?")
    return f"unrecognized arguments: {' '.join(extras)}" + (f" ({'; '.join(hints)})" if hints else "")


class HintingParser(argparse.ArgumentParser):
    """An ArgumentParser whose unrecognized-arguments error suggests the close options."""

    def error(self, message: str):  # type: ignore[override]
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            message = unrecognized(message[len(prefix):].split(" "), [self])
        super().error(message)
