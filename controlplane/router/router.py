"""The router's core: run one request over the pipelines until it finishes, resuming it
wherever its pipeline is interrupted.

A request's life: validated → queued (bounded) → submitted to a pipeline driver → its
tokens go through the commit log (no gap, no duplicate) and the detokenizer to the client.
When the stream is interrupted, `resume.Resumer` picks where and how it continues (read its
docstring for the rules) and the request is submitted again with the committed tokens as
its resume state; the client's stream just goes on. The router also applies the
controller's topology (moving requests off pipelines that are gone) and answers `Stats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass, field
from enum import Enum

import grpc

from spotserve.tokenizer import ModelTokenizer
from spotserve.v1 import common_pb2, control_pb2, worker_pb2

from .commit_log import CommitLog, GapError
from .dispatch import Pipeline, PipelineState
from .errors import ErrorKind, RouterError, invalid
from .load_signal import ArrivalRate, LatencyWindow
from .metrics import RouterMetrics
from .request_log import RequestLog
from .resume import KV, MODE_NAMES, Interruption, Resumer
from .scheduler import Scheduler
from .text import TextStream
from .topology import ResumeHint, Topology, check_pipelines
from .validation import ModelLimits, check_model, validate
from .worker_client import SubmitCall, WorkerClients

log = logging.getLogger(__name__)

FR = common_pb2.FinishReason
# Worker statuses that no other pipeline would answer differently.
FINAL_CODES = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
               grpc.StatusCode.UNIMPLEMENTED}
# How good a driver's record of a request is to take its stream over from: one still
# running first, then one that finished, then one drained with its KV kept; ties go to the
# record with more tokens.
RECORD_RANK = {FR.FINISH_REASON_UNSPECIFIED: 3, FR.FINISH_REASON_STOP: 2,
               FR.FINISH_REASON_LENGTH: 2, FR.FINISH_REASON_PAUSED: 1}
LOOKUP_TIMEOUT = 2.0
RECENT_DRIVERS_SECONDS = 300.0  # a driver that left the topology may still hold records


@dataclass(frozen=True)
class RouterConfig:
    model_name: str
    max_queue: int = 256
    default_concurrency: int = 64   # per pipeline, when the topology sets none
    queue_timeout: float = 60.0     # a new request's longest wait for a slot
    request_timeout: float = 600.0  # deadline of a request whose client sets none
    resume_timeout: float = 60.0    # an interrupted request's longest wait to resume
    hint_wait: float = 10.0         # a paused request's longest wait for a resume hint
    failure_cooldown: float = 5.0   # no new requests to a driver that just failed


@dataclass(frozen=True)
class GenerationInput:
    request_id: str
    prompt_token_ids: list[int]
    sampling: common_pb2.SamplingParams
    deadline: float | None = None  # time.monotonic() by which the request must finish
    resumable: bool = False  # runs on when its stream breaks; `Router.resume` takes it up


@dataclass(frozen=True)
class Chunk:
    """New tokens and their text; `finish_reason` is set on the last chunk only."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: int
    prompt_tokens: int
    completion_tokens: int


class Outcome(Enum):
    FINISHED = "finished"
    PAUSED = "paused"            # drained with KV kept
    INTERRUPTED = "interrupted"  # driver failed, stream broke, or pipeline gone
    FULL = "full"                # the driver refused it: other replicas filled its slots


@dataclass(eq=False)
class _Attempt:
    pipeline_id: str
    address: str
    mode: int
    call: SubmitCall | None = None
    evicted: bool = False
    outcome: Outcome = Outcome.INTERRUPTED
    reason: str = "stream ended without a finish reason"
    finish_reason: int = FR.FINISH_REASON_UNSPECIFIED

    def evict(self) -> None:
        self.evicted = True
        if self.call is not None:
            self.call.cancel()


@dataclass(eq=False)
class _InFlight:
    log: CommitLog
    arrived: float
    attempt: _Attempt | None = None
    queued: bool = True
    paused: bool = False  # drained with its KV kept, waiting to resume
    resumable: bool = False
    superseded: bool = False  # another stream (a Resume) took the request over


