"""One LLMService: its spec checked, its controller run, its status written.

`ServiceRunner.tick` is what the kopf daemon does every interval, level-based: validate
the spec (a bad one gets `Degraded` naming the field, and nothing else happens until it is
fixed), feed the controller the events of the pools' nodes, measure the load when it
autoscales, ask for capacity up to `instances.min`, and patch the whole status, the
controller's state included (`status.controller`: epoch, phase, instance view, committed
placement), so a restarted operator resumes a migration where it stopped. The controller
runs its own loop as a task (`Controller.run`: retries, error policy, the status snapshot
this runner reports); the runner only feeds it events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from spotserve.catalog import Catalog
from spotserve.errors import SpotserveError

from ..controller.actuator import ActuatorError
from ..controller.controller import Controller
from ..controller.events import LoadChanged
from ..controller.journal import ControllerState, Journal
from ..controller.view import GONE, ClusterView
from ..controller.wire import GrpcWire, Wire
from . import manifests as m
from . import status as st
from .api import Connection, KubeApi
from .backend import BackendOptions, KubernetesBackend
from .fleet import describe, instance_type, instance_type_of, node_events
from .model_config import ConfigFetcher
from .nodes import NodeInfo, gpu_holder, pod_gpus
from .spec import Pool, Problem, ServiceSpec, hub_source, url_source, validate

log = logging.getLogger("spotserve.operator")
DEFAULT_RATE = 1.0  # req/s planned for until the router reports a rate
MIN_RATE = 0.1      # an idle router still gets a configuration to serve the next request


@dataclass
class Runtime:
    """What the operator's environment and command line supply."""

    connection: Connection
    token: str | None = None
    defaults: m.Defaults = field(default_factory=m.Defaults)
    options: BackendOptions = field(default_factory=BackendOptions)
    wire: Callable[[], Wire] | None = None
    interval: float = 2.0
    catalog: Catalog = field(default_factory=Catalog.load)
    model_root: Path | None = None  # volume claims as folders, to read a model's config.json
    configs: ConfigFetcher = field(default_factory=ConfigFetcher)   # hub and URL configs
    config_retry_s: float = 10.0   # first wait before fetching a config again (doubles, to 5 min)
    first_seen: dict[str, dict[str, float]] = field(default_factory=dict)  # node → sightings
    # With watched namespaces, kopf's event index misses Node Events (written to
    # `default`, usually): the runner lists them cluster-wide itself.
    list_node_events: bool = False

    def make_wire(self) -> Wire:
        return self.wire() if self.wire else GrpcWire(self.token or "")


class StatusJournal(Journal):
    """A journal whose snapshot the daemon writes into the LLMService."""

    def __init__(self, saved: ControllerState | None) -> None:
        super().__init__(None)
        self.saved = saved

    def save(self, state: ControllerState) -> None:
        self.saved = state

    def load(self) -> ControllerState | None:
        return self.saved


