"""Admission and slots: a bounded FIFO queue in front of the pipelines.

`acquire` returns a pipeline id with one slot taken on it, waiting in the queue while
every serving pipeline is at its concurrency cap. The queue is bounded: a new request that
finds it full is refused at once (RESOURCE_EXHAUSTED with retry advice), never left to
wait without bound. Resumptions of interrupted requests go to the head of the queue and
are never refused for a full queue: they were admitted already.

A pipeline whose driver just failed a call cools down for a few seconds (no new requests)
so that resumptions do not go straight back to a dead driver before the controller
notices it.

With several router replicas, each counts only its own requests against a pipeline's cap;
the driver counts them all and refuses a fresh submission beyond it (RESOURCE_EXHAUSTED).
`mark_full` then keeps new requests off that pipeline until one of ours on it ends or
`full_backoff` passes (a slot another replica freed), so the cap holds across replicas
without the replicas talking to each other.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from .dispatch import choose_pipeline
from .errors import ErrorKind, RouterError
from .topology import Topology


@dataclass(eq=False)
class _Waiter:
    future: asyncio.Future[str]
    only: str | None
    priority: bool
    avoid: frozenset[str] = field(default_factory=frozenset)


class Scheduler:
    def __init__(self, topology: Topology, *, max_queue: int, default_cap: int,
                 failure_cooldown: float = 5.0, full_backoff: float = 0.2) -> None:
        self.topology = topology
        self.max_queue = max_queue
        self.default_cap = default_cap
        self.failure_cooldown = failure_cooldown
        self.full_backoff = full_backoff
        self.running: dict[str, int] = {}
        self._cooling: dict[str, float] = {}
        self._full: dict[str, float] = {}   # pipeline → until when a driver said it is full
        self._waiters: deque[_Waiter] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def total_running(self) -> int:
        return sum(self.running.values())

    async def acquire(self, *, timeout: float, only: str | None = None,
                      priority: bool = False, avoid: frozenset[str] = frozenset()) -> str:
        """Take a slot; raise RESOURCE_EXHAUSTED (queue full) or UNAVAILABLE (timeout)."""
        if not self._waiters or (priority and not any(w.priority for w in self._waiters)):
            taken = self._take(only, avoid)
            if taken is not None:
                return taken
        if not priority and self._admitted_waiting() >= self.max_queue:
            raise RouterError(ErrorKind.RESOURCE_EXHAUSTED,
                              f"the router's queue is full ({self.max_queue} requests "
                              "waiting); retry later", retry_after=self.retry_after())
        waiter = _Waiter(asyncio.get_running_loop().create_future(), only, priority, avoid)
        if priority:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        self.pump()  # a slot may be free for this one even if not for those ahead of it
        granted = False
        try:
            pipeline_id = await asyncio.wait_for(asyncio.shield(waiter.future), timeout)
            granted = True
            return pipeline_id
        except TimeoutError:
            raise RouterError(ErrorKind.UNAVAILABLE, self._no_capacity(only, timeout)) from None
        finally:
            self._abandon(waiter, granted)

    def occupy(self, pipeline_id: str) -> None:
        """Count a request that runs on the pipeline already (one taken over from another
        router replica): it takes a slot whatever the cap, as it holds one in the driver."""
        self.running[pipeline_id] = self.running.get(pipeline_id, 0) + 1

    def release(self, pipeline_id: str) -> None:
        self._full.pop(pipeline_id, None)   # a slot freed: worth trying it again
        count = self.running.get(pipeline_id, 0) - 1
        if count > 0:
            self.running[pipeline_id] = count
        else:
            self.running.pop(pipeline_id, None)
        self.pump()

    def mark_failed(self, pipeline_id: str) -> None:
        self._cooling[pipeline_id] = time.monotonic() + self.failure_cooldown
        asyncio.get_running_loop().call_later(self.failure_cooldown + 0.01, self.pump)

    def mark_full(self, pipeline_id: str) -> None:
        self._full[pipeline_id] = time.monotonic() + self.full_backoff
        asyncio.get_running_loop().call_later(self.full_backoff + 0.01, self.pump)

    def pump(self) -> None:
        """Hand free slots to waiters, in queue order."""
        for waiter in list(self._waiters):
            if waiter.future.done():
                continue
            taken = self._take(waiter.only, waiter.avoid)
            if taken is not None:
                waiter.future.set_result(taken)
                self._waiters.remove(waiter)

    def retry_after(self) -> float:
        """Seconds a refused client should wait: about one queue's worth of turnover."""
        return float(min(max(1, self.queued // max(len(self.topology.serving()), 1)), 30))

    def _take(self, only: str | None, avoid: frozenset[str]) -> str | None:
        pipeline = choose_pipeline(self.topology.pipelines.values(), self.running,
                                   default_cap=self.default_cap,
                                   unavailable=self._cooling_now() | avoid, only=only)
        if pipeline is None and avoid and only is None:
            # Better a pipeline that failed this request once than none at all.
            pipeline = choose_pipeline(self.topology.pipelines.values(), self.running,
                                       default_cap=self.default_cap,
                                       unavailable=self._cooling_now())
        if pipeline is None:
            return None
        self.running[pipeline.id] = self.running.get(pipeline.id, 0) + 1
        return pipeline.id

    def _cooling_now(self) -> set[str]:
        """Pipelines not to send new requests to now: failed lately, or full."""
        now = time.monotonic()
        for marks in (self._cooling, self._full):
            for pid in [p for p, until in marks.items() if until <= now]:
                del marks[pid]
        return set(self._cooling) | set(self._full)

    def _admitted_waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.priority)

    def _abandon(self, waiter: _Waiter, granted: bool) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        future = waiter.future
        if not future.done():
            future.cancel()
        elif not granted and not future.cancelled():
            # A slot arrived just as the waiter gave up (timeout or cancellation).
            self.release(future.result())

    def _no_capacity(self, only: str | None, timeout: float) -> str:
        where = f"pipeline {only!r}" if only else "any serving pipeline"
        if not self.topology.serving():
            return f"no pipeline is serving; waited {timeout:.0f} s"
        return f"no free slot on {where} within {timeout:.0f} s"
