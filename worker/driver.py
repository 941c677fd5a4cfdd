"""A pipeline driver's engine on its own thread: requests in, token events out.

The engine is single-threaded and every step is a collective over the pipeline, so one
thread owns it. gRPC handlers talk to it through `Driver`'s methods, each of which queues a
command and returns a `concurrent.futures.Future`; tokens go to each request's `sink`
(called on the engine thread; the server forwards them to the request's asyncio queue).

A drain (by steps or by a wall-clock deadline) lets the engine run its allowed steps, then
publishes every unfinished request (each rank keeps its share of the KV cache; the driver
remembers the tokens in `PausedRequests`), ends their streams with FINISH_REASON_PAUSED and
reports each one's progress. A drain that `gather`s also keeps each whole cache on the
driver (a rank is leaving). `stop` is a drain of zero steps followed by releasing the
pipeline's other ranks.

While idle, the engine thread pings the pipeline's ranks every `ping_every` seconds, which
keeps every collective inside its timeout and finds a dead peer before a request does. When
the pipeline breaks (a peer died or stopped answering), every stream ends with an error (the
router resumes them elsewhere), `error` says why, and `on_failure` is called once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from spotserve.errors import SpotserveError
from spotserve.v1 import common_pb2
from spotserve.worker.engine.engine import Engine
from spotserve.worker.engine.sequence import FinishReason, RequestState
from spotserve.worker.kv_store import PausedRequests

log = logging.getLogger(__name__)
FR = common_pb2.FinishReason
FINISH = {FinishReason.LENGTH: FR.FINISH_REASON_LENGTH, FinishReason.STOP: FR.FINISH_REASON_STOP,
          FinishReason.ABORT: FR.FINISH_REASON_CANCELLED}
DRAIN_ALL = 1 << 40   # "no step limit" while a deadline drain runs


class NotServing(SpotserveError):
    """The pipeline is drained, stopped or broken: try again elsewhere (UNAVAILABLE)."""


class DuplicateRequest(SpotserveError):
    """A request with this id is already running here (ALREADY_EXISTS)."""


class PipelineFull(SpotserveError):
    """A fresh request finds the pipeline at its batch cap (RESOURCE_EXHAUSTED): the
    router replicas, each counting only its own requests, sent more than the cap."""


@dataclass(frozen=True)
class StreamEvent:
    """A token (or just an end) of one request; `finish` 0 while it goes on. `error` set:
    the pipeline broke and the request must resume elsewhere, or, `rejected`, the engine
    cannot run it (out of memory twice) and it ends with that error."""

    index: int
    token_id: int | None = None
    finish: int = 0
    error: str = ""
    rejected: bool = False


Sink = Callable[[StreamEvent], None]


@dataclass(frozen=True)
class DrainResult:
    steps_run: int
    requests: list[common_pb2.RequestProgress]


@dataclass
class Snapshot:
    """Counters the engine thread publishes after every step, for Status and metrics."""

    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    step_seconds: float = 0.0
    steps: int = 0
    progress: list[common_pb2.RequestProgress] = field(default_factory=list)


class Driver:
    def __init__(self, engine: Engine, paused: PausedRequests,
                 on_step: Callable[[float, Snapshot], None] | None = None,
                 ping_every: float = 1.0,
                 on_failure: Callable[[str], None] | None = None) -> None:
        self.engine, self.paused, self.on_step = engine, paused, on_step
        self.ping_every, self.on_failure = ping_every, on_failure
        self.snapshot = Snapshot(kv_blocks_total=engine.config.num_blocks)
        self.draining = False
        self.error = ""   # why the pipeline broke; "" while it works
        self._contact = time.monotonic()  # the last collective every rank took part in
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = \
            queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._drain: Future[DrainResult] | None = None
        self._deadline: float | None = None
        self._drain_steps = 0
        self._gather = False   # the drain under way keeps whole caches on the driver too
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    def start(self) -> Driver:
        self._thread.start()
        return self

    # ---- commands (any thread) ----------------------------------------------------------
    def _call(self, fn: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        if self._stopped or not self._thread.is_alive():
            future.set_exception(NotServing("the pipeline driver has stopped"))
        else:
            self._commands.put((fn, future))
        return future

    def submit(self, state: RequestState, sink: Sink) -> Future[None]:
        """Start a request, or resume one: from the KV its ranks hold when
        `state.num_computed` says so (falling back to re-prefill), else by re-prefill."""
        return self._call(lambda: self._submit(state, sink))

    def cancel(self, request_id: str) -> Future[bool]:
        return self._call(lambda: self._cancel(request_id))

    def drain(self, steps: int | None = None, deadline_unix: float | None = None,
              gather: bool = False) -> Future[DrainResult]:
        """Stop after `steps` more steps, or before `deadline_unix`; KV kept (`gather`:
        each whole cache on the driver too)."""
        done: Future[DrainResult] = Future()
        return self._call_into(lambda: self._start_drain(steps, deadline_unix, done, gather),
                               done)

    def undrain(self) -> Future[None]:
        return self._call(self._undrain)

    def set_max_batch(self, max_num_seqs: int) -> Future[None]:
        """Run at most this many requests at once from the next step on."""
        def apply() -> None:
            scheduler = self.engine.scheduler
            scheduler.config = replace(scheduler.config, max_num_seqs=max_num_seqs)
        return self._call(apply)

    def stop(self) -> Future[DrainResult]:
        """Pause every request (KV kept) and release the pipeline's other ranks."""
        done: Future[DrainResult] = Future()
        return self._call_into(lambda: self._stop(done), done)

    def _call_into(self, fn: Callable[[], Any], done: Future[DrainResult]
                   ) -> Future[DrainResult]:
        """Run `fn` (which completes `done`) on the engine thread; when it cannot run (the
        driver stopped or its pipeline failed), `done` fails instead of waiting forever."""
        def relay(call: Future[Any]) -> None:
            error = call.exception()
            if error is not None and not done.done():
                done.set_exception(error)

        self._call(fn).add_done_callback(relay)
        return done

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # ---- the engine thread ------------------------------------------------------------------
    def _can_step(self) -> bool:
        return self.engine.has_unfinished and self.engine.steps_left != 0

    def _loop(self) -> None:
        try:
            while not self._stopped:
                self._run_commands(block=not self._can_step())
                if not self._stopped and self._can_step():
                    self._step()
                if not self._stopped:
                    self._keepalive()
                self._finish_drain_if_done()
        except Exception as exc:   # a broken pipeline: every stream must resume elsewhere
            log.exception("pipeline driver failed")
            self.error = f"pipeline failed: {exc}"
            self._fail_all(self.error)
            if self.on_failure is not None:
                self.on_failure(self.error)

    def _keepalive(self) -> None:
        now = time.monotonic()
        if now - self._contact >= self.ping_every:
            self.engine.keepalive()
            self._contact = time.monotonic()

    def _run_commands(self, block: bool) -> None:
        try:
            item = self._commands.get(timeout=0.05) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, future = item
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)
                if not isinstance(exc, SpotserveError):
                    raise
            if self._stopped:
                return
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return

    def _step(self) -> None:
        if self._deadline is not None and \
                time.time() + self.snapshot.step_seconds >= self._deadline:
            self.engine.drain(0)
            return
        start, before = time.perf_counter(), self.engine.num_steps
        events = self.engine.step()
        seconds = time.perf_counter() - start
        if self.engine.num_steps != before:   # the step ran on every rank
            self._contact = time.monotonic()
        if self.draining:
            self._drain_steps += 1
        self._publish(seconds)
        for event in events:
            if event.error:
                log.warning("request %s rejected: %s", event.request_id, event.error)
                sink = self._sinks.pop(event.request_id, None)
                if sink is not None:
                    sink(StreamEvent(event.index, None, 0, event.error, rejected=True))
                continue
            finish = FINISH[event.finish_reason] if event.finish_reason else 0
            sink = self._sinks.pop(event.request_id) if finish else \
                self._sinks.get(event.request_id)
            if sink is not None:
                sink(StreamEvent(event.index, event.token_id, finish))

    def _publish(self, seconds: float) -> None:
        snap, engine = self.snapshot, self.engine
        scheduler = engine.scheduler
        ema = seconds if snap.step_seconds == 0 else 0.8 * snap.step_seconds + 0.2 * seconds
        self.snapshot = Snapshot(
            len(scheduler.running), len(scheduler.waiting),
            engine.blocks.num_blocks - engine.blocks.num_free, engine.blocks.num_blocks,
            ema if seconds else snap.step_seconds, snap.steps + (1 if seconds else 0),
            [_progress(s) for s in (*scheduler.running, *scheduler.waiting)])
        if self.on_step is not None:
            self.on_step(seconds, self.snapshot)

    def _submit(self, state: RequestState, sink: Sink) -> None:
        if self.draining:
            raise NotServing("the pipeline is drained; it takes no new requests")
        if self.engine.scheduler.get(state.request_id) is not None:
            raise DuplicateRequest(f"request {state.request_id} is already running here")
        cap = self.engine.scheduler.config.max_num_seqs
        fresh = not state.num_computed and not state.output_token_ids
        if fresh and len(self._sinks) >= cap:   # a resumed one keeps the place it had
            raise PipelineFull(f"the pipeline is full ({len(self._sinks)} requests, its "
                               f"batch cap is {cap}); try another pipeline")
        if state.num_computed:
            if not self.engine.adopt(state):
                log.warning("request %s: its KV cannot be adopted here (a rank lacks its "
                            "share, or the cache is full); it re-prefills", state.request_id)
        elif state.output_token_ids:
            self.engine.resume(state)
        else:
            self.engine.submit(state.request_id, state.prompt_token_ids, state.params)
        self._sinks[state.request_id] = sink
        self._publish(0.0)

    def _cancel(self, request_id: str) -> bool:
        seq = self.engine.scheduler.get(request_id)
        if seq is None or not self.engine.abort(request_id):
            return False
        sink = self._sinks.pop(request_id, None)
        if sink is not None:
            sink(StreamEvent(len(seq.output_token_ids), None, FR.FINISH_REASON_CANCELLED))
        self._publish(0.0)
        return True

    def _start_drain(self, steps: int | None, deadline: float | None,
                     done: Future[DrainResult], gather: bool = False) -> None:
        if self._drain is not None:   # a second drain replaces the first's limit
            self._drain.add_done_callback(lambda f: _copy_result(f, done))
        else:
            self._drain, self._drain_steps = done, 0
        self.draining, self._deadline = True, deadline
        self._gather = self._gather or gather
        self.engine.drain(DRAIN_ALL if steps is None else steps)

    def _undrain(self) -> None:
        self.draining, self._deadline, self._gather = False, None, False
        self.engine.undrain()

    def _finish_drain_if_done(self) -> None:
        if self._drain is None or self._can_step():
            return
        self.engine.drain(0)
        future, self._drain = self._drain, None
        future.set_result(DrainResult(self._drain_steps, self._pause_all()))
        self._gather = False

    def _pause_all(self) -> list[common_pb2.RequestProgress]:
        progress = []
        for state in self.engine.publish(gather=self._gather):
            request_id = state.request_id
            self.paused.put_state(state)
            progress.append(common_pb2.RequestProgress(
                request_id=request_id, prompt_tokens=len(state.prompt_token_ids),
                generated_tokens=len(state.output_token_ids), kv_tokens=state.num_computed,
                kv_kept=state.num_computed > 0, max_tokens=state.params.max_tokens))
            sink = self._sinks.pop(request_id, None)
            if sink is not None:
                sink(StreamEvent(len(state.output_token_ids), None, FR.FINISH_REASON_PAUSED))
        self._publish(0.0)
        return progress

    def _stop(self, done: Future[DrainResult]) -> None:
        self.draining = True
        self.engine.drain(0)
        result = DrainResult(self._drain_steps, self._pause_all())
        if self._drain is not None:
            self._drain.set_result(result)
            self._drain = None
        self._stopped = True
        try:
            self.engine.shutdown()
        except Exception as exc:  # a rank already gone has nothing to be released from
            log.warning("could not release the pipeline's other ranks: %s", exc)
        done.set_result(result)

    def _fail_all(self, reason: str) -> None:
        self._stopped = True
        for sink in self._sinks.values():
            sink(StreamEvent(0, None, 0, reason))
        self._sinks.clear()
        for future in (self._drain,):
            if future is not None and not future.done():
                future.set_exception(NotServing(reason))
        while not self._commands.empty():
            _, future = self._commands.get_nowait()
            future.set_exception(NotServing(reason))


def _progress(seq: Any) -> common_pb2.RequestProgress:
    return common_pb2.RequestProgress(
        request_id=seq.request_id, prompt_tokens=len(seq.prompt_token_ids),
        generated_tokens=len(seq.output_token_ids), kv_tokens=seq.num_computed,
        kv_kept=seq.num_computed > 0, max_tokens=seq.params.max_tokens)


def _copy_result(source: Future[DrainResult], target: Future[DrainResult]) -> None:
    if source.exception() is not None:
        target.set_exception(source.exception())
    else:
        target.set_result(source.result())
