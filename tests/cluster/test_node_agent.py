"""The node agent against the real control plane: nodes the way EKS (Karpenter, managed
node groups) and GKE label them, pods run as processes with probes, Services resolved by
the real EndpointSlice controller, deletion with preStop and grace, restarts, and the
cloud's interruptions and capacity. What the operator reads of nodes (nodes.py) is checked
against these nodes too."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spotserve.catalog import Catalog
from spotserve.operator.k8s.nodes import describe_node

from .agent import EKS, GKE, KARPENTER, NodeAgent, NodePool, wait_for
from .plane import ControlPlane

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
NS = "agent"

SERVER = """
import http.server, os, signal, sys, time
port = int(sys.argv[1])
if os.environ.get("IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
        self.wfile.write(os.environ["HOSTNAME"].encode())
    def log_message(self, *a): pass
http.server.HTTPServer((sys.argv[2], port), H).serve_forever()
"""


@pytest.fixture(scope="module")
def agent(pod_network: None, cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[NodeAgent]:
    with NodeAgent(cluster, tmp_path_factory.mktemp("agent")) as a:
        cluster.request("POST", "/api/v1/namespaces", {"metadata": {"name": NS}})
        wait_for("the namespace's service account", lambda: cluster.request(
            "GET", f"/api/v1/namespaces/{NS}/serviceaccounts/default")[0] == 200)
        yield a


def server_pod(name: str, node_selector: dict[str, str], *, gpus: int = 0,
               env: dict[str, str] | None = None, grace: int = 30,
               pre_stop: list[str] | None = None, restart: str = "Always",
               script: str = SERVER) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "web", "image": "python:3.13", "command": ["python", "-c", script],
        "args": ["8080", "0.0.0.0"], "ports": [{"name": "http", "containerPort": 8080}],
        "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1}}
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": gpus}}
    if pre_stop:
        container["lifecycle"] = {"preStop": {"exec": {"command": pre_stop}}}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": {"app": name}},
            "spec": {"nodeSelector": node_selector, "restartPolicy": restart,
                     "terminationGracePeriodSeconds": grace,
                     "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                     "containers": [container]}}


def pod(plane: ControlPlane, name: str) -> dict[str, Any] | None:
    code, body = plane.request("GET", f"/api/v1/namespaces/{NS}/pods/{name}")
    return body if code == 200 else None


def ready(plane: ControlPlane, name: str) -> dict[str, Any] | None:
    body = pod(plane, name)
    conditions = ((body or {}).get("status") or {}).get("conditions") or ()
    return body if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions) \
        else None


def node(plane: ControlPlane, name: str) -> dict[str, Any] | None:
    code, body = plane.request("GET", f"/api/v1/nodes/{name}")
    return body if code == 200 else None


def test_nodes_carry_each_clouds_labels_and_the_operator_reads_them(
        cluster: ControlPlane, agent: NodeAgent) -> None:
    catalog = Catalog.load()
    expected = {KARPENTER: ("spot", "A10G", 1, "aws"), EKS: ("on-demand", "A10G", 4, "aws"),
                GKE: ("spot", "L4", 2, "gcp")}
    pools = {KARPENTER: NodePool("kp", KARPENTER), EKS: NodePool(
        "mng", EKS, instance_type="g5.12xlarge", gpus=4, capacity="on-demand"),
        GKE: NodePool("gpool", GKE, instance_type="g2-standard-24", gpus=2,
                      gpu_product="NVIDIA-L4", zone="us-central1-a")}
    for flavour, pool in pools.items():
        name = agent.add_node(pool)
        body = wait_for(f"node {name} Ready", lambda n=name: node(cluster, n))
        info = describe_node(body, now=time.time(), catalog=catalog)
        assert (info.capacity_type, info.gpu_type, info.gpu_count, info.cloud) == \
            expected[flavour], flavour
        assert info.ready and not info.notices
        assert body["status"]["allocatable"]["nvidia.com/gpu"] == str(pool.gpus)
        agent.gone(name)


def test_a_pod_runs_on_its_own_address_and_its_service_finds_it(
        cluster: ControlPlane, agent: NodeAgent) -> None:
    name = agent.add_node(NodePool("cpu", KARPENTER, gpus=0, capacity="on-demand",
                                   instance_type="m5.large"))
    assert cluster.request("POST", f"/api/v1/namespaces/{NS}/pods", server_pod(
        "web", {"kubernetes.io/hostname": name}))[0] == 201
    body = wait_for("the pod Ready", lambda: ready(cluster, "web"), 60)
    ip = body["status"]["podIP"]
    assert ip.startswith("10.244.") and ip != body["status"]["hostIP"]
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
               "spec": {"selector": {"app": "web"}, "ports": [{"port": 80,
                                                                "targetPort": "http"}]}}
    assert cluster.request("POST", f"/api/v1/namespaces/{NS}/services", service)[0] == 201

    def endpoints() -> list[Any]:
        _, slices = cluster.request(
            "GET", f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"
            "?labelSelector=kubernetes.io%2Fservice-name%3Dweb")
        return [(a, p["port"]) for s in slices.get("items") or () for e in s.get("endpoints")
                or () if (e.get("conditions") or {}).get("ready") for a in e["addresses"]
                for p in s.get("ports") or ()]
    (address, port), = wait_for("the EndpointSlice", endpoints, 60)
    import urllib.request
    with urllib.request.urlopen(f"http://{address}:{port}/", timeout=5) as reply:
        assert reply.read() == b"web"


def test_deletion_runs_pre_stop_then_kills_after_the_grace(
        cluster: ControlPlane, agent: NodeAgent, tmp_path: Path) -> None:
    name = agent.add_node(NodePool("cpu2", KARPENTER, gpus=0, capacity="on-demand"))
    marker = tmp_path / "pre-stop-ran"
    cluster.request("POST", f"/api/v1/namespaces/{NS}/pods", server_pod(
        "stubborn", {"kubernetes.io/hostname": name}, env={"IGNORE_TERM": "1"}, grace=3,
        pre_stop=["python", "-c", f"open({str(marker)!r}, 'w').write('x')"]))
    wait_for("the pod Ready", lambda: ready(cluster, "stubborn"), 60)
    started = time.monotonic()
    cluster.request("DELETE", f"/api/v1/namespaces/{NS}/pods/stubborn")
    wait_for("the pod gone", lambda: pod(cluster, "stubborn") is None, 30)
    took = time.monotonic() - started
    assert marker.exists(), f"preStop did not run (deletion took {took:.1f} s)"
    assert took >= 2.5, f"a process ignoring SIGTERM was killed after {took:.1f} s, not 3 s"


def test_a_crashing_container_is_restarted(cluster: ControlPlane, agent: NodeAgent) -> None:
    name = agent.add_node(NodePool("cpu3", KARPENTER, gpus=0, capacity="on-demand"))
    cluster.request("POST", f"/api/v1/namespaces/{NS}/pods", server_pod(
        "crash", {"kubernetes.io/hostname": name}, script="import sys; sys.exit(3)"))

    def restarted() -> bool:
        statuses = ((pod(cluster, "crash") or {}).get("status") or {}).get(
            "containerStatuses") or [{}]
        return int(statuses[0].get("restartCount", 0)) >= 2
    wait_for("two restarts", restarted, 30)


def _pdb(name: str) -> dict[str, Any]:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": name}}}}


def test_karpenter_interruption_taints_evicts_through_budgets_and_ends_the_node(
        cluster: ControlPlane, agent: NodeAgent) -> None:
    name = agent.add_node(NodePool("spot-k", KARPENTER))
    cluster.request("POST", f"/api/v1/namespaces/{NS}/pods", server_pod(
        "guarded", {"kubernetes.io/hostname": name}, gpus=1))
    cluster.request("POST", f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets",
                    _pdb("guarded"))
    wait_for("the pod Ready", lambda: ready(cluster, "guarded"), 60)
    agent.interrupt(name, "karpenter", grace=6)
    tainted = wait_for("the disrupted taint", lambda: any(
        t["key"] == "karpenter.sh/disrupted" for t in
        ((node(cluster, name) or {}).get("spec") or {}).get("taints") or ()), 10)
    assert tainted
    time.sleep(3)  # the budget holds the only pod: evictions are refused, the pod runs
    assert ready(cluster, "guarded") is not None
    wait_for("the node gone", lambda: node(cluster, name) is None, 15)
    wait_for("its pod gone", lambda: pod(cluster, "guarded") is None, 15)


@pytest.mark.parametrize("how", ["nth", "nth-taint"])
def test_termination_handler_cordons_and_drains(cluster: ControlPlane, agent: NodeAgent,
                                                how: str) -> None:
    name = agent.add_node(NodePool(f"mng-{how}", EKS))
    pod_name = f"drained-{how}"
    cluster.request("POST", f"/api/v1/namespaces/{NS}/pods", server_pod(
        pod_name, {"kubernetes.io/hostname": name}, gpus=1, grace=1))
    wait_for("the pod Ready", lambda: ready(cluster, pod_name), 60)
    agent.interrupt(name, how, grace=8)
    body = wait_for("the cordon", lambda: (node(cluster, name) or {}).get(
        "spec", {}).get("unschedulable") and node(cluster, name), 10)
    keys = {t["key"] for t in body["spec"].get("taints") or ()}
    assert ("aws-node-termination-handler/spot-itn" in keys) == (how == "nth-taint")
    info = describe_node(body, now=time.time())
    assert info.notices and info.notices[0].kind == ("termination" if how == "nth-taint"
                                                     else "cordon")
    wait_for("the evicted pod gone", lambda: pod(cluster, pod_name) is None, 15)
    wait_for("the node gone", lambda: node(cluster, name) is None, 15)


def test_gke_preemption_is_a_graceful_node_shutdown(cluster: ControlPlane,
                                                    agent: NodeAgent) -> None:
    name = agent.add_node(NodePool("gke-spot", GKE, instance_type="g2-standard-8",
                                   gpu_product="NVIDIA-L4", zone="us-central1-a"))
    cluster.request("POST", f"/api/v1/namespaces/{NS}/pods", server_pod(
        "shut", {"kubernetes.io/hostname": name}, gpus=1, grace=60))
    wait_for("the pod Ready", lambda: ready(cluster, "shut"), 60)
    agent.interrupt(name, "gke", grace=8)

    def marked() -> dict[str, Any] | None:
        body = pod(cluster, "shut")
        return body if any(c["type"] == "DisruptionTarget" for c in
                           (body or {}).get("status", {}).get("conditions") or ()) else None
    body = wait_for("the DisruptionTarget condition", marked, 10)
    assert body is not None
    failed = wait_for("the pod Failed by the shutdown", lambda: (pod(cluster, "shut") or {})
                      .get("status", {}).get("phase") == "Failed" and pod(cluster, "shut"), 10)
    assert "node shutdown" in failed["status"]["message"]
    wait_for("the node gone", lambda: node(cluster, name) is None, 15)


def test_pending_gpu_pods_get_a_node_and_empty_nodes_are_consolidated(
        cluster: ControlPlane, agent: NodeAgent) -> None:
    agent.add_pool(NodePool("auto", KARPENTER, instance_type="g5.2xlarge",
                            labels={"pool": "auto"}, provision_after=1.0,
                            consolidate_after=2.0))
    cluster.request("POST", f"/api/v1/namespaces/{NS}/pods", server_pod(
        "wants-gpu", {"pool": "auto"}, gpus=1, grace=1))
    body = wait_for("the pod scheduled on a new node", lambda: ready(cluster, "wants-gpu"),
                    60)
    new_node = body["spec"]["nodeName"]
    assert new_node.startswith("auto-")
    cluster.request("DELETE", f"/api/v1/namespaces/{NS}/pods/wants-gpu")
    wait_for("the empty node consolidated", lambda: node(cluster, new_node) is None, 30)
