"""What a Kubernetes Node means to spotserve: capacity type, GPUs, zone, and notices.

Pure functions over the Node (and its Events, and the DisruptionTarget condition of its
pods) as plain dicts, the way kopf hands them over. Every managed Kubernetes flavour
labels and taints nodes differently; this is the one place that knows all of them:

- capacity type: Karpenter, EKS managed node groups, GKE spot / preemptible, AKS spot
  scale sets, and the older `node.kubernetes.io/lifecycle`;
- GPU type and count: NVIDIA GPU feature discovery, Karpenter's AWS labels, GKE's
  accelerator label, `status.capacity`, or the instance type through the catalog; and the
  GPUs a service may use there: `status.allocatable` less what other pods request (a node
  shared with other GPU pods), or what the service's own pod there holds;
- notices: termination-handler, Karpenter, GKE, AKS and cluster-autoscaler taints, the
  out-of-service taint, cordons (imminent on spot nodes: aws-node-termination-handler's
  default), deletion, Node Events, and pods marked DisruptionTarget.

A notice's deadline is its first sighting plus the grace period of its cloud (AWS 120 s,
GCP and Azure 30 s, overridable per source); out-of-service nodes are already gone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from spotserve.catalog import Catalog

DEFAULT_GRACE_SECONDS: Mapping[str, float] = {"aws": 120.0, "gcp": 30.0, "azure": 30.0,
                                              "other": 30.0}
SPOT, ON_DEMAND, UNKNOWN = "spot", "on-demand", "unknown"

# taint key -> (notice kind, cloud it implies or None, imminent)
NOTICE_TAINTS: Mapping[str, tuple[str, str | None, bool]] = {
    "aws-node-termination-handler/spot-itn": ("termination", "aws", True),
    "aws-node-termination-handler/rebalance-recommendation": ("rebalance", "aws", False),
    "aws-node-termination-handler/scheduled-maintenance": ("maintenance", "aws", True),
    "aws-node-termination-handler/asg-lifecycle-termination": ("scale-down", "aws", True),
    "karpenter.sh/disrupted": ("disruption", None, True),
    "karpenter.sh/disruption": ("disruption", None, True),  # Karpenter < 1.0
    "cloud.google.com/impending-node-termination": ("termination", "gcp", True),
    "remediator.kubernetes.azure.com/unschedulable": ("maintenance", "azure", True),
    "ToBeDeletedByClusterAutoscaler": ("scale-down", None, True),
    "node.kubernetes.io/out-of-service": ("out-of-service", None, True),
}
# Node Event reason -> (notice kind, imminent)
NOTICE_EVENTS: Mapping[str, tuple[str, bool]] = {
    "SpotInterrupted": ("termination", True),
    "SpotInterruption": ("termination", True),
    "Preempt": ("termination", True),
    "PreemptScheduled": ("termination", True),
    "RebalanceRecommendation": ("rebalance", False),
    "SpotRebalanceRecommendation": ("rebalance", False),
}

_CAPACITY_LABELS: tuple[tuple[str, Mapping[str, str]], ...] = (
    ("karpenter.sh/capacity-type", {"spot": SPOT, "on-demand": ON_DEMAND,
                                    "reserved": ON_DEMAND}),
    ("eks.amazonaws.com/capacityType", {"SPOT": SPOT, "ON_DEMAND": ON_DEMAND,
                                        "CAPACITY_BLOCK": ON_DEMAND}),
    ("cloud.google.com/gke-spot", {"true": SPOT}),
    ("cloud.google.com/gke-preemptible", {"true": SPOT}),
    ("kubernetes.azure.com/scalesetpriority", {"spot": SPOT, "regular": ON_DEMAND}),
    ("node.kubernetes.io/lifecycle", {"spot": SPOT, "normal": ON_DEMAND,
                                      "on-demand": ON_DEMAND}),
)

# substrings of vendor GPU names, most specific first -> catalog GPU name
_GPU_NAMES: tuple[tuple[str, str], ...] = (
    ("h200", "H200"), ("h100", "H100"), ("a100-80", "A100-80GB"), ("a100-sxm4-80", "A100-80GB"),
    ("a100", "A100-40GB"), ("l40s", "L40S"), ("a10g", "A10G"), ("l4", "L4"), ("t4", "T4"),
)


@dataclass(frozen=True)
class Notice:
    """A node is going away (or may: `imminent` is False for rebalance recommendations)."""

    source: str          # e.g. "taint:aws-node-termination-handler/spot-itn", "event:Preempt"
    kind: str            # termination | rebalance | maintenance | scale-down | disruption |
    #                      out-of-service | cordon | deleting | pod-disruption
    cloud: str           # aws | gcp | azure | other
    first_seen: float    # Unix seconds
    deadline: float      # Unix seconds when the node may be gone
    imminent: bool = True


@dataclass(frozen=True)
class NodeInfo:
    name: str
    capacity_type: str
    gpu_type: str | None
    gpu_count: int
    instance_type: str | None
    zone: str | None
    cloud: str
    ready: bool
    notices: tuple[Notice, ...] = field(default=())
    usable_gpus: int | None = None  # GPUs the service may use here (None: gpu_count)

    @property
    def notice(self) -> Notice | None:
        """The notice that decides: the earliest imminent deadline, else any advisory one."""
        imminent = [n for n in self.notices if n.imminent]
        pool = imminent or list(self.notices)
        return min(pool, key=lambda n: n.deadline) if pool else None

    @property
    def doomed(self) -> bool:
        return any(n.imminent for n in self.notices)


# ---- helpers ---------------------------------------------------------------------------
def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _labels(node: Mapping[str, Any]) -> Mapping[str, str]:
    labels = _meta(node).get("labels")
    return labels if isinstance(labels, Mapping) else {}


def parse_time(value: Any) -> float | None:
    """RFC 3339 timestamp (as Kubernetes writes them) → Unix seconds; None if absent/bad."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def capacity_type(node: Mapping[str, Any]) -> str:
    labels = _labels(node)
    for key, values in _CAPACITY_LABELS:
        value = values.get(str(labels.get(key, "")))
        if value is not None:
            return value
    if "cloud.google.com/gke-nodepool" in labels:
        return ON_DEMAND  # GKE labels only spot and preemptible nodes
    return UNKNOWN


def cloud_of(node: Mapping[str, Any]) -> str:
    spec = node.get("spec") if isinstance(node.get("spec"), Mapping) else {}
    provider = str((spec or {}).get("providerID", ""))
    for prefix, cloud in (("aws://", "aws"), ("gce://", "gcp"), ("azure://", "azure")):
        if provider.startswith(prefix):
            return cloud
    labels = _labels(node)
    if any(k.startswith(("eks.amazonaws.com/", "karpenter.k8s.aws/")) for k in labels):
        return "aws"
    if any(k.startswith("cloud.google.com/") for k in labels):
        return "gcp"
    if any(k.startswith("kubernetes.azure.com/") for k in labels):
        return "azure"
    return "other"


def canonical_gpu(name: str) -> str | None:
    """A vendor GPU label value (e.g. 'NVIDIA-A100-SXM4-80GB', 'nvidia-tesla-t4') → catalog
    name ('A100-80GB', 'T4'); None if not recognised."""
    lowered = name.lower()
    return next((gpu for key, gpu in _GPU_NAMES if key in lowered), None)


def _int_value(value: Any) -> int:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return 0


def gpus(node: Mapping[str, Any], catalog: Catalog | None = None) -> tuple[str | None, int]:
    labels = _labels(node)
    instance = labels.get("node.kubernetes.io/instance-type")
    by_instance = catalog.instances.get(instance) if catalog and instance else None
    gpu_type = None
    for key in ("nvidia.com/gpu.product", "karpenter.k8s.aws/instance-gpu-name",
                "cloud.google.com/gke-accelerator"):
        if key in labels and (gpu_type := canonical_gpu(str(labels[key]))):
            break
    if gpu_type is None and by_instance is not None:
        gpu_type = by_instance.gpu.name
    status = node.get("status") if isinstance(node.get("status"), Mapping) else {}
    capacity = (status or {}).get("capacity") or {}
    count = (_int_value(capacity.get("nvidia.com/gpu")) or
             _int_value(labels.get("nvidia.com/gpu.count")) or
             _int_value(labels.get("karpenter.k8s.aws/instance-gpu-count")) or
             (by_instance.gpus if by_instance else 0))
    return gpu_type, count


