"""The LLMService CRD: its own validity, its examples, and good and bad samples.

Bad samples are patches of a good example; each names the field its error must name. Every
CEL rule in the CRD must be broken by at least one bad sample and by no good one, so a rule
added without a case, or a case that stops reaching its rule, fails here.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from .cel import compile_rule
from .crd_schema import (
    CHART_CRD_PATH,
    CRD_PATH,
    ROOT,
    Rule,
    apply_defaults,
    crd_rules,
    load_crd,
    merge_patch,
    openapi_schema,
    to_jsonschema,
    validate,
    walk_schema,
)

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
K8S_VERSION = "1.30.0"


def _load(path: Path) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text()))


BASE = ROOT / "examples" / "eks-karpenter-spot.yaml"

MINIMAL = {
    "apiVersion": "spotserve.dev/v1alpha1", "kind": "LLMService",
    "metadata": {"name": "tiny", "namespace": "default"},
    "spec": {
        "model": {"huggingFace": {"repoId": "Qwen/Qwen2.5-0.5B-Instruct"}},
        "gpuPools": [{"name": "t4", "capacityType": "spot", "maxInstances": 2}],
        "instances": {"max": 2},
    },
}

GOOD: dict[str, dict[str, Any]] = {
    "volume source": {"spec": {"model": {"huggingFace": None,
                                         "volume": {"claimName": "weights"}}}},
    "url source": {"spec": {"model": {"huggingFace": None,
                                      "url": "s3://models/llama-3.1-8b-instruct/"}}},
    "fixed rate": {"spec": {"load": {"requiredRate": 2.5, "autoscale": None}}},
    "desired instances": {"spec": {"instances": {"min": 1, "max": 4, "desired": 3}}},
    "scale to zero": {"spec": {"instances": {"min": 0, "max": 4, "desired": 0}}},
    "cost with slo": {"spec": {"objective": "cost", "slo": {"latencySeconds": 4}}},
    "no grace": {"spec": {"gracePeriodSeconds": {"aws": 0, "gcp": 0, "azure": 0, "other": 0}}},
    "pool without selector": {"spec": {"gpuPools": [
        {"name": "any-gpu", "capacityType": "on-demand", "maxInstances": 4}]}},
    "one router replica": {"spec": {"router": {"replicas": 1}}},
    "router autoscaled on cpu": {"spec": {"router": {"autoscale": {
        "minReplicas": None, "maxReplicas": 2}}}},
    "router replicas without autoscale": {"spec": {"router": {"autoscale": None,
                                                              "replicas": 4}}},
    "router autoscaled on its queue": {"spec": {"router": {"autoscale": {
        "minReplicas": 3, "maxReplicas": 10, "metric": "queue", "targetQueueDepth": 32}}}},
}

# name -> (patch of BASE, field its error must name)
BAD: dict[str, tuple[dict[str, Any], str]] = {
    "two model sources": ({"spec": {"model": {"url": "s3://b/llama"}}}, "spec.model"),
    "no model source": ({"spec": {"model": {"huggingFace": None}}}, "spec.model"),
    "bad repo id": ({"spec": {"model": {"huggingFace": {"repoId": "llama"}}}},
                    "spec.model.huggingFace.repoId"),
    "ftp url": ({"spec": {"model": {"huggingFace": None, "url": "ftp://x/y"}}},
                "spec.model.url"),
    "volume path escapes": ({"spec": {"model": {"huggingFace": None, "volume": {
        "claimName": "weights", "path": "models/../../etc"}}}}, "spec.model.volume.path"),
    "absolute volume path": ({"spec": {"model": {"huggingFace": None, "volume": {
        "claimName": "weights", "path": "/etc"}}}}, "spec.model.volume.path"),
    "unknown dtype": ({"spec": {"model": {"dtype": "int3"}}}, "spec.model.dtype"),
    "min above max": ({"spec": {"instances": {"min": 3, "max": 2}}}, "spec.instances.min"),
    "desired above max": ({"spec": {"instances": {"desired": 9}}}, "spec.instances.desired"),
    "no max instances": ({"spec": {"instances": {"max": None}}}, "max"),
    "min beyond pools": ({"spec": {"instances": {"min": 5, "max": 8}}}, "spec.instances.min"),
    "negative slo": ({"spec": {"slo": {"latencySeconds": -1}}}, "spec.slo.latencySeconds"),
    "zero slo": ({"spec": {"slo": {"latencySeconds": 0}}}, "spec.slo.latencySeconds"),
    "cost without slo": ({"spec": {"objective": "cost"}}, "spec.slo"),
    "cost without spot price": ({"spec": {"objective": "cost", "slo": {"latencySeconds": 5},
                                          "gpuPools": [{"name": "a", "capacityType": "spot",
                                                        "maxInstances": 4}]}},
                                "spec.gpuPools"),
    "unknown objective": ({"spec": {"objective": "throughput"}}, "spec.objective"),
    "rate and autoscale": ({"spec": {"load": {"requiredRate": 1}}}, "spec.load"),
    "zero rate": ({"spec": {"load": {"autoscale": None, "requiredRate": 0}}},
                  "spec.load.requiredRate"),
    "no pools": ({"spec": {"gpuPools": []}}, "spec.gpuPools"),
    "duplicate pools": ({"spec": {"gpuPools": [
        {"name": "a", "capacityType": "spot", "maxInstances": 4},
        {"name": "a", "capacityType": "on-demand", "maxInstances": 1}]}}, "spec.gpuPools"),
    "unknown fallback pool": ({"spec": {"gpuPools": [
        {"name": "a", "capacityType": "spot", "maxInstances": 4, "fallbackPool": "b"}]}},
        "spec.gpuPools"),
    "pool is its own fallback": ({"spec": {"gpuPools": [
        {"name": "a", "capacityType": "spot", "maxInstances": 4, "fallbackPool": "a"}]}},
        "spec.gpuPools"),
    "capacity type unknown": ({"spec": {"gpuPools": [
        {"name": "a", "capacityType": "preemptible", "maxInstances": 4}]}},
        "spec.gpuPools[0].capacityType"),
    "karpenter label disagrees": ({"spec": {"gpuPools": [
        {"name": "a", "capacityType": "on-demand", "maxInstances": 4,
         "nodeSelector": {"karpenter.sh/capacity-type": "spot"}}]}},
        "spec.gpuPools[0].capacityType"),
    "eks label disagrees": ({"spec": {"gpuPools": [
        {"name": "a", "capacityType": "spot", "maxInstances": 4,
         "nodeSelector": {"eks.amazonaws.com/capacityType": "ON_DEMAND"}}]}},
        "spec.gpuPools[0].capacityType"),
    "gke label disagrees": ({"spec": {"gpuPools": [
        {"name": "a", "capacityType": "on-demand", "maxInstances": 4,
         "nodeSelector": {"cloud.google.com/gke-spot": "true"}}]}},
        "spec.gpuPools[0].capacityType"),
    "bad pool name": ({"spec": {"gpuPools": [
        {"name": "A10G_spot", "capacityType": "spot", "maxInstances": 4}]}},
        "spec.gpuPools[0].name"),
    "sequence shorter than shape": ({"spec": {"serving": {"maxSequenceLength": 1000}}},
                                    "spec.serving.maxSequenceLength"),
    "negative grace": ({"spec": {"gracePeriodSeconds": {"aws": -5}}},
                       "spec.gracePeriodSeconds.aws"),
    "misspelt field": ({"spec": {"gpuPool": []}}, "gpuPool"),
    "string batch": ({"spec": {"serving": {"maxBatch": "16"}}}, "spec.serving.maxBatch"),
    "no router replica": ({"spec": {"router": {"replicas": 0}}}, "spec.router.replicas"),
    "router autoscale min above max": ({"spec": {"router": {"autoscale": {
        "minReplicas": 4, "maxReplicas": 3}}}}, "spec.router.autoscale.minReplicas"),
    "router autoscale default min above max": ({"spec": {"router": {"autoscale": {
        "minReplicas": None, "maxReplicas": 1}}}}, "spec.router.autoscale.minReplicas"),
    "router autoscale without max": ({"spec": {"router": {"autoscale": {
        "minReplicas": 2, "maxReplicas": None}}}}, "maxReplicas"),
    "router autoscale on memory": ({"spec": {"router": {"autoscale": {
        "maxReplicas": 4, "metric": "memory"}}}}, "spec.router.autoscale.metric"),
    "router cpu target over 100%": ({"spec": {"router": {"autoscale": {
        "maxReplicas": 4, "targetCPUUtilization": 150}}}},
        "spec.router.autoscale.targetCPUUtilization"),
}


def _base() -> dict[str, Any]:
    return _load(BASE)


def _problems(obj: dict[str, Any]) -> list[str]:
    return [str(problem) for problem in validate(obj)[1]]


def test_chart_ships_the_same_crd() -> None:
    assert CHART_CRD_PATH.read_bytes() == CRD_PATH.read_bytes(), (
        f"{CHART_CRD_PATH.relative_to(ROOT)} drifted from {CRD_PATH.relative_to(ROOT)}; "
        f"run: cp {CRD_PATH.relative_to(ROOT)} {CHART_CRD_PATH.relative_to(ROOT)}")


def test_crd_is_a_valid_apiextensions_object() -> None:
    kubernetes_validate.validate(load_crd(), K8S_VERSION, strict=True)
    crd = load_crd()
    assert crd["metadata"]["name"] == "llmservices.spotserve.dev"
    assert crd["spec"]["names"]["shortNames"] == ["llms"]
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["storage"]


def test_schema_is_structural() -> None:
    """Every node says its type (or is int-or-string) and every default is valid in place."""
    for path, node in walk_schema(openapi_schema()):
        if path != "metadata":
            assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        if "default" in node:
            default = apply_defaults(node, copy.deepcopy(node["default"]))
            jsonschema.Draft4Validator(to_jsonschema(node)).validate(default)
        if node.get("x-kubernetes-list-type") == "map":
            keys = node["x-kubernetes-list-map-keys"]
            assert set(keys) <= set(node["items"].get("required", [])), path


def _schema_has(path: str) -> bool:
    node: dict[str, Any] | None = openapi_schema()
    for part in path.strip(".").split("."):
        part = part.split("[")[0]
        node = (node or {}).get("properties", {}).get(part)
    return node is not None


def test_printer_columns_and_scale_paths_exist() -> None:
    (version,) = load_crd()["spec"]["versions"]
    for column in version["additionalPrinterColumns"]:
        path = column["jsonPath"].replace('[?(@.type=="Ready")].status', "")
        assert path.startswith(".metadata.") or _schema_has(path), column
    scale = version["subresources"]["scale"]
    for key in ("specReplicasPath", "statusReplicasPath", "labelSelectorPath"):
        assert _schema_has(scale[key]), scale[key]
    names = [column["name"] for column in version["additionalPrinterColumns"]]
    assert names[:5] == ["Ready", "D/P/M", "Spot", "On-Demand", "Migration"]


def test_every_rule_parses() -> None:
    rules = crd_rules()
    assert len(rules) >= 10
    for rule in rules:
        compile_rule(rule.rule)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid(path: Path) -> None:
    obj = _load(path)
    assert obj["kind"] == "LLMService"
    assert _problems(obj) == []


def test_defaults_fill_a_minimal_service() -> None:
    defaulted, problems = validate(MINIMAL)
    assert problems == []
    spec = defaulted["spec"]
    assert spec["objective"] == "latency"
    assert spec["model"]["dtype"] == "auto"
    assert spec["model"]["huggingFace"]["revision"] == "main"
    assert spec["load"] == {"autoscale": {"windowSeconds": 120, "headroom": 1.2}}
    assert spec["instances"] == {"min": 1, "max": 2}
    assert spec["gracePeriodSeconds"] == {"aws": 120, "gcp": 30, "azure": 30, "other": 30}
    assert spec["serving"] == {"inputTokens": 512, "outputTokens": 128, "maxBatch": 8}
    assert spec["worker"] == {"port": 50051, "shmSize": "8Gi"}
    # two routers: no single point of failure unless the user asks for one
    assert spec["router"] == {"replicas": 2, "grpcPort": 50051, "httpPort": 8000,
                              "serviceType": "ClusterIP"}


def test_router_autoscale_defaults_to_cpu_from_two_replicas() -> None:
    obj = merge_patch(copy.deepcopy(MINIMAL), {"spec": {"router": {"autoscale": {
        "maxReplicas": 5}}}})
    defaulted, problems = validate(obj)
    assert problems == []
    assert defaulted["spec"]["router"]["autoscale"] == {
        "minReplicas": 2, "maxReplicas": 5, "metric": "cpu", "targetCPUUtilization": 70,
        "targetQueueDepth": 64}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_sample_is_accepted(name: str) -> None:
    assert _problems(merge_patch(_base(), GOOD[name])) == []


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_sample_is_rejected_naming_the_field(name: str) -> None:
    patch, field = BAD[name]
    problems = _problems(merge_patch(_base(), patch))
    assert problems, f"{name}: accepted"
    assert any(field in problem for problem in problems), (name, problems)


def _fired(obj: dict[str, Any]) -> set[Rule]:
    return {problem.rule for problem in validate(obj)[1] if problem.rule is not None}


def test_every_rule_has_a_bad_case_and_spares_good_ones() -> None:
    fired: set[Rule] = set()
    for patch, _ in BAD.values():
        fired |= _fired(merge_patch(_base(), patch))
    missing = [f"{rule.schema_path}: {rule.rule}" for rule in crd_rules() if rule not in fired]
    assert not missing, f"CEL rules with no bad sample in BAD: {missing}"
    goods = [merge_patch(_base(), patch) for patch in GOOD.values()]
    goods += [_load(path) for path in EXAMPLES] + [MINIMAL]
    assert all(not _fired(obj) for obj in goods)


def test_status_written_by_the_operator_fits_the_schema() -> None:
    obj = _base()
    obj["status"] = {
        "observedGeneration": 3,
        "conditions": [
            {"type": kind, "status": "True", "lastTransitionTime": "2026-11-21T05:00:00Z",
             "reason": "AsPlanned", "message": "", "observedGeneration": 3}
            for kind in ("Ready", "WorkersReady", "RouterReady", "CapacityAvailable")
        ] + [{"type": "Migrating", "status": "True", "reason": "SpotNotice",
              "lastTransitionTime": "2026-11-21T05:01:00Z", "message": "node ip-10-0-1-7"}],
        "parallelism": {
            "current": {"data": 2, "pipeline": 1, "tensor": 4, "batch": 16, "summary": "2/1/4",
                        "stages": [{"firstLayer": 0, "endLayer": 32, "tensor": 4,
                                    "gpuType": "A10G"}]},
            "target": {"data": 1, "pipeline": 1, "tensor": 4, "batch": 16, "summary": "1/1/4"},
        },
        "placement": [{"pipeline": 0, "stage": 0, "tensorRank": rank, "pod": f"llama-8b-w{rank}",
                       "node": "ip-10-0-1-7", "pool": "a10g-spot", "capacityType": "spot",
                       "gpuType": "A10G", "zone": "us-east-1a",
                       "address": f"10.0.1.{20 + rank}:50051"} for rank in range(4)],
        "migration": {"id": "m-0007", "phase": "Transferring", "reason": "Notice",
                      "noticeSource": "aws", "nodes": ["ip-10-0-1-7"],
                      "startedAt": "2026-11-21T05:01:00Z", "deadline": "2026-11-21T05:03:00Z",
                      "bytesPlanned": 8_000_000_000, "bytesMoved": 1_250_000_000},
        "replicas": {"instances": 2, "spotInstances": 2, "onDemandInstances": 0,
                     "pendingInstances": 1, "workers": 8, "readyWorkers": 8},
        "selector": "spotserve.dev/service=llama-8b,app.kubernetes.io/component=worker",
        "endpoint": {"service": "llama-8b-router", "grpc": "llama-8b-router.llm.svc:50051",
                     "http": "http://llama-8b-router.llm.svc:8000/v1"},
        "lastErrors": [{"time": "2026-11-21T04:59:00Z", "reason": "InsufficientCapacity",
                        "field": "spec.gpuPools[0]", "message": "no g5.12xlarge spot in zone"}],
    }
    assert _problems(obj) == []
    obj["status"]["migration"]["phase"] = "Teleporting"
    assert any("status.migration.phase" in p for p in _problems(obj))