@dataclass
class _Counters:
    completed: int = 0
    failed: int = 0
    ttft: LatencyWindow = field(default_factory=LatencyWindow)
    e2e: LatencyWindow = field(default_factory=LatencyWindow)


class Router:
    def __init__(self, config: RouterConfig, tokenizer: ModelTokenizer,
                 workers: WorkerClients) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.workers = workers
        self.limits = ModelLimits(config.model_name, tokenizer.max_context,
                                  tokenizer.vocab_size)
        self.topology = Topology()
        self.scheduler = Scheduler(self.topology, max_queue=config.max_queue,
                                   default_cap=config.default_concurrency,
                                   failure_cooldown=config.failure_cooldown)
        self.resumer = Resumer(self.topology, self.scheduler,
                               resume_timeout=config.resume_timeout,
                               hint_wait=config.hint_wait,
                               topology_changed=self._topology_changed)
        self.metrics = RouterMetrics(config.model_name)
        self.arrivals = ArrivalRate(start=time.monotonic())
        self.counters = _Counters()
        self._inflight: dict[str, _InFlight] = {}
        self._attempts: dict[str, set[_Attempt]] = {}
        self._left: dict[str, tuple[str, float]] = {}  # driver address → (pipeline, when)
        self._changed = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self.closing = False  # shutting down: not ready for new traffic
        self.request_log: RequestLog | None = None  # a line per finished request

    # ---- the request path -------------------------------------------------------------

    def encode_prompt(self, text: str) -> list[int]:
        """Prompt text → token ids (with the tokenizer's own special tokens, such as BOS)."""
        if not text:
            raise invalid("prompt", "must not be empty")
        return self.tokenizer.encode(text)

    def prepare(self, *, model: str, request_id: str, prompt_token_ids: list[int],
                sampling: common_pb2.SamplingParams,
                timeout: float | None = None, resumable: bool = False) -> GenerationInput:
        """Validate a request (raise INVALID_ARGUMENT naming the field) and fix its id."""
        validate(model, request_id, prompt_token_ids, sampling, self.limits)
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        if request_id in self._inflight:
            raise RouterError(ErrorKind.ALREADY_EXISTS,
                              f"request_id: {request_id!r} is already running", field="request_id")
        deadline = time.monotonic() + timeout if timeout is not None else None
        return GenerationInput(request_id, prompt_token_ids, sampling, deadline, resumable)

    def check_model(self, model: str) -> None:
        """INVALID_ARGUMENT unless `model` is empty or the served model's name."""
        check_model(model, self.limits)

    async def generate(self, request: GenerationInput) -> AsyncGenerator[Chunk, None]:
        """Stream the request's chunks; raise `RouterError` if it cannot be served."""
        flight = self._register(request, time.monotonic())
        self.arrivals.record(flight.arrived)
        self.metrics.count_tokens(prompt=len(request.prompt_token_ids))
        async for chunk in self._run(request, flight, first=None, skip=0):
            yield chunk

    async def resume(self, request_id: str, received: int,
                     timeout: float | None = None) -> AsyncGenerator[Chunk, None]:
        """Take up a resumable request whose stream broke (on this replica or on one that
        died): find the driver that holds it, take its stream over, and stream the tokens
        after the first `received`, then the rest. NOT_FOUND when no driver holds it."""
        if not request_id:
            raise invalid("request_id", "must not be empty")
        if received < 0:
            raise invalid("received_tokens", "must not be negative")
        arrived = time.monotonic()
        self._supersede(request_id)
        found = await self._locate(request_id)
        if found is None:
            raise RouterError(ErrorKind.NOT_FOUND, f"request {request_id!r} is not held by "
                              "any pipeline: it was not resumable, was cancelled, ended more "
                              "than a few minutes ago, or was lost with its pipeline",
                              field="request_id")
        pipeline_id, address = found
        call = self.workers.attach(address, request_id, timeout=timeout)
        try:
            head = await self._head(call, request_id, address)
        except BaseException:
            call.cancel()
            raise
        submitted = head.request
        request = GenerationInput(request_id, list(submitted.prompt_token_ids),
                                  submitted.sampling,
                                  arrived + timeout if timeout is not None else None,
                                  resumable=True)
        if received > submitted.sampling.max_tokens:
            call.cancel()
            raise invalid("received_tokens", f"is {received}, more than the request's "
                          f"max_tokens ({submitted.sampling.max_tokens})")
        flight = self._register(request, arrived)
        self.scheduler.occupy(pipeline_id)
        attempt = _Attempt(pipeline_id, address, common_pb2.RESUME_MODE_UNSPECIFIED, call)
        self.metrics.resumed.labels("attach").inc()
        log.info("request %s taken over from %s after %d tokens (the client has %d)",
                 request_id, address, len(head.token_ids), received)
        async for chunk in self._run(request, flight, first=(attempt, head), skip=received):
            yield chunk

    @staticmethod
    async def _head(call: SubmitCall, request_id: str, address: str) -> worker_pb2.TokenDelta:
        """An Attach stream's first delta: the request and every token so far."""
        try:
            head = await call.read()
        except grpc.aio.AioRpcError as exc:
            raise RouterError(ErrorKind.UNAVAILABLE, f"request {request_id!r}: its driver "
                              f"{address} could not be reached: {exc.code().name}: "
                              f"{exc.details()}") from None
        if not isinstance(head, worker_pb2.TokenDelta) or not head.HasField("request"):
            raise RouterError(ErrorKind.UNAVAILABLE, f"request {request_id!r}: its driver "
                              f"{address} ended the stream at once; retry")
        if head.finish_reason == FR.FINISH_REASON_CANCELLED:
            raise RouterError(ErrorKind.NOT_FOUND, f"request {request_id!r} was cancelled "
                              f"(by its deadline or a Cancel) after {len(head.token_ids)} "
                              "tokens", field="request_id")
        return head

    async def cancel(self, request_id: str) -> bool:
        """Stop a request wherever it runs (here, or detached on a driver)."""
        flight = self._inflight.get(request_id)
        if flight is not None:
            flight.resumable = False   # the stream ends with the driver's cancellation
        addresses = {p.driver_address for p in self.topology.pipelines.values()
                     if p.driver_address} | set(self._recent_drivers())
        found = await asyncio.gather(*(self.workers.cancel(a, request_id)
                                       for a in sorted(addresses)))
        return flight is not None or any(found)

    def _register(self, request: GenerationInput, arrived: float) -> _InFlight:
        if request.request_id in self._inflight:
            raise RouterError(ErrorKind.ALREADY_EXISTS,
                              f"request_id: {request.request_id!r} is already running",
                              field="request_id")
        flight = _InFlight(CommitLog(request.request_id, tuple(request.prompt_token_ids),
                                     request.sampling.max_tokens), arrived,
                           resumable=request.resumable)
        self._inflight[request.request_id] = flight
        return flight

    async def _run(self, request: GenerationInput, flight: _InFlight,
                   first: tuple[_Attempt, worker_pb2.TokenDelta] | None,
                   skip: int) -> AsyncGenerator[Chunk, None]:
        deadline = request.deadline or flight.arrived + self.config.request_timeout
        finish: int = FR.FINISH_REASON_UNSPECIFIED
        try:
            async for chunk in self._serve(request, flight, deadline, first, skip):
                finish = chunk.finish_reason
                yield chunk
        except RouterError as exc:
            finish = FR.FINISH_REASON_ERROR
            self._count_failure(exc)
            raise
        finally:
            self._finish(request, flight, finish)

    def _supersede(self, request_id: str) -> None:
        """A Resume of a request this replica still streams (the client reconnected
        before this replica noticed it had gone): that stream ends, the new one goes on."""
        old = self._inflight.pop(request_id, None)
        if old is not None:
            old.superseded = True
            if old.attempt is not None:
                old.attempt.evict()

    async def _locate(self, request_id: str) -> tuple[str, str] | None:
        """(pipeline id, driver address) of the driver whose record of the request is the
        best to take over; None when none holds it."""
        pipelines = {p.driver_address: p.id for p in self.topology.pipelines.values()
                     if p.driver_address}
        recent = {a: pid for a, pid in self._recent_drivers().items() if a not in pipelines}
        holders = {**pipelines, **recent}
        addresses = sorted(holders)
        replies = await asyncio.gather(*(self.workers.lookup(a, request_id, LOOKUP_TIMEOUT)
                                         for a in addresses))
        found = [(RECORD_RANK.get(r.finish_reason, 0), r.generated_tokens, a)
                 for a, r in zip(addresses, replies, strict=True) if r is not None and r.found]
        if not found:
            return None
        best = max(found)[2]
        return holders[best], best

    def _recent_drivers(self) -> dict[str, str]:
        """Drivers of pipelines that left the topology lately (address → pipeline id)."""
        cutoff = time.monotonic() - RECENT_DRIVERS_SECONDS
        for address in [a for a, (_, t) in self._left.items() if t < cutoff]:
            del self._left[address]
        return {a: pid for a, (pid, _) in self._left.items()}

    async def _serve(self, request: GenerationInput, flight: _InFlight, deadline: float,
                     first: tuple[_Attempt, worker_pb2.TokenDelta] | None,
                     skip: int) -> AsyncGenerator[Chunk, None]:
        text = TextStream(self.tokenizer.decode, request.prompt_token_ids,
                          list(request.sampling.stop))
        last = flight.arrived
        failures = 0
        if first is None:
            pipeline_id = await self._admit(deadline)
            mode: int = common_pb2.RESUME_MODE_UNSPECIFIED
            flight.queued = False
        else:
            attempt, head = first
            flight.queued = False
            fresh = flight.log.accept(0, head.token_ids)
            finish = head.finish_reason if head.finish_reason in (
                FR.FINISH_REASON_STOP, FR.FINISH_REASON_LENGTH) or flight.log.complete else 0
            chunk = self._chunk(request, flight, text, fresh, finish or 0, skip)
            if chunk is not None:
                last = self._observe_latency(flight, last)
                yield chunk
                if chunk.finish_reason != FR.FINISH_REASON_UNSPECIFIED:
                    return
            pipeline_id, mode = attempt.pipeline_id, attempt.mode
            if head.finish_reason == FR.FINISH_REASON_PAUSED:   # drained, its KV kept
                self._start_attempt(flight, pipeline_id, mode, attempt)
                attempt.outcome, attempt.reason = Outcome.PAUSED, "paused by a drain"
                self._end_attempt(attempt)
                pipeline_id, mode = await self._resume(flight, attempt, deadline, 1)
                first = None
        while True:
            attempt = self._start_attempt(flight, pipeline_id, mode,
                                          first[0] if first is not None else None)
            first = None
            try:
                async with contextlib.aclosing(self._stream(request, flight, attempt,
                                                            deadline)) as deltas:
                    async for fresh, finish in deltas:
                        chunk = self._chunk(request, flight, text, fresh, finish, skip)
                        if chunk is None:
                            continue
                        last = self._observe_latency(flight, last)
                        failures = 0
                        yield chunk
                        if chunk.finish_reason != FR.FINISH_REASON_UNSPECIFIED:
                            return
            finally:
                self._end_attempt(attempt)
            if attempt.outcome is Outcome.FINISHED:
                return  # finished on a delta whose text was all held back: flushed above
            if attempt.outcome is Outcome.FULL:   # not started: another pipeline, or wait
                pipeline_id = await self._readmit(flight, deadline)
                continue
            if flight.superseded:
                raise RouterError(ErrorKind.ABORTED, f"request {request.request_id} was "
                                  "taken over by a newer stream (a Resume)")
            failures += 1
            pipeline_id, mode = await self._resume(flight, attempt, deadline, failures)

    async def _admit(self, deadline: float) -> str:
        wait = min(self.config.queue_timeout, deadline - time.monotonic())
        self._publish_queue()
        try:
            return await self.scheduler.acquire(timeout=max(wait, 0.0))
        except RouterError as exc:
            if exc.kind is ErrorKind.RESOURCE_EXHAUSTED:
                self.metrics.rejected.labels("queue_full").inc()
            raise
        finally:
            self._publish_queue()

    async def _readmit(self, flight: _InFlight, deadline: float) -> str:
        """A slot again for a request a full driver refused before it started: at the head
        of the queue (it was admitted once), on a pipeline not known to be full."""
        wait = min(self.config.queue_timeout, deadline - time.monotonic())
        flight.queued = True
        self._publish_queue()
        try:
            return await self.scheduler.acquire(timeout=max(wait, 0.0), priority=True)
        finally:
            flight.queued = False
            self._publish_queue()

    async def _stream(self, request: GenerationInput, flight: _InFlight, attempt: _Attempt,
                      deadline: float) -> AsyncGenerator[tuple[list[int], int], None]:
        """Yield (new tokens, finish reason) from one submission; set `attempt.outcome`."""
        commit = flight.log
        call = attempt.call   # set: a stream taken over (Attach), its first delta read
        if call is None:
            submit = worker_pb2.SubmitRequest(request_id=request.request_id,
                                              prompt_token_ids=request.prompt_token_ids,
                                              sampling=request.sampling,
                                              detachable=request.resumable)
            if commit.committed or attempt.mode == KV:
                submit.resume.generated_token_ids.extend(commit.tokens)
                submit.resume.mode = attempt.mode  # type: ignore[assignment]
            call = self.workers.submit(attempt.address, submit,
                                       timeout=max(deadline - time.monotonic(), 0.001))
            attempt.call = call
        if attempt.evicted:
            call.cancel()
        try:
            while True:
                delta = await call.read()
                if not isinstance(delta, worker_pb2.TokenDelta):  # grpc.aio.EOF
                    return
                try:
                    fresh = commit.accept(delta.position, delta.token_ids)
                except GapError as exc:
                    attempt.reason = str(exc)
                    return
                finish = delta.finish_reason
                if finish in (FR.FINISH_REASON_STOP, FR.FINISH_REASON_LENGTH) or commit.complete:
                    attempt.outcome = Outcome.FINISHED
                    yield fresh, finish or FR.FINISH_REASON_LENGTH
                    return
                if fresh:
                    yield fresh, FR.FINISH_REASON_UNSPECIFIED
                if finish == FR.FINISH_REASON_PAUSED:
                    attempt.outcome, attempt.reason = Outcome.PAUSED, "paused by a drain"
                    return
                if finish == FR.FINISH_REASON_ERROR:
                    raise RouterError(ErrorKind.INTERNAL, f"pipeline {attempt.pipeline_id} "
                                      f"failed request {request.request_id} after "
                                      f"{commit.committed} tokens")
                if finish == FR.FINISH_REASON_CANCELLED:
                    attempt.reason = "cancelled by the worker"
                    return
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if attempt.evicted and task is not None and not task.cancelling():
                attempt.reason = f"pipeline {attempt.pipeline_id} left the topology"
                return
            raise
        except grpc.aio.AioRpcError as exc:
            self._classify(request, flight, attempt, exc)
        finally:
            if not call.done():
                call.cancel()

    def _classify(self, request: GenerationInput, flight: _InFlight, attempt: _Attempt,
                  exc: grpc.aio.AioRpcError) -> None:
        code, detail = exc.code(), exc.details() or ""
        where = f"after {flight.log.committed} tokens"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise RouterError(ErrorKind.DEADLINE_EXCEEDED,
                              f"request {request.request_id} passed its deadline {where}")
        if code == grpc.StatusCode.INVALID_ARGUMENT:  # e.g. a shorter context than ours
            raise RouterError(ErrorKind.INVALID_ARGUMENT, f"pipeline {attempt.pipeline_id} "
                              f"refused the request: {detail}")
        if code == grpc.StatusCode.ABORTED:   # another router replica took it over
            raise RouterError(ErrorKind.ABORTED, f"request {request.request_id} was taken "
                              f"over by another stream: {detail}")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # The driver's cap counts every replica's requests; ours counts only ours.
            attempt.outcome = Outcome.FULL
            attempt.reason = f"pipeline {attempt.pipeline_id} is full: {detail}"
            self.scheduler.mark_full(attempt.pipeline_id)
            self.metrics.pipeline_full.inc()
            return
        if code in FINAL_CODES:
            raise RouterError(ErrorKind.INTERNAL, f"pipeline {attempt.pipeline_id} refused "
                              f"request {request.request_id}: {code.name}: {detail}")
        attempt.reason = f"pipeline {attempt.pipeline_id} failed: {code.name}: {detail}"
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                    grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
            self.scheduler.mark_failed(attempt.pipeline_id)

    async def _resume(self, flight: _InFlight, attempt: _Attempt, deadline: float,
                      failures: int) -> tuple[str, int]:
        commit = flight.log
        interrupted_at = time.monotonic()
        log.info("request %s interrupted after %d tokens: %s", commit.request_id,
                 commit.committed, attempt.reason)
        interruption = Interruption(attempt.pipeline_id, attempt.outcome is Outcome.PAUSED,
                                    attempt.reason)
        flight.queued, flight.paused = True, interruption.paused
        try:
            pipeline_id, mode = await self.resumer.next_pipeline(commit, interruption,
                                                                 deadline, failures)
        finally:
            flight.queued = flight.paused = False
        return self._resumed(commit, pipeline_id, mode, interrupted_at, attempt.pipeline_id)

    async def _topology_changed(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), max(timeout, 0.0))

    def _resumed(self, commit: CommitLog, pipeline_id: str, mode: int,
                 interrupted_at: float = 0.0, interrupted_on: str = "") -> tuple[str, int]:
        commit.record_resume(MODE_NAMES[mode], pipeline_id, interrupted_at, interrupted_on)
        self.metrics.resumed.labels(MODE_NAMES[mode]).inc()
        log.info("request %s resumes on %s by %s at token %d", commit.request_id,
                 pipeline_id, MODE_NAMES[mode], commit.committed)
        return pipeline_id, mode

    # ---- bookkeeping ------------------------------------------------------------------

    def _start_attempt(self, flight: _InFlight, pipeline_id: str, mode: int,
                       attempt: _Attempt | None = None) -> _Attempt:
        if attempt is None:
            pipeline = self.topology.pipelines.get(pipeline_id)
            address = pipeline.driver_address if pipeline else ""
            attempt = _Attempt(pipeline_id, address, mode)
        flight.attempt = attempt
        self._attempts.setdefault(pipeline_id, set()).add(attempt)
        self._publish_queue()
        return attempt

    def _end_attempt(self, attempt: _Attempt) -> None:
        attempts = self._attempts.get(attempt.pipeline_id)
        if attempts is not None:
            attempts.discard(attempt)
            if not attempts:
                del self._attempts[attempt.pipeline_id]
        self.scheduler.release(attempt.pipeline_id)
        self._publish_queue()

    def _chunk(self, request: GenerationInput, flight: _InFlight, text: TextStream,
               fresh: list[int], finish: int, skip: int) -> Chunk | None:
        """The client's next chunk: the new tokens and their text, less the first `skip`
        tokens of the request (a resumed stream's client has them), whose text is
        computed and dropped."""
        start = flight.log.committed - len(fresh)
        held = fresh[: max(0, skip - start)]
        text.add(held)
        fresh = fresh[len(held):]
        out = text.add(fresh)
        if not text.stopped and finish != FR.FINISH_REASON_UNSPECIFIED:
            out += text.finish()
        if text.stopped:
            finish = FR.FINISH_REASON_STOP
        if not fresh and not out and finish == FR.FINISH_REASON_UNSPECIFIED:
            return None
        self.metrics.count_tokens(generated=len(fresh))
        return Chunk(request.request_id, fresh, out, finish,
                     len(request.prompt_token_ids), flight.log.committed)

    def _observe_latency(self, flight: _InFlight, last: float) -> float:
        now = time.monotonic()
        if last == flight.arrived:
            self.metrics.observe_ttft(now - flight.arrived)
            self.counters.ttft.add(now - flight.arrived)
        else:
            self.metrics.observe_itl(now - last)
        return now

    def _finish(self, request: GenerationInput, flight: _InFlight, finish: int) -> None:
        if self.request_log is not None:
            ended = FR.Name(finish)[len("FINISH_REASON_"):].lower()
            self.request_log.write(flight.log, "cancelled" if ended == "unspecified" else ended,
                                   flight.arrived)
        if self._inflight.get(request.request_id) is flight:
            del self._inflight[request.request_id]
            self.topology.hints.pop(request.request_id, None)
        elapsed = time.monotonic() - flight.arrived
        if finish in (FR.FINISH_REASON_STOP, FR.FINISH_REASON_LENGTH):
            self.counters.completed += 1
            self.counters.e2e.add(elapsed)
            self.metrics.observe_e2e(elapsed)
            self.metrics.count_finished(FR.Name(finish)[len("FINISH_REASON_"):].lower())
        elif finish == FR.FINISH_REASON_UNSPECIFIED and flight.resumable:
            # The client went away: the driver runs the request on, for a Resume.
            self.metrics.count_finished("detached")
        elif finish == FR.FINISH_REASON_UNSPECIFIED:  # the client went away
            self.metrics.count_finished("cancelled")
            attempt = flight.attempt
            if attempt is not None and attempt.address:
                self._spawn(self.workers.cancel(attempt.address, request.request_id))
        self._publish_queue()

    def _count_failure(self, exc: RouterError) -> None:
        if exc.kind is ErrorKind.RESOURCE_EXHAUSTED:
            return  # a refusal, counted as rejected
        if exc.kind is ErrorKind.ABORTED:
            self.metrics.count_finished("superseded")  # it goes on in another stream
            return
        self.counters.failed += 1
        self.metrics.count_finished("error")

    def _publish_queue(self) -> None:
        self.metrics.set_queue(self.scheduler.queued, self.scheduler.total_running)

    def _spawn(self, coroutine: object) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coroutine)  # type: ignore[arg-type]
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- the control path -------------------------------------------------------------

    async def update_topology(self, epoch: int, pipelines: list[Pipeline],
                              hints: Iterable[ResumeHint]) -> int:
        """Apply the controller's view; move requests off pipelines that are gone."""
        check_pipelines(pipelines)
        before = {p.driver_address: p.id for p in self.topology.pipelines.values()
                  if p.driver_address}
        lost = self.topology.apply(epoch, pipelines, hints)
        if lost is None:
            log.info("ignored a stale topology (epoch %d < %d)", epoch, self.topology.epoch)
            return self.topology.epoch
        now = time.monotonic()
        current = {p.driver_address for p in pipelines if p.state is not PipelineState.GONE}
        self._left.update({a: (pid, now) for a, pid in before.items() if a not in current})
        for address in current:
            self._left.pop(address, None)
        for request_id in [r for r in self.topology.hints if r not in self._inflight]:
            del self.topology.hints[request_id]  # finished already, or never ours
        for pipeline_id in lost:
            for attempt in list(self._attempts.get(pipeline_id, ())):
                if not self.topology.usable(attempt.pipeline_id, attempt.address):
                    attempt.evict()
        for state in PipelineState:
            self.metrics.pipelines.labels(state.value).set(
                sum(p.state is state for p in self.topology.pipelines.values()))
        self.scheduler.pump()
        self._changed.set()
        self._changed = asyncio.Event()
        await self.workers.retain({p.driver_address for p in pipelines} |
                                  {a.address for s in self._attempts.values() for a in s})
        return self.topology.epoch

    def stats(self) -> control_pb2.RouterStats:
        now = time.monotonic()
        self.metrics.arrival_rate.set(self.arrivals.ewma(now))
        return control_pb2.RouterStats(
            arrival_rate_ewma=self.arrivals.ewma(now),
            arrival_rate_window=self.arrivals.windowed(now),
            queued=self.scheduler.queued, running=self.scheduler.total_running,
            completed=self.counters.completed, failed=self.counters.failed,
            ttft_p50_seconds=self.counters.ttft.percentile(50),
            e2e_p50_seconds=self.counters.e2e.percentile(50),
            e2e_p99_seconds=self.counters.e2e.percentile(99),
            requests=[common_pb2.RequestProgress(
                request_id=rid, prompt_tokens=len(f.log.prompt_token_ids),
                generated_tokens=f.log.committed, kv_kept=f.paused)
                for rid, f in self._inflight.items()],
            epoch=self.topology.epoch)

    def ready(self) -> bool:
        return not self.closing and bool(self.topology.serving())

    async def close(self) -> None:
        await self.workers.close()
