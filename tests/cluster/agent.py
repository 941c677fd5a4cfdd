"""A node agent of our own: the kubelet and the cloud, for the test cluster (plane.py).

- **Nodes.** `NodeAgent.add_node(pool)` registers a fake GPU node the way the pool's
  flavour labels and taints it: EKS with Karpenter (`karpenter.sh/capacity-type`, the
  `karpenter.k8s.aws/*` GPU labels), an EKS managed node group
  (`eks.amazonaws.com/capacityType`), or GKE (`cloud.google.com/gke-spot`,
  `cloud.google.com/gke-accelerator`); `nvidia.com/gpu` in capacity and allocatable, the
  `nvidia.com/gpu` NoSchedule taint, a Lease renewed like a kubelet's, and an address
  10.243.x.y of its own (podnet.py: the tests' private pod network).
- **Pods.** Every pod the scheduler binds to one of its nodes runs as local processes on
  the pod's own address (10.244.N.M): init containers in order, then the
  containers. Images are mapped to commands (`ghcr.io/spotserve/*` → `python -m
  spotserve.cli`; a pause image holds without a process). Volumes become folders:
  Secrets and ConfigMaps are written out, a PersistentVolumeClaim is the hostPath of the
  volume it is bound to, the service-account projection gets a token from the TokenRequest
  API and a kubeconfig (`KUBECONFIG`) holding it. Paths under a mount, `$(VAR)` references
  and `0.0.0.0` in arguments and environment are rewritten to what they mean here (the
  pod's folder, its environment, its address): the container's view, emulated.
- **Status.** Phase, pod IP, host IP, container states, restart counts and the conditions
  (Initialized, ContainersReady, Ready) come from the processes and from their readiness,
  liveness and startup probes (gRPC health, HTTP GET, TCP, exec).
- **Termination.** A pod marked for deletion has its preStop hook run (exec or HTTP GET),
  then SIGTERM, then SIGKILL when `terminationGracePeriodSeconds` (the deletion's grace)
  is up; then the pod object is deleted, as a kubelet does. Containers that exit are
  restarted by `restartPolicy` (with back-off), and a liveness failure restarts them.
- **The cloud.** `interrupt(node, how)` plays a spot interruption the way each stack
  delivers it: Karpenter (the `karpenter.sh/disrupted` taint, then evictions through the
  Eviction API, so PodDisruptionBudgets apply), aws-node-termination-handler with and
  without `taintNode` (cordon and drain, the spot-itn taint only with it), GKE (the
  impending-termination taint and the kubelet's graceful node shutdown: pods get the
  DisruptionTarget condition and about 25 s), or none at all (`kill`). The instance is
  gone at the end of its grace: its processes die by SIGKILL, the Node and its pods go.
  Pools with `provision_after` get a new node for unschedulable pods that fit them after
  that delay; pools with `consolidate_after` lose nodes left empty that long.

Everything runs on threads of the test process; `stop()` kills every process it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import podnet
from .plane import ControlPlane

SPOTSERVE = [sys.executable, "-m", "spotserve.cli"]
IMAGES: dict[str, list[str] | None] = {  # image prefix → entrypoint (None: hold, no process)
    "ghcr.io/spotserve/": SPOTSERVE,
    "registry.k8s.io/pause": None,
    "python:": [sys.executable],  # the tests' own small programs
}
KARPENTER, EKS, GKE, PLAIN = "karpenter", "eks", "gke", "plain"
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
GKE_SHUTDOWN = 30.0        # a GKE spot VM stops this long after its preemption notice
GKE_POD_SHUTDOWN = 25.0    # of which regular pods get this (kubelet graceful shutdown)
AWS_NOTICE = 120.0         # an EC2 spot interruption notice comes two minutes ahead


def now_rfc3339(micro: bool = False) -> str:
    stamp = datetime.now(UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


# ---- the cloud's node pools ----------------------------------------------------------------
@dataclass
class NodePool:
    """A node group of the emulated cloud (a Karpenter NodePool, an EKS managed node group,
    a GKE node pool)."""

    name: str
    flavour: str = KARPENTER
    instance_type: str = "g5.xlarge"
    gpus: int = 1
    gpu_product: str = "NVIDIA-A10G"
    capacity: str = "spot"               # spot | on-demand
    zone: str = "us-east-1a"
    cpu: str = "8"
    memory: str = "32Gi"
    ephemeral_storage: str = "200Gi"
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: Sequence[Mapping[str, str]] = ()
    provision_after: float | None = None  # seconds to a new node for a pending pod (None: no)
    consolidate_after: float | None = None  # empty this long: the node is removed
    max_nodes: int = 8

    def node_labels(self, node: str) -> dict[str, str]:
        spot = self.capacity == "spot"
        out = {"kubernetes.io/hostname": node, "kubernetes.io/os": "linux",
               "kubernetes.io/arch": "amd64",
               "node.kubernetes.io/instance-type": self.instance_type,
               "topology.kubernetes.io/zone": self.zone,
               "topology.kubernetes.io/region": self.zone.rsplit("-", 1)[0]
               if self.flavour == GKE else self.zone[:-1]}
        gpu = self.gpu_product.lower().removeprefix("nvidia-")
        if self.flavour == KARPENTER:
            out |= {"karpenter.sh/capacity-type": "spot" if spot else "on-demand",
                    "karpenter.sh/nodepool": self.name, "karpenter.sh/registered": "true"}
            if self.gpus:
                out |= {"karpenter.k8s.aws/instance-gpu-name": gpu,
                        "karpenter.k8s.aws/instance-gpu-count": str(self.gpus)}
        elif self.flavour == EKS:
            out |= {"eks.amazonaws.com/capacityType": "SPOT" if spot else "ON_DEMAND",
                    "eks.amazonaws.com/nodegroup": self.name}
        elif self.flavour == GKE:
            out |= {"cloud.google.com/gke-nodepool": self.name}
            if spot:
                out["cloud.google.com/gke-spot"] = "true"
            if self.gpus:
                out["cloud.google.com/gke-accelerator"] = f"nvidia-{gpu}"
        if self.gpus and self.flavour != GKE:
            out |= {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": self.gpu_product,
                    "nvidia.com/gpu.count": str(self.gpus)}
        return out | dict(self.labels)

    def node_taints(self) -> list[dict[str, str]]:
        out = [dict(t) for t in self.taints]
        if self.gpus and all(t.get("key") != "nvidia.com/gpu" for t in out):
            value = "present" if self.flavour == GKE else "true"
            out.append({"key": "nvidia.com/gpu", "value": value, "effect": "NoSchedule"})
        return out

    def provider_id(self, node: str) -> str:
        if self.flavour == GKE:
            return f"gce://spotserve-test/{self.zone}/{node}"
        if self.flavour in (KARPENTER, EKS):
            return f"aws:///{self.zone}/i-{secrets.token_hex(8)}"
        return f"test://{node}"


# ---- matching pods to pools (what the scheduler checks, for the provisioner) --------------
def _expression_holds(expression: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    key, op = expression.get("key", ""), expression.get("operator", "In")
    values = [str(v) for v in expression.get("values") or ()]
    have = labels.get(key)
    if op == "In":
        return have in values
    if op == "NotIn":
        return have not in values
    if op == "Exists":
        return have is not None
    if op == "DoesNotExist":
        return have is None
    if op in ("Gt", "Lt") and have is not None and values:
        with contextlib.suppress(ValueError):
            return int(have) > int(values[0]) if op == "Gt" else int(have) < int(values[0])
    return False


def _tolerated(taint: Mapping[str, str], tolerations: Sequence[Mapping[str, Any]]) -> bool:
    for t in tolerations:
        if t.get("effect") and t.get("effect") != taint.get("effect"):
            continue
        if t.get("operator") == "Exists" and (not t.get("key") or t["key"] == taint["key"]):
            return True
        if t.get("key") == taint["key"] and str(t.get("value", "")) == taint.get("value", ""):
            return True
    return False


def pod_fits(pod: Mapping[str, Any], pool: NodePool) -> bool:
    """Would a new node of `pool` take this pod (selector, required affinity, taints,
    GPUs)?"""
    spec = pod.get("spec") or {}
    labels = pool.node_labels("new")
    if any(labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
        return False
    required = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    terms = required.get("nodeSelectorTerms") or []
    if terms and not any(all(_expression_holds(e, labels) for e in t.get("matchExpressions")
                             or ()) for t in terms):
        return False
    tolerations = spec.get("tolerations") or []
    if any(t.get("effect") in ("NoSchedule", "NoExecute") and not _tolerated(t, tolerations)
           for t in pool.node_taints()):
        return False
    return gpu_request(pod) <= pool.gpus


def gpu_request(pod: Mapping[str, Any]) -> int:
    total = 0
    for c in (pod.get("spec") or {}).get("containers") or ():
        limits = (c.get("resources") or {}).get("limits") or {}
        requests = (c.get("resources") or {}).get("requests") or {}
        total += int(limits.get("nvidia.com/gpu") or requests.get("nvidia.com/gpu") or 0)
    return total


def local_command(command: Sequence[str]) -> list[str]:
    """`spotserve ...` and `python ...` as this machine runs them."""
    if command and command[0] == "spotserve":
        return SPOTSERVE + list(command[1:])
    if command and command[0] in ("python", "python3"):
        return [sys.executable, *command[1:]]
    return list(command)


# ---- probes --------------------------------------------------------------------------------
def _port(value: Any, container: Mapping[str, Any]) -> int:
    if isinstance(value, int) or str(value).isdigit():
        return int(value)
    for p in container.get("ports") or ():
        if p.get("name") == value:
            return int(p["containerPort"])
    raise ValueError(f"no port named {value}")


def _grpc_health(host: str, port: int, timeout: float) -> bool:
    import grpc
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        call = channel.unary_unary("/grpc.health.v1.Health/Check",
                                   request_serializer=None, response_deserializer=None)
        try:
            return bool(call(b"", timeout=timeout) == b"\x08\x01")
        except grpc.RpcError:
            return False


def run_handler(handler: Mapping[str, Any], host: str, container: Mapping[str, Any],
                timeout: float, run_exec: Callable[[list[str], float], int]) -> bool:
    """One probe or lifecycle-hook action: True when it succeeds."""
    try:
        if "grpc" in handler:
            return _grpc_health(host, _port(handler["grpc"]["port"], container), timeout)
        if "httpGet" in handler:
            get = handler["httpGet"]
            url = f"http://{host}:{_port(get['port'], container)}{get.get('path', '/')}"
            with urllib.request.urlopen(url, timeout=timeout) as reply:
                return 200 <= reply.status < 400
        if "tcpSocket" in handler:
            with socket.create_connection(
                    (host, _port(handler["tcpSocket"]["port"], container)), timeout):
                return True
        if "exec" in handler:
            return run_exec(list(handler["exec"]["command"]), timeout) == 0
        if "sleep" in handler:
            time.sleep(float(handler["sleep"]["seconds"]))
            return True
    except (OSError, ValueError, urllib.error.URLError, subprocess.TimeoutExpired):
        return False
    return False


class Probe:
    """A probe's schedule and thresholds, as the kubelet keeps them."""

    def __init__(self, spec: Mapping[str, Any] | None, initially: bool) -> None:
        """`initially`: the verdict before the first probe (liveness: alive; readiness and
        startup: not yet, when the probe exists)."""
        self.spec = dict(spec or {})
        self.ok = initially
        self.successes = self.failures = 0
        self.next_at = 0.0

    def due(self, started: float, now: float) -> bool:
        if not self.spec:
            return False
        return now >= max(self.next_at, started + float(self.spec.get("initialDelaySeconds", 0)))

    def record(self, success: bool, now: float) -> None:
        self.next_at = now + float(self.spec.get("periodSeconds", 10))
        if success:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= int(self.spec.get("successThreshold", 1)):
                self.ok = True
        else:
            self.successes, self.failures = 0, self.failures + 1
            if self.failures >= int(self.spec.get("failureThreshold", 3)):
                self.ok = False


