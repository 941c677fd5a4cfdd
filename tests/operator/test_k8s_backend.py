"""KubernetesBackend without a cluster: capacity requests (spot first, the pool's fallback,
then on-demand), release, the pod bookkeeping, and the router replicas (found through
EndpointSlices, or pods without them; their objects following the spec), against an
in-memory API."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from spotserve.operator.controller.actuator import ActuatorError, RoutedPipeline
from spotserve.operator.controller.epoch import assignments
from spotserve.operator.controller.events import WorkerRestarted
from spotserve.operator.controller.wire import Configured, RouterReport
from spotserve.operator.k8s import manifests as m
from spotserve.operator.k8s.api import Connection, KubeApi, collection, matches
from spotserve.operator.k8s.backend import BackendOptions, KubernetesBackend
from spotserve.operator.k8s.spec import ServiceSpec, validate
from spotserve.operator.planner import load_request, plan
from spotserve.operator.planner.cluster import GpuId

OWNER = m.Owner("llama", "llm", "uid-1")


class MemoryApi(KubeApi):
    """An in-memory API server: objects by collection path and name; `objects` holds the
    namespace's pods."""

    def __init__(self) -> None:
        super().__init__(Connection("http://unused"))
        self.store: dict[str, dict[str, dict[str, Any]]] = {}  # collection → name → object
        self.version = 0

    @property
    def objects(self) -> dict[str, dict[str, Any]]:
        return self.kind("Pod")

    def kind(self, kind: str) -> dict[str, dict[str, Any]]:
        """The objects of `kind` in the test's namespace, by name."""
        return self.store.setdefault(collection(kind, OWNER.namespace), {})

    def _held(self, path: str) -> tuple[dict[str, dict[str, Any]], str]:
        where, _, name = path.rpartition("/")
        return self.store.setdefault(where, {}), name

    def _stamp(self, obj: dict[str, Any]) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)

    async def create(self, obj: Mapping[str, Any]) -> bool:
        held = self.kind(str(obj["kind"]))
        name = obj["metadata"]["name"]
        if name in held:
            return False
        held[name] = copy.deepcopy(dict(obj))
        self._stamp(held[name])
        return True

    async def apply(self, obj: Mapping[str, Any]) -> Any:
        held = self.kind(str(obj["kind"]))
        name = obj["metadata"]["name"]
        if name in held:
            merge(held[name], obj)
        else:
            held[name] = copy.deepcopy(dict(obj))
        self._stamp(held[name])

    async def patch(self, path: str, body: Mapping[str, Any]) -> Any:
        held, name = self._held(path)
        target = held.get(name)
        if target is not None:
            merge(target, body)
            self._stamp(target)
        return body

    async def delete(self, path: str, resource_version: str | None = None) -> bool:
        where, name = self._held(path)
        held = where.get(name)
        if held is not None and resource_version is not None and \
                held["metadata"]["resourceVersion"] != resource_version:
            return False  # the apiserver's 409 on a failed precondition
        where.pop(name, None)
        return True

    async def list(self, path: str, labels: Mapping[str, str] | None = None
                   ) -> list[dict[str, Any]]:
        return [copy.deepcopy(o) for o in self.store.get(path, {}).values()
                if matches(o, labels or {})]


