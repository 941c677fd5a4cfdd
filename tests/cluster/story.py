"""spotserve installed for real: `helm install` of the chart into the test cluster, the
operator running as the chart's pod with the chart's ServiceAccount (its RBAC), a tiny
Llama on a PersistentVolume, LLMServices applied with kubectl, and OpenAI requests sent
to the router's Service through its EndpointSlices (there is no kube-proxy)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from spotserve.operator.local.tiny_model import build_tiny_llama

from .agent import KARPENTER, NodeAgent, NodePool, wait_for
from .plane import ROOT, ControlPlane, env_for

CHART = ROOT / "charts" / "spotserve"
HELM = ROOT / ".venv" / "bin" / "helm"
RELEASE, SYSTEM = "spotserve", "spotserve-system"
GROUP_PATH = "/apis/spotserve.dev/v1alpha1"
SYSTEM_POOL = NodePool("system", KARPENTER, instance_type="m5.xlarge", gpus=0,
                       capacity="on-demand", labels={"pool": "system"})


def run(argv: list[str], plane: ControlPlane, check: bool = True,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, env=env_for(plane), capture_output=True, text=True,
                          input=stdin, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv[:3])} failed ({done.returncode}):\n"
                             f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return done


def kubectl(plane: ControlPlane, *args: str, stdin: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    return run([str(plane.bin / "kubectl"), *args], plane, check, stdin)


def helm(plane: ControlPlane, *args: str, check: bool = True
         ) -> subprocess.CompletedProcess[str]:
    return run([str(HELM), *args], plane, check)


@dataclass
class Install:
    """One helm release of spotserve in `plane`, its nodes run by `agent`."""

    plane: ControlPlane
    agent: NodeAgent
    workdir: Path
    claims: Path = field(init=False)

    def __post_init__(self) -> None:
        self.claims = self.workdir / "claims"  # the operator's --model-root

    def install(self, *values: str) -> None:
        self.agent.add_node(SYSTEM_POOL)
        self.claims.mkdir(parents=True, exist_ok=True)
        helm(self.plane, "install", RELEASE, str(CHART), "--namespace", SYSTEM,
             "--create-namespace", "--wait=false",
             "--set", "operator.extraArgs={--model-root=/claims,--interval=1}",
             "--set", "operator.extraVolumes[0].name=claims",
             "--set", f"operator.extraVolumes[0].hostPath.path={self.claims}",
             "--set", "operator.extraVolumeMounts[0].name=claims",
             "--set", "operator.extraVolumeMounts[0].mountPath=/claims",
             "--set", "operator.extraVolumeMounts[0].readOnly=true",
             "--set", "operator.logFormat=text", "--set", "operator.replicas=2", *values)
        wait_for("the operator pods Ready", lambda: len(self.ready_pods(
            SYSTEM, "app.kubernetes.io/name=spotserve")) >= 2, 120)

    # ---- reading the cluster -------------------------------------------------------------
    def get(self, path: str) -> dict[str, Any] | None:
        code, body = self.plane.request("GET", path)
        return body if code == 200 else None

    def pods(self, namespace: str, selector: str = "") -> list[dict[str, Any]]:
        query = f"?labelSelector={urllib.request.quote(selector)}" if selector else ""
        body = self.get(f"/api/v1/namespaces/{namespace}/pods{query}") or {}
        return list(body.get("items") or ())

    def ready_pods(self, namespace: str, selector: str = "") -> list[dict[str, Any]]:
        return [p for p in self.pods(namespace, selector) if any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in (p.get("status") or {}).get("conditions") or ())]

    def llm(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(f"{GROUP_PATH}/namespaces/{namespace}/llmservices/{name}")

    def condition(self, namespace: str, name: str, kind: str) -> bool:
        body = self.llm(namespace, name) or {}
        return any(c.get("type") == kind and c.get("status") == "True"
                   for c in (body.get("status") or {}).get("conditions") or ())

    def endpoints(self, namespace: str, service: str, port: str) -> list[str]:
        """host:port of the Service's ready endpoints, from its EndpointSlices."""
        body = self.get(f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
                        f"?labelSelector=kubernetes.io%2Fservice-name%3D{service}") or {}
        out = []
        for piece in body.get("items") or ():
            ports = [p["port"] for p in piece.get("ports") or () if p.get("name") == port]
            for e in piece.get("endpoints") or ():
                if (e.get("conditions") or {}).get("ready") and ports:
                    out += [f"{a}:{ports[0]}" for a in e.get("addresses") or ()]
        return out

    def operator_log(self) -> str:
        logs = sorted(self.agent.workdir.glob(f"pods/{SYSTEM}_*/operator.log"))
        return "\n".join("\n".join(line for line in p.read_text(errors="replace").splitlines()
                                    if "/healthz" not in line)[-8000:] for p in logs)

    # ---- the model ---------------------------------------------------------------------------
    def model_claim(self, namespace: str, claim: str = "tiny") -> Path:
        """A tiny Llama on a hostPath PersistentVolume, bound to `claim` in `namespace`."""
        folder = build_tiny_llama(self.claims / claim)
        self.plane.request("POST", "/api/v1/persistentvolumes", {
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": f"{namespace}-{claim}"},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"],
                     "storageClassName": "", "hostPath": {"path": str(folder)},
                     "claimRef": {"namespace": namespace, "name": claim}}})
        self.plane.request("POST", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims", {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "",
                     "volumeName": f"{namespace}-{claim}",
                     "resources": {"requests": {"storage": "1Gi"}}}})
        return folder

    def apply(self, manifest: dict[str, Any]) -> None:
        kubectl(self.plane, "apply", "-f", "-", stdin=yaml.safe_dump(manifest))

    # ---- requests ----------------------------------------------------------------------------
    def complete(self, namespace: str, service: str, prompt: str, max_tokens: int = 16,
                 timeout: float = 120.0) -> dict[str, Any]:
        """One OpenAI completion through the router's Service (any ready endpoint);
        retried while no endpoint is ready."""
        give_up = time.monotonic() + timeout
        while True:
            for address in self.endpoints(namespace, service, "http"):
                request = urllib.request.Request(
                    f"http://{address}/v1/completions", method="POST",
                    data=json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                                     "temperature": 0}).encode(),
                    headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=timeout) as reply:
                        return dict(json.loads(reply.read()))
                except urllib.error.HTTPError as exc:
                    body = exc.read().decode(errors="replace")
                    if exc.code < 500:
                        raise AssertionError(f"HTTP {exc.code}: {body}") from exc
                except OSError:
                    pass
            if time.monotonic() > give_up:
                raise AssertionError(f"no answer from {namespace}/{service} in {timeout:.0f} s")
            time.sleep(0.5)


