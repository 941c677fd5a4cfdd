"""The Worker gRPC service of one GPU: configure epochs, drive requests, drain, stream
tensors, report status.

State machine (`WorkerState`): STANDBY → (Configure) LOADING → READY ⇄ DRAINING → DRAINED,
and STOPPING on shutdown. Configure gathers the role's weights (kept / peers / checkpoint,
see `weights`) and the KV caches it imports while the previous epoch keeps serving, then
stops the previous epoch (its paused requests keep their KV), joins the new pipeline
world and builds the stage. A Configure whose role and rendezvous group are unchanged only
moves the epoch on and imports KV (the scale-out fast path: the pipeline never stops).

Blocking work (joining a world, building a stage, the engine itself) runs on threads, so
the event loop keeps answering peers' `PullTensors` while this worker is reconfiguring.

A pipeline breaks when a peer dies or stops answering: a collective fails, or times out
after `peer_timeout_s`. The worker then aborts the epoch's communicators, ends every
stream of the pipeline with an error (the router resumes them elsewhere), falls back to
STANDBY and says why in `Status.pipeline_error` until the next Configure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

import grpc
import torch

from spotserve.auth import TokenInterceptor, call_metadata
from spotserve.errors import SpotserveError
from spotserve.layout import TensorSlice, position_slices
from spotserve.model_spec import ModelSpec
from spotserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from spotserve.worker import health, kv_sizing
from spotserve.worker.driver import (
    DrainResult,
    Driver,
    DuplicateRequest,
    NotServing,
    PipelineFull,
    Snapshot,
    StreamEvent,
)
from spotserve.worker.engine.builder import build_runner
from spotserve.worker.engine.engine import Engine, EngineConfig, first_line, free_device_memory
from spotserve.worker.engine.kv_shares import KVShares
from spotserve.worker.engine.runner import StageRunner
from spotserve.worker.epoch import EpochRole, join_world, leave_world, parse_role, role_key
from spotserve.worker.journal import Journal, relay
from spotserve.worker.kv_sizing import KVBudget, KVCacheTooSmall, KVSize, size_kv_cache
from spotserve.worker.kv_store import Paused, PausedRequests, blob_of, import_kv
from spotserve.worker.metrics import WorkerMetrics
from spotserve.worker.model.decoder import TORCH_DTYPES, StageModel, reusable
from spotserve.worker.model.parallel import DEFAULT_PEER_TIMEOUT, EpochGroups, backend_for
from spotserve.worker.peer_service import TensorServicer
from spotserve.worker.requests import KVUnavailable, request_state
from spotserve.worker.tensor_store import TensorStore
from spotserve.worker.transfer import CHANNEL_OPTIONS, PullItem, pull
from spotserve.worker.weights import GatherStats, gather, hold

log = logging.getLogger(__name__)
WS = worker_pb2.WorkerState
# The router pings its drivers every 10 s, with or without calls in flight, to find a dead
# one within seconds; the server's defaults (a ping per 5 minutes without data) would
# answer that with GOAWAY "too_many_pings" and drop the connection.
KEEPALIVE_ACCEPTED = [("grpc.keepalive_permit_without_calls", 1),
                      ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                      ("grpc.http2.max_ping_strikes", 0)]
FR = common_pb2.FinishReason
Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True)
class WorkerOptions:
    address: str = ""                     # as peers and the router reach this worker
    checkpoint: Path | None = None        # default model folder (ModelRef may override)
    dtype: str | None = None
    device: str = "cpu"
    bf16: bool = True                     # the device computes in bf16 (False: T4, V100)
    token: str = ""
    engine: EngineConfig = field(default_factory=EngineConfig)
    # how each configuration's KV cache is sized (--kv-blocks, --gpu-memory-utilization,
    # --kv-memory-gib); None: engine.num_blocks blocks, whatever the shard
    kv: KVBudget | None = None
    join_timeout_s: float = 60.0
    peer_timeout_s: float = DEFAULT_PEER_TIMEOUT  # a silent peer breaks the pipeline after
    streams_per_peer: int = 2
    send_bytes_per_s: float = 0.0         # 0: no limit on what peers pull from here
    bulk_port: int = 0                    # tensor bytes over plain TCP: 0 any free, -1 off
    kv_keep_seconds: float = 600.0
    journal_keep_seconds: float = 300.0   # a detachable request's record after it ends


def default_dtype(model_dtype: str, bf16: bool) -> str:
    """The dtype a worker serves a model in when no one names one: the checkpoint's, but
    float16 for a bfloat16 model on a GPU without bf16 math (T4, V100: bf16 would run
    emulated, several times slower). Same range of use, 3 more mantissa bits, a narrower
    exponent: Llama-family activations fit it."""
    return "float16" if model_dtype == "bfloat16" and not bf16 else model_dtype


class WorkerServicer(TensorServicer):
    def __init__(self, options: WorkerOptions, metrics: WorkerMetrics | None = None) -> None:
        self.paused = PausedRequests(options.kv_keep_seconds)
        self.journal = Journal(options.journal_keep_seconds)  # requests and their tokens
        self.shares = KVShares(options.kv_keep_seconds)  # this rank's share of paused KV
        super().__init__(TensorStore(), blob_of(self.shares))
        self.options, self.metrics = options, metrics or WorkerMetrics()
        self.state, self.epoch = WS.WORKER_STATE_STANDBY, 0
        self.role_message = worker_pb2.Role()
        self.role: EpochRole | None = None
        self.spec: ModelSpec | None = None
        self._folder: Path | None = None    # the checkpoint of `spec`
        # kept pieces the gather left to copy on the GPU (weights.GatherStats.on_device)
        self._on_device: list[tuple[TensorSlice, TensorSlice]] = []
        self.weight_bytes = 0
        self.engine_config = options.engine   # the current epoch's (limits, KV blocks)
        self.kv_size: KVSize | None = None    # the current epoch's KV cache on this rank
        self._key = b""
        self._groups: EpochGroups | None = None
        self._runner: StageRunner | None = None
        self.driver: Driver | None = None
        self.pipeline_error = ""   # why the current epoch's pipeline broke
        self._follower: threading.Thread | None = None
        self._preloaded: tuple[bytes, dict[str, torch.Tensor]] | None = None
        self._staged: dict[str, torch.Tensor] = {}
        self._gather_seconds = 0.0
        self._configure_lock = asyncio.Lock()
        self._switching = False   # a Configure is leaving one epoch for the next
        self._configuring = 0     # the epoch of the Configure in progress
        self._abort_join = threading.Event()  # give up the rendezvous in progress
        self._channels: dict[str, grpc.aio.Channel] = {}

    # ---- helpers ------------------------------------------------------------------------
    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        return self._channels[address]

    async def _pull(self, items: list[PullItem]) -> object:
        return await pull(items, self._channel, token=self.options.token, epoch=self.epoch,
                          streams_per_peer=self.options.streams_per_peer)

    def _spec_for(self, model: worker_pb2.ModelRef) -> tuple[ModelSpec, Path]:
        folder = Path(model.checkpoint_path) if model.checkpoint_path else self.options.checkpoint
        if folder is None:
            raise SpotserveError("no model: give model.checkpoint_path or start with --model")
        spec = ModelSpec.from_hf_config(folder, dtype=model.dtype or self.options.dtype)
        if not (model.dtype or self.options.dtype):
            spec = spec.with_dtype(default_dtype(spec.dtype, self.options.bf16))
        if not spec.is_llama_family:
            raise SpotserveError(f"{folder}: family {spec.family!r} cannot be served")
        return spec, folder

    def _engine_config(self, role: worker_pb2.Role, spec: ModelSpec) -> EngineConfig:
        config = self.options.engine
        scheduler = replace(config.scheduler, max_model_len=min(config.scheduler.max_model_len,
                                                                spec.max_position))
        if role.max_batch:
            scheduler = replace(scheduler, max_num_seqs=role.max_batch)
        return replace(config, scheduler=scheduler)

    def _log(self, event: str, **fields: Any) -> None:
        log.info(event, extra={"fields": {"epoch": self.epoch, **fields}})

    # ---- Configure ------------------------------------------------------------------------
    async def Configure(self, request: worker_pb2.ConfigureRequest,
                        context: Context) -> worker_pb2.ConfigureResponse:
        if self.state == WS.WORKER_STATE_STOPPING:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "the worker is stopping")
        if self._configure_lock.locked() and request.epoch > self._configuring:
            self._abort_join.set()  # a newer epoch: the one joining now will never form
        task = asyncio.ensure_future(self._configure_locked(request))
        task.add_done_callback(_seen)
        try:
            reply = await asyncio.shield(task)
        except asyncio.CancelledError:
            # The caller gave up (a deadline, or the controller re-planning): gathering stops
            # half way, and so does a rendezvous still waiting for its ranks (the worker is
            # then in no epoch: STANDBY); building a stage once joined runs to its end.
            if self._switching:
                self._abort_join.set()
            else:
                task.cancel()
            raise
        except SpotserveError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:   # a peer, the rendezvous or the device failed: not a
            # transient fault to retry as it is (ABORTED), but one to re-plan around
            await _abort(context, grpc.StatusCode.ABORTED, f"configure failed: {exc}")
        return reply

    async def _configure_locked(self, request: worker_pb2.ConfigureRequest
                                ) -> worker_pb2.ConfigureResponse:
        async with self._configure_lock:
            self._configuring = request.epoch
            self._abort_join.clear()
            start = time.perf_counter()
            try:
                reply = await self._configure(request)
            except SpotserveError as exc:
                if self.state == WS.WORKER_STATE_LOADING:   # it left its epoch: no role
                    self.state = WS.WORKER_STATE_STANDBY
                    self._log("configure failed", reason=str(exc))
                raise
            except Exception:
                log.exception("configure failed")
                if self.state == WS.WORKER_STATE_LOADING:
                    self.state = WS.WORKER_STATE_STANDBY
                raise
            finally:
                self._switching = False
            reply.seconds = time.perf_counter() - start
            self.metrics.epoch.set(self.epoch)
            kv = self.kv_size.fields() if self.kv_size is not None and self.role else {}
            self._log("configured", state=WS.Name(self.state), seconds=round(reply.seconds, 3),
                      gather_seconds=round(self._gather_seconds, 3), kept=reply.bytes_kept,
                      pulled=reply.bytes_pulled, checkpoint=reply.bytes_from_checkpoint,
                      max_model_len=self.engine_config.scheduler.max_model_len, **kv)
            return reply

    async def _configure(self, request: worker_pb2.ConfigureRequest
                         ) -> worker_pb2.ConfigureResponse:
        reply = worker_pb2.ConfigureResponse(epoch=request.epoch)
        if not request.HasField("role"):
            self._switching = True
            await self._teardown()
            self.epoch, self.state = request.epoch, WS.WORKER_STATE_STANDBY
            reply.state = self.state
            return reply
        spec, folder = self._spec_for(request.model)
        role = parse_role(request, spec)
        key = role_key(request)
        self._check_pipeline()
        fast = key == self._key and not request.preload_only and \
            self.state in (WS.WORKER_STATE_READY, WS.WORKER_STATE_DRAINED)
        before = self.state
        if not fast:
            self.state = WS.WORKER_STATE_LOADING
        try:
            gather_start = time.perf_counter()
            stats, kv_bytes = await self._gather(request, spec, folder, role, key, fast)
            self._gather_seconds = time.perf_counter() - gather_start
        except BaseException:
            self.state = before
            raise
        reply.bytes_kept, reply.bytes_from_checkpoint = stats.bytes_kept, \
            stats.bytes_from_checkpoint
        reply.bytes_pulled = stats.bytes_pulled + kv_bytes
        if request.preload_only:
            self.state = before
        elif fast:
            self._switching = True
            self.epoch, self.role_message = request.epoch, request.role
            if self.driver is not None:
                config = self._engine_config(request.role, spec).scheduler
                await asyncio.wrap_future(self.driver.set_max_batch(config.max_num_seqs))
                await asyncio.wrap_future(self.driver.undrain())
            self.state = WS.WORKER_STATE_READY
        else:
            self._switching = True
            await self._start(request, spec, folder, role, key)
        reply.state = self.state
        return reply

    async def _gather(self, request: worker_pb2.ConfigureRequest, spec: ModelSpec,
                      folder: Path | None, role: EpochRole, key: bytes, fast: bool
                      ) -> tuple[GatherStats, int]:
        async def weights() -> tuple[dict[str, torch.Tensor], GatherStats]:
            if fast:
                return {}, GatherStats(bytes_kept=self.weight_bytes)
            if self._preloaded is not None and self._preloaded[0] == key:
                tensors = self._preloaded[1]
                return tensors, GatherStats(bytes_kept=sum(t.nbytes for t in tensors.values()))
            cuda = self.options.device.startswith("cuda")
            old = None if request.preload_only else self._previous(spec, folder)
            keep = set() if old is None else reusable(
                old, position_slices(spec, role.config, role.position),
                TORCH_DTYPES[spec.dtype], old.device)
            held = None   # the previous stage's slices on the GPU: kept pieces copied there
            if cuda and old is not None:
                held = {s.tensor: s for s in old.slices if s.tensor not in keep}
            return await gather(spec, role.config, role.position, request.weights, self.store,
                                folder, self._pull, pin=cuda, skip=keep, on_device=held)

        (tensors, stats), kv_bytes = await asyncio.gather(
            weights(), self._import_kv(request.kv_imports, spec))
        self._on_device = stats.on_device
        self._preloaded = (key, tensors) if request.preload_only else None
        self._staged = tensors
        for source, count in (("kept", stats.bytes_kept), ("peer", stats.bytes_pulled + kv_bytes),
                              ("checkpoint", stats.bytes_from_checkpoint)):
            self.metrics.bytes_in.labels(source).inc(count)
        self.metrics.transfer_seconds.observe(stats.seconds)
        for failure in stats.failovers:
            self._log("failover to the checkpoint", reason=failure)
        return stats, kv_bytes

    def _previous(self, spec: ModelSpec, folder: Path | None) -> StageModel | None:
        """The current stage, when it is of the same checkpoint (the new stage may take
        its tensors over, or copy from them on the device)."""
        old = self._runner.model if self._runner is not None else None
        return old if (spec, folder) == (self.spec, self._folder) else None

    async def _import_kv(self, imports: Any, spec: ModelSpec) -> int:
        if not imports:
            return 0
        pulled, problems = await import_kv(imports, spec, self._pull, self.shares)
        for request_id in {i.slice.request_id for i in imports}:
            self.paused.pop(request_id)  # drained here before: it went on elsewhere since
        for problem in problems:
            self._log("KV import failed; those requests will re-prefill", reason=problem)
        return pulled

    async def _start(self, request: worker_pb2.ConfigureRequest, spec: ModelSpec,
                     folder: Path, role: EpochRole, key: bytes) -> None:
        tensors, self._staged = self._staged, {}
        old = self._previous(spec, folder)
        await self._teardown()
        config = self._engine_config(request.role, spec)
        await asyncio.to_thread(self._build, role, spec, folder, tensors, config, old)
        self.epoch, self.role, self.spec, self._key = request.epoch, role, spec, key
        self._folder = folder
        self.role_message = request.role
        self.state = WS.WORKER_STATE_READY

    def _build(self, role: EpochRole, spec: ModelSpec, folder: Path,
               tensors: dict[str, torch.Tensor], config: EngineConfig,
               old: StageModel | None) -> None:
        start = time.perf_counter()
        join_world(role, backend_for(self.options.device), self.options.join_timeout_s,
                   self._abort_join, connect_s=max(5.0, 2 * self.options.peer_timeout_s))
        if role.world_size == 1:
            groups = EpochGroups.single(role.config)
        else:
            groups = EpochGroups.create(role.epoch, role.config, role.ranks(),
                                        self.options.peer_timeout_s)
        joined = time.perf_counter()
        failed = ""
        try:
            size = self._size_kv(role, spec, config, groups)
            config = replace(config, num_blocks=size.blocks)
            runner = build_runner(folder, groups, config, dtype=spec.dtype,
                                  device=self.options.device, tensors=tensors,
                                  shares=self.shares, reuse=old,
                                  on_device=self._on_device if old is not None else ())
        except torch.OutOfMemoryError as exc:   # the stage does not fit: say so, free it all
            _leave(groups)
            tensors.clear()
            failed = first_line(exc)
        except BaseException:
            _leave(groups)   # so that the next Configure can form its world
            raise
        if failed:   # out of the except block: the half-built stage's frames are let go
            free_device_memory()
            raise SpotserveError(
                f"out of memory building stage {role.position.stage} (TP rank "
                f"{role.position.tp_rank}, {spec.dtype}) on {self.options.device}: "
                f"{failed}; the worker is back in standby with nothing loaded. "
                "Plan more GPUs per stage, or lower --gpu-memory-utilization")
        tensors.clear()
        self.weight_bytes = hold(self.store, runner.model)
        self.engine_config, self.kv_size = config, size
        self._log("built the stage", epoch=role.epoch, join_seconds=round(joined - start, 3),
                  build_seconds=round(time.perf_counter() - joined, 3), **size.fields())
        self._groups, self._runner = groups, runner
        self.pipeline_error = ""
        if role.is_driver:
            self.driver = Driver(Engine(runner, config), self.paused, self._on_step,
                                 ping_every=self.options.peer_timeout_s / 3,
                                 on_failure=self._pipeline_failed).start()
            self.metrics.kv_blocks_total.set(config.num_blocks)
        else:
            self._follower = threading.Thread(target=self._follow, args=(runner,),
                                              name="follower", daemon=True)
            self._follower.start()

    def _size_kv(self, role: EpochRole, spec: ModelSpec, config: EngineConfig,
                 groups: EpochGroups) -> KVSize:
        """This epoch's KV cache: sized for this rank's shard (see `kv_sizing`), then the
        smallest of the pipeline's ranks, since the driver's block tables address every
        rank's cache. Every rank takes part even when its own sizing failed, so that its
        peers fail at once too instead of waiting on it."""
        budget = self.options.kv or KVBudget(blocks=config.num_blocks)
        error: KVCacheTooSmall | None = None
        size: KVSize | None = None
        try:
            size = size_kv_cache(budget, spec, role.config, role.position, config,
                                 kv_sizing.device_memory_bytes(self.options.device))
        except KVCacheTooSmall as exc:
            error = exc
        blocks = groups.min_int(size.blocks if size is not None else 0)
        if error is not None:
            raise error
        assert size is not None
        if blocks < 1:
            raise KVCacheTooSmall("another GPU of this pipeline cannot hold its model shard "
                                  "plus one --max-model-len sequence's KV cache (see its "
                                  "Configure error)")
        if blocks < size.blocks:
            self._log("KV cache cut to the pipeline's smallest", blocks=size.blocks,
                      pipeline_blocks=blocks)
            size = replace(size, blocks=blocks)
        return size

    def _follow(self, runner: StageRunner) -> None:
        try:
            runner.serve_forever()
        except Exception as exc:
            log.exception("pipeline follower failed")
            self._pipeline_failed(f"pipeline failed: {exc}")
            self.state = WS.WORKER_STATE_STANDBY

    def _pipeline_failed(self, reason: str) -> None:
        """A peer of this epoch's pipeline is gone (engine or follower thread): abort the
        communicators so nothing stays blocked on it, and say so in Status."""
        self.pipeline_error = reason
        self.metrics.pipeline_failures.inc()
        groups = self._groups
        if groups is not None:
            groups.abort()

    def _on_step(self, seconds: float, snapshot: Snapshot) -> None:
        if seconds:
            self.metrics.decode_steps.inc()
            self.metrics.step_seconds.observe(seconds)
        self.metrics.running.set(snapshot.running)
        self.metrics.waiting.set(snapshot.waiting)
        self.metrics.kv_blocks_used.set(snapshot.kv_blocks_used)
        if snapshot.kv_blocks_total:
            self.metrics.kv_usage.labels(self.spec.name if self.spec else "").set(
                snapshot.kv_blocks_used / snapshot.kv_blocks_total)

    async def _teardown(self) -> None:
        """Leave the current epoch: pause its requests (KV kept), release the pipeline."""
        if self.driver is not None:
            try:
                result = await asyncio.wrap_future(self.driver.stop())
                self._log("stopped the pipeline", paused=len(result.requests))
            except NotServing:   # its pipeline already failed (a peer died): nothing to stop
                self._log("the pipeline had already stopped")
            await asyncio.to_thread(self.driver.join, self.options.join_timeout_s)
            self.driver = None
        if self._follower is not None:
            await asyncio.to_thread(self._follower.join, self.options.join_timeout_s)
            if self._follower.is_alive():
                raise SpotserveError("the previous epoch's driver has not released this "
                                     "worker yet; configure its driver first")
            self._follower = None
        if self._groups is not None:
            groups, self._groups = self._groups, None
            await asyncio.to_thread(_leave, groups)
        self._runner, self.role, self._key = None, None, b""
        self.role_message = worker_pb2.Role()

    # ---- requests ------------------------------------------------------------------------
    async def Submit(self, request: worker_pb2.SubmitRequest,
                     context: Context) -> AsyncIterator[worker_pb2.TokenDelta]:
        driver = self.driver
        if driver is None:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                         f"this worker is not a pipeline driver (state "
                         f"{WS.Name(self.state)})")
        if self.state != WS.WORKER_STATE_READY:
            await _abort(context, grpc.StatusCode.UNAVAILABLE,
                         f"the pipeline is not serving (state {WS.Name(self.state)})")
        assert self.spec is not None
        try:
            state = request_state(request, self.spec, self.engine_config, self.paused,
                                  self.shares)
        except SpotserveError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except KVUnavailable as exc:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc.args[0]))
        loop = asyncio.get_running_loop()
        # The record takes the engine's events from the start, and goes into the journal
        # once the engine took the request (one it refuses, say a duplicate id, leaves the
        # journal and any stream following that id as they were).
        record = self.journal.prepare(request)

        def sink(event: StreamEvent) -> None:
            loop.call_soon_threadsafe(record.add, event.index, event.token_id, event.finish,
                                      event.error, event.rejected)

        accepted = driver.submit(state, sink)
        try:
            await asyncio.wrap_future(accepted)
        except SpotserveError as exc:   # not taken: the shares stay for the next attempt
            await _abort(context, _code_for(exc), str(exc))
        except asyncio.CancelledError:   # the deadline passed before the engine took it
            driver.cancel(request.request_id)
            raise
        owner = self.journal.adopt(record)
        async for delta in relay(context, self.journal.stream(
                record, owner, len(request.resume.generated_token_ids), driver.cancel)):
            yield delta

    def _cancel_running(self, request_id: str) -> None:
        if self.driver is not None:
            self.driver.cancel(request_id)

    async def Lookup(self, request: worker_pb2.LookupRequest,
                     context: Context) -> worker_pb2.LookupResponse:
        if not request.request_id:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "request_id is empty")
        return self.journal.lookup(request.request_id)

    async def Attach(self, request: worker_pb2.AttachRequest,
                     context: Context) -> AsyncIterator[worker_pb2.TokenDelta]:
        if not request.request_id:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "request_id is empty")
        async for delta in relay(context, self.journal.take_over(request.request_id,
                                                                  self._cancel_running)):
            yield delta

    async def Cancel(self, request: worker_pb2.CancelRequest,
                     context: Context) -> worker_pb2.CancelResponse:
        if not request.request_id:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "request_id is empty")
        found = self.paused.pop(request.request_id) is not None
        found = self.journal.drop(request.request_id) or found
        found = self.shares.drop(request.request_id) or found
        if self.driver is not None:
            with contextlib.suppress(SpotserveError):
                found = await asyncio.wrap_future(self.driver.cancel(request.request_id)) or found
        return worker_pb2.CancelResponse(found=found)

    async def Drain(self, request: worker_pb2.DrainRequest,
                    context: Context) -> worker_pb2.DrainResponse:
        driver = self.driver
        if driver is None:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                         "this worker is not a pipeline driver")
        if request.epoch and request.epoch != self.epoch:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                         f"drain for epoch {request.epoch}; this worker is in {self.epoch}")
        limit = request.WhichOneof("limit")
        if limit is None:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         "give steps or deadline_unix")
        if self.state != WS.WORKER_STATE_STOPPING:  # (SIGTERM: its own drain runs already;
            self.state = WS.WORKER_STATE_DRAINING   # this one takes it over, still stopping)
        future = driver.drain(steps=request.steps, gather=request.gather) \
            if limit == "steps" else \
            driver.drain(deadline_unix=request.deadline_unix, gather=request.gather)
        try:
            result: DrainResult = await asyncio.wrap_future(future)
        except SpotserveError as exc:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, str(exc))
        if self.state == WS.WORKER_STATE_DRAINING:
            self.state = WS.WORKER_STATE_DRAINED
        self._log("drained", steps=result.steps_run, paused=len(result.requests))
        return worker_pb2.DrainResponse(requests=result.requests, steps_run=result.steps_run)

    # ---- peers and status -----------------------------------------------------------------
    async def PullTensors(self, request: worker_pb2.PullTensorsRequest,
                          context: Context
                          ) -> AsyncIterator[worker_pb2.TensorChunk]:
        rate = self.options.send_bytes_per_s
        async for chunk in super().PullTensors(request, context):
            self.metrics.bytes_out.inc(len(chunk.data))
            yield chunk
            if rate:
                await asyncio.sleep(len(chunk.data) / rate)

    async def Status(self, request: worker_pb2.StatusRequest,
                     context: Context) -> worker_pb2.WorkerStatus:
        return self.status()

    def _check_pipeline(self) -> None:
        """A driver whose pipeline broke (a peer died) no longer serves its role."""
        if self.driver is not None and not self.driver.alive and \
                self.state in (WS.WORKER_STATE_READY, WS.WORKER_STATE_DRAINED):
            self.state = WS.WORKER_STATE_STANDBY

    def status(self) -> worker_pb2.WorkerStatus:
        self._check_pipeline()
        reply = worker_pb2.WorkerStatus(epoch=self.epoch, state=self.state,
                                        role=self.role_message, device=self.options.device,
                                        weight_bytes=self.weight_bytes,
                                        pipeline_error=self.pipeline_error)
        if self.driver is not None:
            snap = self.driver.snapshot
            reply.running, reply.waiting = snap.running, snap.waiting
            reply.kv_blocks_used, reply.kv_blocks_total = snap.kv_blocks_used, \
                snap.kv_blocks_total
            reply.decode_step_seconds = snap.step_seconds
            reply.requests.extend(snap.progress)
        if self.driver is not None:   # paused requests: drained here, or KV imported here
            for rid in sorted(set(self.paused.ids()) | set(self.shares.ids())):
                reply.requests.append(_paused_progress(rid, self.paused.get(rid),
                                                       self.shares.tokens(rid)))
        return reply

    def serving(self, service: str) -> bool | None:
        """Health: the process is live unless stopping; the Worker service is ready when
        it serves a role."""
        self._check_pipeline()
        if service == "":
            return self.state != WS.WORKER_STATE_STOPPING
        if service == "spotserve.v1.Worker":
            return self.state == WS.WORKER_STATE_READY
        return None

    async def shutdown(self, grace_s: float) -> None:
        """SIGTERM: stop taking requests, let running ones finish until half the grace
        period and pause the rest with their KV kept (peers may still pull it until the
        server stops). A driver then releases its pipeline's other ranks; a follower asks
        its pipeline's driver to drain the same way before it goes."""
        self.state = WS.WORKER_STATE_STOPPING
        deadline = time.time() + grace_s / 2
        try:
            if self.driver is not None:
                drain = asyncio.wrap_future(self.driver.drain(deadline_unix=deadline))
                await asyncio.wait_for(drain, grace_s / 2 + 5)
                await asyncio.wait_for(asyncio.wrap_future(self.driver.stop()), 10)
            elif self._follower is not None and _driver_address(self.role_message):
                stub = worker_pb2_grpc.WorkerStub(
                    self._channel(_driver_address(self.role_message)))
                # this rank's share leaves with it: the driver keeps each whole cache
                await stub.Drain(worker_pb2.DrainRequest(deadline_unix=deadline, gather=True),
                                 metadata=call_metadata(self.options.token),
                                 timeout=grace_s / 2 + 5)
        except Exception as exc:  # its peers may be going too: stopping must still succeed
            log.warning("the pipeline did not drain cleanly: %s", exc)
        for channel in self._channels.values():
            await channel.close()