def merge(target: dict[str, Any], patch: Mapping[str, Any]) -> None:
    """A JSON merge patch, in place."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = copy.deepcopy(dict(value) if isinstance(value, Mapping) else value)


def backend(pools: list[dict[str, Any]], limit: int = 8, spot_wait: float = 180.0
            ) -> tuple[KubernetesBackend, MemoryApi]:
    spec = {"model": {"huggingFace": {"repoId": "facebook/opt-6.7b"}}, "gpuPools": pools,
            "instances": {"min": 1, "max": limit}}
    service = validate(spec)
    assert isinstance(service, ServiceSpec), service
    api = MemoryApi()
    return KubernetesBackend(api, OWNER, spec, service, wire=ConfigureWire(),  # type: ignore[arg-type]
                             pool_of=lambda node: None,
                             options=BackendOptions(spot_wait=spot_wait)), api


def pool(name: str, capacity: str, instances: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "capacityType": capacity, "instanceType": "g4dn.12xlarge",
            "maxInstances": instances, **extra}


def requested(api: MemoryApi) -> list[str]:
    return sorted(o["metadata"]["labels"][m.POOL_LABEL] for o in api.objects.values())


async def test_spot_first_then_the_fallback_pool() -> None:
    b, api = backend([pool("spot", "spot", 1, fallbackPool="od"), pool("od", "on-demand", 2)])
    await b.request_capacity("g4dn.12xlarge", 1, "spot")
    assert requested(api) == ["spot"]
    await b.request_capacity("g4dn.12xlarge", 2, "spot")
    assert requested(api) == ["od", "od", "spot"]
    cap = next(iter(api.objects.values()))
    assert cap["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    with pytest.raises(ActuatorError, match="no pool has room"):
        await b.request_capacity("g4dn.12xlarge", 1, "spot")


async def test_a_capacity_request_bound_to_its_new_node_becomes_the_nodes_worker_pod() -> None:
    """Finding 6: capacity is asked for with real pending worker pods; the one the
    scheduler binds to the new node waits there (kept, so the node is never empty) and is
    adopted as that node's worker pod, not duplicated."""
    b, api = backend([pool("spot", "spot", 0), pool("od", "on-demand", 1)])
    b.pool_of = lambda node: b.service.pools[1]
    await b.request_capacity("g4dn.12xlarge", 1, "spot")
    assert requested(api) == ["od"]
    (name,) = api.objects
    api.objects[name]["spec"]["nodeName"] = "n9"  # a node joined and took it
    assert await b.settle_capacity() == 0
    assert list(api.objects) == [name]  # kept: an empty node could be consolidated away
    await b._ensure_pod("n9", 3)
    assert list(api.objects) == [name], "adopted, not a second pod"
    pod = api.objects[name]
    assert pod["metadata"]["labels"][m.COMPONENT] == m.WORKER
    assert pod["metadata"]["labels"][m.EPOCH_LABEL] == "3"
    assert pod["metadata"]["annotations"][m.INSTANCE] == "n9"
    assert pod["metadata"]["annotations"][m.DO_NOT_DISRUPT] == "true"
    assert b.pod_name("n9") == name
    assert await b.capacity_pods() == [] and await b.settle_capacity() == 0
    assert list(api.objects) == [name]


async def test_a_capacity_request_adopted_while_capacity_settles_is_kept() -> None:
    """The unlucky timing: the controller adopts a capacity pod as its node's worker pod
    between settle_capacity's two reads (capacity requests, then worker pods). The pod
    then looks like the node's worker pod beside itself; it must not be deleted."""
    b, api = backend([pool("spot", "spot", 2)])
    b.pool_of = lambda node: b.service.pools[0]
    await b.request_capacity("g4dn.12xlarge", 1, "spot")
    (name,) = api.objects
    api.objects[name]["spec"]["nodeName"] = "n9"
    real_list = api.list

    async def adopting(path: str, labels: Mapping[str, str] | None = None
                       ) -> list[dict[str, Any]]:
        out = await real_list(path, labels)
        if (labels or {}).get(m.COMPONENT) == m.CAPACITY:  # adopted just after this read
            await api.patch(f"{b.pods_path}/{name}", m.adopted("n9", 3, True))
        return out

    api.list = adopting  # type: ignore[method-assign]
    await b.settle_capacity()
    assert list(api.objects) == [name]
    assert api.objects[name]["metadata"]["labels"][m.COMPONENT] == m.WORKER


async def test_release_deletes_the_pods_of_those_nodes_only() -> None:
    b, api = backend([pool("spot", "spot", 2)])
    raw = b.service.pools[0].raw
    for node_name in ("n1", "n2"):
        await api.create(m.worker_pod(OWNER, b.spec, raw, node_name, 2, 1))
    b.addresses = {"n1/0": "10.0.0.1:50051", "n1/1": "10.0.0.1:50052",
                   "n2/0": "10.0.0.2:50051"}
    await b.release(["n1"])
    assert sorted(api.objects) == ["llama-w-n2"]
    assert list(b.addresses) == ["n2/0"]


