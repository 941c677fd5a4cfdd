"""KubernetesBackend without a cluster: capacity requests (spot first, the pool's fallback,
then on-demand), release, and the pod bookkeeping, against an in-memory API."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from spotserve.operator.controller.actuator import ActuatorError
from spotserve.operator.controller.epoch import assignments
from spotserve.operator.controller.events import WorkerRestarted
from spotserve.operator.controller.wire import Configured
from spotserve.operator.k8s import manifests as m
from spotserve.operator.k8s.api import Connection, KubeApi, matches
from spotserve.operator.k8s.backend import BackendOptions, KubernetesBackend
from spotserve.operator.k8s.spec import ServiceSpec, validate
from spotserve.operator.planner import load_request, plan

OWNER = m.Owner("llama", "llm", "uid-1")


class MemoryApi(KubeApi):
    def __init__(self) -> None:
        super().__init__(Connection("http://unused"))
        self.objects: dict[str, dict[str, Any]] = {}

        self.version = 0

    def _stamp(self, obj: dict[str, Any]) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)

    async def create(self, obj: Mapping[str, Any]) -> bool:
        name = obj["metadata"]["name"]
        if name in self.objects:
            return False
        self.objects[name] = copy.deepcopy(dict(obj))
        self._stamp(self.objects[name])
        return True

    async def apply(self, obj: Mapping[str, Any]) -> Any:
        self.objects[obj["metadata"]["name"]] = copy.deepcopy(dict(obj))
        self._stamp(self.objects[obj["metadata"]["name"]])

    async def patch(self, path: str, body: Mapping[str, Any]) -> Any:
        target = self.objects.get(path.rpartition("/")[2])
        if target is not None:
            merge(target, body)
            self._stamp(target)
        return body

    async def delete(self, path: str, resource_version: str | None = None) -> bool:
        name = path.rpartition("/")[2]
        held = self.objects.get(name)
        if held is not None and resource_version is not None and \
                held["metadata"]["resourceVersion"] != resource_version:
            return False  # the apiserver's 409 on a failed precondition
        self.objects.pop(name, None)
        return True

    async def list(self, path: str, labels: Mapping[str, str] | None = None
                   ) -> list[dict[str, Any]]:
        return [copy.deepcopy(o) for o in self.objects.values() if matches(o, labels or {})]


def merge(target: dict[str, Any], patch: Mapping[str, Any]) -> None:
    """A JSON merge patch, in place."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = dict(value) if isinstance(value, Mapping) else value


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
