"""Node normalisation across EKS (Karpenter, managed node groups), GKE and AKS, and every
notice source the operator reacts to."""

from __future__ import annotations

from typing import Any

import pytest

from spotserve.catalog import Catalog
from spotserve.operator.k8s.nodes import (
    NOTICE_TAINTS,
    describe_node,
    gpu_holder,
    grace_periods,
    node_notices,
    pod_gpus,
    remember,
    usable_gpus,
)

NOW = 1_800_000_000.0


def node(labels: dict[str, str], *, taints: list[dict[str, Any]] | None = None,
         provider: str = "", unschedulable: bool = False, deleting: str | None = None,
         gpus: int | None = None, ready: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "n1", "labels": labels}
    if deleting:
        meta["deletionTimestamp"] = deleting
    status: dict[str, Any] = {"conditions": [{"type": "Ready",
                                              "status": "True" if ready else "False"}]}
    if gpus is not None:
        status["capacity"] = {"nvidia.com/gpu": str(gpus)}
    return {"metadata": meta, "status": status,
            "spec": {"providerID": provider, "taints": taints or [],
                     "unschedulable": unschedulable}}


KARPENTER = {"karpenter.sh/capacity-type": "spot", "karpenter.k8s.aws/instance-gpu-name": "a10g",
             "karpenter.k8s.aws/instance-gpu-count": "4",
             "node.kubernetes.io/instance-type": "g5.12xlarge",
             "topology.kubernetes.io/zone": "us-east-1a"}
EKS_MNG = {"eks.amazonaws.com/capacityType": "ON_DEMAND",
           "node.kubernetes.io/instance-type": "g4dn.12xlarge"}
GKE_SPOT = {"cloud.google.com/gke-spot": "true", "cloud.google.com/gke-nodepool": "gpu",
            "cloud.google.com/gke-accelerator": "nvidia-l4",
            "topology.kubernetes.io/zone": "us-central1-a"}
