"""LocalBackend: the controller's actuator over `spotserve worker` processes on this
machine, plus the emulated cloud that boots, warns and kills them.

An instance is one worker process per emulated GPU, all bound to the instance's own
loopback address 127.0.0.N (OS-chosen ports). The cloud side (`add_instance`, `notice`,
`kill`) puts the controller's events on `events`; the actuator side drives the workers
over their gRPC service (Configure, Drain, Status) and the router over `Control`.

Everything is idempotent per epoch, as the contract asks: a drain of a pipeline already
drained answers what the first drain answered; a worker already serving an unchanged role
is not touched; releasing or killing an instance already gone does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from spotserve.auth import call_metadata
from spotserve.catalog import Catalog
from spotserve.lifetime import DIE_WITH_PARENT_ENV
from spotserve.model_spec import ModelSpec
from spotserve.v1 import control_pb2, control_pb2_grpc, worker_pb2, worker_pb2_grpc

from ..controller.actuator import (
    Actuator,
    ActuatorError,
    DrainedRequest,
    PipelineStatus,
    Resume,
    RoutedPipeline,
)
from ..controller.configure import configure_request, kv_imports, pipeline_members, signature
from ..controller.epoch import WorkerAssignment
from ..controller.events import (
    Event,
    InstanceBooting,
    InstanceLost,
    InstanceReady,
    LoadChanged,
    NoticeReceived,
)
from ..planner.cluster import GpuId

log = logging.getLogger("spotserve.local")
ROOT = Path(__file__).resolve().parents[2]
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20),
                   ("grpc.max_send_message_length", 64 << 20)]
STATES = {"serving": control_pb2.PIPELINE_STATE_SERVING,
          "draining": control_pb2.PIPELINE_STATE_DRAINING,
          "gone": control_pb2.PIPELINE_STATE_GONE}
MODES = {"kv": 1, "reprefill": 2}


@dataclass(frozen=True)
class BackendOptions:
    model_dir: Path
    workdir: Path
    router_address: str              # the router's gRPC (Control) address
    token: str
    boot_delay: float = 0.0          # extra seconds before a requested instance is up
    max_batch: int = 8               # per pipeline, at least the plan's batch
    on_demand_limit: int = 0         # instances `request_capacity` may grant
    output_tokens: int = 32          # for the remaining-steps estimate of a batch
    worker_args: tuple[str, ...] = (
        "--kv-blocks", "256", "--block-size", "8", "--max-batched-tokens", "256",
        "--max-model-len", "512", "--threads", "1", "--join-timeout", "20",
        "--grace", "4", "--log-level", "INFO")
    configure_timeout: float = 120.0
    device: str = "cpu"


@dataclass
class WorkerProcess:
    gpu: GpuId
    process: asyncio.subprocess.Process
    address: str
    epoch: int = 0
    signature: tuple[object, ...] | None = None
    channel: grpc.aio.Channel = field(init=False)
    stub: worker_pb2_grpc.WorkerStub = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0]


@dataclass
class LocalInstance:
    name: str
    instance_type: str
    capacity: str
    host: str
    state: str = "booting"           # booting | ready | notice | gone
    workers: list[WorkerProcess] = field(default_factory=list)


@dataclass
class Moved:
    """Bytes the workers reported for the configurations they took."""

    kept: int = 0
    pulled: int = 0
    checkpoint: int = 0
    configures: int = 0


class LocalBackend(Actuator):
    def __init__(self, model: ModelSpec, catalog: Catalog, options: BackendOptions) -> None:
        self.model, self.catalog, self.options = model, catalog, options
        self.meta = call_metadata(options.token)
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.instances: dict[str, LocalInstance] = {}
        self.timeline: list[dict[str, Any]] = []
        self.moved = Moved()
        self.routed: list[RoutedPipeline] = []
        self.router_epoch = 0
        self._drains: dict[str, list[DrainedRequest]] = {}
        self._next_host = 2
        self._granted = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._router_channel = grpc.aio.insecure_channel(options.router_address)
        self._control = control_pb2_grpc.ControlStub(self._router_channel)
        self._start = time.monotonic()

    # ---- bookkeeping ------------------------------------------------------------------
    def note(self, kind: str, **fields: Any) -> None:
        entry = {"t": round(time.monotonic() - self._start, 3), "kind": kind, **fields}
        self.timeline.append(entry)
        log.info("%s %s", kind, fields)

    def _worker(self, gpu: GpuId) -> WorkerProcess:
        instance = self.instances.get(gpu.instance)
        if instance is None or instance.state == "gone" or gpu.index >= len(instance.workers):
            raise ActuatorError(f"GPU {gpu} is not running")
        return instance.workers[gpu.index]

    def live_workers(self) -> list[WorkerProcess]:
        return [w for i in self.instances.values() if i.state != "gone" for w in i.workers]

    # ---- the emulated cloud -----------------------------------------------------------
    async def add_instance(self, name: str, instance_type: str, capacity: str = "spot",
                           delay: float = 0.0) -> None:
        """Boot an instance: its workers start; it is ready when every one answers."""
        if name in self.instances:
            return
        itype = self.catalog.instance(instance_type)
        host = f"127.0.0.{self._next_host}"
        self._next_host += 1
        instance = LocalInstance(name, instance_type, capacity, host)
        self.instances[name] = instance
        self.note("booting", instance=name, host=host, gpus=itype.gpus, capacity=capacity)
        await self.events.put(InstanceBooting(name, instance_type, capacity))
        await asyncio.sleep(delay)
        try:
            workers = await asyncio.gather(*(self._spawn(GpuId(name, g), host)
                                             for g in range(itype.gpus)))
        except (OSError, RuntimeError, TimeoutError) as exc:
            self.note("boot-failed", instance=name, error=str(exc))
            instance.state = "gone"
            return
        instance.workers = list(workers)
        if instance.state == "gone":  # killed while booting
            await self._stop_workers(instance, signal.SIGKILL)
            return
        instance.state = "ready"
        self.note("ready", instance=name)
        await self.events.put(InstanceReady(name, instance_type, capacity))

    async def _spawn(self, gpu: GpuId, host: str) -> WorkerProcess:
        # the worker asks the kernel to SIGKILL it when this process dies, however it dies
        # (no preexec_fn: running Python between fork and exec in a threaded parent crashes)
        env = {**os.environ, "SPOTSERVE_TOKEN": self.options.token, "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
               DIE_WITH_PARENT_ENV: str(os.getpid())}
        self.options.workdir.mkdir(parents=True, exist_ok=True)
        log_file = self.options.workdir / f"worker-{gpu.instance}-{gpu.index}.log"
        with log_file.open("w") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "spotserve.cli", "worker", "--listen", f"{host}:0",
                "--model", str(self.options.model_dir), "--device", self.options.device,
                *self.options.worker_args, cwd=ROOT, env=env,
                stdout=asyncio.subprocess.PIPE, stderr=stderr, start_new_session=True)
        assert process.stdout is not None
        try:
            line = (await asyncio.wait_for(process.stdout.readline(), 180)).decode()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        if "worker listening" not in line:
            await process.wait()
            raise RuntimeError(f"worker {gpu} did not start; see {log_file}")
        return WorkerProcess(gpu, process, line.split()[-1])

    async def notice(self, name: str, grace: float) -> None:
        instance = self.instances.get(name)
        if instance is None or instance.state in ("gone", "notice"):
            return
        deadline = time.time() + grace
        instance.state = "notice" if instance.state == "ready" else instance.state
        self.note("notice", instance=name, grace=grace)
        await self.events.put(NoticeReceived(name, deadline, "emulator"))

    async def kill(self, name: str) -> None:
        """The instance vanishes: SIGKILL, no goodbye."""
        await self._gone(name, signal.SIGKILL, "killed")

    async def set_rate(self, rate: float) -> None:
        self.note("rate", rate=rate)
        await self.events.put(LoadChanged(rate))

    async def _stop_workers(self, instance: LocalInstance, sig: int) -> None:
        for worker in instance.workers:
            if worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(sig)
        for worker in instance.workers:
            try:
                await asyncio.wait_for(worker.process.wait(), 15)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
                await worker.process.wait()
            await worker.channel.close()

    async def close(self) -> None:
        """Stop every worker process and background task (also after a failure)."""
        for task in list(self._tasks):
            task.cancel()
        for instance in self.instances.values():
            instance.state = "gone"
            await self._stop_workers(instance, signal.SIGKILL)
        await self._router_channel.close()

    # ---- the actuator -----------------------------------------------------------------
    async def progress(self) -> Mapping[str, PipelineStatus]:
        serving = [p for p in self.routed if p.state == "serving"]
        replies = await asyncio.gather(*(self._status(p.driver) for p in serving),
                                       return_exceptions=True)
        out = {}
        for pipeline, reply in zip(serving, replies, strict=True):
            if isinstance(reply, worker_pb2.WorkerStatus):
                left = [max(0, self.options.output_tokens - r.generated_tokens)
                        for r in reply.requests if not r.kv_kept]
                out[pipeline.pipeline_id] = PipelineStatus(
                    sum(r.kv_tokens for r in reply.requests), max(left, default=0),
                    reply.decode_step_seconds * 1000)
        return out

    async def _status(self, gpu: GpuId) -> worker_pb2.WorkerStatus:
        worker = self._worker(gpu)
        reply: worker_pb2.WorkerStatus = await worker.stub.Status(
            worker_pb2.StatusRequest(), metadata=self.meta, timeout=5)
        return reply

    async def drain(self, epoch: int, pipeline_id: str, driver: GpuId,
                    steps: int) -> Sequence[DrainedRequest]:
        if pipeline_id in self._drains:
            return self._drains[pipeline_id]
        await self._mark_draining(pipeline_id)
        worker = self._worker(driver)
        if worker.signature is None or worker.signature[0] != pipeline_id:
            raise ActuatorError(f"{driver} no longer drives {pipeline_id}")
        try:
            reply = await worker.stub.Drain(worker_pb2.DrainRequest(epoch=worker.epoch,
                                                                    steps=steps),
                                            metadata=self.meta, timeout=60)
        except grpc.aio.AioRpcError as exc:
            raise ActuatorError(f"drain of {pipeline_id} on {driver}: "
                                f"{exc.code().name} {exc.details()}") from None
        drained = [DrainedRequest(r.request_id, r.prompt_tokens, r.generated_tokens,
                                  r.kv_tokens if r.kv_kept else 0) for r in reply.requests]
        self._drains[pipeline_id] = drained
        self.note("drained", pipeline=pipeline_id, steps=reply.steps_run,
                  requests=len(drained))
        return drained

    async def _mark_draining(self, pipeline_id: str) -> None:
        marked = [RoutedPipeline(p.pipeline_id, p.driver, p.capacity,
                                 "draining" if p.pipeline_id == pipeline_id
                                 and p.state == "serving" else p.state)
                  for p in self.routed]
        with contextlib.suppress(ActuatorError):
            await self._send_topology(self.router_epoch, marked, ())

    async def configure(self, epoch: int, jobs: Mapping[GpuId, WorkerAssignment],
                        kv: Mapping[int, Sequence[DrainedRequest]]) -> int:
        members = pipeline_members(jobs)
        calls: list[tuple[WorkerProcess, worker_pb2.ConfigureRequest,
                          tuple[object, ...] | None]] = []
        for group in members.values():
            todo = [j for j in group if not self._serves(j)]
            if not todo:
                continue
            driver = self._worker(group[0].gpu)
            master = f"{driver.host}:{_free_port(driver.host)}"
            for job in group:  # a pipeline regroups whole: every rank joins the new world
                imports = self._kv_imports(job, kv)
                request = configure_request(self.model, str(self.options.model_dir), epoch,
                                            job, group, self._address, master,
                                            self.options.max_batch, imports)
                calls.append((self._worker(job.gpu), request, signature(job)))
        busy = {w.gpu for w, _, _ in calls} | set(jobs)
        for worker in self.live_workers():
            if worker.gpu not in busy and worker.signature is not None:
                calls.append((worker, worker_pb2.ConfigureRequest(epoch=epoch), None))
        replies, failed = await self._configure_each([(w, r) for w, r, _ in calls])
        moved = 0
        for (worker, _, sig), reply in zip(calls, replies, strict=True):
            if reply is None:
                worker.signature = None
                continue
            worker.epoch, worker.signature = epoch, sig
            self._count(reply)
            moved += reply.bytes_pulled + reply.bytes_from_checkpoint
        self.note("configured", epoch=epoch, workers=len(calls), failed=len(failed))
        if failed:
            raise ActuatorError("configure failed on " + "; ".join(failed))
        return moved

    async def preload(self, epoch: int, jobs: Mapping[GpuId, WorkerAssignment],
                      gpus: Sequence[GpuId]) -> int:
        targets = set(gpus)
        calls = []
        for group in pipeline_members(jobs).values():
            driver = self._worker(group[0].gpu)
            for job in group:
                if job.gpu in targets:
                    request = configure_request(self.model, str(self.options.model_dir), epoch,
                                                job, group, self._address,
                                                f"{driver.host}:0", self.options.max_batch)
                    request.preload_only = True
                    calls.append((self._worker(job.gpu), request))
        replies, failed = await self._configure_each(calls)
        gathered = 0
        for reply in replies:
            if reply is not None:
                # counted as moved now; the configure that follows reports them as kept
                self.moved.pulled += reply.bytes_pulled
                self.moved.checkpoint += reply.bytes_from_checkpoint
                gathered += reply.bytes_pulled + reply.bytes_from_checkpoint
        self.note("preloaded", epoch=epoch, workers=len(calls), failed=len(failed),
                  bytes=gathered)
        if failed:
            raise ActuatorError("preload failed on " + "; ".join(failed))
        return gathered

    def _serves(self, job: WorkerAssignment) -> bool:
        """An unchanged job whose worker already runs exactly this role."""
        try:
            worker = self._worker(job.gpu)
        except ActuatorError:
            return False
        return job.unchanged and worker.signature == signature(job)

    def _kv_imports(self, job: WorkerAssignment, kv: Mapping[int, Sequence[DrainedRequest]]
                    ) -> list[worker_pb2.KVImport]:
        if not job.is_driver or job.kv_from is None or job.kv_holder is None or \
                job.kv_holder == job.gpu:
            return []
        try:
            holder = self._address(job.kv_holder)
        except ActuatorError:
            return []  # the holder is gone: those requests re-prefill
        return kv_imports(self.model, kv.get(job.kv_from, ()), holder)

    def _address(self, gpu: GpuId) -> str:
        return self._worker(gpu).address

    async def _configure_each(
            self, calls: Sequence[tuple[WorkerProcess, worker_pb2.ConfigureRequest]]
    ) -> tuple[list[worker_pb2.ConfigureResponse | None], list[str]]:
        """Every Configure at once: each reply (None where it failed) and the failures."""
        replies = await asyncio.gather(*(self._configure_one(w, r) for w, r in calls),
                                       return_exceptions=True)
        out: list[worker_pb2.ConfigureResponse | None] = []
        failed = []
        for (worker, _), reply in zip(calls, replies, strict=True):
            if isinstance(reply, BaseException):
                failed.append(f"{worker.gpu}: {reply}")
                out.append(None)
            else:
                out.append(reply)
        return out, failed

    async def _configure_one(self, worker: WorkerProcess, request: worker_pb2.ConfigureRequest
                             ) -> worker_pb2.ConfigureResponse:
        """One Configure call, tried again once: a worker whose old pipeline broke under
        it (a peer killed) fails the first teardown and succeeds the next."""
        for attempt in range(2):
            try:
                reply: worker_pb2.ConfigureResponse = await worker.stub.Configure(
                    request, metadata=self.meta, timeout=self.options.configure_timeout)
                return reply
            except grpc.aio.AioRpcError as exc:
                error = f"{exc.code().name} {exc.details()}"
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt or \
                        worker.process.returncode is not None:
                    raise ActuatorError(error) from None
                await asyncio.sleep(0.5)
        raise AssertionError("unreachable")

    def _count(self, reply: worker_pb2.ConfigureResponse) -> None:
        self.moved.kept += reply.bytes_kept
        self.moved.pulled += reply.bytes_pulled
        self.moved.checkpoint += reply.bytes_from_checkpoint
        self.moved.configures += 1

    async def set_topology(self, epoch: int, pipelines: Sequence[RoutedPipeline],
                           resume: Sequence[Resume]) -> None:
        await self._send_topology(epoch, pipelines, resume)
        self.routed = [p for p in pipelines if p.state != "gone"]
        self.router_epoch = epoch
        serving = {p.pipeline_id for p in self.routed}
        self._drains = {k: v for k, v in self._drains.items() if k not in serving}
        self.note("topology", epoch=epoch, pipelines=sorted(serving),
                  resume_kv=sum(r.mode == "kv" for r in resume),
                  resume_reprefill=sum(r.mode != "kv" for r in resume))

    async def _send_topology(self, epoch: int, pipelines: Sequence[RoutedPipeline],
                             resume: Sequence[Resume]) -> None:
        infos = []
        for p in pipelines:
            try:
                address = self._address(p.driver) if p.state != "gone" else ""
            except ActuatorError:
                address, state = "", "gone"
            else:
                state = p.state
            infos.append(control_pb2.PipelineInfo(id=p.pipeline_id, driver_address=address,
                                                  capacity=p.capacity, state=STATES[state],
                                                  max_concurrency=self.options.max_batch))
        hints = [control_pb2.ResumeHint(request_id=r.request_id, pipeline_id=r.pipeline_id,
                                        mode=MODES[r.mode], kv_tokens=r.kv_tokens)  # type: ignore[arg-type]
                 for r in resume]
        try:
            await self._control.UpdateTopology(
                control_pb2.Topology(epoch=epoch, pipelines=infos, resume_hints=hints),
                metadata=self.meta, timeout=10)
        except grpc.aio.AioRpcError as exc:
            raise ActuatorError(f"router: {exc.code().name} {exc.details()}") from None

    async def release(self, instances: Sequence[str]) -> None:
        for name in instances:
            await self._gone(name, signal.SIGTERM, "released")

    async def _gone(self, name: str, sig: signal.Signals, kind: str) -> None:
        """The instance's workers stopped with `sig`, and the controller told it is lost
        (a no-op for an instance unknown or already gone)."""
        instance = self.instances.get(name)
        if instance is None or instance.state == "gone":
            return
        instance.state = "gone"
        await self._stop_workers(instance, sig)
        self.note(kind, instance=name)
        await self.events.put(InstanceLost(name))

    async def request_capacity(self, instance_type: str, count: int, capacity: str) -> None:
        """Spot capacity comes from the trace; what the controller asks for beyond it is
        granted as on-demand instances, up to `on_demand_limit`."""
        grant = max(0, min(count, self.options.on_demand_limit - self._granted))
        self.note("capacity-requested", instance_type=instance_type, count=count,
                  capacity=capacity, granted=grant)
        for _ in range(grant):
            self._granted += 1
            name = f"od{self._granted}"
            task = asyncio.create_task(self.add_instance(name, instance_type, "on-demand",
                                                         self.options.boot_delay))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
