"""The scheduler without sockets: bounded queue, FIFO order, priority for resumptions,
waiting for a named pipeline, timeouts and cancellation giving slots back."""

from __future__ import annotations

import asyncio

import pytest

from spotserve.operator.router.dispatch import Pipeline
from spotserve.operator.router.errors import ErrorKind, RouterError
from spotserve.operator.router.scheduler import Scheduler
from spotserve.operator.router.topology import Topology

pytestmark = pytest.mark.asyncio


def _scheduler(*pipelines: Pipeline, max_queue: int = 2) -> Scheduler:
    topology = Topology()
    topology.apply(1, list(pipelines), [])
    return Scheduler(topology, max_queue=max_queue, default_cap=1, failure_cooldown=0.05)


async def test_full_queue_refuses_with_retry_advice() -> None:
    scheduler = _scheduler(Pipeline("a", "h:1"))
    assert await scheduler.acquire(timeout=1) == "a"
    waiting = [asyncio.create_task(scheduler.acquire(timeout=5)) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(RouterError) as info:
        await scheduler.acquire(timeout=1)
    assert info.value.kind is ErrorKind.RESOURCE_EXHAUSTED and info.value.retry_after
    scheduler.release("a")
    assert await waiting[0] == "a" and not waiting[1].done()  # first come, first served
    scheduler.release("a")
    assert await waiting[1] == "a"


async def test_resumptions_jump_the_queue_and_are_never_refused() -> None:
    scheduler = _scheduler(Pipeline("a", "h:1"), max_queue=1)
    await scheduler.acquire(timeout=1)
    queued = asyncio.create_task(scheduler.acquire(timeout=5))
    await asyncio.sleep(0)
    resumed = asyncio.create_task(scheduler.acquire(timeout=5, priority=True))
    await asyncio.sleep(0)
    scheduler.release("a")
    assert await resumed == "a" and not queued.done()
    scheduler.release("a")
    assert await queued == "a"


async def test_waiting_for_a_named_pipeline_does_not_block_others() -> None:
    scheduler = _scheduler(Pipeline("a", "h:1"), Pipeline("b", "h:2"))
    await scheduler.acquire(timeout=1, only="b")
    for_b = asyncio.create_task(scheduler.acquire(timeout=5, only="b", priority=True))
    await asyncio.sleep(0)
    assert await scheduler.acquire(timeout=1) == "a"
    scheduler.release("b")
    assert await for_b == "b"


async def test_timeout_and_cancellation_leave_no_slot_taken() -> None:
    scheduler = _scheduler(Pipeline("a", "h:1"))
    await scheduler.acquire(timeout=1)
    with pytest.raises(RouterError) as info:
        await scheduler.acquire(timeout=0.02)
    assert info.value.kind is ErrorKind.UNAVAILABLE and "no free slot" in info.value.message
    task = asyncio.create_task(scheduler.acquire(timeout=5))
    await asyncio.sleep(0)
    task.cancel()
    scheduler.release("a")
    with pytest.raises(asyncio.CancelledError):
        await task
    assert scheduler.queued == 0 and scheduler.total_running == 0


async def test_failed_pipeline_cools_down_then_returns() -> None:
    scheduler = _scheduler(Pipeline("a", "h:1"), Pipeline("b", "h:2"))
    scheduler.mark_failed("a")
    assert await scheduler.acquire(timeout=1) == "b"
    assert await scheduler.acquire(timeout=1) == "a"  # after the 50 ms cooldown