async def start_server(listen: str, options: WorkerOptions, metrics: WorkerMetrics | None = None
                       ) -> tuple[grpc.aio.Server, WorkerServicer, str]:
    """Serve the Worker service (and the gRPC health check) on `listen`; the server, its
    servicer and the address it is reachable at (the real port when `listen` asks for 0)."""
    server = grpc.aio.server(
        interceptors=[TokenInterceptor(options.token, frozenset({health.CHECK}))],
        options=[*CHANNEL_OPTIONS, *KEEPALIVE_ACCEPTED])
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as exc:   # gRPC's "Failed to bind": a port in use, say
        raise SpotserveError(f"cannot listen on {listen}: the address is in use or not "
                             f"this machine's") from exc
    address = f"{listen.rsplit(':', 1)[0]}:{port}"
    servicer = WorkerServicer(replace(options, address=options.address or address), metrics)
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers([health.handler(servicer.serving)])
    await server.start()
    if options.bulk_port >= 0:  # peers pull tensors from here at near raw-TCP speed
        await servicer.start_bulk(listen.rsplit(":", 1)[0], options.bulk_port,
                                  send_bytes_per_s=options.send_bytes_per_s,
                                  on_sent=servicer.metrics.bytes_out.inc)
    return server, servicer, address


def _driver_address(role: worker_pb2.Role) -> str:
    """The pipeline driver's address: named in the role, or inferred from its peers."""
    if role.driver:
        return str(role.driver)
    if role.stage == 0 and role.tp_peers:
        return str(role.tp_peers[0])
    return str(role.prev_stage) if role.stage == 1 else ""