class ServiceRunner:
    """The daemon's state for one LLMService: its controller, backend and status."""

    def __init__(self, runtime: Runtime, api: KubeApi, body: Mapping[str, Any]) -> None:
        self.runtime, self.api = runtime, api
        self.owner = m.Owner.of(body)
        self.spec_text = ""
        self.service: ServiceSpec | None = None
        self.controller: Controller | None = None
        self.backend: KubernetesBackend | None = None
        self.task: asyncio.Task[None] | None = None
        self.nodes: dict[str, tuple[NodeInfo, Pool]] = {}
        self.failures: list[Problem] = []  # backend failures not yet in lastErrors
        self.saved_state: dict[str, Any] | None = None  # the controller state last written
        self.measured_at = 0.0
        self.router_ready = False  # the router answered and serves the current topology
        self.last_status: dict[str, Any] | None = None
        self.failures_seen = 0  # the controller's failures already in lastErrors
        self.announced: tuple[Any, ...] | None = None  # the migration last told in an Event
        self.fetch_failures = 0     # config fetches failed in a row (an unchanged spec)
        self.refetch_at: float | None = None   # when to try the failed fetch again

    @property
    def path(self) -> str:
        o = self.owner
        return f"/apis/{m.GROUP}/{m.VERSION}/namespaces/{o.namespace}/{m.PLURAL}/{o.name}"

    async def tick(self, body: Mapping[str, Any], indices: tuple[Any, Any, Any, Any]) -> None:
        spec = dict(body.get("spec") or {})
        text = json.dumps(spec, sort_keys=True)
        retry = self.refetch_at is not None and time.monotonic() >= self.refetch_at
        if text != self.spec_text or retry:
            await self._reconfigure(body, spec, text)
        if self.service is None or self.controller is None or self.backend is None:
            return
        await self._feed(indices)
        self.router_ready = await self.backend.check_router()
        await self._autoscale()
        pending = await self.backend.settle_capacity()
        pending += await self._ensure_minimum(pending)
        await self._write(body, pending)

    async def _ensure_minimum(self, pending: int) -> int:
        """Ask for capacity until `instances.min` (or `desired`) nodes exist or are coming:
        the controller plans only over nodes that exist, so a service starting from zero
        nodes starts here. Returns how many were requested."""
        service, backend = self.service, self.backend
        assert service is not None and backend is not None
        wanted = service.desired_instances or service.min_instances
        missing = wanted - len(self.nodes) - pending
        kind = next((instance_type_of(p, service) for p in service.pools
                     if instance_type_of(p, service)), None)
        if missing <= 0 or kind is None:
            return 0
        try:
            await backend.request_capacity(kind, missing, "spot")
        except ActuatorError as exc:
            log.info("%s: %s", self.owner.name, exc)
            return 0
        return missing

    async def _reconfigure(self, body: Mapping[str, Any], spec: dict[str, Any],
                           text: str) -> None:
        self.spec_text = text
        fetched, why = None, None
        model = spec.get("model") or {}
        hub, url = hub_source(model), url_source(model)
        try:   # not a built-in name: the checkpoint's own config tells its shape
            if hub is not None:
                fetched = await self.runtime.configs.hugging_face(*hub)
            elif url is not None:
                fetched = await self.runtime.configs.url(url)
        except SpotserveError as exc:
            why = str(exc)
        self._schedule_refetch(failed=why is not None)
        result = validate(spec, self.runtime.catalog, self.runtime.model_root, fetched, why)
        await self.stop()
        if isinstance(result, list):
            self.service = None
            log.warning("%s/%s is invalid: %s", self.owner.namespace, self.owner.name,
                        "; ".join(map(str, result)))
            await self._event("InvalidSpec", "; ".join(map(str, result)), warning=True)
            await self._patch_status(body, st.Observed(
                generation=_generation(body), now=time.time(), problems=result,
                selector=m.selector(self.owner)))
            return
        self.service, previous = result, self.backend
        self.backend = KubernetesBackend(self.api, self.owner, spec, result,
                                         self.runtime.make_wire(), self._pool_of,
                                         self.runtime.defaults, self.runtime.options,
                                         gpus_of=self._gpus_of)
        await self.backend.ensure_router(self.runtime.token)
        if not self.runtime.options.router_address:
            await self.backend.find_routers()
        if previous is not None:  # a spec change: the pods and the router stay as they are
            self.backend.addresses = dict(previous.addresses)
            self.backend.serving = dict(previous.serving)
            self.backend.router_epoch = previous.router_epoch
            self.backend.router_acks = dict(previous.router_acks)
            self.backend.routed = list(previous.routed)
        saved = self.saved_state or (body.get("status") or {}).get("controller")
        state = _state(saved)
        self.saved_state = state.to_dict() if state else None
        # workers of a new node answer once its pods are scheduled, pulled and started
        settings = replace(result.settings, startup_seconds=self.runtime.options.ready_timeout)
        self.controller = Controller(settings, self.backend, StatusJournal(state))
        self.failures_seen = 0
        placement = self.controller.placement
        if previous is None and placement is not None:  # a restarted operator
            at = placement.by_position
            await self.backend.adopt({
                pid: at[min(p for p in at if p.pipeline == d)]
                for d, pid in enumerate(self.controller.pipeline_ids)}, self.controller.epoch)
        await self.controller.submit(LoadChanged(result.required_rate or DEFAULT_RATE))
        self.task = asyncio.create_task(self.controller.run())

    def _schedule_refetch(self, failed: bool) -> None:
        """A config that could not be had (unreachable, not uploaded yet) is fetched again
        with the spec unchanged: after `config_retry_s`, doubling to 5 minutes."""
        if not failed:
            self.fetch_failures, self.refetch_at = 0, None
            return
        self.fetch_failures += 1
        wait = min(self.runtime.config_retry_s * 2 ** (self.fetch_failures - 1), 300.0)
        self.refetch_at = time.monotonic() + wait

    def _pool_of(self, node: str) -> Pool | None:
        entry = self.nodes.get(node)
        return entry[1] if entry else None

    def _gpus_of(self, node: str) -> int:
        """The GPUs the node's worker pod asks for: the instance's, as the planner counts
        them (fewer on a node shared with other GPU pods)."""
        entry = self.nodes.get(node)
        if entry is None:
            return 0
        info, pool = entry
        catalog = self.runtime.catalog
        kind = instance_type(info, pool, catalog)
        total = catalog.instances[kind].gpus if kind and kind in catalog.instances else \
            info.gpu_count or pool.gpus_per_instance or 1
        return min(total, info.usable_gpus or total)

    def _ours(self, pod: Mapping[str, Any]) -> bool:
        """A worker pod (or capacity request) of this service."""
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        return meta.get("namespace") == self.owner.namespace and \
            labels.get(m.SERVICE_LABEL) == self.owner.name and \
            labels.get(m.COMPONENT) in (m.WORKER, m.CAPACITY)

    async def _feed(self, indices: tuple[Any, Any, Any, Any]) -> None:
        assert self.service is not None and self.controller is not None
        nodes_index, events_index, disrupted_index, gpu_pods_index = indices
        nodes = {k: dict(next(iter(v))) for k, v in _items(nodes_index)}
        events = {k: [dict(e) for e in v] for k, v in _items(events_index)}
        gpu_pods: dict[str, list[Mapping[str, Any]]] | None = {
            k: [dict(p) for p in v] for k, v in _items(gpu_pods_index)}
        if self.runtime.list_node_events:
            for name, found in (await node_events_of(self.api)).items():
                events.setdefault(name, []).extend(found)
            gpu_pods = await gpu_pods_of(self.api)
        disrupted = {k: [dict(p) for p in v] for k, v in _items(disrupted_index)}
        self.nodes = describe(nodes, events, disrupted, self.service, time.time(),
                              self.runtime.first_seen, gpu_pods, self._ours)
        # the controller ignores what it knows already: every tick says it all again
        view = self.controller.view
        known = [n for n, r in view.instances.items() if r.state != GONE]
        for event in node_events(self.nodes, known, self.runtime.catalog):
            await self.controller.submit(event)

    async def _autoscale(self) -> None:
        """With `load.autoscale`, plan for the router's measured rate × headroom."""
        service, backend, controller = self.service, self.backend, self.controller
        assert service is not None and backend is not None and controller is not None
        now = time.monotonic()
        measured = backend.router_rate
        if service.required_rate is not None or measured is None or \
                now - self.measured_at < service.autoscale_window / 4:
            return
        self.measured_at = now
        # the controller re-plans only past its threshold, so small wobbles cost nothing
        await controller.submit(LoadChanged(max(MIN_RATE, measured * service.autoscale_headroom)))

    # ---- status ---------------------------------------------------------------------
    async def _write(self, body: Mapping[str, Any], pending: int) -> None:
        assert self.controller is not None and self.backend is not None
        state = self.controller.journal.load()
        if state is not None:
            self.saved_state = state.to_dict()
        snapshot = self.controller.status()
        fresh = [f for f in snapshot.failures if f.seq > self.failures_seen]
        if fresh:
            self.failures_seen = fresh[-1].seq
        self.failures += [Problem("status.migration", f"{f.kind}: {f.message}") for f in fresh]
        pods = {p["metadata"]["name"]: p for p in await self.backend.worker_pods()}
        seen = self.observe(body, pods, pending)
        await self._patch_status(body, seen)
        for problem in self.failures:
            await self._event("MigrationFailed", str(problem), warning=True)
        self.failures = []  # now in lastErrors
        await self._announce(seen.migration)

    async def _announce(self, migration: st.Migration | None) -> None:
        """An Event when a migration starts and when it ends (`kubectl describe llms`)."""
        key = (migration.id, migration.phase) if migration is not None else None
        if migration is None or key == self.announced:
            return
        if self.announced is None or self.announced[0] != migration.id:
            doomed = ", ".join(migration.nodes) or "none"
            await self._event("Migrating", f"migration {migration.id}: {migration.reason} "
                              f"(nodes going: {doomed})")
        done = st.MIGRATION_PHASES.get(migration.phase) == "Completed"
        if done or migration.phase == "failed":
            await self._event("Migrated" if done else "MigrationFailed",
                              f"migration {migration.id} {'done' if done else 'failed'}",
                              warning=not done)
        self.announced = key

    async def _event(self, reason: str, message: str, warning: bool = False) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:
            await self.api.create(m.event(self.owner, reason, message, warning, stamp))
        except ActuatorError as exc:  # an Event is worth less than the loop
            log.info("%s: no Event %s: %s", self.owner.name, reason, exc)

    def observe(self, body: Mapping[str, Any], pods: Mapping[str, Mapping[str, Any]],
                pending: int) -> st.Observed:
        controller, backend = self.controller, self.backend
        assert controller is not None and backend is not None
        placement = controller.placement
        slots = []
        for position, gpu in placement.assignment if placement else ():
            name = backend.pod_names.get(gpu.instance) or \
                m.worker_pod_name(self.owner, gpu.instance)
            pod = pods.get(name, {})
            info, pool = self.nodes.get(gpu.instance, (None, None))
            slots.append(st.Slot(
                position.pipeline, position.stage, position.tp_rank, name, gpu.instance,
                pool.name if pool else "", info.capacity_type if info else "",
                (info.gpu_type or "") if info else "", (info.zone or "") if info else "",
                backend.addresses.get(str(gpu), ""), bool(pod) and _ready(pod)))
        snapshot = controller.status()
        meets = snapshot.meets_rate
        target = snapshot.target
        return st.Observed(
            generation=_generation(body), now=time.time(), failures=self.failures,
            current=_shape(placement.config) if placement else None,
            target=_shape(target) if target else None, slots=slots,
            migration=self._migration(), router_ready=self.router_ready,
            capacity_available=meets, capacity_message=(
                "the plan meets the required rate" if meets else "waiting for GPU nodes"),
            pending_instances=pending, endpoint=m.endpoint(self.owner, backend.spec),
            selector=m.selector(self.owner), controller=self.saved_state)

    def _migration(self) -> st.Migration | None:
        controller = self.controller
        assert controller is not None
        migration = controller.status().migration
        if migration is None:
            return None
        notices = [self.nodes[n][0].notice for n in migration.doomed if n in self.nodes]
        cloud = next((n.cloud for n in notices if n is not None), None)
        phase = migration.outcome if migration.outcome in ("failed", "aborted") else \
            migration.phase
        return st.Migration(
            migration.id, "planning" if phase == "aborted" else phase, migration.reason, cloud,
            migration.doomed, migration.started_at, migration.deadline,
            migration.bytes_planned, migration.bytes_moved)

    async def _patch_status(self, body: Mapping[str, Any], seen: st.Observed) -> None:
        # this runner is the status' only writer: what it wrote last is newer than the body,
        # which waits for the watch event
        previous = self.last_status or dict(body.get("status") or {})
        new = st.build(seen, previous)
        self.last_status = new
        patch = {**new, "parallelism": {**new["parallelism"]}}
        if "target" not in patch["parallelism"]:
            patch["parallelism"]["target"] = None  # merge patch: remove it
        if "controller" in new:
            patch["controller"] = st.merge_patch(previous.get("controller"), new["controller"])
        await self.api.patch(f"{self.path}/status", {"status": patch})

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None