def llm_service(name: str, namespace: str, pools: list[dict[str, Any]], *,
                claim: str = "tiny", minimum: int = 2, maximum: int = 4,
                **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"volume": {"claimName": claim}, "servedName": "tiny", "dtype": "float32"},
        "serving": {"inputTokens": 16, "outputTokens": 16, "maxBatch": 4,
                    "maxSequenceLength": 480},
        "gpuPools": pools, "instances": {"min": minimum, "max": maximum},
        "load": {"requiredRate": 1.0}, **extra}
    return {"apiVersion": "spotserve.dev/v1alpha1", "kind": "LLMService",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def gpu_pool(name: str, node_pool: NodePool, **extra: Any) -> dict[str, Any]:
    selector = ({"karpenter.sh/nodepool": node_pool.name} if node_pool.flavour == KARPENTER
                else {"eks.amazonaws.com/nodegroup": node_pool.name}
                if node_pool.flavour == "eks" else
                {"cloud.google.com/gke-nodepool": node_pool.name})
    # GKE's machine types are not in the catalog: its pools name the GPU and its count
    kind = {"gpuType": "L4", "gpusPerInstance": node_pool.gpus} if node_pool.flavour == "gke" \
        else {"instanceType": node_pool.instance_type}
    return {"name": name, "capacityType": node_pool.capacity, **kind, "maxInstances": 4,
            "nodeSelector": selector, **extra}
