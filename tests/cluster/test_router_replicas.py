"""Issue 16 against the real control plane: the operator, with the chart's RBAC (its
ServiceAccount's token), makes a 2-replica router Deployment, the routers'
PodDisruptionBudget and the headless control Service; the ReplicaSet, the scheduler, the
EndpointSlice and disruption controllers do the rest; the operator then finds both router
pods, Ready or not, through that Service's EndpointSlices and tells each its topology.
Spec changes reach the Deployment, and autoscale makes and deletes the HPA.

There is no kubelet: the test writes the router pods' status (Running, an IP, not Ready:
a router is Ready only once told its topology) as one would."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from spotserve.operator.controller.actuator import Resume, RoutedPipeline
from spotserve.operator.controller.wire import RouterReport
from spotserve.operator.k8s import manifests as m
from spotserve.operator.k8s.api import Connection, KubeApi
from spotserve.operator.k8s.backend import KubernetesBackend
from spotserve.operator.k8s.spec import ServiceSpec, validate
from spotserve.operator.planner.cluster import GpuId

from .plane import ROOT, ControlPlane

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]

NS, SYSTEM = "routers", "spotserve-system"
IPS = ("10.244.1.5", "10.244.2.5", "10.244.3.5")
SPEC: dict[str, Any] = {
    "model": {"huggingFace": {"repoId": "facebook/opt-6.7b"}},
    "gpuPools": [{"name": "spot", "capacityType": "spot", "instanceType": "g4dn.12xlarge",
                  "maxInstances": 2}],
    "instances": {"min": 1, "max": 2}}


async def until(what: str, check: Callable[[], Awaitable[Any]], timeout: float = 60.0) -> Any:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        got = await check()
        if got:
            return got
        await asyncio.sleep(0.3)
    pytest.fail(f"{what}: not within {timeout:.0f} s")


class Replicas:
    """The router replicas' Control services: each serves the epoch it was last told."""

    def __init__(self) -> None:
        self.told: dict[str, list[int]] = {}

    async def topology(self, router: str, epoch: int,
                       pipelines: Sequence[tuple[RoutedPipeline, str]],
                       resume: Sequence[Resume], max_concurrency: int,
                       timeout: float) -> None:
        self.told.setdefault(router, []).append(epoch)

    async def router_stats(self, router: str, timeout: float) -> RouterReport:
        return RouterReport(self.told[router][-1] if router in self.told else 0, 0.5)


def _node(plane: ControlPlane, name: str, zone: str) -> None:
    """A Ready CPU node, as its kubelet would report it."""
    code, body = plane.request("POST", "/api/v1/nodes", {"metadata": {"name": name, "labels": {
        "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
        "topology.kubernetes.io/zone": zone}}})
    assert code == 201, body
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    resources = {"cpu": "4", "memory": "16Gi", "pods": "110"}
    code, body = plane.request("PATCH", f"/api/v1/nodes/{name}/status", {"status": {
        "capacity": resources, "allocatable": resources,
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "lastHeartbeatTime": now, "lastTransitionTime": now}]}},
        content_type="application/merge-patch+json")
    assert code == 200, body


def _operator_token(plane: ControlPlane) -> str:
    """The chart's ServiceAccount and RBAC, installed; a token of that account."""
    helm = shutil.which("helm", path=str(Path(sys.executable).parent))
    if helm is None:
        pytest.skip("helm is not installed; run: make test-tools")
    rendered = subprocess.run(
        [helm, "template", "spotserve", str(ROOT / "charts" / "spotserve"), "--namespace",
         SYSTEM, "--show-only", "templates/serviceaccount.yaml", "--show-only",
         "templates/rbac.yaml"], capture_output=True, text=True, timeout=60, check=True)
    plane.request("POST", "/api/v1/namespaces", {"metadata": {"name": SYSTEM}})
    paths = {"ServiceAccount": f"/api/v1/namespaces/{SYSTEM}/serviceaccounts",
             "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
             "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings"}
    account = ""
    for doc in yaml.safe_load_all(rendered.stdout):
        if not doc:
            continue
        code, body = plane.request("POST", paths[doc["kind"]], doc)
        assert code == 201, body
        if doc["kind"] == "ServiceAccount":
            account = doc["metadata"]["name"]
    code, body = plane.request(
        "POST", f"/api/v1/namespaces/{SYSTEM}/serviceaccounts/{account}/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
         "spec": {"expirationSeconds": 3600}})
    assert code == 201, body
    return str(body["status"]["token"])