# ---- one container -------------------------------------------------------------------------
@dataclass
class Container:
    spec: dict[str, Any]
    init: bool = False
    process: subprocess.Popen[bytes] | None = None
    holding: bool = False          # a pause container: running without a process
    started_at: float = 0.0
    started_stamp: str = ""
    restarts: int = 0
    exit_code: int | None = None
    finished_stamp: str = ""
    waiting: str | None = "ContainerCreating"
    waiting_message: str = ""
    readiness: Probe = field(default_factory=lambda: Probe(None, True))
    liveness: Probe = field(default_factory=lambda: Probe(None, True))
    startup: Probe = field(default_factory=lambda: Probe(None, True))
    restart_at: float = 0.0

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def running(self) -> bool:
        return self.holding or (self.process is not None and self.process.poll() is None)

    def status(self, image: str) -> dict[str, Any]:
        state: dict[str, Any]
        if self.running:
            state = {"running": {"startedAt": self.started_stamp}}
        elif self.exit_code is not None:
            state = {"terminated": {"exitCode": self.exit_code,
                                    "reason": "Completed" if self.exit_code == 0 else "Error",
                                    "startedAt": self.started_stamp,
                                    "finishedAt": self.finished_stamp}}
        else:
            state = {"waiting": {"reason": self.waiting or "ContainerCreating",
                                 **({"message": self.waiting_message}
                                    if self.waiting_message else {})}}
        return {"name": self.name, "image": image, "imageID": image, "state": state,
                "ready": bool(self.running and self.readiness.ok and self.startup.ok),
                "started": self.running, "restartCount": self.restarts}


