"""What a pipeline driver keeps of each request it runs: the request as submitted and every
token generated for it, so a router replica other than the one that submitted it can take
its stream over (`Attach`) after that replica died.

The driver is where a request's committed tokens live beyond the router: every submission
(fresh, or a resume after a migration) carries the request's prompt and all the tokens
committed before it, and the driver appends each token it generates. So the driver that
runs a request always holds at least every token any router has sent to the client.

A record is followed by at most one stream at a time (the `owner`): `Submit` opens a record
and follows it; `Attach` makes a new owner, which ends the previous owner's stream
(`Superseded`). When a stream goes away before its request ended, a detachable request
keeps running and its record stays; any other is cancelled by the caller and dropped.
Ended records of detachable requests are kept for `keep_seconds` (and at most
`max_records` of them), so a client that reconnects after its request finished still gets
the end of its stream.

`stream` and `take_over` are the Submit and Attach streams; they end with a `StreamEnded`
whose status `relay` sends. asyncio and gRPC only, no torch: the real worker and the
router's test double share it.
Every method runs on the event loop's thread (the engine thread hands events over with
`call_soon_threadsafe`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from spotserve.v1 import common_pb2, worker_pb2

FR = common_pb2.FinishReason
RUNNING = FR.FINISH_REASON_UNSPECIFIED


class StreamEnded(Exception):
    """Why a record's stream cannot go on, and the status that says so."""

    code = grpc.StatusCode.INTERNAL


class Superseded(StreamEnded):
    """Another stream (a later Attach or Submit of the same id) follows the record now."""

    code = grpc.StatusCode.ABORTED


class Broken(StreamEnded):
    """The request's pipeline broke: resume it elsewhere."""

    code = grpc.StatusCode.UNAVAILABLE


class Rejected(StreamEnded):
    """The engine could not run the request (out of device memory, twice): its final
    answer, with the reason; the router passes it on instead of resuming elsewhere."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotHeld(StreamEnded):
    """No record of the request here."""

    code = grpc.StatusCode.NOT_FOUND


class NotDetachable(StreamEnded):
    """The request was not submitted detachable: its submitter's stream is the only one."""

    code = grpc.StatusCode.FAILED_PRECONDITION


@dataclass(eq=False)
class Record:
    request: worker_pb2.SubmitRequest
    tokens: list[int]
    finish: int = RUNNING
    error: str = ""
    rejected: bool = False    # the error is the engine's refusal, not a broken pipeline
    ended_at: float = 0.0
    owner: int = 0            # the stream that follows it now (0: none)
    dropped: bool = False     # cancelled: let go once its stream has the end
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def detachable(self) -> bool:
        return self.request.detachable

    @property
    def ended(self) -> bool:
        return self.finish != RUNNING

    def add(self, index: int, token_id: int | None, finish: int = 0, error: str = "",
            rejected: bool = False) -> None:
        """One engine event: the token at generated index `index` (a token the record has
        already is kept as it was), the end, or the pipeline's error (`rejected`: the
        engine's refusal of this request)."""
        if self.ended:
            return
        if token_id is not None and index == len(self.tokens):
            self.tokens.append(token_id)
        if error:
            self.finish, self.error, self.rejected = FR.FINISH_REASON_ERROR, error, rejected
        elif finish:
            self.finish = finish
        if self.ended:
            self.ended_at = time.monotonic()
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self, owner: int, position: int
                     ) -> AsyncIterator[worker_pb2.TokenDelta]:
        """Deltas from generated index `position` on, as tokens arrive, until the record
        ends (the last delta has its finish reason). Raise `Superseded` once another
        stream owns the record; a pipeline error ends with a delta whose finish reason is
        ERROR (the caller turns it into a status)."""
        while True:
            if self.owner != owner:
                raise Superseded(f"request {self.request_id} is followed by another stream")
            changed = self._changed
            if len(self.tokens) > position or self.ended:
                delta = worker_pb2.TokenDelta(
                    request_id=self.request_id, token_ids=self.tokens[position:],
                    position=position, finish_reason=self.finish)  # type: ignore[arg-type]
                position = len(self.tokens)
                if self.ended:
                    delta.usage.prompt_tokens = len(self.request.prompt_token_ids)
                    delta.usage.completion_tokens = position
                    yield delta
                    return
                yield delta
                continue
            await changed.wait()


