"""Batches the prompts of all queued requests into shared model calls, fairly.

A request hands the scheduler its prompts as :class:`Work` items with a key: items of equal keys
can share one model call (every judge-style next-token prompt; generation prompts with the same
sampling settings). The thread that runs the model (the main thread: the platform's device
adaptations are thread-local) calls :meth:`Scheduler.run_next`, which takes the key of the
longest-waiting request and fills one call round-robin from every request waiting with that key,
one prompt each per round, up to ``max_batch_prompts`` prompts and ``max_batch_tokens`` padded
tokens. Requests served move behind those that were not, so a one-prompt request waits for at
most about one model call of a 4,000-prompt request, never for all of it.

A request's answer is a ``concurrent.futures.Future`` of its items' results, in order; cancelling
it (the client went away) drops the items not yet run.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Optional

logger = logging.getLogger(__name__)


class SchedulerClosed(RuntimeError):
    """The server is shutting down: queued work is not run."""


@dataclasses.dataclass(frozen=True)
class Work:
    """One prompt's share of a model call."""

    key: Hashable
    """Items of equal keys can run in one call."""
    payload: Any
    """What the model call needs of this prompt (its tokens and per-prompt settings)."""
    cost: int
    """Positions this prompt occupies in the call (its padded length)."""


class _Request:
    def __init__(self, works: Sequence[Work]):
        self.works = list(works)
        self.key = self.works[0].key
        self.next = 0  # the first item not yet taken into a call
        self.done = 0
        self.results: list[Any] = [None] * len(self.works)
        self.future: concurrent.futures.Future = concurrent.futures.Future()

    @property
    def waiting(self) -> bool:
        return self.next < len(self.works) and not self.future.done()


@dataclasses.dataclass
class Batch:
    """The items of one model call: (request, item index) pairs, all with ``key``."""

    key: Hashable
    items: list[tuple[_Request, int]]

    def payloads(self) -> list[Any]:
        return [request.works[index].payload for request, index in self.items]


class Scheduler:
    """Fair batching of queued work; ``execute(key, payloads) -> results`` runs one call."""

    def __init__(
        self,
        execute: Callable[[Hashable, list[Any]], Sequence[Any]],
        max_batch_prompts: int,
        max_batch_tokens: int,
    ):
        self.execute = execute
        self.max_batch_prompts = max_batch_prompts
        self.max_batch_tokens = max_batch_tokens
        self._queue: collections.deque[_Request] = collections.deque()
        self._ready = threading.Condition()
        self._closed = False

    # -- any thread -------------------------------------------------------------------------

    def submit(self, works: Sequence[Work]) -> concurrent.futures.Future:
        """Queues one request's items (all of one key); the future's result is their results
        in order. An empty request is answered at once."""
        request = _Request(works) if works else None
        if request is None:
            future: concurrent.futures.Future = concurrent.futures.Future()
            future.set_result([])
            return future
        if len({work.key for work in request.works}) != 1:
            raise ValueError("the items of one request must share one key")
        with self._ready:
            if self._closed:
                raise SchedulerClosed("the server is shutting down")
            self._queue.append(request)
            self._ready.notify()
        return request.future

    def queued_prompts(self) -> int:
        with self._ready:
            return sum(len(r.works) - r.next for r in self._queue if r.waiting)

    def close(self) -> None:
        """Refuses new work and fails what is queued with :class:`SchedulerClosed`."""
        with self._ready:
            self._closed = True
            queued, self._queue = list(self._queue), collections.deque()
            self._ready.notify_all()
        for request in queued:
            _settle(request.future, error=SchedulerClosed("the server is shutting down"))

    # -- the model's thread -----------------------------------------------------------------

    def run_next(self, timeout: float) -> bool:
        """Runs one model call if work comes within ``timeout`` seconds; whether one ran."""
        with self._ready:
            batch = self._take()
            if batch is None and not self._closed:
                self._ready.wait(timeout)
                batch = self._take()
        if batch is None:
            return False
        self._run(batch)
        return True

    def _take(self) -> Optional[Batch]:
        """The next call's items (under the lock): the oldest waiting request's key, filled
        round-robin; requests served go to the back of the queue in their order."""
        self._queue = collections.deque(r for r in self._queue if r.waiting)
        if not self._queue:
            return None
        key = self._queue[0].key
        candidates = [r for r in self._queue if r.key == key]
        items: list[tuple[_Request, int]] = []
        longest = 0
        while candidates and len(items) < self.max_batch_prompts:
            for request in list(candidates):
                if len(items) == self.max_batch_prompts:
                    break
                if request.next == len(request.works):
                    candidates.remove(request)
                    continue
                cost = max(longest, request.works[request.next].cost)
                if items and (len(items) + 1) * cost > self.max_batch_tokens:
                    candidates.remove(request)  # its next prompt does not fit this call
                    continue
                items.append((request, request.next))
                request.next += 1
                longest = cost
        served = {id(request) for request, _ in items}
        self._queue = collections.deque(
            [r for r in self._queue if id(r) not in served and r.waiting]
            + [r for r in self._queue if id(r) in served and r.waiting]
        )
        return Batch(key, items)

    def _run(self, batch: Batch) -> None:
        begun = time.monotonic()
        try:
            results = self.execute(batch.key, batch.payloads())
            if len(results) != len(batch.items):
                raise RuntimeError(f"{len(results)} results for {len(batch.items)} prompts")
        except BaseException as error:  # noqa: BLE001 (handed to every request of the call)
            logger.error("a model call of %d prompt(s) failed: %r", len(batch.items), error)
            for request, _ in batch.items:
                _settle(request.future, error=error)
            if not isinstance(error, Exception):
                raise
            return
        logger.debug(
            "model call %r: %d prompt(s) of %d request(s), %.1f ms", batch.key, len(batch.items),
            len({id(request) for request, _ in batch.items}), 1000 * (time.monotonic() - begun),
        )  # fmt: skip
        for (request, index), result in zip(batch.items, results):
            request.results[index] = result
            request.done += 1
            if request.done == len(request.works):
                _settle(request.future, result=request.results)


def _settle(future: concurrent.futures.Future, result=None, error=None) -> None:
    """Sets a future's outcome unless its client cancelled it meanwhile."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass
