"""The Kubernetes objects an LLMService owns, built as plain dicts (pure: no API calls).

- a worker pod per instance (node), holding all the GPUs it gets there, a worker process
  per GPU inside (`spotserve worker --gpus N`: GPU i on the worker port + i), so tensor
  parallelism inside an instance stays inside one pod (NCCL over NVLink/P2P); placed by the
  scheduler through its GPU requests, the pool's selector and tolerations and a node
  affinity; `karpenter.sh/do-not-disrupt` while the service migrates;
- "capacity requests": the same worker pods without a node, asking for a whole instance of
  a pool, so the cluster autoscaler or Karpenter starts one; the scheduler binds each to
  its new node (never one that already holds a pod of the service), where it starts
  fetching the model at once, and the operator adopts it as that node's worker pod;
- the router: a Deployment of N replicas spread over nodes and zones, its public Service
  (grpc and http), a headless Service of the replicas' Control ports (the operator finds
  every replica through its EndpointSlices, Ready or not), a PodDisruptionBudget and,
  with `router.autoscale`, a HorizontalPodAutoscaler;
- the namespace's copy of the shared-token Secret.

Every object carries the labels docs/kubernetes.md promises (the chart's NetworkPolicy and
ServiceMonitor select by them) and an owner reference to the LLMService.
"""

from __future__ import annotations

import base64
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .nodes import grace_periods, pod_grace_seconds

Manifest = dict[str, Any]

GROUP, VERSION, PLURAL, KIND = "spotserve.dev", "v1alpha1", "llmservices", "LLMService"
SERVICE_LABEL = "spotserve.dev/service"
EPOCH_LABEL, POOL_LABEL, NODE_LABEL = "spotserve.dev/epoch", "spotserve.dev/pool", \
    "spotserve.dev/node"
REQUESTED_AT = "spotserve.dev/requested-at"
INSTANCE = "spotserve.dev/instance"  # the node's name, exactly (labels hold DNS-safe forms)
DO_NOT_DISRUPT = "karpenter.sh/do-not-disrupt"
COMPONENT = "app.kubernetes.io/component"
TOKEN_KEY, TOKEN_DIR, MODEL_DIR = "token", "/var/run/spotserve", "/models"
MAX_GPUS = 16  # an instance's workers listen on the worker port .. port + 15
CONTROL_PORT = 50061  # the router's Control service: the operator's, never behind readiness
WORKER, ROUTER, CAPACITY = "worker", "router", "capacity"
ROUTER_CONTROL = "router-control"  # the component label of the routers' headless Service
SERVICE_NAME_LABEL = "kubernetes.io/service-name"  # an EndpointSlice's Service
ROUTER_REPLICAS = 2       # spec.router.replicas unset (an older CRD prunes it)
ROUTER_CPU = "500m"       # the router's CPU request unless spec.router.resources sets one
ROUTER_CPU_TARGET = 70    # autoscale on cpu: average utilisation of the request, percent
ROUTER_QUEUE_TARGET = 64  # autoscale on queue: requests waiting per replica (of 256 admitted)
QUEUE_METRIC = "spotserve_num_requests_waiting"  # the router's gauge of its queue


@dataclass(frozen=True)
class Owner:
    """The LLMService the objects belong to."""

    name: str
    namespace: str
    uid: str

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> Owner:
        meta = body.get("metadata") or {}
        return cls(str(meta.get("name", "")), str(meta.get("namespace") or "default"),
                   str(meta.get("uid") or ""))


@dataclass(frozen=True)
class Defaults:
    """What the operator's own environment supplies (SPOTSERVE_* variables)."""

    worker_image: str = "ghcr.io/spotserve/spotserve-worker:latest"
    router_image: str = "ghcr.io/spotserve/spotserve-operator:latest"
    token_secret: str = "spotserve-token"
    router_placement: Mapping[str, Any] | None = None


DEFAULTS = Defaults()


def labels(owner: Owner, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/part-of": "spotserve", COMPONENT: component,
            "app.kubernetes.io/instance": owner.name, SERVICE_LABEL: owner.name}


