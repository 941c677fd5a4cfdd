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
