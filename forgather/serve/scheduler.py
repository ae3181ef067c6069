"""Continuous batching: which requests hold which cache slots, and what the engine runs next.

The engine's cache has a fixed number of slots, one sequence each. A request waits in a bounded queue
(`QueueFull` when every slot is taken and `max_waiting` requests already wait: the app answers 429), is
admitted into the lowest free slot between two engine steps, has its prompt prefilled, then decodes one
token per step beside every other decoding request until it finishes. Lowest-slot allocation keeps the
busy slots near the front, so a decode step covers only a short prefix of the slots.

Prefill shares each step with decoding: while requests decode, a step prefills at most `prefill_chunk`
prompt tokens (the waiting prompts' next chunks, several prompts in one forward pass), so running streams
keep flowing; when nothing decodes, a step takes the first prompt whole, plus others up to that size.

Threads: requests are submitted and cancelled from the app's threads; everything else happens on the
engine's thread. The queue, the count of requests in the engine, the cancelled flags and the wake-up
condition are shared, so they sit behind one lock; slots and the running set are the engine thread's
alone. A cancelled request leaves at the start of the next step (`plan`), its slot free for the request
admitted in that same step. Once closed (the server shuts down, or the engine failed), `submit` refuses with
`EngineStopped` and the engine's thread takes every request left (`drain`) to end it with that error.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import threading
from typing import Any, Callable


class QueueFull(RuntimeError):
    """More requests than slots plus the waiting queue's bound."""


class EngineStopped(RuntimeError):
    """The engine stopped: the server is shutting down, or the engine failed. The requests in it end with this
    error, and new ones are refused with it (the app answers 503)."""


SHUTTING_DOWN = ("the server is shutting down: the request was stopped before it finished; send it again once the "
                 "server is back")


@dataclasses.dataclass(eq=False)
class Request:
    """One completion. `deliver` receives each sampled token id (int), then one finish reason (str: "stop",
    "length"), or an exception if the engine failed; it is called on the engine's thread."""

    prompt_ids: list[int]
    params: Any  # backend.SamplingParams
    deliver: Callable[[int | str | BaseException], None]
    slot: int | None = None
    prefilled: int = 0  # prompt tokens already in the cache
    generated: int = 0
    last_token: int = 0
    generator: Any = None  # the request's own torch.Generator: a seed means the same text, batched or not
    cancelled: bool = False

    @property
    def position(self) -> int:
        """Where the last sampled token goes in the cache when it is fed back."""
        return len(self.prompt_ids) + self.generated - 1


@dataclasses.dataclass
class Plan:
    """One engine step: prompt chunks to prefill, (request, start, stop) each, and the requests to decode."""

    prefill: list[tuple[Request, int, int]]
    decode: list[Request]


class Scheduler:
    def __init__(self, slots: int, max_waiting: int, prefill_chunk: int):
        self.slots, self.max_waiting, self.prefill_chunk = slots, max_waiting, prefill_chunk
        self.free = list(range(slots))  # a heap: the lowest free slot first
        self.waiting: collections.deque[Request] = collections.deque()
        self.prefilling: collections.deque[Request] = collections.deque()
        self.decoding: dict[int, Request] = {}
        self.wake = threading.Condition()
        self.outstanding = 0  # requests submitted and not yet finished: in slots or waiting
        self.stopped: EngineStopped | None = None  # why it closed; None while it runs

    @property
    def closed(self) -> bool:
        return self.stopped is not None

    # --- the app's threads -----------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        with self.wake:
            if self.stopped is not None:
                raise EngineStopped(str(self.stopped))
            if self.outstanding >= self.slots + self.max_waiting:
                raise QueueFull(f"{self.slots} requests are running and {self.max_waiting} are waiting, the "
                                f"most this server holds; retry later")
            self.outstanding += 1
            self.waiting.append(request)
            self.wake.notify()

    def cancel(self, request: Request) -> None:
        with self.wake:
            request.cancelled = True
            self.wake.notify()

    def close(self, reason: EngineStopped | None = None) -> None:
        """Stop planning: the engine's thread leaves its loop after the step it runs. `reason` (default: the server
        is shutting down) is what every request left gets, and new ones; the first close's reason stays."""
        with self.wake:
            if self.stopped is None:
                self.stopped = reason or EngineStopped(SHUTTING_DOWN)
            self.wake.notify()

    # --- the engine's thread ---------------------------------------------------------------------------

    def plan(self, block: bool = True) -> Plan | None:
        """The next step's work; waits for some when `block` (None once closed, or idle without `block`)."""
        with self.wake:
            while not self.closed:
                self._reap()
                self._admit()
                if self.prefilling or self.decoding or not block:
                    break
                self.wake.wait()
            if self.closed or not (self.prefilling or self.decoding):
                return None
        decode = sorted(self.decoding.values(), key=lambda r: r.slot)
        prefill = []
        budget = self.prefill_chunk
        if self.prefilling and not decode:
            first = self.prefilling[0]
            budget = max(budget, len(first.prompt_ids) - first.prefilled)
        for request in self.prefilling:
            chunk = min(len(request.prompt_ids) - request.prefilled, budget)
            if chunk <= 0:
                break
            prefill.append((request, request.prefilled, request.prefilled + chunk))
            budget -= chunk
        return Plan(prefill, decode)

    def prefilled(self, request: Request, stop: int) -> None:
        """The prompt is in the cache up to `stop`; a whole prompt starts decoding."""
        request.prefilled = stop
        if stop == len(request.prompt_ids):
            self.prefilling.remove(request)
            self.decoding[request.slot] = request

    def finish(self, request: Request) -> None:
        """Free the request's slot (it ended, or failed)."""
        if request in self.prefilling:
            self.prefilling.remove(request)
        self.decoding.pop(request.slot, None)
        heapq.heappush(self.free, request.slot)
        request.slot = None
        with self.wake:
            self.outstanding -= 1

    def drain(self) -> list[Request]:
        """Every request still waiting or in a slot, taken out of the scheduler (once closed: none will run)."""
        with self.wake:
            requests = [*self.waiting, *self.prefilling, *self.decoding.values()]
            self.waiting.clear()
            self.prefilling.clear()
            self.decoding.clear()
            self.free = list(range(self.slots))
            self.outstanding = 0
        for request in requests:
            request.slot = None
        return requests

    def _reap(self) -> None:
        """Drop cancelled requests (called with the lock held)."""
        left = [r for r in self.waiting if r.cancelled]
        self.waiting = collections.deque(r for r in self.waiting if not r.cancelled)
        self.outstanding -= len(left)
        for request in [r for r in (*self.prefilling, *self.decoding.values()) if r.cancelled]:
            self.finish(request)

    def _admit(self) -> None:
        while self.free and self.waiting:
            request = self.waiting.popleft()
            request.slot = heapq.heappop(self.free)
            self.prefilling.append(request)