def selector(owner: Owner, component: str = WORKER) -> str:
    """The label selector of a component's pods (the scale subresource's for workers)."""
    return ",".join(f"{k}={v}" for k, v in labels(owner, component).items())


def owner_reference(owner: Owner) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": owner.name,
            "uid": owner.uid, "controller": True, "blockOwnerDeletion": True}


def _metadata(owner: Owner, name: str, component: str,
              extra_labels: Mapping[str, str] | None = None,
              annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": owner.namespace,
                            "labels": {**labels(owner, component), **(extra_labels or {})},
                            "ownerReferences": [owner_reference(owner)]}
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def dns_name(*parts: object, limit: int = 63) -> str:
    """A DNS label made of `parts` (lower case, [a-z0-9-], at most `limit` characters)."""
    text = re.sub(r"[^a-z0-9-]+", "-", "-".join(str(p) for p in parts).lower()).strip("-")
    if len(text) <= limit:
        return text
    digest = format(zlib.crc32(text.encode()) % 16**6, "06x")
    return f"{text[:limit - 7].rstrip('-')}-{digest}"


def worker_pod_name(owner: Owner, node: str) -> str:
    # a pod name may be 253 characters; keep it a DNS label anyway, for its hostname
    return dns_name(owner.name, "w", node, limit=253)


def token_secret_name(owner: Owner) -> str:
    return dns_name(owner.name, "token", limit=253)


def router_name(owner: Owner) -> str:
    return dns_name(owner.name, "router")


def router_control_name(owner: Owner) -> str:
    """The headless Service of the router replicas' Control ports."""
    return dns_name(owner.name, "router-control")


# ---- Pod Security "restricted" -------------------------------------------------------------
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                      "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


def _identity(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The pod's ServiceAccount (for IRSA / Workload Identity); no API token mounted: no
    spotserve pod talks to the API server."""
    out: dict[str, Any] = {"automountServiceAccountToken": False}
    if spec.get("serviceAccountName"):
        out["serviceAccountName"] = str(spec["serviceAccountName"])
    return out


def max_sequence_args(spec: Mapping[str, Any], flag: str,
                      model_context: int | None = None) -> list[str]:
    """`serving.maxSequenceLength` as a worker's or router's flag; unset, the model's
    context (`model_context`, when given), so workers and router agree on the limit."""
    longest = (spec.get("serving") or {}).get("maxSequenceLength") or model_context
    return [f"{flag}={int(longest)}"] if longest else []


# ---- worker pods ------------------------------------------------------------------------
def _tolerations(pool: Mapping[str, Any]) -> list[dict[str, Any]]:
    gpu = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    own = [dict(t) for t in pool.get("tolerations") or ()]
    return own + ([gpu] if all(t.get("key") != "nvidia.com/gpu" for t in own) else [])


GIB = 1 << 30


def model_storage(model_bytes: int | None) -> str | None:
    """The node-local disk a downloaded checkpoint needs (its weights, a tenth more for
    the tokenizer and file system, and a GiB of slack), as a Kubernetes quantity; None
    when the size is unknown."""
    if not model_bytes:
        return None
    return f"{-(-(int(model_bytes * 1.1) + GIB) // GIB)}Gi"


def _model_volume(spec: Mapping[str, Any], model_bytes: int | None = None
                  ) -> tuple[list[dict[str, Any]], str]:
    """The model's volume and the directory the worker reads it from: the claim when the
    spec names one, else an emptyDir on the node's disk sized for the checkpoint (a pod
    per instance: one download per node)."""
    model = spec.get("model") or {}
    volume = model.get("volume")
    if volume:
        path = str(volume.get("path") or ".")
        source = {"persistentVolumeClaim": {"claimName": volume["claimName"],
                                            "readOnly": True}}
        return [{"name": "model", **source}], f"{MODEL_DIR}/{path}".rstrip("/.") or MODEL_DIR
    size = model_storage(model_bytes)
    return [{"name": "model", "emptyDir": {"sizeLimit": size} if size else {}}], MODEL_DIR


def model_dir(spec: Mapping[str, Any]) -> str:
    """Where workers and the router read the model."""
    return _model_volume(spec)[1]


def _download_step(spec: Mapping[str, Any], image: str, *,
                   metadata_only: bool = False) -> list[dict[str, Any]]:
    """An init container fetching a Hub repository or URL into the model volume (with
    `metadata_only`, the config and tokenizer files alone: the router's)."""
    model = spec.get("model") or {}
    if model.get("volume"):
        return []
    hub = model.get("huggingFace")
    if hub:
        args = ["download", "--hf", str(hub["repoId"]), "--revision",
                str(hub.get("revision") or "main"), "--to", MODEL_DIR]
    else:
        args = ["download", "--url", str(model.get("url", "")), "--to", MODEL_DIR]
    if metadata_only:
        args.append("--metadata-only")
    step: dict[str, Any] = {"name": "download", "image": image, "args": args,
                            "volumeMounts": [{"name": "model", "mountPath": MODEL_DIR}],
                            "securityContext": dict(CONTAINER_SECURITY)}
    if model.get("credentialsSecret"):
        step["envFrom"] = [{"secretRef": {"name": model["credentialsSecret"]}}]
    return [step]


def _worker_resources(resources: Mapping[str, Any] | None, gpus: int,
                      storage: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {k: dict(v) for k, v in (resources or {}).items()}
    out.setdefault("limits", {})["nvidia.com/gpu"] = gpus
    out.setdefault("requests", {})["nvidia.com/gpu"] = gpus
    if storage:  # the scheduler puts the pod only where the checkpoint fits
        out["requests"].setdefault("ephemeral-storage", storage)
    return out


def _hostname_term(nodes: Sequence[str]) -> dict[str, Any]:
    return {"matchExpressions": [
        {"key": "kubernetes.io/hostname", "operator": "In", "values": list(nodes)}]}


def _worker_spec(owner: Owner, spec: Mapping[str, Any], pool: Mapping[str, Any], gpus: int,
                 defaults: Defaults, model_context: int | None,
                 model_bytes: int | None) -> dict[str, Any]:
    """The pod spec of an instance's workers: `gpus` GPUs, a worker process each."""
    worker = spec.get("worker") or {}
    port = int(worker.get("port") or 50051)
    image = str(worker.get("image") or defaults.worker_image)
    volumes, model_dir = _model_volume(spec, model_bytes)
    dtype = str((spec.get("model") or {}).get("dtype") or "auto")
    grace = pod_grace_seconds(grace_periods(spec.get("gracePeriodSeconds")),
                              pool.get("nodeSelector") or {})
    args = ["worker", f"--gpus={gpus}", f"--listen=0.0.0.0:{port}",
            f"--advertise=$(POD_IP):{port}", f"--model={model_dir}",
            f"--token-file={TOKEN_DIR}/{TOKEN_KEY}", f"--grace={grace:g}",
            *max_sequence_args(spec, "--max-model-len", model_context)]
    if dtype != "auto":
        args.append(f"--dtype={dtype}")
    container: dict[str, Any] = {
        "name": "worker", "image": image, "args": args,
        # GPU i's worker listens on port + i
        "ports": [{"name": f"grpc-{i}", "containerPort": port + i} for i in range(gpus)],
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                *[dict(e) for e in worker.get("env") or ()]],
        "resources": _worker_resources(worker.get("resources"), gpus,
                                       None if (spec.get("model") or {}).get("volume")
                                       else model_storage(model_bytes)),
        # GPU 0's worker answers for the pod; the operator checks every GPU's itself
        "readinessProbe": {"grpc": {"port": port}, "periodSeconds": 5},
        # a wedged group (GPU 0's gRPC health silent for a minute) is restarted in place;
        # a worker that exits is restarted by the group
        "livenessProbe": {"grpc": {"port": port}, "periodSeconds": 10, "timeoutSeconds": 5,
                          "failureThreshold": 6},
        "volumeMounts": [{"name": "token", "mountPath": TOKEN_DIR, "readOnly": True},
                         {"name": "model", "mountPath": MODEL_DIR, "readOnly": True},
                         {"name": "shm", "mountPath": "/dev/shm"}],
        "securityContext": dict(CONTAINER_SECURITY),
    }
    if worker.get("imagePullPolicy"):
        container["imagePullPolicy"] = worker["imagePullPolicy"]
    pod_spec: dict[str, Any] = {
        # a crashed group restarts in place (the controller re-plans around it meanwhile);
        # a pod that fails for good is deleted and created again by the operator
        "restartPolicy": "Always",
        # SIGTERM (an eviction, a node shutdown) drains within --grace; then SIGKILL
        "terminationGracePeriodSeconds": int(grace) + 5,
        "nodeSelector": dict(pool.get("nodeSelector") or {}),
        "tolerations": _tolerations(pool),
        "initContainers": _download_step(spec, image),
        "containers": [container],
        "securityContext": dict(POD_SECURITY), **_identity(spec),
        "volumes": [{"name": "token", "secret": {"secretName": token_secret_name(owner)}},
                    *volumes,
                    # NCCL's shared memory between the instance's workers
                    {"name": "shm", "emptyDir": {"medium": "Memory",
                                                 "sizeLimit": str(worker.get("shmSize",
                                                                             "8Gi"))}}],
    }
    if spec.get("imagePullSecrets"):
        pod_spec["imagePullSecrets"] = [dict(s) for s in spec["imagePullSecrets"]]
    return pod_spec


def worker_pod(owner: Owner, spec: Mapping[str, Any], pool: Mapping[str, Any], node: str,
               gpus: int, epoch: int, *, migrating: bool = False,
               defaults: Defaults = Defaults(), model_context: int | None = None,
               model_bytes: int | None = None) -> Manifest:
    """The pod serving the `gpus` GPUs of `node` (the device plugin picks them; GPU i is
    cuda:i inside); `model_context`: the model's longest sequence, the workers' limit when
    the spec sets none (the router's own default); `model_bytes`: the checkpoint's size,
    for the node-local disk the pod asks for."""
    pod_spec = _worker_spec(owner, spec, pool, gpus, defaults, model_context, model_bytes)
    pod_spec["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
                                             {"nodeSelectorTerms": [_hostname_term([node])]}}}
    extra = {EPOCH_LABEL: str(epoch), POOL_LABEL: str(pool.get("name", "")),
             NODE_LABEL: dns_name(node)}
    annotations = {INSTANCE: node, **({DO_NOT_DISRUPT: "true"} if migrating else {})}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": _metadata(owner, worker_pod_name(owner, node), WORKER, extra,
                                  annotations),
            "spec": pod_spec}


def adopted(node: str, epoch: int, migrating: bool) -> dict[str, Any]:
    """Merge patch making a pod (a capacity request the scheduler bound to `node`) the
    node's worker pod."""
    return {"metadata": {
        "labels": {COMPONENT: WORKER, NODE_LABEL: dns_name(node), EPOCH_LABEL: str(epoch)},
        "annotations": {INSTANCE: node, DO_NOT_DISRUPT: "true" if migrating else None}}}


def disruption_annotation(migrating: bool) -> dict[str, Any]:
    """Merge patch turning `karpenter.sh/do-not-disrupt` on or off on a worker pod."""
    return {"metadata": {"annotations": {DO_NOT_DISRUPT: "true" if migrating else None}}}


# ---- capacity requests ------------------------------------------------------------------
def capacity_pod(owner: Owner, spec: Mapping[str, Any], pool: Mapping[str, Any], gpus: int,
                 index: int, requested_at: float = 0.0, defaults: Defaults = DEFAULTS,
                 model_context: int | None = None, model_bytes: int | None = None
                 ) -> Manifest:
    """A worker pod for a whole instance of `pool` that no node has yet: pending, it asks
    the autoscaler for one; bound, it fetches the model while the operator learns of the
    node, then becomes its worker pod (`adopted`). `requested_at` (Unix seconds) lets the
    operator fall back when spot does not come."""
    pod_spec = _worker_spec(owner, spec, pool, max(1, gpus), defaults, model_context,
                            model_bytes)
    if pool.get("instanceType"):
        pod_spec["nodeSelector"].setdefault("node.kubernetes.io/instance-type",
                                            str(pool["instanceType"]))
    # a node that holds a pod of this service already is not new capacity
    pod_spec["affinity"] = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {
            "app.kubernetes.io/part-of": "spotserve", SERVICE_LABEL: owner.name}}}]}}
    name = dns_name(owner.name, "capacity", pool.get("name", ""), index, limit=253)
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": _metadata(owner, name, CAPACITY, {POOL_LABEL: str(pool.get("name"))},
                                  {REQUESTED_AT: str(int(requested_at))}),
            "spec": pod_spec}