GKE_PREEMPTIBLE = {"cloud.google.com/gke-preemptible": "true",
                   "cloud.google.com/gke-nodepool": "p",
                   "cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}
GKE_ON_DEMAND = {"cloud.google.com/gke-nodepool": "gpu",
                 "cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
AKS_SPOT = {"kubernetes.azure.com/scalesetpriority": "spot",
            "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB", "nvidia.com/gpu.count": "8"}


@pytest.mark.parametrize(("labels", "provider", "device_gpus", "capacity", "gpu", "count",
                          "cloud"), [
    (KARPENTER, "aws:///us-east-1a/i-1", None, "spot", "A10G", 4, "aws"),
    (EKS_MNG, "aws:///us-east-1a/i-2", None, "on-demand", "T4", 4, "aws"),
    (GKE_SPOT, "gce://proj/us-central1-a/n", 1, "spot", "L4", 1, "gcp"),
    (GKE_PREEMPTIBLE, "", 1, "spot", "T4", 1, "gcp"),
    (GKE_ON_DEMAND, "", 8, "on-demand", "H100", 8, "gcp"),
    (AKS_SPOT, "azure:///subscriptions/x", None, "spot", "A100-80GB", 8, "azure"),
    ({"node.kubernetes.io/lifecycle": "spot", "nvidia.com/gpu.product": "Tesla-T4"}, "", 1,
     "spot", "T4", 1, "other"),
    ({}, "", None, "unknown", None, 0, "other"),
])
def test_capacity_gpu_and_cloud(labels: dict[str, str], provider: str, device_gpus: int | None,
                                capacity: str, gpu: str | None, count: int, cloud: str) -> None:
    info = describe_node(node(labels, provider=provider, gpus=device_gpus), now=NOW,
                         catalog=Catalog.load())
    assert (info.capacity_type, info.gpu_type, info.gpu_count, info.cloud) == \
        (capacity, gpu, count, cloud)
    assert info.ready and not info.doomed


def test_zone_and_instance_type() -> None:
    info = describe_node(node(KARPENTER), now=NOW)
    assert (info.zone, info.instance_type) == ("us-east-1a", "g5.12xlarge")


@pytest.mark.parametrize("key", sorted(NOTICE_TAINTS))
def test_every_notice_taint_is_detected(key: str) -> None:
    info = describe_node(node(KARPENTER, provider="aws:///x/i",
                              taints=[{"key": key, "effect": "NoSchedule"}]), now=NOW)
    notice = info.notice
    assert notice is not None and notice.source == f"taint:{key}"
    kind, _, imminent = NOTICE_TAINTS[key]
    assert notice.kind == kind and info.doomed == imminent
    if kind == "out-of-service":
        assert notice.deadline == NOW
    elif key.startswith("cloud.google.com") or key.startswith("remediator.kubernetes.azure.com"):
        assert notice.deadline == NOW + 30
    else:
        assert notice.deadline == NOW + 120  # an AWS node


def test_grace_depends_on_the_cloud_and_can_be_overridden() -> None:
    taint = [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]
    gke = node(GKE_SPOT, provider="gce://p/z/n", taints=taint)
    assert describe_node(gke, now=NOW).notice.deadline == NOW + 30  # type: ignore[union-attr]
    grace = grace_periods({"gcp": 25, "aws": -1})
    assert grace["gcp"] == 25 and grace["aws"] == 120
    assert describe_node(gke, now=NOW, grace=grace).notice.deadline == NOW + 25  # type: ignore


def test_deadline_counts_from_the_first_sighting_on_replays() -> None:
    taints = [{"key": "aws-node-termination-handler/spot-itn", "effect": "NoSchedule"}]
    first = node_notices(node(KARPENTER, provider="aws:///x", taints=taints), now=NOW)
    seen = remember({}, first)
    replay = node_notices(node(KARPENTER, provider="aws:///x", taints=taints), now=NOW + 50,
                          first_seen=seen)
    assert replay[0].deadline == first[0].deadline == NOW + 120


def test_taint_time_added_is_used_when_present() -> None:
    taints = [{"key": "cloud.google.com/impending-node-termination", "effect": "NoExecute",
               "timeAdded": "2027-01-15T07:59:00Z"}]  # NOW - 60 s
    notice = node_notices(node(GKE_SPOT, taints=taints), now=NOW)[0]
    assert (notice.first_seen, notice.deadline) == (NOW - 60, NOW - 30)


@pytest.mark.parametrize(("reason", "kind", "imminent"), [
    ("SpotInterrupted", "termination", True), ("SpotInterruption", "termination", True),
    ("Preempt", "termination", True), ("RebalanceRecommendation", "rebalance", False),
    ("SpotRebalanceRecommendation", "rebalance", False),
])
def test_node_events_are_notices(reason: str, kind: str, imminent: bool) -> None:
    events = [{"reason": reason, "firstTimestamp": None, "metadata": {}},
              {"reason": "Scheduled"}]
    notices = node_notices(node(KARPENTER, provider="aws:///x"), now=NOW, events=events)
    assert [(n.kind, n.imminent, n.deadline) for n in notices] == [(kind, imminent, NOW + 120)]


def test_disruption_target_pods_doom_their_node() -> None:
    pod = {"status": {"conditions": [{"type": "DisruptionTarget", "status": "True",
                                      "reason": "TerminationByKubelet"}]}}
    healthy = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    info = describe_node(node(GKE_SPOT), now=NOW, disrupted_pods=[pod, healthy])
    assert info.doomed and info.notice.source == "pod:TerminationByKubelet"  # type: ignore
    # a capacity request preempted by the worker made for its node: the node stays
    preempted = {"status": {"conditions": [{"type": "DisruptionTarget", "status": "True",
                                            "reason": "PreemptionByScheduler"}]}}
    assert not describe_node(node(GKE_SPOT), now=NOW, disrupted_pods=[preempted]).notices


def test_cordon_and_deletion() -> None:
    cordoned = describe_node(node(EKS_MNG, unschedulable=True), now=NOW)
    assert cordoned.notice is not None and not cordoned.doomed  # advisory on on-demand
    # aws-node-termination-handler's defaults (no taint, no events): only a cordon shows
    spot = describe_node(node({**EKS_MNG, "eks.amazonaws.com/capacityType": "SPOT"},
                              unschedulable=True), now=NOW)
    assert spot.doomed and spot.notice.kind == "cordon"  # type: ignore[union-attr]
    deleting = describe_node(node(EKS_MNG, deleting="2027-01-15T08:00:00Z"), now=NOW)
    assert deleting.doomed and deleting.notice.kind == "deleting"  # type: ignore[union-attr]


def test_earliest_imminent_notice_decides() -> None:
    taints = [{"key": "aws-node-termination-handler/rebalance-recommendation"},
              {"key": "node.kubernetes.io/out-of-service", "effect": "NoExecute"}]
    info = describe_node(node(KARPENTER, provider="aws:///x", taints=taints), now=NOW)
    assert info.notice.kind == "out-of-service" and info.notice.deadline == NOW  # type: ignore


def test_malformed_objects_do_not_crash() -> None:
    for bad in ({}, {"metadata": None, "spec": None, "status": None},
                {"metadata": {"labels": None}, "spec": {"taints": None}}):
        info = describe_node(bad, now=NOW)
        assert info.capacity_type == "unknown" and info.notices == ()


def gpu_pod(gpus: int, service: str = "", phase: str = "Running", init: int = 0
            ) -> dict[str, Any]:
    labels = {"spotserve.dev/service": service} if service else {}
    resources = {"requests": {"nvidia.com/gpu": str(gpus)}} if gpus else {}
    spec: dict[str, Any] = {"nodeName": "n1", "containers": [{"resources": resources},
                                                             {"resources": {}}]}
    if init:
        spec["initContainers"] = [{"resources": {"limits": {"nvidia.com/gpu": init}}}]
    return {"metadata": {"name": "p", "namespace": "ml", "labels": labels}, "spec": spec,
            "status": {"phase": phase}}


def test_a_node_shared_with_other_gpu_pods_offers_only_what_they_leave() -> None:
    """Finding 6: GPUs free for the service are allocatable less other pods' requests
    (ended pods hold none), or what its own pod there already holds."""
    shared = node(KARPENTER, gpus=4)
    shared["status"]["allocatable"] = {"nvidia.com/gpu": "4"}

    def ours(pod: dict[str, Any]) -> bool:
        return pod["metadata"]["labels"].get("spotserve.dev/service") == "llama"

    assert usable_gpus(shared, [], ours) == 4
    others = [gpu_pod(1), gpu_pod(2, phase="Succeeded"), gpu_pod(0, init=1)]
    assert [pod_gpus(p) for p in others] == [1, 0, 1]
    assert usable_gpus(shared, others, ours) == 2
    # once the service's pod holds its GPUs there, it keeps counting those
    assert usable_gpus(shared, [*others, gpu_pod(2, "llama")], ours) == 2
    assert usable_gpus(shared, [gpu_pod(4), gpu_pod(1)], ours) == 0
    # no allocatable reported yet: the node's GPU count from its labels
    assert usable_gpus(node(KARPENTER), [gpu_pod(1)], ours) == 3
    assert pod_gpus(gpu_holder(gpu_pod(3, "llama"))) == 3
    assert ours(gpu_holder(gpu_pod(3, "llama")))


def test_an_instance_offering_fewer_gpus_is_planned_with_those() -> None:
    from spotserve.operator.controller.events import InstanceReady
    from spotserve.operator.controller.view import ClusterView

    catalog = Catalog.load()
    view = ClusterView().apply(InstanceReady("n1", "g5.12xlarge", "spot", "", gpus=3), NOW)
    view = view.apply(InstanceReady("n2", "g5.12xlarge", "spot"), NOW)
    n1, n2 = view.planner_instances(catalog)
    assert (len(n1.gpus), len(n2.gpus)) == (3, 4)
    assert ClusterView.from_dict(view.to_dict()) == view