def _llm_service(plane: ControlPlane) -> m.Owner:
    """The CRD installed and an LLMService made: the owner of the router's objects (the
    garbage collector deletes objects whose owner does not exist)."""
    crd = yaml.safe_load((ROOT / "crds" / "llmservices.spotserve.dev.yaml").read_text())
    path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    code, body = plane.request("POST", path, crd)
    assert code == 201, body

    def established() -> bool:
        got = plane.request("GET", f"{path}/{crd['metadata']['name']}")[1]
        return any(c["type"] == "Established" and c["status"] == "True"
                   for c in (got.get("status") or {}).get("conditions") or ())
    give_up = time.monotonic() + 60
    while not established():
        assert time.monotonic() < give_up, "the CRD is not Established"
        time.sleep(0.2)
    obj = {"apiVersion": f"{m.GROUP}/{m.VERSION}", "kind": m.KIND,
           "metadata": {"name": "llama", "namespace": NS}, "spec": SPEC}
    for _ in range(50):  # the new resource takes a moment to be served
        code, body = plane.request("POST", f"/apis/{m.GROUP}/{m.VERSION}/namespaces/{NS}/"
                                   f"{m.PLURAL}", obj)
        if code != 404:
            break
        time.sleep(0.2)
    assert code == 201, body
    # the server's defaults, as the operator reads the spec
    assert body["spec"]["router"]["replicas"] == 2
    return m.Owner.of(body)


def _backend(api: KubeApi, owner: m.Owner, spec: dict[str, Any],
             wire: Replicas) -> KubernetesBackend:
    """What the operator's runner makes for the LLMService (at start, on a spec change)."""
    service = validate(spec)
    assert isinstance(service, ServiceSpec), service
    return KubernetesBackend(api, owner, spec, service, wire,  # type: ignore[arg-type]
                             pool_of=lambda node: None)


