"""The real control plane does what kmock cannot: the scheduler places pods by
`nvidia.com/gpu` requests on nodes that have them free (and leaves the rest Pending,
saying why), and the controller-manager's garbage collector deletes what an owner
leaves behind."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from .plane import ControlPlane

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]


def _until(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    pytest.fail(f"{what}: not within {timeout:.0f} s")


def _gpu_node(plane: ControlPlane, name: str, gpus: int) -> None:
    """A Ready node with `gpus` GPUs, as a kubelet with the NVIDIA device plugin reports."""
    status, body = plane.request("POST", "/api/v1/nodes", {"metadata": {
        "name": name, "labels": {"kubernetes.io/hostname": name,
                                 "karpenter.sh/capacity-type": "spot"}}})
    assert status == 201, body
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    resources = {"cpu": "48", "memory": "192Gi", "pods": "110", "nvidia.com/gpu": str(gpus)}
    status, body = plane.request("PATCH", f"/api/v1/nodes/{name}/status", {"status": {
        "capacity": resources, "allocatable": resources,
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "lastHeartbeatTime": now, "lastTransitionTime": now}]}},
        content_type="application/merge-patch+json")
    assert status == 200, body


def _pod(plane: ControlPlane, name: str, gpus: int) -> None:
    status, body = plane.request("POST", "/api/v1/namespaces/default/pods", {
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "worker", "image": "spotserve/worker",
                                 "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}]}})
    assert status == 201, body


def test_the_scheduler_places_pods_by_free_gpus(cluster: ControlPlane) -> None:
    _gpu_node(cluster, "gpu-a", 4)
    _pod(cluster, "fits", 3)
    _pod(cluster, "too-big", 2)   # 1 GPU left on gpu-a once `fits` is bound

    def node_of(pod: str) -> str:
        return cluster.request("GET", f"/api/v1/namespaces/default/pods/{pod}")[1][
            "spec"].get("nodeName", "")

    assert _until("the pod that fits is bound", lambda: node_of("fits")) == "gpu-a"

    def unschedulable() -> str:
        pod = cluster.request("GET", "/api/v1/namespaces/default/pods/too-big")[1]
        return next((c.get("message", "") for c in pod["status"].get("conditions") or ()
                     if c["type"] == "PodScheduled" and c["status"] == "False"), "")

    assert "nvidia.com/gpu" in _until("the scheduler says why", unschedulable)
    assert not node_of("too-big")
    _gpu_node(cluster, "gpu-b", 4)  # new capacity: the pending pod lands there
    assert _until("the pending pod is bound to the new node", lambda: node_of("too-big")) \
        == "gpu-b"


def test_the_garbage_collector_deletes_what_an_owner_leaves(cluster: ControlPlane) -> None:
    path = "/api/v1/namespaces/default/configmaps"
    status, owner = cluster.request("POST", path, {"metadata": {"name": "owner"}})
    assert status == 201, owner
    status, body = cluster.request("POST", path, {"metadata": {
        "name": "owned", "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap",
                                              "name": "owner",
                                              "uid": owner["metadata"]["uid"]}]}})
    assert status == 201, body
    status, body = cluster.request("DELETE", f"{path}/owner")
    assert status == 200, body
    _until("the owned object is collected",
           lambda: cluster.request("GET", f"{path}/owned")[0] == 404)


def test_node_events_in_default_are_read_when_namespaces_are_watched(
        cluster: ControlPlane) -> None:
    """With operator.watchNamespaces set, kopf watches Events only there; the runner lists
    Node Events cluster-wide itself (finding 10), e.g. a SpotInterruption in `default`."""
    import asyncio

    from spotserve.operator.k8s.api import Connection, KubeApi
    from spotserve.operator.k8s.nodes import describe_node
    from spotserve.operator.k8s.runner import node_events_of

    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    code, _ = cluster.request("POST", "/api/v1/namespaces/default/events", {
        "apiVersion": "v1", "kind": "Event", "metadata": {"name": "spot-1.itn"},
        "involvedObject": {"kind": "Node", "name": "spot-1"}, "reason": "SpotInterruption",
        "message": "EC2 spot interruption notice", "type": "Warning",
        "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1})
    assert code == 201

    async def read() -> dict[str, list[dict[str, Any]]]:
        api = KubeApi(Connection(cluster.server, cluster.admin_token, insecure=True))
        try:
            return await node_events_of(api)
        finally:
            await api.close()
    events = asyncio.run(read())
    node = {"metadata": {"name": "spot-1", "labels": {
        "karpenter.sh/capacity-type": "spot", "karpenter.k8s.aws/instance-gpu-count": "1"}},
        "spec": {"providerID": "aws:///us-east-1a/i-1"}}
    info = describe_node(node, now=time.time(), events=events.get("spot-1", ()))
    assert info.doomed and info.notice is not None and info.notice.kind == "termination"


def test_a_delete_made_on_a_stale_read_leaves_a_changed_object_alone(
        cluster: ControlPlane) -> None:
    """The operator deletes a capacity request it read a moment ago only if nobody changed
    it since (the apiserver's resourceVersion precondition): one adopted as a node's
    worker pod in between stays."""
    import asyncio

    from spotserve.operator.k8s.api import Connection, KubeApi

    path = "/api/v1/namespaces/default/configmaps"
    code, body = cluster.request("POST", path, {"metadata": {"name": "request-1"}})
    assert code == 201, body
    stale = body["metadata"]["resourceVersion"]
    code, _ = cluster.request("PATCH", f"{path}/request-1",
                              {"metadata": {"labels": {"adopted": "yes"}}},
                              content_type="application/merge-patch+json")
    assert code == 200

    async def delete(version: str) -> bool:
        api = KubeApi(Connection(cluster.server, cluster.admin_token, insecure=True))
        try:
            return await api.delete(f"{path}/request-1", version)
        finally:
            await api.close()
    assert asyncio.run(delete(stale)) is False
    code, now = cluster.request("GET", f"{path}/request-1")
    assert code == 200 and now["metadata"]["labels"] == {"adopted": "yes"}
    assert asyncio.run(delete(now["metadata"]["resourceVersion"])) is True
    assert cluster.request("GET", f"{path}/request-1")[0] == 404