def _code_for(error: SpotserveError) -> grpc.StatusCode:
    if isinstance(error, NotServing):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(error, DuplicateRequest):
        return grpc.StatusCode.ALREADY_EXISTS
    if isinstance(error, PipelineFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.INVALID_ARGUMENT


def _paused_progress(request_id: str, held: Paused | None,
                     kv_tokens: int) -> common_pb2.RequestProgress:
    state = held.state if held else None
    return common_pb2.RequestProgress(
        request_id=request_id,
        prompt_tokens=len(state.prompt_token_ids) if state else 0,
        generated_tokens=len(state.output_token_ids) if state else 0,
        kv_tokens=kv_tokens, kv_kept=kv_tokens > 0,
        max_tokens=state.params.max_tokens if state else 0)


def _seen(task: asyncio.Future[Any]) -> None:
    """A Configure whose caller left still ends: its failure was logged, not lost."""
    if not task.cancelled():
        task.exception()


def _leave(groups: EpochGroups) -> None:
    """Tear the epoch's groups down; a pipeline that broke (a peer died) may fail to, and
    that must not stop this worker from joining the next epoch."""
    try:
        groups.destroy()
    except Exception:
        log.warning("could not destroy the previous epoch's groups", exc_info=True)
    try:
        leave_world()
    except Exception:
        log.warning("could not leave the previous epoch's world", exc_info=True)


async def _abort(context: Context, code: grpc.StatusCode,
                 message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable")