async def node_events_of(api: KubeApi) -> dict[str, list[dict[str, Any]]]:
    """Every Node's Events, from all namespaces (the chart's ClusterRole lists events
    cluster-wide); none when the list fails (the taints still tell)."""
    try:
        found = await api.list("/api/v1/events?fieldSelector=involvedObject.kind%3DNode")
    except ActuatorError as exc:
        log.info("node events: %s", exc)
        return {}
    out: dict[str, list[dict[str, Any]]] = {}
    for event in found:
        if (event.get("involvedObject") or {}).get("kind") == "Node":
            out.setdefault(str(event["involvedObject"].get("name")), []).append(event)
    return out


async def gpu_pods_of(api: KubeApi) -> dict[str, list[Mapping[str, Any]]] | None:
    """The GPUs every running pod holds, by node, from all namespaces (with watched
    namespaces, kopf's index sees only those); None when the list fails (then every GPU
    counts as free: a worker pod that does not fit stays Pending, and says why)."""
    try:
        found = await api.list("/api/v1/pods?fieldSelector="
                               "status.phase%21%3DSucceeded%2Cstatus.phase%21%3DFailed")
    except ActuatorError as exc:
        log.info("GPU pods: %s", exc)
        return None
    out: dict[str, list[Mapping[str, Any]]] = {}
    for pod in found:
        node = (pod.get("spec") or {}).get("nodeName")
        if node and pod_gpus(pod):
            out.setdefault(str(node), []).append(gpu_holder(pod))
    return out


def _items(index: Any) -> list[tuple[Any, Any]]:
    return [(k, index[k]) for k in list(index)] if index is not None else []


def _state(saved: Any) -> ControllerState | None:
    if not saved:
        return None
    try:
        state = ControllerState.from_dict(saved)
        ClusterView.from_dict(state.view)  # fails here, not in the controller
        return state
    except (ValueError, TypeError, AttributeError, KeyError):
        log.warning("ignoring an unreadable status.controller")
        return None


def _generation(body: Mapping[str, Any]) -> int:
    return int((body.get("metadata") or {}).get("generation") or 1)


def _ready(pod: Mapping[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or ())


def _shape(config: Any) -> st.Shape:
    first = config.pipelines[0]
    stages = tuple((s.layer_start, s.layer_end, s.tp, s.gpu_type or "") for s in first.stages)
    return st.Shape(len(config.pipelines), len(first.stages), first.stages[0].tp,
                    config.batch, stages)