async def test_unanswered_spot_requests_fall_back_to_on_demand() -> None:
    b, api = backend([pool("spot", "spot", 2), pool("od", "on-demand", 2)], spot_wait=0.0)
    await b.request_capacity("g4dn.12xlarge", 1, "spot")
    assert requested(api) == ["spot"]
    assert await b.settle_capacity() == 1
    assert requested(api) == ["od"]
    assert await b.settle_capacity() == 1  # on-demand requests are left to come
    assert requested(api) == ["od"]
    patient, api2 = backend([pool("spot", "spot", 2), pool("od", "on-demand", 2)])
    await patient.request_capacity("g4dn.12xlarge", 1, "spot")
    await patient.settle_capacity()
    assert requested(api2) == ["spot"]



class ReadyApi(MemoryApi):
    """Pods come up at once, each with its own loopback IP."""

    async def create(self, obj: Mapping[str, Any]) -> bool:
        made = await super().create(obj)
        if made and obj.get("kind") == "Pod":
            self.objects[obj["metadata"]["name"]]["status"] = {
                "podIP": f"127.0.0.{len(self.objects) + 1}",
                "conditions": [{"type": "Ready", "status": "True"}]}
        return made


class ConfigureWire:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []
        self.forgotten: list[str] = []

    async def configure(self, address: str, request: Any, timeout: float) -> Configured:
        self.sent.append((address, request))
        return Configured("standby", pulled=1 << 20)

    async def forget(self, address: str) -> None:
        self.forgotten.append(address)

    async def status(self, address: str, timeout: float) -> Any:
        return object()  # every worker answers