# ---- router -----------------------------------------------------------------------------
def _router_placement(spec: Mapping[str, Any], defaults: Defaults) -> dict[str, Any]:
    router = spec.get("router") or {}
    base = dict(defaults.router_placement or {})
    out: dict[str, Any] = {}
    if base.get("affinity"):
        out["affinity"] = base["affinity"]
    selector_ = router.get("nodeSelector") or base.get("nodeSelector")
    tolerations = router.get("tolerations") or base.get("tolerations")
    if selector_:
        out["nodeSelector"] = dict(selector_)
    if tolerations:
        out["tolerations"] = [dict(t) for t in tolerations]
    return out


def router_deployment(owner: Owner, spec: Mapping[str, Any], model_name: str,
                      defaults: Defaults = Defaults()) -> Manifest:
    router = spec.get("router") or {}
    grpc_port, http_port = int(router.get("grpcPort") or 50051), \
        int(router.get("httpPort") or 8000)
    volumes, model_dir = _model_volume(spec)
    image = str(router.get("image") or defaults.router_image)
    container: dict[str, Any] = {
        "name": "router", "image": image,
        "args": ["router", f"--model={model_dir}", f"--served-model-name={model_name}",
                 f"--grpc=0.0.0.0:{grpc_port}", f"--http=0.0.0.0:{http_port}",
                 f"--control=0.0.0.0:{CONTROL_PORT}",
                 f"--token-file={TOKEN_DIR}/{TOKEN_KEY}",
                 *max_sequence_args(spec, "--max-context")],
        # the Service carries grpc and http only: the operator dials each router pod's
        # control port itself, so a router is told its topology before it is Ready
        "ports": [{"name": "grpc", "containerPort": grpc_port},
                  {"name": "http", "containerPort": http_port},
                  {"name": "control", "containerPort": CONTROL_PORT}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"},
                           "periodSeconds": 5},
        # leave the Service's endpoints before refusing requests (no kube-proxy lag)
        # (exec, not the sleep action: that needs Kubernetes 1.30)
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", "5"]}}},
        "volumeMounts": [{"name": "token", "mountPath": TOKEN_DIR, "readOnly": True},
                         {"name": "model", "mountPath": MODEL_DIR, "readOnly": True}],
        "securityContext": {**CONTAINER_SECURITY, "readOnlyRootFilesystem": True},
    }
    container["resources"] = _router_resources(router)
    if router.get("imagePullPolicy"):
        container["imagePullPolicy"] = router["imagePullPolicy"]
    pod_spec: dict[str, Any] = {
        **_router_placement(spec, defaults),
        # the router reads the tokenizer and config only
        "initContainers": _download_step(spec, image, metadata_only=True),
        "containers": [container],
        "securityContext": dict(POD_SECURITY), **_identity(spec),
        "volumes": [{"name": "token", "secret": {"secretName": token_secret_name(owner)}},
                    *volumes]}
    if spec.get("imagePullSecrets"):
        pod_spec["imagePullSecrets"] = [dict(s) for s in spec["imagePullSecrets"]]
    pod_labels = labels(owner, ROUTER)
    # replicas on different nodes, and zones, when the scheduler can; one node still does
    pod_spec["topologySpreadConstraints"] = [
        {"maxSkew": 1, "topologyKey": key, "whenUnsatisfiable": "ScheduleAnyway",
         "labelSelector": {"matchLabels": dict(pod_labels)},
         "matchLabelKeys": ["pod-template-hash"]}  # a rollout's new pods spread anew
        for key in ("kubernetes.io/hostname", "topology.kubernetes.io/zone")]
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _metadata(owner, router_name(owner), ROUTER),
            "spec": {"replicas": router_replicas(spec),
                     "selector": {"matchLabels": pod_labels},
                     "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec}}}


def router_autoscale(spec: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """`spec.router.autoscale`, or None when the replica count is fixed."""
    auto = (spec.get("router") or {}).get("autoscale")
    return auto if isinstance(auto, Mapping) else None


def router_replicas(spec: Mapping[str, Any]) -> int:
    """The router replicas to create: `router.replicas`, or with autoscale its
    `minReplicas` (the HPA owns the count from then on)."""
    router = spec.get("router") or {}
    auto = router_autoscale(spec)
    if auto is not None:
        return max(1, int(auto.get("minReplicas") or ROUTER_REPLICAS))
    return max(1, int(router.get("replicas") or ROUTER_REPLICAS))


def without_replicas(deployment: Manifest) -> Manifest:
    """The Deployment as a merge patch that leaves its replica count alone (the HPA's)."""
    return {**deployment, "spec": {k: v for k, v in deployment["spec"].items()
                                   if k != "replicas"}}


def _router_resources(router: Mapping[str, Any]) -> dict[str, Any]:
    """The router container's resources: the spec's, with a CPU request unless it sets one
    (the scheduler reserves it, and an HPA on CPU utilisation measures against it); a CPU
    limit alone is the request, as Kubernetes itself would default it."""
    out: dict[str, Any] = {k: dict(v) for k, v in (router.get("resources") or {}).items()}
    requests = out.setdefault("requests", {})
    if "cpu" not in requests:
        limit = (out.get("limits") or {}).get("cpu")
        requests["cpu"] = limit if limit is not None else ROUTER_CPU  # ≤ the limit
    return out


def router_service(owner: Owner, spec: Mapping[str, Any]) -> Manifest:
    router = spec.get("router") or {}
    grpc_port, http_port = int(router.get("grpcPort") or 50051), \
        int(router.get("httpPort") or 8000)
    meta = _metadata(owner, router_name(owner), ROUTER,
                     annotations=router.get("serviceAnnotations") or None)
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta,
            "spec": {"type": str(router.get("serviceType") or "ClusterIP"),
                     "selector": labels(owner, ROUTER),
                     "ports": [{"name": "grpc", "port": grpc_port, "targetPort": "grpc"},
                               {"name": "http", "port": http_port, "targetPort": "http"}]}}


def router_control_service(owner: Owner) -> Manifest:
    """A headless Service of every router replica's Control port, Ready or not
    (`publishNotReadyAddresses`: a router is Ready only once the operator told it its
    topology). No cluster IP, no client traffic: its EndpointSlices are how the operator
    finds the replicas."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _metadata(owner, router_control_name(owner), ROUTER_CONTROL),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": labels(owner, ROUTER),
                     "ports": [{"name": "control", "port": CONTROL_PORT,
                                "targetPort": "control", "protocol": "TCP"}]}}


def control_addresses(slices: Sequence[Mapping[str, Any]]) -> list[str]:
    """host:port of each router replica's Control service, from the EndpointSlices of
    `router_control_service`: ready or not (the Service publishes unready replicas), but
    not terminating ones."""
    out: set[str] = set()
    for piece in slices:
        if piece.get("addressType") not in ("IPv4", "IPv6"):
            continue
        port = next((int(p["port"]) for p in piece.get("ports") or ()
                     if p.get("name") == "control" and p.get("port")), CONTROL_PORT)
        for found in piece.get("endpoints") or ():
            if (found.get("conditions") or {}).get("terminating"):
                continue
            addresses = found.get("addresses") or ()
            if addresses:  # fungible: the first one is the endpoint's
                host = str(addresses[0])
                out.add(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return sorted(out)


def router_disruption_budget(owner: Owner) -> Manifest:
    """Voluntary disruptions (drains, upgrades, consolidation) take one router replica at a
    time; one that is not Ready (it serves nothing yet) may always be evicted."""
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": _metadata(owner, router_name(owner), ROUTER),
            "spec": {"maxUnavailable": 1, "unhealthyPodEvictionPolicy": "AlwaysAllow",
                     "selector": {"matchLabels": labels(owner, ROUTER)}}}


def router_autoscaler(owner: Owner, spec: Mapping[str, Any]) -> Manifest | None:
    """The router Deployment's HorizontalPodAutoscaler (autoscaling/v2) when
    `router.autoscale` is set: on the replicas' CPU utilisation (of their request), or on
    the requests waiting in each replica's queue (`spotserve_num_requests_waiting`, a Pods
    metric a metrics adapter such as prometheus-adapter must serve). Scales down one
    replica a minute, after five calm minutes: a replica that goes takes its streams."""
    auto = router_autoscale(spec)
    if auto is None:
        return None
    if str(auto.get("metric") or "cpu") == "queue":
        depth = int(auto.get("targetQueueDepth") or ROUTER_QUEUE_TARGET)
        metric: dict[str, Any] = {"type": "Pods", "pods": {
            "metric": {"name": QUEUE_METRIC},
            "target": {"type": "AverageValue", "averageValue": str(depth)}}}
    else:
        utilisation = int(auto.get("targetCPUUtilization") or ROUTER_CPU_TARGET)
        metric = {"type": "Resource", "resource": {
            "name": "cpu", "target": {"type": "Utilization",
                                      "averageUtilization": utilisation}}}
    low = router_replicas(spec)
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": _metadata(owner, router_name(owner), ROUTER),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                                        "name": router_name(owner)},
                     "minReplicas": low,
                     "maxReplicas": max(low, int(auto.get("maxReplicas") or low)),
                     "metrics": [metric],
                     "behavior": {"scaleDown": {
                         "stabilizationWindowSeconds": 300,
                         "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}]}}}}


def endpoint(owner: Owner, spec: Mapping[str, Any]) -> dict[str, str]:
    router = spec.get("router") or {}
    host = f"{router_name(owner)}.{owner.namespace}.svc"
    return {"service": router_name(owner),
            "grpc": f"{host}:{int(router.get('grpcPort') or 50051)}",
            "http": f"http://{host}:{int(router.get('httpPort') or 8000)}/v1"}


def worker_disruption_budget(owner: Owner) -> Manifest:
    """Voluntary disruptions (drains, upgrades, consolidation) take one worker at a time, so
    the operator migrates before the next goes; unready workers may always be evicted."""
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": _metadata(owner, dns_name(owner.name, "workers"), WORKER),
            "spec": {"maxUnavailable": 1, "unhealthyPodEvictionPolicy": "AlwaysAllow",
                     "selector": {"matchLabels": labels(owner, WORKER)}}}


def token_secret(owner: Owner, token: str) -> Manifest:
    meta = _metadata(owner, token_secret_name(owner), "token")
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque",
            "data": {TOKEN_KEY: base64.b64encode(token.encode()).decode()}}


def event(owner: Owner, reason: str, message: str, warning: bool = False,
          now: str = "") -> Manifest:
    """A core/v1 Event about the LLMService (`kubectl describe llms` shows it)."""
    name = dns_name(owner.name, reason, format(zlib.crc32(f"{message}{now}".encode()), "08x"),
                    limit=253)
    return {"apiVersion": "v1", "kind": "Event",
            "metadata": {"name": name, "namespace": owner.namespace},
            "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
                               "name": owner.name, "namespace": owner.namespace,
                               "uid": owner.uid},
            "reason": reason, "message": message[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": "spotserve-operator"},
            "firstTimestamp": now or None, "lastTimestamp": now or None, "count": 1}


def names(objects: Sequence[Manifest]) -> list[str]:
    return [str(o["metadata"]["name"]) for o in objects]
