"""The driver's journal of requests (what Lookup and Attach serve): a detachable request's
tokens outlive the stream that submitted it, one stream follows a record at a time, and
records of ended requests are kept for a while, then let go."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator

import grpc
import pytest

from spotserve.v1 import common_pb2, worker_pb2
from spotserve.worker.journal import (
    Broken,
    Journal,
    NotDetachable,
    NotHeld,
    Rejected,
    Superseded,
)

pytestmark = pytest.mark.asyncio
FR = common_pb2.FinishReason


def _request(request_id: str, *, detachable: bool = True,
             done: tuple[int, ...] = ()) -> worker_pb2.SubmitRequest:
    request = worker_pb2.SubmitRequest(request_id=request_id, prompt_token_ids=[1, 2, 3],
                                       detachable=detachable)
    request.sampling.max_tokens = 8
    request.resume.generated_token_ids.extend(done)
    return request


async def _collect(deltas: AsyncGenerator[worker_pb2.TokenDelta, None],
                   into: list[worker_pb2.TokenDelta]) -> None:
    async for delta in deltas:
        into.append(delta)


def _tokens(deltas: list[worker_pb2.TokenDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


async def test_a_stream_gets_every_token_once_in_order_then_the_finish() -> None:
    journal = Journal()
    record, owner = journal.open(_request("a", done=(7, 8)))   # a resume after 2 tokens
    got: list[worker_pb2.TokenDelta] = []
    task = asyncio.create_task(_collect(journal.stream(record, owner, 2, print), got))
    for index, token in enumerate([9, 10, 11], start=2):
        record.add(index, token)
        await asyncio.sleep(0)
    record.add(4, 11)          # an engine event repeated: kept as it was
    record.add(5, 12, FR.FINISH_REASON_LENGTH)
    await task
    assert _tokens(got) == [9, 10, 11, 12]
    assert next(d.position for d in got) == 2
    assert got[-1].finish_reason == FR.FINISH_REASON_LENGTH
    assert got[-1].usage.completion_tokens == 6
    assert journal.lookup("a").found   # detachable: its end is kept for a late reader


async def test_a_non_detachable_request_is_cancelled_and_dropped_with_its_stream() -> None:
    journal = Journal()
    cancelled: list[str] = []
    record, owner = journal.open(_request("b", detachable=False))
    deltas = journal.stream(record, owner, 0, cancelled.append)
    record.add(0, 5)
    assert (await anext(deltas)).token_ids == [5]
    await deltas.aclose()                  # the router's stream went away
    assert cancelled == ["b"]
    assert not journal.lookup("b").found
    with pytest.raises(NotHeld):
        await anext(journal.take_over("b", cancelled.append))


async def test_a_detachable_request_outlives_its_stream_and_attach_gets_all_of_it() -> None:
    journal = Journal()
    cancelled: list[str] = []
    record, owner = journal.open(_request("c", done=(4,)))
    deltas = journal.stream(record, owner, 1, cancelled.append)
    record.add(1, 5)
    await anext(deltas)
    await deltas.aclose()                  # the replica serving it died
    assert cancelled == []                 # it runs on
    record.add(2, 6)
    looked = journal.lookup("c")
    assert looked.found and looked.generated_tokens == 3 and not looked.attached
    attach = journal.take_over("c", cancelled.append)
    head = await anext(attach)
    assert head.position == 0 and list(head.token_ids) == [4, 5, 6]
    assert list(head.request.resume.generated_token_ids) == [4, 5, 6]
    assert list(head.request.prompt_token_ids) == [1, 2, 3]
    assert journal.lookup("c").attached
    record.add(3, 7, FR.FINISH_REASON_STOP)
    rest = [d async for d in attach]
    assert _tokens(rest) == [7] and rest[-1].finish_reason == FR.FINISH_REASON_STOP


async def test_a_second_attach_supersedes_the_first() -> None:
    journal = Journal()
    record, _ = journal.open(_request("d"))
    first = journal.take_over("d", print)
    await anext(first)
    second = journal.take_over("d", print)
    await anext(second)
    record.add(0, 1)
    with pytest.raises(Superseded):
        await anext(first)
    assert (await anext(second)).token_ids == [1]
    await second.aclose()


async def test_a_resubmission_of_the_same_id_supersedes_the_old_stream() -> None:
    journal = Journal()
    old, old_owner = journal.open(_request("e"))
    stream = journal.stream(old, old_owner, 0, print)
    waiting = asyncio.create_task(anext(stream))
    await asyncio.sleep(0)
    new, _ = journal.open(_request("e", done=(3,)))
    with pytest.raises(Superseded):
        await waiting
    assert journal.get("e") is new and new.tokens == [3]


async def test_a_pipeline_error_ends_streams_as_broken_after_the_tokens() -> None:
    journal = Journal()
    record, owner = journal.open(_request("f"))
    record.add(0, 1)
    record.add(1, None, error="a peer died")
    with pytest.raises(Broken, match="a peer died"):
        await anext(journal.stream(record, owner, 1, print))
    attach = journal.take_over("f", print)
    head = await anext(attach)
    assert list(head.token_ids) == [1] and head.finish_reason == FR.FINISH_REASON_UNSPECIFIED
    with pytest.raises(Broken):
        await anext(attach)


async def test_attach_refuses_a_request_submitted_not_detachable() -> None:
    journal = Journal()
    journal.open(_request("g", detachable=False))
    with pytest.raises(NotDetachable):
        await anext(journal.take_over("g", print))


async def test_ended_records_are_kept_for_a_while_and_at_most_so_many() -> None:
    journal = Journal(keep_seconds=60, max_records=2)
    for name in ("h1", "h2", "h3"):
        record, owner = journal.open(_request(name))
        journal.release(record, owner, cancelled=False)
        record.add(0, 1, FR.FINISH_REASON_LENGTH)
    journal.open(_request("h4"))           # opening expires the oldest ended ones
    assert not journal.lookup("h1").found and journal.lookup("h4").found
    short = Journal(keep_seconds=0.01)
    record, owner = short.open(_request("i"))
    short.release(record, owner, cancelled=False)
    record.add(0, 1, FR.FINISH_REASON_LENGTH)
    time.sleep(0.02)
    assert not short.lookup("i").found
    running, _ = short.open(_request("j"))   # a running record is never expired
    time.sleep(0.02)
    assert short.lookup("j").found and not running.ended


async def test_a_rejected_request_ends_with_its_reason_as_a_final_error() -> None:
    """The engine refused the request (out of memory, twice): its stream and an Attach end
    with INVALID_ARGUMENT and the reason, which the router passes on to the client,
    instead of UNAVAILABLE, which would send it to another pipeline."""
    journal = Journal()
    record, owner = journal.open(_request("r"))
    record.add(0, 4)
    record.add(1, None, error="out of memory: request r does not fit", rejected=True)
    with pytest.raises(Rejected, match="out of memory") as caught:
        await anext(journal.stream(record, owner, 1, print))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    attach = journal.take_over("r", print)
    assert list((await anext(attach)).token_ids) == [4]
    with pytest.raises(Rejected):
        await anext(attach)