# ---- one pod -------------------------------------------------------------------------------
class PodRunner:
    """Runs one pod bound to one of the agent's nodes, on its own thread."""

    def __init__(self, agent: NodeAgent, pod: Mapping[str, Any], ip: str, host_ip: str) -> None:
        self.agent, self.ip, self.host_ip = agent, ip, host_ip
        meta = pod["metadata"]
        self.name, self.namespace, self.uid = meta["name"], meta["namespace"], meta["uid"]
        self.node = pod["spec"]["nodeName"]
        self.pod = dict(pod)
        self.spec: dict[str, Any] = dict(pod["spec"])
        self.dir = agent.workdir / "pods" / f"{self.namespace}_{self.name}_{self.uid[:8]}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.init = [Container(dict(c), init=True) for c in self.spec.get("initContainers") or ()]
        self.containers = [Container(dict(c)) for c in self.spec.get("containers") or ()]
        for c in self.containers:
            c.readiness = Probe(c.spec.get("readinessProbe"), not c.spec.get("readinessProbe"))
            c.liveness = Probe(c.spec.get("livenessProbe"), True)
            c.startup = Probe(c.spec.get("startupProbe"), not c.spec.get("startupProbe"))
        self.phase, self.reason, self.message = "Pending", "", ""
        self.started_stamp = now_rfc3339()
        self.deleting_at: float | None = None   # monotonic time the grace ends
        self.shutdown: tuple[str, str] | None = None  # (reason, message) of a node shutdown
        self.extra_conditions: list[dict[str, Any]] = []
        self.done = threading.Event()           # the pod's thread ended
        self.kill_now = threading.Event()       # the instance is gone: SIGKILL, no hooks
        self.mounts: dict[str, Path] = {}
        self.env: dict[str, str] = {}
        self.last_status: str = ""
        self.thread = threading.Thread(target=self._main, name=f"pod-{self.name}", daemon=True)

    # ---- the container's view of the world -----------------------------------------------
    def _volumes(self) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for volume in self.spec.get("volumes") or ():
            name, path = volume["name"], self.dir / "volumes" / volume["name"]
            if "persistentVolumeClaim" in volume:
                out[name] = self.agent.claim_path(self.namespace,
                                                  volume["persistentVolumeClaim"]["claimName"])
                continue
            if "hostPath" in volume:
                out[name] = Path(volume["hostPath"]["path"])
                continue
            path.mkdir(parents=True, exist_ok=True)
            if "secret" in volume:
                self.agent.write_secret(self.namespace, volume["secret"], path)
            elif "configMap" in volume:
                self.agent.write_config_map(self.namespace, volume["configMap"], path)
            elif "projected" in volume:
                self.agent.write_projected(self, volume["projected"], path)
            out[name] = path
        return out

    def _mounts(self, container: Mapping[str, Any], volumes: Mapping[str, Path]
                ) -> dict[str, Path]:
        out = {}
        for mount in container.get("volumeMounts") or ():
            base = volumes.get(mount["name"])
            if base is not None:
                sub = mount.get("subPath")
                out[mount["mountPath"].rstrip("/") or "/"] = base / sub if sub else base
        return out

    def _rewrite(self, text: str, mounts: Mapping[str, Path], env: Mapping[str, str]) -> str:
        """`text` as this machine must see it: `$(VAR)` expanded, 0.0.0.0 the pod's
        address, a path under a mount the folder behind it (one pass: no double rewrite)."""
        text = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                      lambda m: env.get(m.group(1), m.group(0)), text)
        text = text.replace("0.0.0.0", self.ip)
        if not mounts:
            return text
        alternatives = "|".join(re.escape(m) for m in sorted(mounts, key=len, reverse=True))
        return re.sub(r"(?<![\w./-])(" + alternatives + r")(?=/|$|[^\w.-])",
                      lambda m: str(mounts[m.group(1)]), text)

    def _env(self, container: Mapping[str, Any], mounts: Mapping[str, Path]) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom") or ():
            if "secretRef" in source:
                env |= self.agent.secret_data(self.namespace, source["secretRef"]["name"])
        for item in container.get("env") or ():
            if "value" in item:
                env[item["name"]] = self._rewrite(str(item["value"]), mounts, env)
            elif "valueFrom" in item:
                env[item["name"]] = self._value_from(item["valueFrom"])
        base = {k: v for k, v in os.environ.items() if not k.startswith("KUBE")}
        out = {**base, "HOSTNAME": self.name, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
               "GLOO_SOCKET_IFNAME": "lo", **env}
        if SA_MOUNT in mounts and (mounts[SA_MOUNT] / "kubeconfig").exists():
            out["KUBECONFIG"] = str(mounts[SA_MOUNT] / "kubeconfig")
        if "/tmp" in mounts:
            out["TMPDIR"] = str(mounts["/tmp"])
        return out

    def _value_from(self, source: Mapping[str, Any]) -> str:
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            return {"status.podIP": self.ip, "status.hostIP": self.host_ip,
                    "metadata.name": self.name, "metadata.namespace": self.namespace,
                    "metadata.uid": self.uid, "spec.nodeName": self.node,
                    "spec.serviceAccountName": str(self.spec.get("serviceAccountName", "")),
                    }.get(path, "")
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            return self.agent.secret_data(self.namespace, ref["name"]).get(ref["key"], "")
        if "resourceFieldRef" in source:
            return "1"
        return ""

    def command(self, container: Mapping[str, Any], mounts: Mapping[str, Path],
                env: Mapping[str, str]) -> list[str] | None:
        """The command line a container runs here; None for a pause container. The pod's
        own words (command, args) are rewritten to this machine's view, then the program
        is mapped to a local one (never rewritten: it lives outside the pod's mounts)."""
        image = str(container.get("image", ""))
        entry = next((e for prefix, e in IMAGES.items() if image.startswith(prefix)), "unknown")
        if entry is None:
            return None
        if entry == "unknown":
            raise LookupError(f"image {image} is not one the node agent knows")
        words = [self._rewrite(str(w), mounts, env)
                 for w in [*(container.get("command") or ()), *(container.get("args") or ())]]
        return local_command(words) if container.get("command") else [*entry, *words]

    # ---- running ---------------------------------------------------------------------------
    def _start(self, c: Container, volumes: Mapping[str, Path]) -> bool:
        mounts = self._mounts(c.spec, volumes)
        env = self._env(c.spec, mounts)
        try:
            argv = self.command(c.spec, mounts, env)
        except LookupError as exc:
            c.waiting, c.waiting_message = "ErrImagePull", str(exc)
            return False
        c.started_at, c.started_stamp = time.monotonic(), now_rfc3339()
        c.exit_code, c.waiting = None, None
        c.readiness.ok = not c.readiness.spec
        c.startup.ok = not c.startup.spec
        c.liveness.ok = True
        c.liveness.failures = c.readiness.failures = 0
        if argv is None:
            c.holding = True
            return True
        log = (self.dir / f"{c.name}.log").open("ab")
        c.process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.dir, start_new_session=True)
        log.close()
        self.agent.remember_process(c.process)
        return True

    def _exec(self, c: Container, volumes: Mapping[str, Path]
              ) -> Callable[[list[str], float], int]:
        mounts = self._mounts(c.spec, volumes)
        env = self._env(c.spec, mounts)

        def run(command: list[str], timeout: float) -> int:
            argv = local_command([self._rewrite(a, mounts, env) for a in command])
            return subprocess.run(argv, env=env, cwd=self.dir, timeout=timeout,
                                  capture_output=True).returncode
        return run

    def _main(self) -> None:
        try:
            self._run()
        except Exception as exc:
            self.phase, self.reason, self.message = "Failed", "AgentError", repr(exc)
            (self.dir / "agent-error.log").write_text(traceback.format_exc())
            self._kill_all(signal.SIGKILL)
        finally:
            with contextlib.suppress(Exception):
                self.report()
            self.done.set()

    def _run(self) -> None:
        volumes = self._volumes()
        self.report()
        for c in self.init:
            while not self._stopping():
                if not self._start(c, volumes):
                    self.report()
                    self._sleep(2.0)
                    continue
                while c.running and not self._stopping():
                    self._sleep(0.2)
                self._ended(c)
                if c.exit_code == 0 or self._stopping():
                    break
                if self.spec.get("restartPolicy", "Always") == "Never":
                    self.phase, self.reason = "Failed", "InitContainerFailed"
                    return
                c.restarts += 1
                self.report()
                self._sleep(min(10.0, 2.0 ** min(c.restarts, 4) / 2))
            if self._stopping():
                break
        if not self._stopping():
            for c in self.containers:
                self._start(c, volumes)
            self.phase = "Running"
        policy = self.spec.get("restartPolicy", "Always")
        while not self._stopping():
            now = time.monotonic()
            for c in self.containers:
                if c.waiting == "ErrImagePull":
                    continue
                if not c.running and c.exit_code is None and c.started_at:
                    self._ended(c)
                if not c.running:
                    if policy == "Always" or (policy == "OnFailure" and c.exit_code):
                        if c.restart_at == 0.0:
                            c.restarts += 1
                            c.restart_at = now + min(10.0, 2.0 ** min(c.restarts, 4) / 2)
                            c.waiting = "CrashLoopBackOff"
                        elif now >= c.restart_at:
                            c.restart_at = 0.0
                            self._start(c, volumes)
                    continue
                self._probe(c, volumes, now)
            if policy == "Never" and all(not c.running for c in self.containers) and \
                    all(c.exit_code is not None for c in self.containers):
                failed = any(c.exit_code for c in self.containers)
                self.phase = "Failed" if failed else "Succeeded"
                self.report()
                return
            self.report()
            self._sleep(0.2)
        self._terminate(volumes)

    def _probe(self, c: Container, volumes: Mapping[str, Path], now: float) -> None:
        if c.process is None:
            return
        if not c.startup.ok:
            if c.startup.due(c.started_at, now):
                c.startup.record(self._check(c, c.startup, volumes), now)
                if c.startup.failures >= int(c.startup.spec.get("failureThreshold", 3)):
                    self._restart_for(c, "startup probe failed")
            return
        if c.readiness.due(c.started_at, now):
            c.readiness.record(self._check(c, c.readiness, volumes), now)
        if c.liveness.due(c.started_at, now):
            c.liveness.record(self._check(c, c.liveness, volumes), now)
            if not c.liveness.ok:
                self._restart_for(c, "liveness probe failed")

    def _check(self, c: Container, probe: Probe, volumes: Mapping[str, Path]) -> bool:
        return run_handler(probe.spec, self.ip, c.spec, float(probe.spec.get(
            "timeoutSeconds", 1)), self._exec(c, volumes))

    def _restart_for(self, c: Container, why: str) -> None:
        self.agent.event(self.pod, "Unhealthy", f"container {c.name}: {why}", "Warning")
        self._stop_container(c, float(self.spec.get("terminationGracePeriodSeconds", 30)))
        c.liveness = Probe(c.spec.get("livenessProbe"), True)
        c.startup = Probe(c.spec.get("startupProbe"), True)

    def _ended(self, c: Container) -> None:
        if c.holding:
            c.holding = False
        elif c.process is not None:
            c.exit_code = c.process.returncode if c.process.returncode is not None else 137
        c.finished_stamp = now_rfc3339()

    def _stopping(self) -> bool:
        return self.deleting_at is not None or self.kill_now.is_set()

    def _sleep(self, seconds: float) -> None:
        self.kill_now.wait(seconds)

    def _terminate(self, volumes: Mapping[str, Path]) -> None:
        """preStop, SIGTERM, then SIGKILL once the deletion's grace is up."""
        deadline = self.deleting_at if self.deleting_at is not None else time.monotonic()
        if not self.kill_now.is_set():
            hooks = [threading.Thread(target=self._pre_stop, args=(c, volumes, deadline),
                                      daemon=True) for c in self.containers if c.running]
            for t in hooks:
                t.start()
            for t in hooks:
                t.join(max(0.0, deadline - time.monotonic()))
            for c in self.containers:
                self._signal(c, signal.SIGTERM)
            while any(c.running for c in self.containers) and time.monotonic() < deadline \
                    and not self.kill_now.is_set():
                self.report()
                self._sleep(0.1)
        self._kill_all(signal.SIGKILL)
        for c in self.containers + self.init:
            if c.started_at and c.exit_code is None:
                self._ended(c)
        if self.shutdown is not None:
            self.phase, (self.reason, self.message) = "Failed", self.shutdown
        elif self.phase not in ("Succeeded", "Failed"):
            self.phase = "Failed" if any(c.exit_code for c in self.containers) else "Succeeded"

    def _pre_stop(self, c: Container, volumes: Mapping[str, Path], deadline: float) -> None:
        hook = ((c.spec.get("lifecycle") or {}).get("preStop"))
        if hook:
            run_handler(hook, self.ip, c.spec, max(0.1, deadline - time.monotonic()),
                        self._exec(c, volumes))

    def _signal(self, c: Container, sig: int) -> None:
        if c.process is not None and c.process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(c.process.pid, sig)
        if sig == signal.SIGKILL:
            c.holding = False

    def _stop_container(self, c: Container, grace: float) -> None:
        self._signal(c, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            if c.process is not None:
                c.process.wait(grace)
        self._signal(c, signal.SIGKILL)
        if c.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.process.wait(5)
        self._ended(c)

    def _kill_all(self, sig: int) -> None:
        for c in self.init + self.containers:
            self._signal(c, sig)
            if c.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    c.process.wait(5)

    # ---- status ----------------------------------------------------------------------------
    def ready(self) -> bool:
        return self.phase == "Running" and not self._stopping() and all(
            c.running and c.readiness.ok and c.startup.ok for c in self.containers)

    def report(self) -> None:
        inited = all(c.exit_code == 0 for c in self.init)
        containers_ready = all(c.running and c.readiness.ok and c.startup.ok
                               for c in self.containers)
        ready = self.ready()

        def cond(kind: str, ok: bool) -> dict[str, Any]:
            return {"type": kind, "status": "True" if ok else "False"}

        conditions = [cond("PodReadyToStartContainers", True), cond("Initialized", inited),
                      cond("ContainersReady", containers_ready and not self._stopping()),
                      cond("Ready", ready), *self.extra_conditions]
        status: dict[str, Any] = {
            "phase": self.phase, "hostIP": self.host_ip, "hostIPs": [{"ip": self.host_ip}],
            "podIP": self.ip, "podIPs": [{"ip": self.ip}], "startTime": self.started_stamp,
            "conditions": conditions,
            "initContainerStatuses": [c.status(c.spec.get("image", "")) for c in self.init],
            "containerStatuses": [c.status(c.spec.get("image", "")) for c in self.containers]}
        if self.reason:
            status |= {"reason": self.reason, "message": self.message}
        text = json.dumps(status, sort_keys=True)
        if text == self.last_status:
            return
        # stamps change only when the state does: compare before adding them
        for c in conditions:
            c["lastTransitionTime"] = now_rfc3339()
        code, _ = self.agent.plane.request(
            "PATCH", f"/api/v1/namespaces/{self.namespace}/pods/{self.name}/status",
            {"status": status}, content_type="application/strategic-merge-patch+json")
        if code == 200:
            self.last_status = text


# ---- the agent -----------------------------------------------------------------------------
@dataclass
class Node:
    name: str
    pool: NodePool
    ip: str
    created: float = field(default_factory=time.monotonic)
    empty_since: float = field(default_factory=time.monotonic)
    index: int = 0
    gone: bool = False
    next_pod_ip: int = 2


class NodeAgent:
    """The kubelet of every fake node, and the cloud they live in (see the module doc)."""

    def __init__(self, plane: ControlPlane, workdir: Path,
                 pools: Sequence[NodePool] = ()) -> None:
        self.plane, self.workdir = plane, workdir
        self.pools = {p.name: p for p in pools}
        self.nodes: dict[str, Node] = {}
        self.pods: dict[str, PodRunner] = {}  # uid → runner
        self.claims: dict[str, tuple[str, float]] = {}  # pod uid → (pool, when to launch)
        self.history: list[tuple[float, str, str]] = []  # (time, what, node) for the tests
        self._processes: list[subprocess.Popen[bytes]] = []
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._counter = 0
        self._threads: list[threading.Thread] = []
        self.workdir.mkdir(parents=True, exist_ok=True)

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> NodeAgent:
        for target, name in ((self._sync_loop, "agent-pods"), (self._cloud_loop, "agent-cloud"),
                             (self._lease_loop, "agent-leases")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            runners = list(self.pods.values())
        for r in runners:
            r.kill_now.set()
        for r in runners:
            r.done.wait(10)
        for process in self._processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> NodeAgent:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def remember_process(self, process: subprocess.Popen[bytes]) -> None:
        self._processes.append(process)

    # ---- nodes ----------------------------------------------------------------------------
    def add_pool(self, pool: NodePool) -> None:
        self.pools[pool.name] = pool

    def add_node(self, pool: str | NodePool, name: str | None = None) -> str:
        """Register a node of `pool` (Ready at once, as a kubelet that just joined)."""
        if isinstance(pool, NodePool):
            self.pools.setdefault(pool.name, pool)
        p = self.pools[pool if isinstance(pool, str) else pool.name]
        with self._lock:
            self._counter += 1
            index = self._counter
            name = name or f"{p.name}-{secrets.token_hex(3)}"
            node = Node(name, p, podnet.node_ip(index), index=index)
            self.nodes[name] = node
        capacity = {"cpu": p.cpu, "memory": p.memory, "pods": "110",
                    "ephemeral-storage": p.ephemeral_storage}
        if p.gpus:
            capacity["nvidia.com/gpu"] = str(p.gpus)
        body = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": p.node_labels(name)},
                "spec": {"providerID": p.provider_id(name), "taints": p.node_taints()}}
        code, reply = self.plane.request("POST", "/api/v1/nodes", body)
        if code not in (200, 201):
            raise RuntimeError(f"registering node {name}: {code} {reply}")
        stamp = now_rfc3339()
        status = {"capacity": capacity, "allocatable": capacity,
                  "addresses": [{"type": "InternalIP", "address": node.ip},
                                {"type": "Hostname", "address": name}],
                  "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                  "message": "the spotserve node agent is posting ready status",
                                  "lastHeartbeatTime": stamp, "lastTransitionTime": stamp}],
                  "nodeInfo": {"kubeletVersion": "v1.37.2", "operatingSystem": "linux",
                               "architecture": "amd64", "containerRuntimeVersion": "agent://1",
                               "kernelVersion": "", "osImage": "", "kubeProxyVersion": "",
                               "machineID": "", "systemUUID": "", "bootID": ""}}
        self.plane.request("PATCH", f"/api/v1/nodes/{name}/status", {"status": status},
                           content_type="application/strategic-merge-patch+json")
        self._renew_lease(node)
        self.history.append((time.time(), "node-added", name))
        return name

    def _renew_lease(self, node: Node) -> None:
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": node.name, "namespace": "kube-node-lease"},
                 "spec": {"holderIdentity": node.name, "leaseDurationSeconds": 40,
                          "renewTime": now_rfc3339(micro=True)}}
        path = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"
        code, _ = self.plane.request("PATCH", f"{path}/{node.name}", {"spec": lease["spec"]},
                                     content_type="application/merge-patch+json")
        if code == 404:
            self.plane.request("POST", path, lease)

    def _lease_loop(self) -> None:
        while not self._stop.wait(5.0):
            with self._lock:
                nodes = [n for n in self.nodes.values() if not n.gone]
            for node in nodes:
                with contextlib.suppress(OSError):
                    self._renew_lease(node)

    def node_pods(self, node: str) -> list[PodRunner]:
        with self._lock:
            return [r for r in self.pods.values() if r.node == node]

    def crash(self, pod: str, namespace: str) -> bool:
        """SIGKILL the processes of a pod's containers (as an OOM kill would); the pod's
        restartPolicy decides what happens next. False when no such pod runs here."""
        with self._lock:
            runner = next((r for r in self.pods.values()
                           if r.name == pod and r.namespace == namespace), None)
        if runner is None:
            return False
        for c in runner.containers:
            runner._signal(c, signal.SIGKILL)
        return True

    # ---- pods -----------------------------------------------------------------------------
    def _sync_loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                self._sync()
            self._stop.wait(0.2)

    def _sync(self) -> None:
        code, data = self.plane.request("GET", "/api/v1/pods")
        if code != 200:
            return
        seen = set()
        for pod in data.get("items") or ():
            meta, spec = pod["metadata"], pod.get("spec") or {}
            node = self.nodes.get(spec.get("nodeName") or "")
            if node is None or node.gone:
                continue
            uid = meta["uid"]
            seen.add(uid)
            with self._lock:
                runner = self.pods.get(uid)
                if runner is None:
                    if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                        continue  # finished before we knew it (or a gone node's leftovers)
                    ip = podnet.pod_ip(node.index, node.next_pod_ip)
                    node.next_pod_ip += 1
                    runner = PodRunner(self, pod, ip, node.ip)
                    self.pods[uid] = runner
                    runner.thread.start()
            deleting = meta.get("deletionTimestamp")
            if deleting and runner.deleting_at is None:
                grace = float(meta.get("deletionGracePeriodSeconds") or 0)
                runner.deleting_at = time.monotonic() + grace
                threading.Thread(target=self._finish_deletion, args=(runner,),
                                 daemon=True).start()
        with self._lock:
            vanished = [r for uid, r in self.pods.items() if uid not in seen]
            for r in vanished:
                self.pods.pop(r.uid, None)
        for r in vanished:  # deleted at once (grace 0) or force-deleted: no hooks
            r.kill_now.set()

    def _finish_deletion(self, runner: PodRunner) -> None:
        """Once the containers are down, delete the object for good (a kubelet's last
        word); the UID precondition keeps a recreated pod of the same name alive."""
        runner.done.wait()
        self.plane.request(
            "DELETE", f"/api/v1/namespaces/{runner.namespace}/pods/{runner.name}",
            {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
             "preconditions": {"uid": runner.uid}})
        with self._lock:
            self.pods.pop(runner.uid, None)

    # ---- what volumes hold ------------------------------------------------------------------
    def secret_data(self, namespace: str, name: str) -> dict[str, str]:
        import base64
        code, secret = self.plane.request("GET", f"/api/v1/namespaces/{namespace}/secrets/{name}")
        if code != 200:
            raise LookupError(f"secret {namespace}/{name}: {code}")
        return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}

    def write_secret(self, namespace: str, volume: Mapping[str, Any], path: Path) -> None:
        for key, value in self.secret_data(namespace, volume["secretName"]).items():
            (path / key).write_text(value)

    def write_config_map(self, namespace: str, volume: Mapping[str, Any], path: Path) -> None:
        code, cm = self.plane.request(
            "GET", f"/api/v1/namespaces/{namespace}/configmaps/{volume['name']}")
        for key, value in ((cm.get("data") or {}) if code == 200 else {}).items():
            (path / key).write_text(value)

    def write_projected(self, runner: PodRunner, projected: Mapping[str, Any],
                        path: Path) -> None:
        """The service-account projection: a token from the TokenRequest API, the cluster's
        CA and the namespace, and a kubeconfig of them (the process reads KUBECONFIG)."""
        token = ""
        for source in projected.get("sources") or ():
            if "serviceAccountToken" in source:
                account = runner.spec.get("serviceAccountName") or "default"
                code, reply = self.plane.request(
                    "POST", f"/api/v1/namespaces/{runner.namespace}/serviceaccounts/"
                    f"{account}/token",
                    {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                     "spec": {"expirationSeconds": 3600, "boundObjectRef": {
                         "apiVersion": "v1", "kind": "Pod", "name": runner.name,
                         "uid": runner.uid}}})
                if code != 201:
                    raise LookupError(f"token for {account}: {code} {reply}")
                token = reply["status"]["token"]
                (path / source["serviceAccountToken"].get("path", "token")).write_text(token)
            elif "configMap" in source:
                self.write_config_map(runner.namespace, source["configMap"], path)
            elif "downwardAPI" in source:
                (path / "namespace").write_text(runner.namespace)
        if token:
            (path / "kubeconfig").write_text(json.dumps({
                "apiVersion": "v1", "kind": "Config", "current-context": "pod",
                "clusters": [{"name": "c", "cluster": {"server": self.plane.server,
                                                       "insecure-skip-tls-verify": True}}],
                "users": [{"name": "sa", "user": {"token": token}}],
                "contexts": [{"name": "pod", "context": {
                    "cluster": "c", "user": "sa", "namespace": runner.namespace}}]}))

    def claim_path(self, namespace: str, claim: str) -> Path:
        """A PersistentVolumeClaim's folder: the hostPath or local path of its bound PV."""
        give_up = time.monotonic() + 30
        while time.monotonic() < give_up:
            code, pvc = self.plane.request(
                "GET", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}")
            volume = (pvc.get("spec") or {}).get("volumeName") if code == 200 else None
            if volume:
                _, pv = self.plane.request("GET", f"/api/v1/persistentvolumes/{volume}")
                spec = pv.get("spec") or {}
                source = spec.get("hostPath") or spec.get("local") or {}
                return Path(source["path"])
            time.sleep(0.5)
        raise LookupError(f"claim {namespace}/{claim} is not bound")

    def event(self, involved: Mapping[str, Any], reason: str, message: str,
              kind: str = "Normal") -> None:
        meta = involved.get("metadata") or {}
        namespace = meta.get("namespace") or "default"
        self.plane.request("POST", f"/api/v1/namespaces/{namespace}/events", {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name', 'x')}.", "namespace": namespace},
            "involvedObject": {"kind": involved.get("kind", "Pod"), "name": meta.get("name"),
                               "namespace": meta.get("namespace"), "uid": meta.get("uid")},
            "reason": reason, "message": message, "type": kind,
            "source": {"component": "spotserve-node-agent"},
            "firstTimestamp": now_rfc3339(), "lastTimestamp": now_rfc3339(), "count": 1})

    # ---- the cloud: interruptions ---------------------------------------------------------
    def interrupt(self, node: str, how: str, grace: float | None = None) -> threading.Thread:
        """Interrupt `node` the way `how` delivers it: "karpenter", "nth" (cordon and drain),
        "nth-taint" (NTH with taintNode), "gke", or "kill" (no notice). The instance is
        gone after `grace` seconds (default: AWS 120, GKE 30). Returns the thread playing it."""
        plays = {"karpenter": self._karpenter, "nth": self._nth, "nth-taint": self._nth,
                 "gke": self._gke, "kill": lambda n, g, h: self.gone(n)}
        if how not in plays:
            raise ValueError(f"unknown interruption {how!r}")
        wait = grace if grace is not None else (GKE_SHUTDOWN if how == "gke" else AWS_NOTICE)
        self.history.append((time.time(), f"interrupt:{how}", node))
        thread = threading.Thread(target=plays[how], args=(node, wait, how), daemon=True,
                                  name=f"interrupt-{node}")
        thread.start()
        return thread

    def taint(self, node: str, key: str, effect: str = "NoSchedule", value: str = "") -> None:
        code, body = self.plane.request("GET", f"/api/v1/nodes/{node}")
        if code != 200:
            return
        taints = [t for t in (body.get("spec") or {}).get("taints") or () if t["key"] != key]
        taints.append({"key": key, "effect": effect, "timeAdded": now_rfc3339(),
                       **({"value": value} if value else {})})
        self.plane.request("PATCH", f"/api/v1/nodes/{node}", {"spec": {"taints": taints}},
                           content_type="application/merge-patch+json")

    def cordon(self, node: str) -> None:
        self.plane.request("PATCH", f"/api/v1/nodes/{node}", {"spec": {"unschedulable": True}},
                           content_type="application/merge-patch+json")

    def evict_all(self, node: str, deadline: float) -> None:
        """Evict every pod of `node` through the Eviction API, retrying those a
        PodDisruptionBudget holds (HTTP 429) until `deadline` (monotonic)."""
        while time.monotonic() < deadline and not self._stop.is_set():
            left = [r for r in self.node_pods(node) if r.deleting_at is None]
            if not left:
                return
            for r in left:
                self.plane.request(
                    "POST", f"/api/v1/namespaces/{r.namespace}/pods/{r.name}/eviction",
                    {"apiVersion": "policy/v1", "kind": "Eviction",
                     "metadata": {"name": r.name, "namespace": r.namespace}})
            self._stop.wait(1.0)

    def _karpenter(self, node: str, grace: float, _: str) -> None:
        deadline = time.monotonic() + grace
        self.taint(node, "karpenter.sh/disrupted")
        self.evict_all(node, deadline)
        self._wait_until(deadline)
        self.gone(node)

    def _nth(self, node: str, grace: float, how: str) -> None:
        deadline = time.monotonic() + grace
        if how == "nth-taint":
            self.taint(node, "aws-node-termination-handler/spot-itn",
                       value=str(int(time.time())))
        self.cordon(node)
        self.evict_all(node, deadline)
        self._wait_until(deadline)
        self.gone(node)

    def _gke(self, node: str, grace: float, _: str) -> None:
        """A GKE spot preemption: the impending-termination taint, and the kubelet's
        graceful node shutdown (pods marked DisruptionTarget, then stopped with at most
        `grace` - 5 s), the VM gone after `grace`."""
        deadline = time.monotonic() + grace
        self.taint(node, "cloud.google.com/impending-node-termination")
        pod_grace = max(0.0, min(GKE_POD_SHUTDOWN, grace - 5.0))
        for r in self.node_pods(node):
            r.extra_conditions = [{
                "type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
                "message": "Pod was terminated in response to imminent node shutdown.",
                "lastTransitionTime": now_rfc3339()}]
            r.shutdown = ("Terminated",
                          "Pod was terminated in response to imminent node shutdown.")
            own = float(r.spec.get("terminationGracePeriodSeconds", 30))
            if r.deleting_at is None:
                r.deleting_at = time.monotonic() + min(own, pod_grace)
        self._wait_until(deadline)
        self.gone(node)

    def _wait_until(self, deadline: float) -> None:
        self._stop.wait(max(0.0, deadline - time.monotonic()))

    def gone(self, node: str) -> None:
        """The instance is gone: its processes die at once, the Node and its pods go."""
        with self._lock:
            record = self.nodes.get(node)
            if record is None or record.gone:
                return
            record.gone = True
            runners = [r for r in self.pods.values() if r.node == node]
        for r in runners:
            r.kill_now.set()
        for r in runners:
            r.done.wait(10)
        self.history.append((time.time(), "node-gone", node))
        self.plane.request("DELETE", f"/api/v1/nodes/{node}")
        self.plane.request("DELETE", f"/apis/coordination.k8s.io/v1/namespaces/"
                                     f"kube-node-lease/leases/{node}")
        for r in runners:  # the pod garbage collector would, later; the test waits less
            self.plane.request("DELETE", f"/api/v1/namespaces/{r.namespace}/pods/{r.name}",
                               {"kind": "DeleteOptions", "apiVersion": "v1",
                                "gracePeriodSeconds": 0, "preconditions": {"uid": r.uid}})
            with self._lock:
                self.pods.pop(r.uid, None)

    # ---- the cloud: capacity ----------------------------------------------------------------
    def _cloud_loop(self) -> None:
        while not self._stop.wait(0.5):
            with contextlib.suppress(OSError, ValueError):
                self._provision()
                self._consolidate()

    def _provision(self) -> None:
        if not any(p.provision_after is not None for p in self.pools.values()):
            return
        code, data = self.plane.request("GET", "/api/v1/pods?fieldSelector=spec.nodeName%3D")
        if code != 200:
            return
        now = time.monotonic()
        pending = {}
        for pod in data.get("items") or ():
            if pod["metadata"].get("deletionTimestamp"):
                continue
            unschedulable = any(c.get("type") == "PodScheduled" and c.get("reason") ==
                                "Unschedulable" for c in (pod.get("status") or {})
                                .get("conditions") or ())
            if unschedulable:
                pending[pod["metadata"]["uid"]] = pod
        for uid in [u for u in self.claims if u not in pending]:
            self.claims.pop(uid)
        launched: dict[str, int] = {}
        for uid, pod in pending.items():
            if uid in self.claims:
                pool_name, at = self.claims[uid]
                if at and now >= at:
                    self.claims[uid] = (pool_name, 0.0)  # launched; wait for the scheduler
                    launched[pool_name] = launched.get(pool_name, 0) + 1
                continue
            pool = next((p for p in self.pools.values() if p.provision_after is not None and
                         pod_fits(pod, p) and self._room(p)), None)
            if pool is not None:
                self.claims[uid] = (pool.name, now + float(pool.provision_after or 0))
        for pool_name, count in launched.items():
            for _ in range(count):
                if self._room(self.pools[pool_name]):
                    self.add_node(pool_name)

    def _room(self, pool: NodePool) -> bool:
        alive = [n for n in self.nodes.values() if n.pool.name == pool.name and not n.gone]
        return len(alive) < pool.max_nodes

    def _consolidate(self) -> None:
        now = time.monotonic()
        code, data = self.plane.request("GET", "/api/v1/pods")
        if code != 200:
            return
        busy: dict[str, bool] = {}
        for pod in data.get("items") or ():
            node = (pod.get("spec") or {}).get("nodeName")
            if node and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
                busy[node] = True  # any running pod keeps its node (do-not-disrupt or not)
        for node in list(self.nodes.values()):
            if node.gone or node.pool.consolidate_after is None:
                continue
            if busy.get(node.name) or any(c == node.pool.name for c, _ in self.claims.values()):
                node.empty_since = now
            elif now - node.empty_since >= node.pool.consolidate_after:
                self.history.append((time.time(), "consolidated", node.name))
                self.taint(node.name, "karpenter.sh/disrupted")
                self.gone(node.name)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0,
             every: float = 0.2) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what`."""
    give_up = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