async def test_preload_starts_only_the_joining_gpus_pods_and_configures_them_preload_only(
) -> None:
    request = load_request(Path(__file__).resolve().parents[2] / "examples" / "plan" /
                           "preemption.yaml")
    result = plan(request)
    assert result.mapping is not None and result.migration is not None and request.current
    old, new = request.current.placement, result.mapping.placement
    jobs = assignments(request.model, 2, new, result.migration.transfers, old, ["a", "b", "c"])
    joining = sorted(g for g in jobs if g.instance == "node-3")
    assert joining and all(not jobs[g].unchanged for g in joining)
    spec = {"model": {"huggingFace": {"repoId": "facebook/opt-6.7b"}},
            "gpuPools": [pool("spot", "spot", 4)], "instances": {"min": 1, "max": 4}}
    service = validate(spec)
    assert isinstance(service, ServiceSpec)
    api, wire = ReadyApi(), ConfigureWire()
    b = KubernetesBackend(api, OWNER, spec, service, wire=wire,  # type: ignore[arg-type]
                          pool_of=lambda node: service.pools[0],
                          options=BackendOptions(poll_seconds=0.01), gpus_of=lambda node: 4)
    b.addresses = {str(g): f"10.0.0.{i + 1}:50051" for i, (_, g) in enumerate(old.assignment)}
    gathered = await b.preload(2, jobs, joining)
    assert gathered == len(joining) << 20
    # one pod for the joining instance, all its GPUs, GPU i's worker on port + i
    assert sorted(api.objects) == ["llama-w-node-3"]
    (pod,) = api.objects.values()
    assert pod["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == 4
    assert len(wire.sent) == len(joining)
    ip = pod["status"]["podIP"]
    assert sorted(address for address, _ in wire.sent) == sorted(
        f"{ip}:{50051 + g.index}" for g in joining)
    for _, sent in wire.sent:
        assert sent.preload_only and sent.epoch == 2 and not sent.kv_imports
    # two pipelines whose drivers share the pod meet at different stores
    assert b.rendezvous(joining[0], 2) != b.rendezvous(joining[1], 2)
    assert b.rendezvous(joining[0], 2) not in {f"{ip}:{50051 + i}" for i in range(16)}


class SilentWire(ConfigureWire):
    """Workers that never answer Status (wedged, or SIGSTOP'd)."""

    async def status(self, address: str, timeout: float) -> Any:
        raise ActuatorError(f"{address}: deadline exceeded")


async def test_a_wedged_worker_pod_is_deleted_and_reported_restarted() -> None:
    b, api = backend([pool("spot", "spot", 2)])
    wire = SilentWire()
    b.wire = wire  # type: ignore[assignment]
    b.fleet = dataclasses.replace(b.fleet, health_every=0.02, status_timeout=0.02,
                                  health_deadline=0.2)
    raw = b.service.pools[0].raw
    await api.create(m.worker_pod(OWNER, b.spec, raw, "n1", 1, 1))
    api.objects["llama-w-n1"]["status"] = {"podIP": "10.0.0.1"}
    b.addresses = {"n1/0": "10.0.0.1:50051"}
    events: list[Any] = []

    async def sink(event: Any) -> None:
        events.append(event)

    await b.start(sink)
    try:
        for _ in range(200):
            if events:
                break
            await asyncio.sleep(0.02)
    finally:
        await b.stop()
    assert isinstance(events[0], WorkerRestarted) and events[0].name == "n1"
    assert api.objects == {}, "the wedged worker's pod is deleted (a new one is made on demand)"
    assert b.addresses == {} and wire.forgotten == ["10.0.0.1:50051"]


# ---- the router replicas --------------------------------------------------------------
def backend_for(spec: dict[str, Any], api: MemoryApi) -> KubernetesBackend:
    """A backend of `spec` on `api`: what the runner makes at start and on a spec change."""
    service = validate(spec)
    assert isinstance(service, ServiceSpec), service
    return KubernetesBackend(api, OWNER, spec, service, wire=RouterWire(),  # type: ignore[arg-type]
                             pool_of=lambda node: None)


def router_spec(**router: Any) -> dict[str, Any]:
    return {"model": {"huggingFace": {"repoId": "facebook/opt-6.7b"}},
            "gpuPools": [pool("spot", "spot", 2)], "instances": {"min": 1, "max": 2},
            "router": router}


class RouterWire(ConfigureWire):
    """Router replicas: each serves the epoch it was last told (0 until then)."""

    def __init__(self) -> None:
        super().__init__()
        self.told: dict[str, list[tuple[int, list[str]]]] = {}

    async def topology(self, router: str, epoch: int,
                       pipelines: Sequence[tuple[RoutedPipeline, str]],
                       resume: Sequence[Any], max_concurrency: int, timeout: float) -> None:
        self.told.setdefault(router, []).append((epoch, [a for _, a in pipelines]))

    async def router_stats(self, router: str, timeout: float) -> RouterReport:
        return RouterReport(self.told[router][-1][0] if router in self.told else 0, 0.5)


def endpoint_slice(name: str, *endpoints: tuple[str, bool, bool]) -> dict[str, Any]:
    """An EndpointSlice of the routers' control Service, as the EndpointSlice controller
    writes it: (address, ready, terminating) per router pod."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": OWNER.namespace, "labels": {
                m.SERVICE_NAME_LABEL: m.router_control_name(OWNER)}},
            "addressType": "IPv4",
            "ports": [{"name": "control", "port": m.CONTROL_PORT, "protocol": "TCP"}],
            "endpoints": [{"addresses": [address],
                           "conditions": {"ready": ready, "serving": ready,
                                          "terminating": terminating}}
                          for address, ready, terminating in endpoints]}


async def test_two_router_replicas_found_through_endpoint_slices_are_both_told() -> None:
    """Issue 16: the backend finds every router replica through the EndpointSlices of the
    headless control Service, the one not Ready yet included (it is Ready only once told)
    and the one terminating left out, and sends both the topology."""
    api = MemoryApi()
    b = backend_for(router_spec(), api)
    await b.ensure_router("t")
    slices = api.kind("EndpointSlice")
    slices["llama-router-control-x1"] = endpoint_slice(
        "llama-router-control-x1", ("10.1.0.5", True, False), ("10.1.0.6", False, False),
        ("10.1.0.7", True, True))  # an old replica on its way out
    # a slice of another Service is not the routers'
    other = endpoint_slice("llama-router-abc", ("10.1.0.5", True, False))
    other["metadata"]["labels"][m.SERVICE_NAME_LABEL] = m.router_name(OWNER)
    slices["llama-router-abc"] = other
    b.addresses = {"n1/0": "10.0.0.1:50051"}
    b.routed = [RoutedPipeline("p0", GpuId("n1", 0), 1.0)]
    b.router_epoch = 4
    assert await b.check_router()
    wire = b.wire
    assert isinstance(wire, RouterWire)
    assert list(b.router_addresses()) == ["10.1.0.5:50061", "10.1.0.6:50061"]
    assert wire.told == {"10.1.0.5:50061": [(4, ["10.0.0.1:50051"])],
                         "10.1.0.6:50061": [(4, ["10.0.0.1:50051"])]}
    assert b.router_rate == 1.0  # both replicas' rates, summed
    # told, they serve epoch 4: nothing is sent again
    assert await b.check_router()
    assert all(len(told) == 1 for told in wire.told.values())


class NoSlicesApi(MemoryApi):
    """An API whose EndpointSlices this operator may not read (an older chart's RBAC)."""

    async def list(self, path: str, labels: Mapping[str, str] | None = None
                   ) -> list[dict[str, Any]]:
        if "endpointslices" in path:
            raise ActuatorError(f"list {path}: HTTP 403")
        return await super().list(path, labels)


async def test_without_endpoint_slices_the_running_router_pods_are_used(
        caplog: pytest.LogCaptureFixture) -> None:
    api = NoSlicesApi()
    b = backend_for(router_spec(), api)
    for name, phase, ip in (("r1", "Running", "10.1.0.5"), ("r2", "Running", "10.1.0.6"),
                            ("r3", "Pending", None)):
        api.objects[name] = {"metadata": {"name": name, "labels": m.labels(OWNER, m.ROUTER)},
                             "status": {"phase": phase, **({"podIP": ip} if ip else {})}}
    with caplog.at_level("WARNING"):
        assert await b.find_routers() == ["10.1.0.5:50061", "10.1.0.6:50061"]
        assert await b.find_routers() == ["10.1.0.5:50061", "10.1.0.6:50061"]
    warnings = [r.getMessage() for r in caplog.records if "EndpointSlices" in r.getMessage()]
    assert len(warnings) == 1, warnings  # said once
    assert "list on endpointslices.discovery.k8s.io" in warnings[0]


async def test_the_router_objects_follow_the_spec() -> None:
    """Each spec change (the runner makes a new backend and ensures the router) reaches the
    Deployment; with autoscale the replica count is the HPA's, and removing autoscale
    deletes the HPA and restores the spec's count."""
    api = MemoryApi()
    await backend_for(router_spec(), api).ensure_router("t")
    deployments = api.kind("Deployment")
    assert deployments["llama-router"]["spec"]["replicas"] == 2
    assert sorted(api.kind("Service")) == ["llama-router", "llama-router-control"]
    assert sorted(api.kind("PodDisruptionBudget")) == ["llama-router", "llama-workers"]
    assert api.kind("HorizontalPodAutoscaler") == {}

    await backend_for(router_spec(replicas=3), api).ensure_router("t")
    assert deployments["llama-router"]["spec"]["replicas"] == 3

    autoscaled = router_spec(replicas=3, autoscale={"minReplicas": 2, "maxReplicas": 6})
    await backend_for(autoscaled, api).ensure_router("t")
    (hpa,) = api.kind("HorizontalPodAutoscaler").values()
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert deployments["llama-router"]["spec"]["replicas"] == 3, "the HPA's to change"
    deployments["llama-router"]["spec"]["replicas"] = 5  # the HPA scaled it up
    image = dict(autoscaled, router={**autoscaled["router"], "image": "registry/router:2"})
    await backend_for(image, api).ensure_router("t")
    assert deployments["llama-router"]["spec"]["replicas"] == 5
    container = deployments["llama-router"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry/router:2"

    await backend_for(router_spec(replicas=2), api).ensure_router("t")
    assert api.kind("HorizontalPodAutoscaler") == {}
    assert deployments["llama-router"]["spec"]["replicas"] == 2


async def test_an_autoscaled_router_starts_at_its_minimum() -> None:
    api = MemoryApi()
    await backend_for(router_spec(autoscale={"minReplicas": 3, "maxReplicas": 5}),
                      api).ensure_router(None)
    assert api.kind("Deployment")["llama-router"]["spec"]["replicas"] == 3
    assert api.kind("HorizontalPodAutoscaler")["llama-router"]["spec"]["maxReplicas"] == 5
