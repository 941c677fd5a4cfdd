"""WorkerFleet: the actuator's side that speaks to workers and the router, shared by every
backend.

A backend (local processes, Kubernetes pods) says where each GPU's worker listens and
manages worker lifecycles; everything said to workers and the router lives here, once:
progress from the drivers' Status, drains (the router first hears the pipeline is
draining), Configure fan-out (a pipeline regroups whole; one already serving exactly its
role is left alone; workers no role uses are stood down), the topology switch, and the
health monitor that replaces a wedged worker and reports a pipeline its workers say broke.

Every call carries a deadline; `Wire` makes the calls (and is what tests replace).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from spotserve.model_spec import ModelSpec
from spotserve.v1 import worker_pb2

from ..planner.cluster import GpuId
from .actuator import (
    Actuator,
    ActuatorError,
    DrainedRequest,
    PipelineStatus,
    Resume,
    RoutedPipeline,
    Sink,
)
from .configure import configure_request, epoch_requests, pipeline_members, signature
from .epoch import WorkerAssignment
from .events import PipelineBroken, WorkerRestarted
from .wire import Configured, Wire, WorkerReport

log = logging.getLogger("spotserve.fleet")
# A stopping driver (SIGTERM: evicted, its node shutting down) is draining itself with its
# KV kept for peers to pull: its pipeline is going, not broken (the notice follows).
SERVING_STATES = ("ready", "draining", "drained", "stopping")


@dataclass(frozen=True)
class FleetOptions:
    model_dir: str                  # where workers read the checkpoint
    max_batch: int                  # per pipeline (the router's cap, the engine's batch)
    status_timeout: float = 2.0     # one Status call (a healthy worker answers in ms)
    configure_timeout: float = 300.0  # one Configure (gathers weights: minutes for a big model)
    switch_timeout: float = 10.0    # one topology update
    health_every: float = 1.0       # seconds between health checks of every worker
    health_deadline: float = 10.0   # a worker silent this long is wedged, and replaced


@dataclass
class Moved:
    """Bytes the workers reported for the roles they took."""

    kept: int = 0
    pulled: int = 0
    checkpoint: int = 0
    configures: int = 0

    def add(self, reply: Configured) -> None:
        self.kept += reply.kept
        self.pulled += reply.pulled
        self.checkpoint += reply.checkpoint
        self.configures += 1


class WorkerFleet(Actuator):
    def __init__(self, model: ModelSpec, wire: Wire, options: FleetOptions) -> None:
        self.model, self.wire, self.fleet = model, wire, options
        self.routed: list[RoutedPipeline] = []   # what the routers serve (not gone)
        self.router_epoch = 0
        self.router_acks: dict[str, int] = {}    # replica → the epoch it acknowledged
        self.router_rate: float | None = None    # req/s all replicas last reported, summed
        self.moved = Moved()
        self.serving: dict[GpuId, tuple[int, tuple[object, ...] | None]] = {}  # epoch, role
        self._drains: dict[str, list[DrainedRequest]] = {}
        self._monitor: asyncio.Task[None] | None = None
        self._silent: dict[GpuId, float] = {}   # GPU → since when its worker is silent

    # ---- what a backend provides ------------------------------------------------------
    @abstractmethod
    def address(self, gpu: GpuId) -> str:
        """host:port of the GPU's worker; `ActuatorError` when it has none."""

    @abstractmethod
    def workers(self) -> Sequence[GpuId]:
        """The GPUs whose workers run now (health-checked, stood down when unused)."""

    @abstractmethod
    def router_addresses(self) -> Sequence[str]:
        """host:port of every router replica's Control service (empty: none runs yet)."""

    @abstractmethod
    def rendezvous(self, driver: GpuId, epoch: int) -> str:
        """host:port of the TCP store the pipeline driven by `driver` forms its world on."""

    async def ensure_workers(self, epoch: int, gpus: Sequence[GpuId]) -> None:
        """Make sure `gpus` have workers that answer (start pods, say)."""

    async def replace_worker(self, gpu: GpuId, reason: str) -> None:
        """A wedged or crashed worker: end it and start a fresh one in its place."""

    def crashed(self, gpu: GpuId) -> bool:
        """The worker process is known to have exited (no need to wait for the deadline)."""
        return False

    async def switched(self, epoch: int) -> None:
        """The router serves `epoch` now (clean up what the old one needed)."""

    # ---- reads ------------------------------------------------------------------------
    async def progress(self) -> Mapping[str, PipelineStatus]:
        serving = [p for p in self.routed if p.state != "gone"]
        reports = await asyncio.gather(*(self._report(p.driver) for p in serving),
                                       return_exceptions=True)
        out = {}
        for pipeline, report in zip(serving, reports, strict=True):
            if isinstance(report, WorkerReport):
                out[pipeline.pipeline_id] = _status(pipeline.pipeline_id, report)
        return out

    async def _report(self, gpu: GpuId, timeout: float | None = None) -> WorkerReport:
        return await self.wire.status(self.address(gpu), timeout or self.fleet.status_timeout)

    # ---- drain ------------------------------------------------------------------------
    async def drain(self, epoch: int, pipeline_id: str, driver: GpuId, steps: int,
                    timeout: float) -> Sequence[DrainedRequest]:
        if pipeline_id in self._drains:   # drained already in an aborted migration
            return self._drains[pipeline_id]
        await self._mark(pipeline_id, "draining")
        worker_epoch, _ = self.serving.get(driver, (0, None))
        drained = await self.wire.drain(self.address(driver), worker_epoch, steps, timeout)
        self._drains[pipeline_id] = drained
        return drained

    async def abandon(self, pipeline_ids: Sequence[str]) -> None:
        await self._mark(pipeline_ids, "gone")

    async def _mark(self, pipeline_ids: Sequence[str] | str, state: str) -> None:
        """Tell the router some pipelines' new state within the epoch it serves. Marks add
        up until the next switch (a pipeline once gone stays gone)."""
        ids = {pipeline_ids} if isinstance(pipeline_ids, str) else set(pipeline_ids)
        self.routed = [RoutedPipeline(p.pipeline_id, p.driver, p.capacity,
                                      state if p.pipeline_id in ids and p.state != "gone"
                                      else p.state) for p in self.routed]
        with contextlib.suppress(ActuatorError):
            await self._send_topology(self.router_epoch, self.routed, ())

    # ---- configure --------------------------------------------------------------------
    async def configure(self, epoch: int, jobs: Mapping[GpuId, WorkerAssignment],
                        kv: Mapping[int, Sequence[DrainedRequest]]) -> int:
        await self.ensure_workers(epoch, list(jobs))
        calls: list[tuple[GpuId, worker_pb2.ConfigureRequest, tuple[object, ...] | None]] = [
            (job.gpu, request, signature(job)) for job, request in epoch_requests(
                self.model, self.fleet.model_dir, epoch, jobs, kv, self.address,
                self._reachable, lambda driver: self.rendezvous(driver, epoch),
                self.fleet.max_batch, self._serves)]
        wedged = self.unresponsive()
        for gpu in self.workers():   # a worker no role uses stops its old pipeline
            if gpu not in jobs and self.serving.get(gpu, (0, None))[1] is not None \
                    and gpu.instance not in wedged:  # (a wedged one can't)
                calls.append((gpu, worker_pb2.ConfigureRequest(epoch=epoch), None))
        replies = await self._configure_all([(g, r) for g, r, _ in calls], fail_fast=jobs)
        failed, moved = [], 0
        for (gpu, _, role), reply in zip(calls, replies, strict=True):
            if isinstance(reply, BaseException):
                self.serving.pop(gpu, None)
                if gpu in jobs:
                    failed.append(f"{gpu}: {reply}")
                else:  # standing down one that is gone already (its node stopping): done
                    log.info("worker %s did not stand down (%s); no role needs it", gpu, reply)
                continue
            self.serving[gpu] = (epoch, role)
            self.moved.add(reply)
            moved += reply.moved
        if failed:
            raise ActuatorError("configure failed on " + "; ".join(failed))
        return moved

    async def preload(self, epoch: int, jobs: Mapping[GpuId, WorkerAssignment],
                      gpus: Sequence[GpuId]) -> int:
        await self.ensure_workers(epoch, gpus)
        targets, calls = set(gpus), []
        for group in pipeline_members(jobs).values():
            for job in group:
                if job.gpu in targets:
                    request = configure_request(self.model, self.fleet.model_dir, epoch, job,
                                                group, self.address, "", self.fleet.max_batch)
                    request.preload_only = True
                    calls.append((job.gpu, request))
        replies = await self._configure_all(calls)
        failed = [f"{gpu}: {r}" for (gpu, _), r in zip(calls, replies, strict=True)
                  if isinstance(r, BaseException)]
        gathered = sum(r.moved for r in replies if isinstance(r, Configured))
        # counted as moved now; the configure that follows reports them as kept
        self.moved.pulled += sum(r.pulled for r in replies if isinstance(r, Configured))
        self.moved.checkpoint += sum(r.checkpoint for r in replies if isinstance(r, Configured))
        if failed:
            raise ActuatorError("preload failed on " + "; ".join(failed))
        return gathered

    async def _configure_all(self, calls: Sequence[tuple[GpuId, worker_pb2.ConfigureRequest]],
                             fail_fast: Collection[GpuId] = ()
                             ) -> list[Configured | BaseException]:
        """Every Configure at once (the ranks of a pipeline rendezvous with each other).
        When one of `fail_fast` fails the epoch cannot form: the others of `fail_fast` still
        running are cancelled (a rank waiting in a rendezvous for the failed one leaves it)
        instead of each waiting out its timeout, and the controller re-plans at once."""
        async def one(gpu: GpuId, request: worker_pb2.ConfigureRequest) -> Configured:
            return await self.wire.configure(self.address(gpu), request,
                                             self.fleet.configure_timeout)

        tasks = [asyncio.ensure_future(one(g, r)) for g, r in calls]
        try:
            pending = {t for (g, _), t in zip(calls, tasks, strict=True) if g in fail_fast}
            while pending:
                done, pending = await asyncio.wait(pending,
                                                   return_when=asyncio.FIRST_EXCEPTION)
                if any(not t.cancelled() and t.exception() is not None for t in done):
                    for task in pending:
                        task.cancel()
                    break
            replies = await asyncio.gather(*tasks, return_exceptions=True)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        return [ActuatorError("cancelled: another rank of this epoch failed to configure")
                if isinstance(r, asyncio.CancelledError) else r for r in replies]

    def _serves(self, job: WorkerAssignment) -> bool:
        """An unchanged job whose worker already runs exactly this role."""
        return job.unchanged and self.serving.get(job.gpu, (0, None))[1] == signature(job)

    def _reachable(self, gpu: GpuId) -> str | None:
        try:
            return self.address(gpu)
        except ActuatorError:
            return None   # gone: what only it held cannot be had

    # ---- switch -----------------------------------------------------------------------
    async def set_topology(self, epoch: int, pipelines: Sequence[RoutedPipeline],
                           resume: Sequence[Resume]) -> None:
        await self._send_topology(epoch, pipelines, resume)
        self.routed = [p for p in pipelines if p.state != "gone"]
        self.router_epoch = epoch
        self._drains = {}  # every drain so far is settled by this switch
        await self.switched(epoch)

    async def _send_topology(self, epoch: int, pipelines: Sequence[RoutedPipeline],
                             resume: Sequence[Resume],
                             replicas: Sequence[str] | None = None) -> None:
        """Tell every router replica (or just `replicas`) at once. Enough that one takes
        it: a replica that missed it is told again by `check_routers` (without the resume
        hints, which only matter to requests it holds: those fall back to re-prefill).
        `ActuatorError` when no replica took it."""
        routes = []
        for p in pipelines:
            try:
                address = self.address(p.driver) if p.state != "gone" else ""
            except ActuatorError:
                address = ""   # its driver is gone: so is the pipeline
            routes.append((p, address))
        targets = list(self.router_addresses() if replicas is None else replicas)
        if not targets:
            raise ActuatorError("no router replica is running yet")
        replies = await asyncio.gather(*(self.wire.topology(
            router, epoch, routes, resume, self.fleet.max_batch, self.fleet.switch_timeout)
            for router in targets), return_exceptions=True)
        failed = []
        for router, reply in zip(targets, replies, strict=True):
            if isinstance(reply, BaseException):
                if not isinstance(reply, ActuatorError):
                    raise reply
                failed.append(f"{router}: {reply}")
            else:
                self.router_acks[router] = max(epoch, self.router_acks.get(router, 0))
        if failed:
            log.warning("topology %d not taken by %d of %d router replicas: %s", epoch,
                        len(failed), len(targets), "; ".join(failed))
        if len(failed) == len(targets):
            raise ActuatorError("no router replica took the topology: " + "; ".join(failed))

    async def check_routers(self) -> bool:
        """Ask every replica what it serves and how busy it is: one that restarted or
        joined (it serves an older epoch, or none) is told the current topology without
        resume hints (the requests it held died with it; resumable ones resume through
        any replica). Sums the rates they measured. True when one serves the current
        epoch."""
        if self.router_epoch == 0:
            return False
        replicas = list(self.router_addresses())
        self.router_acks = {r: e for r, e in self.router_acks.items() if r in replicas}
        reports = await asyncio.gather(*(self.wire.router_stats(r, self.fleet.status_timeout)
                                         for r in replicas), return_exceptions=True)
        lagging, rates = [], []
        for router, report in zip(replicas, reports, strict=True):
            if isinstance(report, BaseException):
                if not isinstance(report, ActuatorError):
                    raise report
                log.info("router %s: %s", router, report)
                self.router_acks.pop(router, None)   # it may come back empty: ask again
                continue
            rates.append(report.rate)
            self.router_acks[router] = report.epoch
            if report.epoch < self.router_epoch:
                log.info("router %s serves epoch %d, not %d: sending the topology again",
                         router, report.epoch, self.router_epoch)
                lagging.append(router)
        self.router_rate = sum(rates) if rates else None
        if lagging:
            with contextlib.suppress(ActuatorError):
                await self._send_topology(self.router_epoch, self.routed, (), lagging)
        return any(e >= self.router_epoch for e in self.router_acks.values())

    # ---- health -----------------------------------------------------------------------
    def unresponsive(self) -> frozenset[str]:
        """Instances with a worker that missed its health checks for a few seconds (two
        rounds): wedged, or about to be found dead."""
        now, grace = time.monotonic(), self.fleet.health_every + self.fleet.status_timeout
        return frozenset(g.instance for g, since in self._silent.items()
                         if now - since >= grace)

    async def start(self, sink: Sink) -> None:
        await self.stop()
        self._monitor = asyncio.create_task(self._watch(sink), name="fleet-health")

    async def stop(self) -> None:
        task, self._monitor = self._monitor, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def _watch(self, sink: Sink) -> None:
        """Every `health_every` seconds, every worker's Status (each waited for at most
        that long, so one silent worker does not slow the round): a serving pipeline its
        workers report broken, or one with a worker silent past `unresponsive`'s grace, is
        reported once; a worker silent for `health_deadline` (or whose process exited) is
        replaced."""
        reported: set[str] = set()
        while True:
            await asyncio.sleep(self.fleet.health_every)
            try:
                await self._check(sink, reported)
            except Exception:  # the monitor must outlive a failed round
                log.exception("health check round failed")

    async def _check(self, sink: Sink, reported: set[str]) -> None:
        gpus = list(self.workers())
        timeout = min(self.fleet.status_timeout, self.fleet.health_every)
        reports = await asyncio.gather(*(self._report(g, timeout) for g in gpus),
                                       return_exceptions=True)
        now, silent = time.monotonic(), self._silent
        serving = {p.pipeline_id for p in self.routed if p.state == "serving"}
        wedged = self.unresponsive()
        for gpu, report in zip(gpus, reports, strict=True):
            if isinstance(report, WorkerReport):
                silent.pop(gpu, None)
                broken = report.pipeline_id, report.pipeline_error
            else:
                since = silent.setdefault(gpu, now)
                role = self.serving.get(gpu, (0, None))[1]
                pid = str(role[0]) if role else ""
                broken = pid, (f"the worker on {gpu} does not answer"
                               if gpu.instance in wedged else "")
                if self.crashed(gpu) or now - since >= self.fleet.health_deadline:
                    await self._replace(sink, gpu, since, report)
            pid, error = broken
            if error and pid in serving and pid not in reported:
                reported.add(pid)
                await sink(PipelineBroken(pid, error))

    async def _replace(self, sink: Sink, gpu: GpuId, since: float, report: object) -> None:
        self._silent.pop(gpu, None)
        why = "exited" if self.crashed(gpu) else \
            f"silent for {time.monotonic() - since:.1f} s ({report})"
        log.warning("worker %s %s: replacing it", gpu, why)
        self.serving.pop(gpu, None)
        await self.replace_worker(gpu, why)
        await sink(WorkerRestarted(gpu.instance, gpu.index, why))


def _status(pipeline_id: str, report: WorkerReport) -> PipelineStatus:
    error = report.pipeline_error
    if not error and report.pipeline_id != pipeline_id:
        error = f"its driver serves {report.pipeline_id or 'no pipeline'} now"
    elif not error and report.state not in SERVING_STATES:
        error = f"its driver is {report.state}"
    return PipelineStatus(report.cached_tokens, report.remaining_steps, report.decode_step_ms,
                          report.state, error)
