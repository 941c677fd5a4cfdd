"""The Helm chart: `helm lint`, `helm template` with default and example values, and the
rendered manifests checked offline with kubernetes-validate --strict plus our own rules
(least-privilege RBAC, the operator's placement and security context, optional objects).

`make install` puts helm into .venv/bin (scripts/install-helm.sh); without it these skip.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from .crd_schema import ROOT, validate

CHART = ROOT / "charts" / "spotserve"
HELM_VALUES = sorted((ROOT / "examples" / "helm").glob("*.yaml"))
# The chart's minimum Kubernetes (Chart.yaml kubeVersion) and the newest schemas shipped.
K8S_VERSIONS = ("1.28.0", kubernetes_validate.utils.latest_version())
# Kinds from CRDs that kubernetes-validate has no schema for: checked by hand below.
THIRD_PARTY = {("monitoring.coreos.com/v1", "ServiceMonitor")}

VALUE_SETS: dict[str, list[str]] = {
    "default": [],
    **{path.stem: ["-f", str(path)] for path in HELM_VALUES},
    "everything": ["--set", "networkPolicy.enabled=true", "--set", "serviceMonitor.enabled=true",
                   "--set", "operator.watchNamespaces={llm,batch}",
                   "--set", "auth.existingSecret=my-token", "--set", "image.tag=dev"],
}


@cache
def _helm() -> str | None:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which("helm", path=path)


@pytest.fixture
def helm() -> str:
    found = _helm()
    if found is None:
        pytest.skip("helm is not installed; run: bash scripts/install-helm.sh .venv/bin")
    return found


def _run(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


@cache
def _render(helm: str, value_set: str) -> list[dict[str, Any]]:
    out = _run(helm, "template", "spotserve", str(CHART), "--namespace", "spotserve-system",
               "--include-crds", *VALUE_SETS[value_set])
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def _kinds(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def _deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = _kinds(docs, "Deployment")
    return deployment


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_helm_lint(helm: str, value_set: str) -> None:
    out = _run(helm, "lint", "--strict", str(CHART), *VALUE_SETS[value_set])
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_rendered_manifests_are_valid(helm: str, value_set: str, version: str) -> None:
    for doc in _render(helm, value_set):
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if (doc["apiVersion"], doc["kind"]) in THIRD_PARTY:
            assert doc["spec"]["endpoints"] and doc["spec"]["selector"]["matchLabels"], where
        elif doc["apiVersion"].startswith("spotserve.dev/"):
            assert validate(doc)[1] == [], where
        else:
            kubernetes_validate.validate(doc, version, strict=True)


def test_kubernetes_validate_cli_passes_the_default_render(helm: str, tmp_path: Path) -> None:
    """The same check as the command line a user would run on `helm template` output."""
    cli = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent))
    if cli is None:
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate)")
    docs = [doc for doc in _render(helm, "default")
            if (doc["apiVersion"], doc["kind"]) not in THIRD_PARTY]
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(docs))
    out = subprocess.run([cli, "--strict", "--kubernetes-version", K8S_VERSIONS[-1],
                          str(rendered)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_strict_validation_catches_a_misspelt_field(helm: str) -> None:
    """A negative control: the offline schemas do reject an unknown field."""
    deployment = _deployment(_render(helm, "default"))
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_chart_installs_the_crd(helm: str) -> None:
    crds = {c["metadata"]["name"] for c in _kinds(_render(helm, "default"),
                                                  "CustomResourceDefinition")}
    # and kopf's peering resources, for operator.replicas > 1
    assert crds == {"llmservices.spotserve.dev", "clusterkopfpeerings.kopf.dev",
                    "kopfpeerings.kopf.dev"}


def test_optional_objects_render_only_when_enabled(helm: str) -> None:
    default = _render(helm, "default")
    assert not _kinds(default, "NetworkPolicy") and not _kinds(default, "ServiceMonitor")
    everything = _render(helm, "everything")
    policies = _kinds(everything, "NetworkPolicy")
    assert sorted(p["metadata"]["namespace"] for p in policies) == ["batch", "llm"]
    assert len(_kinds(everything, "ServiceMonitor")) == 2


def test_network_policy_admits_only_router_operator_and_workers(helm: str) -> None:
    (policy, _) = _kinds(_render(helm, "everything"), "NetworkPolicy")
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"
    assert spec["policyTypes"] == ["Ingress"]
    peers = [peer for rule in spec["ingress"] for peer in rule["from"]]
    components = {peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
                  for peer in peers}
    assert components == {"worker", "router", "operator"}
    operator_peer = next(p for p in peers if "namespaceSelector" in p)
    assert operator_peer["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "spotserve-system"}


def _rules(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [rule for role in _kinds(docs, kind) for rule in role["rules"]]


def _verbs(rules: list[dict[str, Any]], resource: str) -> set[str]:
    return {verb for rule in rules if resource in rule["resources"] for verb in rule["verbs"]}


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_rbac_is_least_privilege(helm: str, value_set: str) -> None:
    docs = _render(helm, value_set)
    rules = _rules(docs, "ClusterRole") + _rules(docs, "Role")
    for rule in rules:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
        assert not {"update", "deletecollection", "escalate", "bind", "impersonate"} & set(
            rule["verbs"]), rule
    assert _verbs(rules, "nodes") == {"get", "list", "watch"}
    assert _verbs(rules, "secrets") == {"create", "patch"}
    assert _verbs(rules, "llmservices/status") == {"get", "patch"}
    assert _verbs(rules, "pods") == {"get", "list", "watch", "create", "patch", "delete"}
    assert "delete" not in _verbs(rules, "deployments") | _verbs(rules, "services")
    # the router replicas: found through their control Service's EndpointSlices (read
    # only), a budget beside the workers', an HPA deleted when autoscale is removed
    assert _verbs(rules, "endpointslices") == {"get", "list", "watch"}
    assert _verbs(rules, "poddisruptionbudgets") == {"create", "patch"}
    assert _verbs(rules, "horizontalpodautoscalers") == {"create", "patch", "delete"}
    groups = {r["resources"][0]: r["apiGroups"] for r in rules if len(r["resources"]) == 1}
    assert groups["endpointslices"] == ["discovery.k8s.io"]
    assert groups["horizontalpodautoscalers"] == ["autoscaling"]


def test_watched_namespaces_get_roles_not_cluster_wide_pods(helm: str) -> None:
    """With watched namespaces, pods are written only there; cluster-wide the operator may
    only list them (the GPUs other teams' pods hold on shared nodes)."""
    docs = _render(helm, "everything")
    assert _verbs(_rules(docs, "ClusterRole"), "pods") == {"list"}
    roles = _kinds(docs, "Role")
    assert sorted(role["metadata"]["namespace"] for role in roles) == ["batch", "llm"]
    assert all(_verbs(role["rules"], "pods") for role in roles)
    bindings = _kinds(docs, "RoleBinding")
    assert {b["subjects"][0]["namespace"] for b in bindings} == {"spotserve-system"}


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_operator_runs_non_root_on_on_demand_nodes(helm: str, value_set: str) -> None:
    deployment = _deployment(_render(helm, value_set))
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][0] == "operator"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    excluded = {e["key"]: e["values"] for e in term["matchExpressions"] if e["operator"] == "NotIn"}
    assert excluded["karpenter.sh/capacity-type"] == ["spot"]
    assert excluded["eks.amazonaws.com/capacityType"] == ["SPOT"]
    assert excluded["cloud.google.com/gke-spot"] == ["true"]