def pod_gpus(pod: Mapping[str, Any]) -> int:
    """The GPUs a pod holds on its node: its containers' `nvidia.com/gpu` requests (limits
    when no request), or its largest init container's, whichever is more; 0 once the pod
    has ended (Succeeded or Failed pods hold nothing)."""
    spec = pod.get("spec") if isinstance(pod.get("spec"), Mapping) else {}
    status = pod.get("status") if isinstance(pod.get("status"), Mapping) else {}
    if (status or {}).get("phase") in ("Succeeded", "Failed"):
        return 0

    def one(container: Any) -> int:
        resources = (container or {}).get("resources") or {}
        value = (resources.get("requests") or {}).get("nvidia.com/gpu",
                                                       (resources.get("limits") or {})
                                                       .get("nvidia.com/gpu"))
        return _int_value(value)

    regular = sum(one(c) for c in (spec or {}).get("containers") or ())
    init = max((one(c) for c in (spec or {}).get("initContainers") or ()), default=0)
    return max(regular, init)


def gpu_holder(pod: Mapping[str, Any]) -> dict[str, Any]:
    """What `usable_gpus` needs of a pod (an index keeps this, not the whole pod)."""
    meta = _meta(pod)
    return {"metadata": {"name": meta.get("name"), "namespace": meta.get("namespace"),
                         "labels": dict(meta.get("labels") or {})},
            "spec": {"containers": [
                {"resources": {"requests": {"nvidia.com/gpu": pod_gpus(pod)}}}]},
            "status": {"phase": ((pod.get("status") or {}).get("phase"))}}


def usable_gpus(node: Mapping[str, Any], pods: Iterable[Mapping[str, Any]],
                is_ours: Callable[[Mapping[str, Any]], bool],
                catalog: Catalog | None = None) -> int:
    """The GPUs a service may use on `node`: what its own pod there holds, when it has one
    (a pod's GPUs cannot change while it runs); else the node's allocatable GPUs less
    every other pod's."""
    ours = [pod_gpus(p) for p in pods if is_ours(p) and pod_gpus(p)]
    if ours:
        return max(ours)
    status = node.get("status") if isinstance(node.get("status"), Mapping) else {}
    allocatable = _int_value(((status or {}).get("allocatable") or {}).get("nvidia.com/gpu"))
    total = allocatable or gpus(node, catalog)[1]
    return max(0, total - sum(pod_gpus(p) for p in pods if not is_ours(p)))


def is_ready(node: Mapping[str, Any]) -> bool:
    status = node.get("status") if isinstance(node.get("status"), Mapping) else {}
    for cond in (status or {}).get("conditions") or ():
        if isinstance(cond, Mapping) and cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


# ---- notices ---------------------------------------------------------------------------
def _notice(source: str, kind: str, cloud: str, seen: float, grace: Mapping[str, float],
            imminent: bool = True) -> Notice:
    wait = 0.0 if kind == "out-of-service" else grace.get(cloud, grace.get("other", 30.0))
    return Notice(source, kind, cloud, seen, seen + wait, imminent)


def node_notices(node: Mapping[str, Any], *, now: float,
                 first_seen: Mapping[str, float] | None = None,
                 events: Iterable[Mapping[str, Any]] = (),
                 disrupted_pods: Iterable[Mapping[str, Any]] = (),
                 grace: Mapping[str, float] = DEFAULT_GRACE_SECONDS) -> tuple[Notice, ...]:
    """Every notice on this node. `first_seen` (source → Unix seconds) remembers when the
    caller first saw each source, so replays of the same object keep the same deadline."""
    seen = dict(first_seen or {})
    cloud = cloud_of(node)
    out: list[Notice] = []

    def when(source: str, stamp: Any = None) -> float:
        return seen.get(source) or parse_time(stamp) or now

    spec = node.get("spec") if isinstance(node.get("spec"), Mapping) else {}
    for taint in (spec or {}).get("taints") or ():
        key = str(taint.get("key")) if isinstance(taint, Mapping) else ""
        if key in NOTICE_TAINTS:
            kind, implied, imminent = NOTICE_TAINTS[key]
            source = f"taint:{key}"
            out.append(_notice(source, kind, implied or cloud, when(source, taint.get("timeAdded")),
                               grace, imminent))
    if (spec or {}).get("unschedulable") and not out:
        # on a spot node, a cordon is all aws-node-termination-handler shows of an
        # interruption with its defaults (no taint, no events): take it as one
        out.append(_notice("cordon", "cordon", cloud, when("cordon"), grace,
                           imminent=capacity_type(node) == SPOT))
    deleting = _meta(node).get("deletionTimestamp")
    if deleting:
        out.append(_notice("deleting", "deleting", cloud, when("deleting", deleting), grace))
    for event in events:
        reason = str(event.get("reason"))
        if reason in NOTICE_EVENTS:
            kind, imminent = NOTICE_EVENTS[reason]
            source = f"event:{reason}"
            stamp = event.get("eventTime") or event.get("firstTimestamp") or \
                _meta(event).get("creationTimestamp")
            out.append(_notice(source, kind, cloud, when(source, stamp), grace, imminent))
    for pod in disrupted_pods:
        cond = disruption_condition(pod)
        if cond is not None:
            source = f"pod:{cond.get('reason') or 'DisruptionTarget'}"
            out.append(_notice(source, "pod-disruption", cloud,
                               when(source, cond.get("lastTransitionTime")), grace))
    return _dedupe(out)


