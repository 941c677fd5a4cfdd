"""KubernetesBackend: the controller's actuator on a cluster.

An instance is a Node; its GPUs `node/0..n-1` are served by one worker pod on that node
holding n GPUs, a worker process per GPU inside (GPU i on the worker port + i). The backend
creates the pods of an epoch's nodes (marked `karpenter.sh/do-not-disrupt` until the
switch), or adopts the capacity request the scheduler bound to a new node, and waits until
the pod is Ready and every GPU's worker answers; what is then said to the workers and the
router is the shared `WorkerFleet`'s. After the switch it deletes the pods no job uses and
clears the annotation. A worker the health monitor finds wedged costs its pod (the pod's
other workers are then found gone, and replaced in turn); a configuration that needs the
node creates it again. Capacity requests are pending worker pods of a whole instance in a
pool (spot first, then its fallback or any on-demand pool) that the cluster autoscaler or
Karpenter answers with a node. Every step is create-if-absent or patch, so a restarted
operator can repeat it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..controller.actuator import ActuatorError, RoutedPipeline
from ..controller.fleet import FleetOptions, WorkerFleet
from ..controller.wire import Wire
from ..planner.cluster import GpuId
from . import manifests as m
from .api import KubeApi, collection
from .nodes import pod_gpus
from .spec import Pool, ServiceSpec

# a pipeline's store listens on its driver's pod, past the workers' ports:
# worker port + MAX_GPUS * (1 + epoch % RENDEZVOUS_SLOTS) + the driver's GPU index
RENDEZVOUS_SLOTS = 32

log = logging.getLogger("spotserve.operator.backend")


@dataclass(frozen=True)
class BackendOptions:
    ready_timeout: float = 600.0  # pods scheduled, pulled and answering
    poll_seconds: float = 1.0
    router_address: str | None = None  # host:port of the router's Control (default: its pod)
    model_dir: str | None = None  # where workers read the model (default: the pod's mount)
    spot_wait: float = 180.0  # a spot request unanswered this long falls back to on-demand
    health_deadline: float = 15.0  # a worker silent this long is wedged: its pod is deleted


def pod_ready(pod: Mapping[str, Any]) -> bool:
    status = pod.get("status") or {}
    return bool(status.get("podIP")) and any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or ())


def ended(pod: Mapping[str, Any]) -> bool:
    """The pod will not run again: Failed or Succeeded, or being deleted."""
    return (pod.get("status") or {}).get("phase") in ("Failed", "Succeeded") or \
        bool(pod["metadata"].get("deletionTimestamp"))


class KubernetesBackend(WorkerFleet):
    def __init__(self, api: KubeApi, owner: m.Owner, spec: Mapping[str, Any],
                 service: ServiceSpec, wire: Wire, pool_of: Callable[[str], Pool | None],
                 defaults: m.Defaults = m.DEFAULTS,
                 options: BackendOptions = BackendOptions(),
                 gpus_of: Callable[[str], int] | None = None) -> None:
        super().__init__(service.settings.model, wire, FleetOptions(
            # "": each worker reads the checkpoint where its pod mounts it (its --model)
            model_dir=options.model_dir or "",
            max_batch=service.settings.limits.max_batch,
            configure_timeout=900.0,  # a checkpoint read or peers' pulls: minutes
            health_deadline=options.health_deadline))
        self.api, self.owner, self.spec, self.service = api, owner, spec, service
        self.pool_of, self.defaults, self.options = pool_of, defaults, options
        self.gpus_of = gpus_of or (lambda _node: 1)
        self.port = int((spec.get("worker") or {}).get("port") or 50051)
        self.addresses: dict[str, str] = {}    # "node/index" → host:port
        self.pod_names: dict[str, str] = {}    # node → its worker pod (adopted ones differ)
        self.current: set[GpuId] = set()       # the GPUs of the latest epoch's jobs
        self._current_epoch = 0
        self.router_pods: list[str] = []       # host:port of each router replica's Control
        self._slices_warned = False            # said once that EndpointSlices are unreadable

    @property
    def pods_path(self) -> str:
        return collection("Pod", self.owner.namespace)

    async def worker_pods(self) -> list[dict[str, Any]]:
        return await self.api.list(self.pods_path, m.labels(self.owner, m.WORKER))

    # ---- where the workers are (WorkerFleet) ------------------------------------------
    def address(self, gpu: GpuId) -> str:
        address = self.addresses.get(str(gpu))
        if address is None:
            raise ActuatorError(f"no worker address for {gpu}")
        return address

    def workers(self) -> Sequence[GpuId]:
        return [GpuId.parse(key) for key in self.addresses]

    def router_addresses(self) -> Sequence[str]:
        """Every router replica's Control address (as `find_routers` last found them),
        dialled directly: the public Service routes only to Ready pods, and a router is
        Ready only once it has a topology."""
        if self.options.router_address:
            return [self.options.router_address]
        return self.router_pods

    async def find_routers(self) -> list[str]:
        """Learn the Control addresses of the router replicas, from the EndpointSlices of
        their headless control Service (every replica with an address, Ready or not, but
        none terminating); when those cannot be read (RBAC without endpointslices, say),
        from the running router pods."""
        path = collection("EndpointSlice", self.owner.namespace)
        try:
            slices = await self.api.list(
                path, {m.SERVICE_NAME_LABEL: m.router_control_name(self.owner)})
        except ActuatorError as exc:
            if not self._slices_warned:
                self._slices_warned = True
                log.warning("%s: cannot read the EndpointSlices of Service %s (%s): finding "
                            "the router replicas by listing pods instead (grant the operator "
                            "list on endpointslices.discovery.k8s.io)", self.owner.name,
                            m.router_control_name(self.owner), exc)
        else:
            self.router_pods = m.control_addresses(slices)
            return self.router_pods
        pods = await self.api.list(self.pods_path, m.labels(self.owner, m.ROUTER))
        live = [p for p in pods if (p.get("status") or {}).get("podIP") and
                (p.get("status") or {}).get("phase") == "Running" and
                not p["metadata"].get("deletionTimestamp")]
        self.router_pods = sorted(f"{p['status']['podIP']}:{m.CONTROL_PORT}" for p in live)
        return self.router_pods

    def rendezvous(self, driver: GpuId, epoch: int) -> str:
        host = self.address(driver).rpartition(":")[0]
        slot = 1 + epoch % RENDEZVOUS_SLOTS
        return f"{host}:{self.port + m.MAX_GPUS * slot + driver.index}"

    def pod_name(self, node: str) -> str:
        return self.pod_names.get(node) or m.worker_pod_name(self.owner, node)

    async def ensure_workers(self, epoch: int, gpus: Sequence[GpuId]) -> None:
        """The pods of `gpus`' nodes exist (protected from voluntary disruption until the
        switch) and every one of `gpus` answers."""
        if epoch != self._current_epoch:   # preload and configure of one epoch add up
            self.current, self._current_epoch = set(), epoch
        self.current |= set(gpus)
        for node in sorted({g.instance for g in gpus}):
            await self._ensure_pod(node, epoch)
        await self._wait_ready(gpus)

    async def replace_worker(self, gpu: GpuId, reason: str) -> None:
        """Delete the wedged worker's pod (its group's other workers go with it and are
        found gone in turn); a configuration that needs the node creates it again. A
        worker that exits is restarted by its group, a group that exits by the kubelet."""
        address = self.addresses.pop(str(gpu), None)
        if address is not None:
            await self.wire.forget(address)
        name = self.pod_name(gpu.instance)
        pod = next((p for p in await self.worker_pods() if p["metadata"]["name"] == name), None)
        if pod is None or (address is not None and
                           (pod.get("status") or {}).get("podIP") != address.rpartition(":")[0]):
            return  # gone already, or a new pod since: it holds nothing wedged
        log.warning("worker %s in pod %s is wedged (%s): deleting the pod", gpu, name, reason)
        await self.api.delete(f"{self.pods_path}/{name}")

    async def adopt(self, drivers: Mapping[str, GpuId], epoch: int = 0) -> None:
        """After a restart: learn the running workers' addresses from their pods, and the
        pipelines' drivers from the resumed placement, so drains and progress still work;
        the router is taken to serve those pipelines at `epoch` until it says otherwise."""
        for pod in await self.worker_pods():
            node = (pod["metadata"].get("annotations") or {}).get(m.INSTANCE)
            if node and pod_ready(pod) and not ended(pod):
                self.pod_names[node] = pod["metadata"]["name"]
                self._learn(node, pod)
        self.routed = [RoutedPipeline(pid, gpu, 1.0) for pid, gpu in drivers.items()]
        self.router_epoch = epoch if drivers else 0

    def _learn(self, node: str, pod: Mapping[str, Any]) -> None:
        """The addresses of a ready pod's workers: GPU i on the pod's IP, port + i."""
        for i in range(pod_gpus(pod)):
            self.addresses[str(GpuId(node, i))] = f"{pod['status']['podIP']}:{self.port + i}"

    async def _node_pod(self, node: str) -> dict[str, Any] | None:
        """The service's pod on `node`: its worker pod, else a capacity request bound
        there."""
        found = await self.api.list(self.pods_path, {m.SERVICE_LABEL: self.owner.name})
        mine = [p for p in found
                if (p["metadata"].get("labels") or {}).get(m.COMPONENT) in (m.WORKER, m.CAPACITY)
                and ((p["metadata"].get("annotations") or {}).get(m.INSTANCE) == node or
                     (p.get("spec") or {}).get("nodeName") == node)]
        mine.sort(key=lambda p: (ended(p), (p["metadata"].get("labels") or {})
                                 .get(m.COMPONENT) != m.WORKER))
        return mine[0] if mine else None

    async def _ensure_pod(self, node: str, epoch: int) -> None:
        """Create the node's worker pod, adopt the capacity request bound to it, or mark
        the existing pod do-not-disrupt; a pod that ended for good (Failed: its node shut
        down, say) is deleted and created anew."""
        pool = self.pool_of(node)
        if pool is None:
            raise ActuatorError(f"node {node} is in none of the service's pools")
        existing = await self._node_pod(node)
        if existing is not None and not ended(existing):
            name = existing["metadata"]["name"]
            self.pod_names[node] = name
            labels = existing["metadata"].get("labels") or {}
            if labels.get(m.COMPONENT) == m.CAPACITY:
                log.info("pod %s, a capacity request, is node %s's worker pod now", name, node)
            await self.api.patch(f"{self.pods_path}/{name}", m.adopted(node, epoch, True))
            return
        gpus = self.gpus_of(node)
        if gpus < 1:
            raise ActuatorError(f"node {node} has no GPU free for the service")
        pod = m.worker_pod(self.owner, self.spec, pool.raw, node, gpus, epoch,
                           migrating=True, defaults=self.defaults,
                           model_context=self.service.model.max_position,
                           model_bytes=self.service.model.weight_bytes)
        name = pod["metadata"]["name"]
        self.pod_names[node] = name
        if existing is not None:  # ended
            log.warning("worker pod %s ended (%s): creating it again",
                        existing["metadata"]["name"],
                        (existing.get("status") or {}).get("reason") or "Failed")
            for key in [k for k in self.addresses if k.rpartition("/")[0] == node]:
                self.addresses.pop(key)
            await self.api.delete(f"{self.pods_path}/{existing['metadata']['name']}")
        if not await self.api.create(pod):
            raise ActuatorError(f"worker pod {name} is still terminating")

    async def _wait_ready(self, gpus: Sequence[GpuId]) -> None:
        """Every node's pod Ready and every GPU's worker answering (a pod is Ready when
        its GPU 0 answers; the others may start a moment later)."""
        nodes = sorted({g.instance for g in gpus})
        give_up = time.monotonic() + self.options.ready_timeout
        while True:
            pods = {p["metadata"]["name"]: p for p in await self.worker_pods()}
            missing = []
            for node in nodes:
                name = self.pod_name(node)
                pod = pods.get(name)
                if pod is not None and ended(pod):
                    raise ActuatorError(f"worker pod {name} failed")
                if pod is None or not pod_ready(pod):
                    missing.append(name)
                    continue
                self._learn(node, pod)
                wanted = [g for g in gpus if g.instance == node]
                if any(g.index >= pod_gpus(pod) for g in wanted):
                    raise ActuatorError(f"worker pod {name} holds {pod_gpus(pod)} GPUs, "
                                        f"fewer than the plan uses")
                answers = await asyncio.gather(
                    *(self._report(g, self.fleet.status_timeout) for g in wanted),
                    return_exceptions=True)
                missing += [str(g) for g, a in zip(wanted, answers, strict=True)
                            if isinstance(a, BaseException)]
            if not missing:
                return
            if time.monotonic() > give_up:
                raise ActuatorError(f"worker pods not ready: {', '.join(sorted(missing))}")
            await asyncio.sleep(self.options.poll_seconds)

    # ---- switch and release ---------------------------------------------------------
    async def switched(self, epoch: int) -> None:
        await self._clean_up(epoch)

    async def check_router(self) -> bool:
        """Are the routers serving the current topology? (See `check_routers`.)"""
        if not self.options.router_address:
            await self.find_routers()
        return await self.check_routers()

    async def _clean_up(self, epoch: int) -> None:
        """Delete pods of nodes no serving pipeline uses; clear do-not-disrupt on the rest."""
        used = {m.dns_name(g.instance) for g in self.current}
        for pod in await self.worker_pods():
            meta = pod["metadata"]
            labels = meta.get("labels") or {}
            if int(labels.get(m.EPOCH_LABEL, epoch)) < epoch and \
                    labels.get(m.NODE_LABEL, "") not in used:
                await self.api.delete(f"{self.pods_path}/{meta['name']}")
            elif (meta.get("annotations") or {}).get(m.DO_NOT_DISRUPT):
                await self.api.patch(f"{self.pods_path}/{meta['name']}",
                                     m.disruption_annotation(False))

    async def release(self, instances: Sequence[str]) -> None:
        """Delete this service's pods on `instances`; the autoscaler reclaims idle nodes."""
        gone = {m.dns_name(i) for i in instances}
        for pod in await self.worker_pods():
            if (pod["metadata"].get("labels") or {}).get(m.NODE_LABEL) in gone:
                await self.api.delete(f"{self.pods_path}/{pod['metadata']['name']}")
        for key in [k for k in self.addresses if m.dns_name(k.rpartition("/")[0]) in gone]:
            self.serving.pop(GpuId.parse(key), None)
            await self.wire.forget(self.addresses.pop(key))

    # ---- capacity -------------------------------------------------------------------
    async def capacity_pods(self) -> list[dict[str, Any]]:
        return await self.api.list(self.pods_path, m.labels(self.owner, m.CAPACITY))

    def choose_pool(self, instance_type: str, capacity: str,
                    held: Mapping[str, int]) -> Pool | None:
        """The pool to grow: `capacity` pools for this instance type (or GPU) with room,
        then their fallbacks, then any on-demand pool with room."""
        catalog = self.service.settings.catalog
        gpu = catalog.instances[instance_type].gpu.name \
            if instance_type in catalog.instances else None

        def fits(p: Pool) -> bool:
            kind = catalog.instances.get(p.catalog_type)
            return p.catalog_type == instance_type or (kind is not None and
                                                       kind.gpu.name == gpu)

        def room(p: Pool) -> bool:
            return held.get(p.name, 0) < p.max_instances

        pools = self.service.pools
        ordered = [p for p in pools if p.capacity == capacity and fits(p)]
        ordered += [q for p in ordered for q in pools if q.name == p.fallback]
        ordered += [p for p in pools if p.capacity == "on-demand" and fits(p)]
        ordered += [p for p in pools if p.capacity == "on-demand"]
        return next((p for p in ordered if room(p)), None)

    async def request_capacity(self, instance_type: str, count: int, capacity: str) -> None:
        pending = await self.capacity_pods()
        held: dict[str, int] = dict(self.held_instances())
        for pod in pending:
            pool = (pod["metadata"].get("labels") or {}).get(m.POOL_LABEL, "")
            held[pool] = held.get(pool, 0) + 1
        index = len(pending)
        room = self.service.max_instances - sum(held.values())
        if count > room:
            if room <= 0:
                raise ActuatorError(f"spec.instances.max ({self.service.max_instances}) "
                                    "reached: no more capacity requested")
            count = room
        for _ in range(count):
            pool = self.choose_pool(instance_type, capacity, held)
            if pool is None:
                raise ActuatorError(f"no pool has room for another {instance_type}")
            index = await self._create_capacity(pool, index)
            held[pool.name] = held.get(pool.name, 0) + 1

    async def _create_capacity(self, pool: Pool, index: int) -> int:
        """One capacity pod in `pool` under the first free name from `index`; the next one."""
        known = self.service.settings.catalog.instances
        gpus = pool.gpus_per_instance or (
            known[pool.catalog_type].gpus if pool.catalog_type in known else 1)
        while not await self.api.create(m.capacity_pod(
                self.owner, self.spec, pool.raw, gpus, index, time.time(), self.defaults,
                self.service.model.max_position, self.service.model.weight_bytes)):
            index += 1
        return index + 1

    def held_instances(self) -> Mapping[str, int]:
        """Pool → instances this service's workers occupy."""
        out: dict[str, int] = {}
        for node in {key.rpartition("/")[0] for key in self.addresses}:
            pool = self.pool_of(node)
            if pool is not None:
                out[pool.name] = out.get(pool.name, 0) + 1
        return out

    async def settle_capacity(self) -> int:
        """Capacity requests bound to a node wait there (fetching the model) until the
        controller adopts them as the node's worker pod: one left unadopted for
        `ready_timeout`, or on a node that has a worker pod of the service already, is
        deleted. Spot ones unanswered for `spot_wait` are replaced by the pool's fallback
        or on-demand. Returns how many are still pending."""
        waiting, pods = 0, await self.capacity_pods()
        requests = {p["metadata"]["name"] for p in pods}
        # (a request adopted since the first list shows up as a worker pod: not another)
        manned = {(p["metadata"].get("labels") or {}).get(m.NODE_LABEL)
                  for p in await self.worker_pods()
                  if not ended(p) and p["metadata"]["name"] not in requests}
        for pod in pods:
            meta = pod["metadata"]
            node = (pod.get("spec") or {}).get("nodeName")
            if node:
                asked = float((meta.get("annotations") or {}).get(m.REQUESTED_AT) or 0)
                if m.dns_name(node) in manned or \
                        time.time() - asked > self.options.ready_timeout:
                    # only as it was read: one the controller adopted meanwhile stays
                    await self.api.delete(f"{self.pods_path}/{meta['name']}",
                                          meta.get("resourceVersion"))
                continue
            waiting += 1
            pool = next((p for p in self.service.pools
                         if p.name == (meta.get("labels") or {}).get(m.POOL_LABEL)), None)
            asked = float((meta.get("annotations") or {}).get(m.REQUESTED_AT) or 0)
            if pool is None or pool.capacity != "spot" or \
                    time.time() - asked < self.options.spot_wait:
                continue
            fallback = self._fallback(pool)
            if fallback is not None:
                await self._create_capacity(fallback, len(pods))
                await self.api.delete(f"{self.pods_path}/{meta['name']}")
                log.info("no spot %s after %.0f s: asked %s instead", pool.name,
                         self.options.spot_wait, fallback.name)
        return waiting

    def _fallback(self, pool: Pool) -> Pool | None:
        """Where a spot pool's unanswered request goes: its fallbackPool, else an on-demand
        pool with the same GPUs, else any on-demand pool."""
        pools = self.service.pools
        gpu = self.service.settings.catalog.instances.get(pool.catalog_type)
        ordered = [p for p in pools if p.name == pool.fallback]
        ordered += [p for p in pools if p.capacity == "on-demand" and gpu is not None and
                    self.service.settings.catalog.instances.get(p.catalog_type) is not None and
                    self.service.settings.catalog.instances[p.catalog_type].gpu == gpu.gpu]
        ordered += [p for p in pools if p.capacity == "on-demand"]
        return next((p for p in ordered if p.name != pool.name), None)

    async def ensure_router(self, token: str | None) -> None:
        """Create or patch the router's objects to match the spec (run at start and on
        every spec change): the token copy, the Deployment, its public and control
        Services, the routers' and the workers' PodDisruptionBudgets, and the
        HorizontalPodAutoscaler with `router.autoscale`. An autoscaled Deployment is
        created with `minReplicas`, then patched without a replica count: that is the
        HPA's. Without autoscale the HPA is deleted first, so it cannot scale the
        Deployment away from `router.replicas` once that is patched in."""
        if token is not None:
            await self.api.apply(m.token_secret(self.owner, token))
        deployment = m.router_deployment(self.owner, self.spec, self.service.model_name,
                                         self.defaults)
        autoscaler = m.router_autoscaler(self.owner, self.spec)
        if autoscaler is None:
            await self._delete_autoscaler()
            await self.api.apply(deployment)
        elif not await self.api.create(deployment):
            path = collection("Deployment", self.owner.namespace)
            await self.api.patch(f"{path}/{deployment['metadata']['name']}",
                                 m.without_replicas(deployment))
        await self.api.apply(m.router_service(self.owner, self.spec))
        await self.api.apply(m.router_control_service(self.owner))
        await self.api.apply(m.router_disruption_budget(self.owner))
        await self.api.apply(m.worker_disruption_budget(self.owner))
        if autoscaler is not None:
            await self.api.apply(autoscaler)

    async def _delete_autoscaler(self) -> None:
        """The router's HPA gone (none there counts as gone)."""
        path = collection("HorizontalPodAutoscaler", self.owner.namespace)
        try:
            await self.api.delete(f"{path}/{m.router_name(self.owner)}")
        except ActuatorError as exc:
            log.warning("%s: could not delete the router's HorizontalPodAutoscaler, which "
                        "may still scale the router against spec.router.replicas (does the "
                        "operator's role grant delete on horizontalpodautoscalers?): %s",
                        self.owner.name, exc)