class Journal:
    def __init__(self, keep_seconds: float = 300.0, max_records: int = 4096) -> None:
        self.keep_seconds, self.max_records = keep_seconds, max_records
        self._records: OrderedDict[str, Record] = OrderedDict()
        self._owners = 0

    def __len__(self) -> int:
        return len(self._records)

    def open(self, request: worker_pb2.SubmitRequest) -> tuple[Record, int]:
        """A new record for a submission (replacing any earlier one of the same id, whose
        stream is superseded), and the owner token of the stream that follows it."""
        record = self.prepare(request)
        return record, self.adopt(record)

    @staticmethod
    def prepare(request: worker_pb2.SubmitRequest) -> Record:
        """A record for a submission, not in the journal yet: events can go to it while
        the engine decides whether to take the request (`adopt` once it has)."""
        return Record(request, list(request.resume.generated_token_ids))

    def adopt(self, record: Record) -> int:
        """Put a prepared record in the journal, replacing any earlier one of the same id
        (whose stream is superseded); the owner token of the stream that follows it."""
        self._expire()
        old = self._records.pop(record.request_id, None)
        if old is not None and old is not record:
            old.owner = 0
            old._wake()
        self._records[record.request_id] = record
        return self._own(record)

    def get(self, request_id: str) -> Record | None:
        self._expire()
        return self._records.get(request_id)

    def release(self, record: Record, owner: int, *, cancelled: bool) -> bool:
        """The stream `owner` ended. Drop the record when no one may come back for it: it
        is not detachable, or it was cancelled. Returns whether the request still runs and
        the caller should cancel it (a stream of a non-detachable request went away)."""
        if record.owner != owner:
            return False    # superseded: the new owner has it now
        record.owner = 0
        keep = record.detachable and not cancelled and not record.dropped
        if not keep and self._records.get(record.request_id) is record:
            del self._records[record.request_id]
        return not keep and not record.ended

    def drop(self, request_id: str) -> bool:
        """A Cancel: let the record go. One a stream follows goes once that stream has had
        the end (the engine's CANCELLED), so the stream ends as cancelled, not cut off."""
        record = self._records.get(request_id)
        if record is None:
            return False
        if record.owner and not record.ended:
            record.dropped = True
        else:
            del self._records[request_id]
            record.owner = 0
            record._wake()
        return True

    def first_delta(self, record: Record) -> worker_pb2.TokenDelta:
        """An Attach stream's first delta: the request and every token so far."""
        delta = worker_pb2.TokenDelta(request_id=record.request_id, token_ids=record.tokens,
                                      position=0, finish_reason=record.finish)  # type: ignore[arg-type]
        delta.request.CopyFrom(record.request)
        del delta.request.resume.generated_token_ids[:]
        delta.request.resume.generated_token_ids.extend(record.tokens)
        return delta

    def lookup(self, request_id: str) -> worker_pb2.LookupResponse:
        record = self.get(request_id)
        if record is None:
            return worker_pb2.LookupResponse(found=False)
        return worker_pb2.LookupResponse(found=True, generated_tokens=len(record.tokens),
                                         finish_reason=record.finish,  # type: ignore[arg-type]
                                         attached=record.owner != 0)

    async def stream(self, record: Record, owner: int, position: int,
                     cancel: Callable[[str], object]
                     ) -> AsyncGenerator[worker_pb2.TokenDelta, None]:
        """The deltas of the record `owner` follows, from `position` on. When the stream
        goes away first, `cancel(request_id)` stops a request that is not detachable."""
        try:
            async for delta in record.follow(owner, position):
                if delta.finish_reason == FR.FINISH_REASON_ERROR:
                    raise _ended(record)
                yield delta
        finally:
            if self.release(record, owner, cancelled=False):
                cancel(record.request_id)

    async def take_over(self, request_id: str, cancel: Callable[[str], object]
                        ) -> AsyncGenerator[worker_pb2.TokenDelta, None]:
        """An Attach stream: the first delta carries the request and every token so far
        (position 0); then the deltas as they come. The previous owner's stream ends."""
        record = self.get(request_id)
        if record is None:
            raise NotHeld(f"request {request_id!r} is not held here")
        if not record.detachable:
            raise NotDetachable(f"request {request_id!r} was not submitted detachable")
        owner = self._own(record)
        first = self.first_delta(record)
        if not record.ended:
            position = len(first.token_ids)   # fixed now: tokens may come while it waits
            yield first
            async with contextlib.aclosing(self.stream(record, owner, position,
                                                       cancel)) as deltas:
                async for delta in deltas:
                    yield delta
            return
        self.release(record, owner, cancelled=False)
        if record.finish == FR.FINISH_REASON_ERROR:  # its tokens, then why it stopped
            first.finish_reason = FR.FINISH_REASON_UNSPECIFIED
            yield first
            raise _ended(record)
        yield first

    def _own(self, record: Record) -> int:
        self._owners += 1
        record.owner = self._owners
        record._wake()
        self._records.move_to_end(record.request_id)
        return record.owner

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.keep_seconds
        ended = [r for r in self._records.values() if r.ended and r.owner == 0]
        extra = len(self._records) - self.max_records
        for record in ended:
            if record.ended_at < cutoff or extra > 0:
                del self._records[record.request_id]
                extra -= 1


def _ended(record: Record) -> StreamEnded:
    """Why a record that ended in an error ended: the engine refused it, or its pipeline
    broke (resume it elsewhere)."""
    if record.rejected:
        return Rejected(record.error)
    return Broken(record.error or "the pipeline failed")


async def relay(context: grpc.aio.ServicerContext[Any, Any],
                deltas: AsyncGenerator[worker_pb2.TokenDelta, None]
                ) -> AsyncIterator[worker_pb2.TokenDelta]:
    """A journal stream's deltas for a servicer; its `StreamEnded` as the call's status."""
    try:
        async with contextlib.aclosing(deltas):   # its clean-up runs when the caller leaves
            async for delta in deltas:
                yield delta
    except StreamEnded as exc:
        await context.abort(exc.code, str(exc))