def _dedupe(notices: list[Notice]) -> tuple[Notice, ...]:
    by_source: dict[str, Notice] = {}
    for n in notices:
        old = by_source.get(n.source)
        by_source[n.source] = n if old is None or n.first_seen < old.first_seen else old
    return tuple(sorted(by_source.values(), key=lambda n: (n.deadline, n.source)))


# DisruptionTarget reasons that say nothing of the node: the scheduler preempting a pod
# (a worker taking its capacity request's GPUs), a pod's own failure policy
POD_LEVEL_DISRUPTIONS = frozenset({"PreemptionByScheduler", "PreemptionByKubeScheduler",
                                   "TerminationByPodFailurePolicy"})


def disruption_condition(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The pod's DisruptionTarget condition when it tells of its node going (an eviction,
    a node shutdown, a taint manager deletion); None otherwise."""
    status = pod.get("status") if isinstance(pod.get("status"), Mapping) else {}
    for cond in (status or {}).get("conditions") or ():
        if isinstance(cond, Mapping) and cond.get("type") == "DisruptionTarget" and \
                cond.get("status") == "True" and \
                cond.get("reason") not in POD_LEVEL_DISRUPTIONS:
            return cond
    return None


def describe_node(node: Mapping[str, Any], *, now: float, catalog: Catalog | None = None,
                  first_seen: Mapping[str, float] | None = None,
                  events: Iterable[Mapping[str, Any]] = (),
                  disrupted_pods: Iterable[Mapping[str, Any]] = (),
                  grace: Mapping[str, float] = DEFAULT_GRACE_SECONDS,
                  usable: int | None = None) -> NodeInfo:
    labels = _labels(node)
    gpu_type, count = gpus(node, catalog)
    zone = labels.get("topology.kubernetes.io/zone") or \
        labels.get("failure-domain.beta.kubernetes.io/zone")
    return NodeInfo(
        name=str(_meta(node).get("name", "")), capacity_type=capacity_type(node),
        gpu_type=gpu_type, gpu_count=count,
        instance_type=labels.get("node.kubernetes.io/instance-type"), zone=zone,
        cloud=cloud_of(node), ready=is_ready(node),
        notices=node_notices(node, now=now, first_seen=first_seen, events=events,
                             disrupted_pods=disrupted_pods, grace=grace),
        usable_gpus=usable)


def pool_cloud(node_selector: Mapping[str, str]) -> str:
    """The cloud a pool's nodes are in, judged from its nodeSelector's labels."""
    return cloud_of({"metadata": {"labels": dict(node_selector)}})


def pod_grace_seconds(grace: Mapping[str, float], node_selector: Mapping[str, str]) -> float:
    """How long a worker pod of this pool may take to stop: its cloud's grace period. A
    node shutdown (GKE: about 25 s for pods) or an eviction (Karpenter: at once) cuts it
    short; the worker then drains within what it was given."""
    cloud = pool_cloud(node_selector)
    if cloud == "other":  # a selector that names no cloud: the longest any gives
        return float(max(grace.values(), default=DEFAULT_GRACE_SECONDS["other"]))
    return float(grace.get(cloud, grace.get("other", DEFAULT_GRACE_SECONDS["other"])))


def grace_periods(overrides: Mapping[str, Any] | None) -> dict[str, float]:
    """Default grace periods with an LLMService's `gracePeriodSeconds` overrides applied."""
    merged = dict(DEFAULT_GRACE_SECONDS)
    for cloud, value in (overrides or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
            merged[cloud] = float(value)
    return merged


def remember(first_seen: Mapping[str, float], notices: Iterable[Notice]) -> dict[str, float]:
    """`first_seen` updated with these notices' sightings (earliest wins)."""
    out = dict(first_seen)
    for n in notices:
        out[n.source] = min(out.get(n.source, n.first_seen), n.first_seen)
    return out