async def test_the_operator_runs_two_router_replicas_and_finds_both(
        cluster: ControlPlane, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="spotserve.operator.backend")
    token = _operator_token(cluster)
    _node(cluster, "cpu-a", "zone-a")
    _node(cluster, "cpu-b", "zone-b")
    assert cluster.request("POST", "/api/v1/namespaces", {"metadata": {"name": NS}})[0] == 201

    async def account() -> bool:  # pods need the namespace's default ServiceAccount
        return cluster.request("GET", f"/api/v1/namespaces/{NS}/serviceaccounts/default")[0] \
            == 200
    await until("the namespace's default ServiceAccount", account)
    owner = _llm_service(cluster)

    api = KubeApi(Connection(cluster.server, token, insecure=True))
    wire = Replicas()
    try:
        backend = _backend(api, owner, SPEC, wire)
        await backend.ensure_router("s3cret")

        def get(path: str) -> dict[str, Any] | None:
            code, body = cluster.request("GET", path)
            return body if code == 200 else None
        apps = f"/apis/apps/v1/namespaces/{NS}/deployments/llama-router"
        deployment = get(apps)
        assert deployment is not None and deployment["spec"]["replicas"] == 2
        control = get(f"/api/v1/namespaces/{NS}/services/llama-router-control")
        assert control is not None
        assert control["spec"]["clusterIP"] == "None"
        assert control["spec"]["publishNotReadyAddresses"] is True
        public = get(f"/api/v1/namespaces/{NS}/services/llama-router")
        assert public is not None
        assert [p["name"] for p in public["spec"]["ports"]] == ["grpc", "http"]
        budget_path = f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/llama-router"
        assert (get(budget_path) or {}).get("spec", {}).get("maxUnavailable") == 1
        hpa_path = f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/llama-router"
        assert get(hpa_path) is None

        # the ReplicaSet makes two pods; the scheduler spreads them over the two nodes
        selector = "app.kubernetes.io/component%3Drouter,spotserve.dev/service%3Dllama"

        def pods() -> list[dict[str, Any]]:
            body = get(f"/api/v1/namespaces/{NS}/pods?labelSelector={selector}") or {}
            return sorted(body.get("items") or (), key=lambda p: p["metadata"]["name"])

        async def bound(count: int) -> list[dict[str, Any]] | None:
            found = [p for p in pods() if p["spec"].get("nodeName")]
            return found if len(found) == count else None
        routers = await until("two router pods bound", lambda: bound(2))
        assert {p["spec"]["nodeName"] for p in routers} == {"cpu-a", "cpu-b"}

        def started(pod: dict[str, Any], ip: str) -> None:
            """The kubelet's report: running, an IP, not Ready (no topology yet)."""
            code, body = cluster.request(
                "PATCH", f"/api/v1/namespaces/{NS}/pods/{pod['metadata']['name']}/status",
                {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                            "conditions": [{"type": "Ready", "status": "False"},
                                           {"type": "PodScheduled", "status": "True"}]}},
                content_type="application/merge-patch+json")
            assert code == 200, body
        for pod, ip in zip(routers, IPS, strict=False):
            started(pod, ip)

        want = [f"{ip}:{m.CONTROL_PORT}" for ip in IPS[:2]]

        async def found(count: int) -> bool:
            return len(await backend.find_routers()) == count
        await until("both router pods in the control Service's EndpointSlices",
                    lambda: found(2))
        assert list(backend.router_addresses()) == want
        # clients are not sent to them yet: in the public Service's slices, none is ready
        async def public_endpoints() -> list[dict[str, Any]] | None:
            slices = get(f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"
                         "?labelSelector=kubernetes.io%2Fservice-name%3Dllama-router") or {}
            found = [e for s in slices.get("items") or () for e in s.get("endpoints") or ()]
            return found if len(found) == 2 else None
        endpoints = await until("both router pods in the public Service's EndpointSlices",
                                public_endpoints)
        assert not any(e["conditions"].get("ready") for e in endpoints)

        # the operator tells both the topology
        backend.addresses = {"n1/0": "10.0.0.1:50051"}
        backend.routed = [RoutedPipeline("p0", GpuId("n1", 0), 1.0)]
        backend.router_epoch = 3
        assert await backend.check_router()
        assert wire.told == {address: [3] for address in want}

        async def budget_counts(count: int) -> bool:  # the disruption controller's count
            return (get(budget_path) or {}).get("status", {}).get("expectedPods") == count
        await until("the routers' PodDisruptionBudget covering both", lambda: budget_counts(2))

        # a spec change reaches the Deployment: a third replica
        three = {**SPEC, "router": {"replicas": 3}}
        await _backend(api, owner, three, wire).ensure_router("s3cret")
        assert (get(apps) or {})["spec"]["replicas"] == 3
        routers = await until("a third router pod bound", lambda: bound(3))
        new = next(p for p in routers if not (p.get("status") or {}).get("podIP"))
        started(new, IPS[2])
        await until("three router pods in the control Service's EndpointSlices",
                    lambda: found(3))

        # autoscale: an HPA (the Deployment's count is its own then), removed with it
        auto = {**SPEC, "router": {"replicas": 3, "autoscale": {"minReplicas": 2,
                                                                "maxReplicas": 4}}}
        await _backend(api, owner, auto, wire).ensure_router("s3cret")
        hpa = get(hpa_path)
        assert hpa is not None and hpa["spec"]["minReplicas"] == 2
        assert hpa["spec"]["scaleTargetRef"]["name"] == "llama-router"
        assert hpa["metadata"]["ownerReferences"][0]["uid"] == owner.uid
        await _backend(api, owner, three, wire).ensure_router("s3cret")
        assert get(hpa_path) is None
        assert (get(apps) or {})["spec"]["replicas"] == 3

        # back to two: the pod the ReplicaSet deletes stays Terminating (no kubelet to
        # end it), and is no longer one of the replicas the operator tells
        await _backend(api, owner, SPEC, wire).ensure_router("s3cret")

        async def terminating() -> bool:
            return any(p["metadata"].get("deletionTimestamp") for p in pods())
        await until("a router pod terminating", terminating)
        await until("two router replicas left", lambda: found(2))
        going = {p["status"]["podIP"] for p in pods() if p["metadata"].get("deletionTimestamp")}
        assert going and not going & {a.rpartition(":")[0] for a in backend.router_addresses()}
        # all of it through the EndpointSlices the chart's RBAC lets the operator read
        assert not [r for r in caplog.records if "EndpointSlices" in r.getMessage()]
    finally:
        await api.close()