def test_operator_configuration_reaches_the_pod(helm: str) -> None:
    pod = _deployment(_render(helm, "everything"))["spec"]["template"]["spec"]
    env = {item["name"]: item.get("value") for item in pod["containers"][0]["env"]}
    assert env["SPOTSERVE_WATCH_NAMESPACES"] == "llm,batch"
    assert env["SPOTSERVE_WORKER_IMAGE"] == "ghcr.io/spotserve/spotserve-worker:0.1.0"
    assert env["SPOTSERVE_ROUTER_IMAGE"] == "ghcr.io/spotserve/spotserve-operator:dev"
    assert env["SPOTSERVE_TOKEN_SECRET"] == "my-token"
    assert yaml.safe_load(env["SPOTSERVE_ROUTER_PLACEMENT"])["nodeSelector"]
    (token,) = [v for v in pod["volumes"] if v["name"] == "token"]
    assert token["secret"]["secretName"] == "my-token"


def test_several_operator_replicas_use_kopf_peering(helm: str) -> None:
    out = _run(helm, "template", "spotserve", str(CHART), "--set", "operator.replicas=2")
    assert out.returncode == 0, out.stderr
    objects = [o for o in yaml.safe_load_all(out.stdout) if o]
    (peering,) = [o for o in objects if o["kind"] == "ClusterKopfPeering"]
    deployment = _deployment(objects)
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SPOTSERVE_PEERING"]["value"] == peering["metadata"]["name"]
    assert _deployment(_render(helm, "default"))["spec"]["strategy"]["type"] == "Recreate"


def test_shared_token_is_generated_unless_given(helm: str) -> None:
    (secret,) = _kinds(_render(helm, "default"), "Secret")
    assert len(base64.b64decode(secret["data"]["token"])) == 48
    assert not _kinds(_render(helm, "everything"), "Secret")
    template = (CHART / "templates" / "secret.yaml").read_text()
    assert "lookup" in template, "the token must be read back on upgrade"


@pytest.mark.parametrize("bad", ["image.pullPolicy=Sometimes", "operator.replicas=0",
                                 "networkPolicy.workerPort=0", "operator.logLevel=loud"])
def test_values_schema_rejects(helm: str, bad: str) -> None:
    out = _run(helm, "template", "spotserve", str(CHART), "--set", bad)
    assert out.returncode != 0
    assert bad.split("=")[0].split(".")[-1] in out.stderr
