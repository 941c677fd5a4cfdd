"""Where and how an interrupted request continues.

A request's stream is interrupted when its driver paused it (a drain, KV kept), the driver
failed, or the controller declared the pipeline gone. It is submitted again, with the
tokens committed so far as its resume state, on a pipeline chosen as follows:

1. a resume hint from the controller naming a pipeline and mode KV → that pipeline, mode KV
   (its KV cache was migrated there);
2. paused, no hint, and its own pipeline is serving again → the same pipeline, mode KV
   (the drain was called off and the KV is still there);
3. otherwise mode REPREFILL (prompt + committed tokens recomputed) on the pipeline a
   REPREFILL hint names, else on any serving pipeline — preferably not the one that just
   failed it.

A paused request waits up to `hint_wait` seconds for a hint while its pipeline is draining.
A KV resumption that fails (the KV is not there) falls back to re-prefill at the next
interruption. A request that cannot resume within `resume_timeout` of its interruption (or
by its own deadline) fails with a message saying how far it got and why it stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from spotserve.v1 import common_pb2

from .commit_log import CommitLog
from .dispatch import PipelineState
from .errors import RouterError
from .scheduler import Scheduler
from .topology import ResumeHint, Topology

KV = common_pb2.RESUME_MODE_KV
REPREFILL = common_pb2.RESUME_MODE_REPREFILL
MODE_NAMES: dict[int, str] = {KV: "kv", REPREFILL: "reprefill"}


@dataclass(frozen=True)
class Interruption:
    pipeline_id: str
    paused: bool  # drained with its KV kept (FINISH_REASON_PAUSED)
    reason: str


class Resumer:
    def __init__(self, topology: Topology, scheduler: Scheduler, *, resume_timeout: float,
                 hint_wait: float, topology_changed: Callable[[float], Awaitable[None]]
                 ) -> None:
        self.topology = topology
        self.scheduler = scheduler
        self.resume_timeout = resume_timeout
        self.hint_wait = hint_wait
        self._topology_changed = topology_changed

    async def next_pipeline(self, commit: CommitLog, interruption: Interruption,
                            deadline: float, failures: int) -> tuple[str, int]:
        """A slot on the pipeline where the request continues, and the resume mode."""
        give_up = min(deadline, time.monotonic() + self.resume_timeout)
        if failures > 1:  # repeated failures without progress: back off a little
            await asyncio.sleep(min(0.05 * 2 ** (failures - 2), 1.0))
        if interruption.paused:
            hint = await self._await_hint(commit.request_id, interruption, give_up)
        else:
            hint = self.topology.hints.pop(commit.request_id, None)
        target = self._kv_target(interruption, hint)
        if target is not None:
            with contextlib.suppress(RouterError):
                return await self._acquire(target, give_up, bounded=True), KV
        try:
            return await self._acquire_for_reprefill(interruption, hint, give_up), REPREFILL
        except RouterError as exc:
            raise RouterError(exc.kind, f"request {commit.request_id} was interrupted after "
                              f"{commit.committed} tokens ({interruption.reason}) and could "
                              f"not resume: {exc.message}") from None

    async def _await_hint(self, request_id: str, interruption: Interruption,
                          give_up: float) -> ResumeHint | None:
        """A paused request: wait for the controller to say where its KV went."""
        until = min(give_up, time.monotonic() + self.hint_wait)
        while True:
            hint = self.topology.hints.pop(request_id, None)
            source = self.topology.pipelines.get(interruption.pipeline_id)
            if hint is not None or source is None or source.state is not \
                    PipelineState.DRAINING or time.monotonic() >= until:
                return hint
            await self._topology_changed(until - time.monotonic())

    def _kv_target(self, interruption: Interruption, hint: ResumeHint | None) -> str | None:
        if hint is not None:
            return hint.pipeline_id if hint.mode == "kv" and hint.pipeline_id else None
        source = self.topology.pipelines.get(interruption.pipeline_id)
        if interruption.paused and source is not None and \
                source.state is PipelineState.SERVING:
            return source.id
        return None

    async def _acquire_for_reprefill(self, interruption: Interruption,
                                     hint: ResumeHint | None, give_up: float) -> str:
        if hint is not None and hint.mode == "reprefill" and hint.pipeline_id:
            with contextlib.suppress(RouterError):
                return await self._acquire(hint.pipeline_id, give_up, bounded=True)
        avoid = frozenset() if interruption.paused else frozenset({interruption.pipeline_id})
        return await self.scheduler.acquire(timeout=max(give_up - time.monotonic(), 0.0),
                                            priority=True, avoid=avoid)

    async def _acquire(self, pipeline_id: str, give_up: float, *, bounded: bool) -> str:
        """A slot on one named pipeline, waiting at most `hint_wait` for it."""
        wait = give_up - time.monotonic()
        if bounded:
            wait = min(wait, self.hint_wait)
        return await self.scheduler.acquire(timeout=max(wait, 0.0), only=pipeline_id,
                                            priority=True)
