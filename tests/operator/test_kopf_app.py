"""The real kopf app against kmock's Kubernetes emulator on 127.0.0.1.

Workers are stood in for by the test: it marks each worker pod Ready with a 127.0.0.N IP,
and a recording `Wire` answers the gRPC calls (test_kopf_e2e.py runs real ones). Covered:
an invalid LLMService gets `Degraded` naming the field (and the operator keeps running);
autoscale asks the router for its rate; a valid LLMService with GPU nodes gets worker pods,
the router and the token copy (owned by it) and a status with the planned D/P/M; every
notice source (AWS termination handler, Karpenter, GKE, AKS and cluster-autoscaler taints,
SpotInterrupted and Preempt Node Events, a DisruptionTarget pod, a Node deletionTimestamp)
and a node lost without notice show as a migration, and the node's pods are replaced; an
operator restarted mid-drain completes the migration from the state it saved; the router's
replicas, budget, control Service and HPA follow the spec, and every replica found through
the control Service's EndpointSlices is told the topology.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import kmock
import kopf
import pytest

from spotserve.operator.controller.actuator import (
    ActuatorError,
    DrainedRequest,
    Resume,
    RoutedPipeline,
)
from spotserve.operator.controller.wire import Configured, RouterReport, WorkerReport
from spotserve.operator.k8s.api import Connection
from spotserve.operator.k8s.app import Runtime, register
from spotserve.operator.k8s.backend import BackendOptions
from spotserve.v1 import worker_pb2

NS = "llm"
LLMS = f"/apis/spotserve.dev/v1alpha1/namespaces/{NS}/llmservices"
PODS = f"/api/v1/namespaces/{NS}/pods"
POOL = {"name": "g4dn-spot", "capacityType": "spot", "instanceType": "g4dn.12xlarge",
        "maxInstances": 4, "nodeSelector": {"karpenter.sh/capacity-type": "spot"}}
SPEC = {"model": {"huggingFace": {"repoId": "facebook/opt-6.7b"}},
        "gpuPools": [POOL], "instances": {"min": 1, "max": 4},
        "serving": {"maxBatch": 4}, "load": {"requiredRate": 0.5}}


class RecordingWire:
    """Answers the operator's gRPC calls as workers and a router would. `workers` (address
    → epoch, pipeline id, state) are the emulated workers, and outlive an operator."""

    def __init__(self, workers: dict[str, tuple[int, str, str]] | None = None) -> None:
        self.workers = {} if workers is None else workers
        self.configured: list[tuple[int, str]] = []
        self.topologies: list[tuple[int, list[str]]] = []
        self.drained: list[tuple[int, str]] = []
        self.router_epoch = 0  # what the emulated router serves; 0 = just (re)started
        self.router_down = False

    async def status(self, address: str, timeout: float) -> WorkerReport:
        epoch, pipeline, state = self.workers.get(address, (0, "", "standby"))
        return WorkerReport(epoch, state, pipeline, "")

    async def drain(self, address: str, epoch: int, steps: int,
                    timeout: float) -> list[DrainedRequest]:
        self.drained.append((epoch, address))
        at, pipeline, _ = self.workers.get(address, (0, "", "standby"))
        self.workers[address] = (at, pipeline, "drained")
        return []

    async def configure(self, address: str, request: worker_pb2.ConfigureRequest,
                        timeout: float) -> Configured:
        if request.HasField("role"):
            # "": the worker reads the checkpoint where its pod mounts it (its --model)
            assert request.role.pipeline_id and request.model.checkpoint_path == ""
        self.configured.append((request.epoch, address))
        if not request.preload_only:
            self.workers[address] = (request.epoch, request.role.pipeline_id,
                                     "ready" if request.HasField("role") else "standby")
        return Configured("ready", pulled=1000)

    async def topology(self, router: str, epoch: int,
                       pipelines: Sequence[tuple[RoutedPipeline, str]],
                       resume: Sequence[Resume], max_concurrency: int,
                       timeout: float) -> None:
        if self.router_down:
            raise ActuatorError(f"UpdateTopology {router}: connection refused")
        self.topologies.append((epoch, [a for p, a in pipelines if p.state == "serving"]))
        self.router_epoch = epoch

    async def router_stats(self, router: str, timeout: float) -> RouterReport:
        if self.router_down:
            raise ActuatorError(f"Stats {router}: connection refused")
        return RouterReport(self.router_epoch, 0.4)

    async def forget(self, address: str) -> None:
        return None

    async def close(self) -> None:
        return None


def node(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "uid": f"uid-{name}", "labels": {
                "karpenter.sh/capacity-type": "spot", "kubernetes.io/hostname": name,
                "node.kubernetes.io/instance-type": "g4dn.12xlarge",
                "topology.kubernetes.io/zone": "us-east-1a"}},
            "spec": {"providerID": f"aws:///us-east-1a/{name}", **spec},
            "status": {"capacity": {"nvidia.com/gpu": "4"},
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def service(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "spotserve.dev/v1alpha1", "kind": "LLMService",
            "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}",
                         "generation": 1, "resourceVersion": "1"}, "spec": spec}


class Cluster:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.session = aiohttp.ClientSession()

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        kind = "application/merge-patch+json" if method == "PATCH" else "application/json"
        async with self.session.request(method, self.url + path, json=body,
                                        headers={"Content-Type": kind}) as r:
            assert r.status < 300, (method, path, r.status, await r.text())
            return await r.json()

    async def items(self, path: str) -> list[dict[str, Any]]:
        return list((await self.call("GET", path))["items"])

    async def get(self, path: str) -> dict[str, Any]:
        return dict(await self.call("GET", path))


async def until(check: Callable[[], Awaitable[Any]], timeout: float = 20.0) -> Any:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if loop.time() > end:
            raise AssertionError("timed out")
        await asyncio.sleep(0.2)


async def kubelet(cluster: Cluster) -> None:
    """Stand in for scheduling: worker pods on live nodes become Ready at 127.0.0.N."""
    addresses: dict[str, str] = {}
    while True:
        for pod in await cluster.items(PODS):
            meta, status = pod["metadata"], pod.get("status") or {}
            if (meta.get("labels") or {}).get("app.kubernetes.io/component") != "worker" or \
                    status.get("podIP"):
                continue
            ip = addresses.setdefault(meta["name"], f"127.0.0.{len(addresses) + 2}")
            await cluster.call("PATCH", f"{PODS}/{meta['name']}/status", {"status": {
                "phase": "Running", "podIP": ip,
                "conditions": [{"type": "Ready", "status": "True"}]}})
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def emulator(objects: Sequence[dict[str, Any]],
                   stand_in: Callable[[Cluster], Awaitable[None]] | None = None
                   ) -> AsyncIterator[Cluster]:
    """kmock serving the resources the operator uses, seeded with `objects`, plus the
    stand-in kubelet."""
    async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s) as server:
        k8s.resources["v1/nodes"] = kmock.ResourceInfo(kind="Node", namespaced=False,
                                                       verbs={"list", "watch", "get",
                                                              "patch"})
        for plural, kind in (("pods", "Pod"), ("events", "Event"), ("services", "Service"),
                             ("secrets", "Secret")):
            k8s.resources[f"v1/{plural}"] = kmock.ResourceInfo(
                kind=kind, namespaced=True, verbs={"list", "watch", "get", "create", "patch",
                                                   "delete"}, subresources={"status"})
        for plural, kind in (("apiextensions.k8s.io/v1/customresourcedefinitions",
                              "CustomResourceDefinition"), ("v1/namespaces", "Namespace")):
            k8s.resources[plural] = kmock.ResourceInfo(kind=kind, namespaced=False,
                                                       verbs={"list", "watch"})
        k8s.resources["apps/v1/deployments"] = kmock.ResourceInfo(
            kind="Deployment", namespaced=True, verbs={"list", "watch", "create", "patch"})
        for plural, kind in (("policy/v1/poddisruptionbudgets", "PodDisruptionBudget"),
                             ("autoscaling/v2/horizontalpodautoscalers",
                              "HorizontalPodAutoscaler"),
                             ("discovery.k8s.io/v1/endpointslices", "EndpointSlice")):
            k8s.resources[plural] = kmock.ResourceInfo(
                kind=kind, namespaced=True, verbs={"list", "watch", "get", "create", "patch",
                                                   "delete"})
        k8s.resources["spotserve.dev/v1alpha1/llmservices"] = kmock.ResourceInfo(
            kind="LLMService", namespaced=True, verbs={"list", "watch", "get", "patch"},
            subresources={"status", "scale"})
        cluster = Cluster(str(server.url))
        for obj in objects:
            path = "/api/v1/nodes" if obj["kind"] == "Node" else LLMS
            await cluster.call("POST", path, obj)
        helper = asyncio.create_task((stand_in or kubelet)(cluster))
        try:
            yield cluster
        finally:
            helper.cancel()
            await asyncio.gather(helper, return_exceptions=True)
            await cluster.session.close()


@contextlib.asynccontextmanager
async def running(cluster: Cluster, wire: Any, health: str | None = None
                  ) -> AsyncIterator[None]:
    runtime = Runtime(Connection(cluster.url, insecure=True), token="t", wire=lambda: wire,
                      options=BackendOptions(ready_timeout=20, poll_seconds=0.2,
                                             router_address="router:50061"),
                      interval=0.3)
    async with running_with(cluster, runtime, health):
        yield


@contextlib.asynccontextmanager
async def running_with(cluster: Cluster, runtime: Runtime,
                       health: str | None = None) -> AsyncIterator[None]:
    """The real kopf app (indices + daemons) against `cluster`, stopped on exit; with
    `health` (host:port) it serves /healthz there, as `spotserve operator` does."""
    registry = kopf.OperatorRegistry()
    url = cluster.url

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=url, insecure=True)

    register(registry, runtime)
    settings = kopf.OperatorSettings()
    settings.peering.standalone = True
    settings.posting.enabled = False
    settings.watching.reconnect_backoff = 0.2
    # kopf runs in a thread of its own, as in production: at exit it cancels every task of
    # its loop, which must not include the emulator's
    stop = threading.Event()
    failure: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(kopf.operator(
                registry=registry, settings=settings, clusterwide=True, stop_flag=stop,
                liveness_endpoint=f"http://{health}/healthz" if health else None))
        except BaseException as exc:  # reported by the test below
            failure.append(exc)

    thread = threading.Thread(target=main, name="kopf", daemon=True)
    thread.start()
    try:
        yield
        assert thread.is_alive() and not failure, f"the operator stopped: {failure}"
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 20)


@contextlib.asynccontextmanager
async def operator(objects: Sequence[dict[str, Any]], health: str | None = None
                   ) -> AsyncIterator[tuple[Cluster, RecordingWire]]:
    wire = RecordingWire()
    async with emulator(objects) as cluster, running(cluster, wire, health):
        yield cluster, wire


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or ()}


@pytest.mark.timeout(60)
async def test_invalid_service_is_degraded_and_the_operator_runs_on(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    bad = copy.deepcopy(SPEC)
    bad["instances"] = {"min": 5, "max": 2}
    autoscaled = {**SPEC, "load": {"autoscale": {"windowSeconds": 2, "headroom": 1.5}}}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        health = f"127.0.0.1:{probe.getsockname()[1]}"
    async with operator([service("bad", bad), service("good", autoscaled), node("n1")],
                        health) as (cluster, _):
        async def degraded() -> dict[str, Any] | None:
            c = conditions(await cluster.get(f"{LLMS}/bad")).get("Degraded")
            return c if c and c["status"] == "True" else None
        cond = await until(degraded)
        assert "spec.instances.min" in cond["message"]
        assert cond["reason"] == "InvalidSpecInstancesMin"
        obj = await cluster.get(f"{LLMS}/bad")
        assert obj["status"]["lastErrors"][0]["field"] == "spec.instances.min"
        assert obj["status"]["conditions"][0]["type"] == "Ready"

        async def good_planned() -> Any:
            return (await cluster.get(f"{LLMS}/good")).get("status", {}).get("parallelism",
                                                                             {}).get("current")
        assert await until(good_planned)

        async def rate_measured() -> bool:  # 0.4 req/s measured × headroom 1.5
            state = (await cluster.get(f"{LLMS}/good")).get("status", {}).get("controller")
            return bool(state) and abs(state["view"]["rate"] - 0.6) < 1e-9
        assert await until(rate_measured), "autoscale never planned for the router's rate"
        async with cluster.session.get(f"http://{health}/healthz") as response:
            assert response.status == 200


def taint(key: str) -> Callable[[Cluster, str], Awaitable[Any]]:
    async def apply(cluster: Cluster, node_name: str) -> Any:
        return await cluster.call("PATCH", f"/api/v1/nodes/{node_name}", {"spec": {"taints": [
            {"key": key, "effect": "NoSchedule"}]}})
    return apply


def node_event(reason: str) -> Callable[[Cluster, str], Awaitable[Any]]:
    async def apply(cluster: Cluster, node_name: str) -> Any:
        return await cluster.call("POST", "/api/v1/namespaces/default/events", {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{node_name}.{reason.lower()}", "namespace": "default",
                         "resourceVersion": "1"},
            "involvedObject": {"kind": "Node", "name": node_name}, "reason": reason,
            "type": "Warning", "message": "the instance will be interrupted"})
    return apply


async def disruption_target(cluster: Cluster, node_name: str) -> Any:
    return await cluster.call("POST", PODS, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "evicted", "namespace": NS, "resourceVersion": "1"},
        "spec": {"nodeName": node_name, "containers": [{"name": "c", "image": "x"}]},
        "status": {"conditions": [{"type": "DisruptionTarget", "status": "True",
                                   "reason": "TerminationByKubelet"}]}})


async def node_deleting(cluster: Cluster, node_name: str) -> Any:
    """A Node being deleted (a finalizer holds it, as the cloud controller's would)."""
    return await cluster.call("PATCH", f"/api/v1/nodes/{node_name}", {"metadata": {
        "finalizers": ["example.com/hold"], "deletionTimestamp": "2030-01-01T00:00:00Z"}})


async def node_vanishes(cluster: Cluster, node_name: str) -> Any:
    """No notice at all: the Node object is simply gone."""
    return await cluster.call("DELETE", f"/api/v1/nodes/{node_name}")


NOTICES: dict[str, tuple[Callable[[Cluster, str], Awaitable[Any]], str | None]] = {
    "taint-aws-spot-itn": (taint("aws-node-termination-handler/spot-itn"), "aws"),
    "taint-karpenter-disrupted": (taint("karpenter.sh/disrupted"), "aws"),
    "taint-gke-impending-termination": (taint("cloud.google.com/impending-node-termination"),
                                        "gcp"),
    "taint-aks-remediator": (taint("remediator.kubernetes.azure.com/unschedulable"), "azure"),
    "event-spot-interrupted": (node_event("SpotInterrupted"), "aws"),
    "pod-disruption-target": (disruption_target, "aws"),
    "taint-cluster-autoscaler": (taint("ToBeDeletedByClusterAutoscaler"), "aws"),
    "event-aks-preempt": (node_event("Preempt"), "aws"),
    "node-deletion-timestamp": (node_deleting, "aws"),
    "node-lost-without-notice": (node_vanishes, None),
}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("source", list(NOTICES))
async def test_service_is_planned_placed_and_migrates_on_a_notice(source: str) -> None:
    notify, cloud = NOTICES[source]
    async with operator([node("n1"), node("n2"), service("llama", SPEC)]) as (cluster, wire):
        async def ready() -> dict[str, Any] | None:
            obj = await cluster.get(f"{LLMS}/llama")
            return obj if conditions(obj).get("Ready", {}).get("status") == "True" else None
        obj = await until(ready)
        status = obj["status"]
        current = status["parallelism"]["current"]
        assert current["summary"] == f"{current['data']}/{current['pipeline']}/" \
            f"{current['tensor']}"
        pods = [p for p in await cluster.items(PODS)
                if p["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"]
        # a pod per instance holding its GPUs; a worker (a placement slot) per GPU
        assert len(pods) == len({s["pod"] for s in status["placement"]}) == len(
            {s["node"] for s in status["placement"]})
        assert len(status["placement"]) == status["replicas"]["workers"]
        assert all(p["metadata"]["ownerReferences"][0]["uid"] == "uid-llama" for p in pods)
        deployment = await cluster.get(f"/apis/apps/v1/namespaces/{NS}/deployments/"
                                       "llama-router")
        assert deployment["metadata"]["ownerReferences"][0]["name"] == "llama"
        assert (await cluster.get(f"/api/v1/namespaces/{NS}/secrets/llama-token"))["data"]
        assert wire.topologies and wire.configured
        assert status["migration"]["bytesMoved"] == 1000 * len(status["placement"])
        used = {s["node"] for s in status["placement"]}
        doomed = sorted(used)[0]
        epoch = wire.topologies[-1][0]

        await notify(cluster, doomed)

        async def moved() -> dict[str, Any] | None:
            obj = await cluster.get(f"{LLMS}/llama")
            s = obj.get("status") or {}
            nodes = {p["node"] for p in s.get("placement") or ()}
            done = s.get("migration", {}).get("id") != f"e{epoch}" and doomed not in nodes
            return obj if done and nodes else None
        obj = await until(moved, 40)
        migration = obj["status"]["migration"]
        assert migration.get("noticeSource") == cloud
        assert ("notice" if cloud else "InstanceLost") in migration["reason"]

        async def replaced() -> bool:
            pods = await cluster.items(PODS)
            return not any((p["metadata"].get("labels") or {}).get("spotserve.dev/node") ==
                           doomed for p in pods)
        assert await until(replaced)


class GatedWire(RecordingWire):
    """Every drain waits until the gate opens (the operator dies first)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    async def drain(self, address: str, epoch: int, steps: int,
                    timeout: float) -> list[DrainedRequest]:
        while not self.gate.is_set():
            await asyncio.sleep(0.05)
        return await super().drain(address, epoch, steps, timeout)


@pytest.mark.timeout(90)
async def test_a_restarted_operator_completes_the_migration() -> None:
    async with emulator([node("n1"), node("n2"), service("llama", SPEC)]) as cluster:
        first = GatedWire()
        async with running(cluster, first):
            async def ready() -> dict[str, Any] | None:
                obj = await cluster.get(f"{LLMS}/llama")
                return obj if conditions(obj).get("Ready", {}).get("status") == "True" \
                    else None
            status = (await until(ready))["status"]
            doomed = sorted({s["node"] for s in status["placement"]})[0]
            await taint("aws-node-termination-handler/spot-itn")(cluster, doomed)

            async def stuck() -> bool:
                obj = await cluster.get(f"{LLMS}/llama")
                saved = (obj.get("status") or {}).get("controller")
                return bool(saved) and saved["phase"] == "draining" and \
                    obj["status"].get("migration", {}).get("phase") == "Draining" and \
                    conditions(obj)["Migrating"]["status"] == "True"
            assert await until(stuck)
        assert not any(epoch >= 2 for epoch, _ in first.topologies)

        second = RecordingWire(first.workers)  # the workers outlive the operator
        async with running(cluster, second):
            async def finished() -> dict[str, Any] | None:
                obj = await cluster.get(f"{LLMS}/llama")
                s = obj.get("status") or {}
                nodes = {p["node"] for p in s.get("placement") or ()}
                saved = s.get("controller") or {}
                done = s.get("migration", {}).get("phase") == "Completed" and \
                    saved["phase"] == "serving"
                return obj if done and nodes and doomed not in nodes else None
            obj = await until(finished, 40)
        state = obj["status"]["controller"]
        assert "spotserve.dev/controller-state" not in obj["metadata"].get("annotations", {})
        assert state["epoch"] >= 2 and state["phase"] == "serving"
        assert second.topologies and second.topologies[-1][0] >= 2
        # the new operator found the running workers: it drained the doomed pipeline itself
        assert any(address.startswith("127.0.0.") for _, address in second.drained)
        assert conditions(obj)["Ready"]["status"] == "True"


@pytest.mark.timeout(60)
async def test_no_nodes_yet_means_capacity_requests_up_to_min() -> None:
    spec = {**SPEC, "instances": {"min": 2, "max": 4}}
    async with operator([service("cold", spec)]) as (cluster, _):
        async def requested() -> list[dict[str, Any]]:
            pods = await cluster.items(PODS)
            return [p for p in pods if p["metadata"]["labels"].get(
                "app.kubernetes.io/component") == "capacity"]
        pods = await until(requested)
        await asyncio.sleep(1.0)  # a few more ticks: the request is not repeated
        pods = await requested()
        assert len(pods) == 2
        assert pods[0]["spec"]["nodeSelector"] == {
            "karpenter.sh/capacity-type": "spot",
            "node.kubernetes.io/instance-type": "g4dn.12xlarge"}
        assert pods[0]["metadata"]["ownerReferences"][0]["name"] == "cold"
        status = (await cluster.get(f"{LLMS}/cold"))["status"]
        assert status["replicas"]["pendingInstances"] == 2
        assert conditions(await cluster.get(f"{LLMS}/cold"))["CapacityAvailable"][
            "status"] == "False"



@pytest.mark.timeout(60)
async def test_a_spec_broken_then_fixed_recovers() -> None:
    async with operator([node("n1"), service("llama", SPEC)]) as (cluster, _):
        async def condition_is(kind: str, value: str) -> dict[str, Any] | None:
            obj = await cluster.get(f"{LLMS}/llama")
            return obj if conditions(obj).get(kind, {}).get("status") == value else None
        await until(lambda: condition_is("Ready", "True"))
        await cluster.call("PATCH", f"{LLMS}/llama", {"spec": {"slo": {"latencySeconds": -1}}})
        obj = await until(lambda: condition_is("Degraded", "True"))
        assert "spec.slo.latencySeconds" in conditions(obj)["Degraded"]["message"]
        await cluster.call("PATCH", f"{LLMS}/llama", {"spec": {"slo": None}})
        obj = await until(lambda: condition_is("Ready", "True"))
        assert conditions(obj)["Degraded"]["status"] == "False"
        assert obj["status"]["lastErrors"][0]["field"] == "spec.slo.latencySeconds"


@pytest.mark.timeout(60)
async def test_a_hub_repository_no_built_in_names_is_planned_from_its_config(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 19: an LLMService naming Mistral-7B-Instruct-v0.3 (no built-in model) is
    planned from the config.json the operator fetches, and its workers are configured; so
    is one serving Qwen2.5-7B from an https archive, once the archive is there (Degraded
    before, and fetched again with the spec unchanged); a repository whose config cannot
    be had is Degraded, saying why."""
    from .fake_hub import https_archives
    mistral = {**SPEC, "model": {"huggingFace": {
        "repoId": "mistralai/Mistral-7B-Instruct-v0.3"}}}
    missing = {**SPEC, "model": {"huggingFace": {"repoId": "acme/nothing"}}}
    wire = RecordingWire()
    archives: dict[str, bytes] = {}   # the archive is not uploaded yet
    with https_archives(archives, monkeypatch) as base:
        qwen = {**SPEC, "model": {"url": f"{base}/qwen.tar.gz"}}
        await _plans_from_fetched_configs(wire, mistral, missing, qwen, archives)


async def _plans_from_fetched_configs(wire: RecordingWire, mistral: dict[str, Any],
                                      missing: dict[str, Any], qwen: dict[str, Any],
                                      archives: dict[str, bytes]) -> None:
    from spotserve.operator.k8s.model_config import ConfigFetcher

    from .fake_hub import QWEN25_7B, archive, fake_hub
    async with fake_hub() as hub, emulator([node("n1"), node("n2"), service("mistral", mistral),
                                            service("missing", missing),
                                            service("qwen", qwen)]) as cluster:
        runtime = Runtime(Connection(cluster.url, insecure=True), token="t",
                          wire=lambda: wire, interval=0.3,
                          options=BackendOptions(ready_timeout=20, poll_seconds=0.2,
                                                 router_address="router:50061"),
                          configs=ConfigFetcher(hub.url, token=""), config_retry_s=0.5)
        async with running_with(cluster, runtime):
            async def condition(name: str, kind: str) -> dict[str, Any] | None:
                obj = await cluster.get(f"{LLMS}/{name}")
                c = conditions(obj).get(kind)
                return c if c and c["status"] == "True" else None
            await until(lambda: condition("mistral", "Ready"))
            cond = await until(lambda: condition("qwen", "Degraded"))
            assert "qwen.tar.gz" in cond["message"] and "404" in cond["message"]
            archives["/qwen.tar.gz"] = archive(QWEN25_7B)   # uploaded now
            await until(lambda: condition("qwen", "Ready"))
            assert wire.configured
            cond = await until(lambda: condition("missing", "Degraded"))
            assert "acme/nothing" in cond["message"] and "no config.json" in cond["message"]


class FlakyWire(RecordingWire):
    """The first Configure fails, as a worker that is not up yet would."""

    async def configure(self, address: str, request: worker_pb2.ConfigureRequest,
                        timeout: float) -> Configured:
        if not self.configured:
            self.configured.append((-1, address))
            raise ActuatorError(f"Configure {address}: connection refused")
        return await super().configure(address, request, timeout)


@pytest.mark.timeout(60)
async def test_a_backend_failure_is_recorded_and_retried() -> None:
    wire = FlakyWire()
    async with emulator([node("n1"), service("llama", SPEC)]) as cluster, \
            running(cluster, wire):
        async def ready() -> dict[str, Any] | None:
            obj = await cluster.get(f"{LLMS}/llama")
            return obj if conditions(obj).get("Ready", {}).get("status") == "True" else None
        obj = await until(ready)
        assert conditions(obj)["Degraded"]["status"] == "False"
        errors = obj["status"]["lastErrors"]
        assert errors[0]["field"] == "status.migration"
        assert "connection refused" in errors[0]["message"]


@pytest.mark.timeout(60)
async def test_a_restarted_router_gets_the_topology_again() -> None:
    async with operator([node("n1"), service("llama", SPEC)]) as (cluster, wire):
        async def router_ready(want: str) -> bool:
            obj = await cluster.get(f"{LLMS}/llama")
            return conditions(obj).get("RouterReady", {}).get("status") == want
        assert await until(lambda: router_ready("True"))
        epoch, pipelines = wire.topologies[-1]
        wire.router_down = True  # its pod is rescheduled...
        assert await until(lambda: router_ready("False"))
        wire.router_down, wire.router_epoch = False, 0  # ...and comes back knowing nothing
        assert await until(lambda: router_ready("True"))
        assert wire.topologies[-1] == (epoch, pipelines)
        assert wire.router_epoch == epoch


class ReplicaWire(RecordingWire):
    """Router replicas, each serving the epoch it was last told."""

    def __init__(self) -> None:
        super().__init__()
        self.told: dict[str, int] = {}

    async def topology(self, router: str, epoch: int,
                       pipelines: Sequence[tuple[RoutedPipeline, str]],
                       resume: Sequence[Resume], max_concurrency: int,
                       timeout: float) -> None:
        await super().topology(router, epoch, pipelines, resume, max_concurrency, timeout)
        self.told[router] = epoch

    async def router_stats(self, router: str, timeout: float) -> RouterReport:
        return RouterReport(self.told.get(router, 0), 0.4)


@pytest.mark.timeout(90)
async def test_router_replicas_follow_the_spec_and_each_is_told_the_topology() -> None:
    """Issue 16: the operator makes a 2-replica router Deployment, its PodDisruptionBudget
    and headless control Service; it finds both replicas (one not Ready) through that
    Service's EndpointSlices and tells each the topology; spec changes reach the
    Deployment, and autoscale makes and removes the HPA."""
    wire = ReplicaWire()
    deployments = f"/apis/apps/v1/namespaces/{NS}/deployments"
    hpas = f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers"
    async with emulator([node("n1"), service("llama", SPEC)]) as cluster:
        await cluster.call("POST", f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices", {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "llama-router-control-x1", "namespace": NS,
                         "labels": {"kubernetes.io/service-name": "llama-router-control"}},
            "addressType": "IPv4", "ports": [{"name": "control", "port": 50061}],
            "endpoints": [{"addresses": ["10.1.0.5"], "conditions": {"ready": True}},
                          {"addresses": ["10.1.0.6"], "conditions": {"ready": False}}]})
        runtime = Runtime(Connection(cluster.url, insecure=True), token="t",
                          wire=lambda: wire, interval=0.3,
                          options=BackendOptions(ready_timeout=20, poll_seconds=0.2))
        async with running_with(cluster, runtime):
            async def router() -> dict[str, Any] | None:
                found = [d for d in await cluster.items(deployments)
                         if d["metadata"]["name"] == "llama-router"]
                return found[0] if found else None
            assert (await until(router))["spec"]["replicas"] == 2
            services = {s["metadata"]["name"]: s for s in
                        await cluster.items(f"/api/v1/namespaces/{NS}/services")}
            control = services["llama-router-control"]["spec"]
            assert control["clusterIP"] == "None" and control["publishNotReadyAddresses"]
            assert [p["port"] for p in control["ports"]] == [50061]
            assert 50061 not in [p["port"] for p in services["llama-router"]["spec"]["ports"]]
            async def budgets() -> list[str]:   # the workers' comes with their first pods
                found = await cluster.items(f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets")
                names = sorted(b["metadata"]["name"] for b in found)
                return names if len(names) == 2 else []
            assert await until(budgets) == ["llama-router", "llama-workers"]

            async def both_told() -> bool:
                return set(wire.told) == {"10.1.0.5:50061", "10.1.0.6:50061"} and \
                    len(set(wire.told.values())) == 1 and min(wire.told.values()) > 0
            assert await until(both_told)

            async def replicas(want: int) -> bool:
                found = await router()
                return found is not None and found["spec"].get("replicas") == want
            await cluster.call("PATCH", f"{LLMS}/llama", {"spec": {"router": {"replicas": 3}}})
            assert await until(lambda: replicas(3))

            await cluster.call("PATCH", f"{LLMS}/llama", {"spec": {"router": {"autoscale": {
                "minReplicas": 2, "maxReplicas": 5, "metric": "queue"}}}})

            async def autoscaler() -> dict[str, Any] | None:
                found = await cluster.items(hpas)
                return found[0] if found else None
            hpa = await until(autoscaler)
            assert hpa["spec"]["maxReplicas"] == 5
            assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == \
                "spotserve_num_requests_waiting"
            assert await replicas(3), "the count is the HPA's now, not reset to minReplicas"

            await cluster.call("PATCH", f"{LLMS}/llama", {"spec": {"router": {
                "autoscale": None, "replicas": 2}}})

            async def no_autoscaler() -> bool:
                return not await cluster.items(hpas)
            assert await until(no_autoscaler)
            assert await until(lambda: replicas(2))
