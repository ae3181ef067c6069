"""From token ids to the text a client sees: incremental detokenization and stop strings.

`TextStream(decode, stop)` takes a completion's tokens one at a time (`push`) and returns the text that is
safe to send: never the start of a possible stop string, never half a UTF-8 character. A stop string ends
the completion (`push` then returns a Delta with finish_reason "stop") and is not part of the text;
`finish(reason)` flushes what was held back. Decoding is incremental: each token decodes only a short
window (the tokens since the last complete character, plus the one before, whose text SentencePiece-style
tokenizers need to place a leading space), not the whole completion again, so a token costs the same at
the 10th or the 10,000th. The joined text equals decoding all the ids at once.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

REPLACEMENT_CHARACTER = "\ufffd"  # what a partial UTF-8 sequence decodes to


@dataclasses.dataclass
class Delta:
    """New text; the last Delta of a completion has `finish_reason` ("stop" or "length") and the token count."""

    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0


class IncrementalDetokenizer:
    """`add(token)` -> the new text that token completes ("" while a character is still partial)."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] is text already returned, decoded again as context
        self.read = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        context = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        if text.endswith(REPLACEMENT_CHARACTER) or len(text) <= len(context):
            return ""  # a partial character: wait for the bytes that complete it
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(context):]

    def rest(self) -> str:
        """What the held tokens decode to (a partial character at the end is dropped)."""
        context = self.decode(self.ids[self.prefix:self.read])
        return self.decode(self.ids[self.prefix:])[len(context):].rstrip(REPLACEMENT_CHARACTER)


class TextStream:
    """A completion's text as tokens arrive, holding back what might become a stop string."""

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()):
        self.detokenizer = IncrementalDetokenizer(decode)
        self.stop = stop
        self.text = ""
        self.emitted = 0
        self.tokens = 0

    def push(self, token: int) -> Delta | None:
        """The Delta this token releases (None: nothing new yet); finish_reason "stop" at a stop string."""
        self.tokens += 1
        self.text += self.detokenizer.add(token)
        stop_at = first_stop(self.text, self.stop, self.emitted)
        if stop_at is not None:
            return Delta(self.text[self.emitted:stop_at], "stop", self.tokens)
        safe = len(self.text) - held_back(self.text, self.stop)
        if safe <= self.emitted:
            return None
        delta = Delta(self.text[self.emitted:safe])
        self.emitted = safe
        return delta

    def finish(self, reason: str) -> Delta:
        """The last Delta: the held-back text (cut at a stop string the flush completes)."""
        self.text += self.detokenizer.rest()
        stop_at = first_stop(self.text, self.stop, self.emitted)
        if stop_at is not None:
            return Delta(self.text[self.emitted:stop_at], "stop", self.tokens)
        return Delta(self.text[self.emitted:], reason, self.tokens)


def first_stop(text: str, stop: tuple[str, ...], emitted: int) -> int | None:
    """Where the earliest stop string starts. Emitted text never holds the start of one (`held_back`), so the
    search begins near `emitted` instead of rescanning the whole completion."""
    found = [index for s in stop if (index := text.find(s, max(0, emitted - len(s) + 1))) >= 0]
    return min(found) if found else None


def held_back(text: str, stop: tuple[str, ...]) -> int:
    """How many trailing characters to keep back: the longest end of `text` that starts a stop string (and is
    shorter than it). Only the last len(s) - 1 characters can start `s`, and only where its first character
    is: the cost is bounded by the stop strings' lengths, not the completion's."""
    held = 0
    for s in stop:
        tail = text[len(text) - min(len(s) - 1, len(text)):]
        start = tail.find(s[0]) if tail else -1
        while 0 <= start and len(tail) - start > held:
            if s.startswith(tail[start:]):
                held = len(tail) - start
                break
            start = tail.find(s[0], start + 1)
    return held
