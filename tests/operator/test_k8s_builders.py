"""Pure builders of the Kubernetes operator: manifests, spec validation and status."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from spotserve.operator.k8s import manifests as m
from spotserve.operator.k8s import status as st
from spotserve.operator.k8s.spec import Problem, ServiceSpec, validate

from ..manifests.crd_schema import merge_patch

ROOT = Path(__file__).resolve().parents[2]
CRD = yaml.safe_load((ROOT / "crds" / "llmservices.spotserve.dev.yaml").read_text())
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
OWNER = m.Owner("llama", "llm", "uid-1")
POOL = {"name": "a10g-spot", "capacityType": "spot", "instanceType": "g5.12xlarge",
        "maxInstances": 4, "nodeSelector": {"karpenter.sh/capacity-type": "spot"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                         "effect": "NoSchedule"}]}


def spec(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"huggingFace": {"repoId": "meta-llama/Llama-3.1-8B-Instruct"}},
        "gpuPools": [copy.deepcopy(POOL)], "instances": {"min": 1, "max": 4},
        "serving": {"maxBatch": 4}}
    base.update(changes)
    return base


# ---- manifests --------------------------------------------------------------------------
def test_worker_pod_holds_the_instance_and_is_placed_owned_labelled_with_the_token() -> None:
    """One pod per instance (finding 8): all four GPUs of a g5.12xlarge in one pod, a worker
    process per GPU on ports 50051..50054, placed by the scheduler on the node."""
    eight_b = 16_060_522_496  # Llama-3.1-8B's weights in bf16
    pod = m.worker_pod(OWNER, spec(), POOL, "ip-10-0-0-1", 4, 3, migrating=True,
                       model_bytes=eight_b)
    meta = pod["metadata"]
    assert meta["ownerReferences"][0]["uid"] == "uid-1"
    assert meta["ownerReferences"][0]["kind"] == "LLMService"
    assert meta["labels"]["app.kubernetes.io/component"] == "worker"
    assert meta["labels"]["spotserve.dev/service"] == "llama"
    assert meta["labels"]["app.kubernetes.io/part-of"] == "spotserve"
    assert meta["annotations"] == {"karpenter.sh/do-not-disrupt": "true",
                                   "spotserve.dev/instance": "ip-10-0-0-1"}
    assert meta["name"] == "llama-w-ip-10-0-0-1"
    assert "nodeName" not in pod["spec"]  # the scheduler places it
    terms = pod["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"][0]["values"] == ["ip-10-0-0-1"]
    assert pod["spec"]["nodeSelector"] == {"karpenter.sh/capacity-type": "spot"}
    assert len(pod["spec"]["tolerations"]) == 1
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert "--gpus=4" in container["args"]
    assert [p["containerPort"] for p in container["ports"]] == [50051, 50052, 50053, 50054]
    assert container["readinessProbe"]["grpc"]["port"] == 50051
    # the checkpoint (8B parameters, bf16: 16 GB) lands on the node's disk, declared
    size = container["resources"]["requests"]["ephemeral-storage"]
    assert size == m.model_storage(eight_b) == "18Gi"
    model = next(v for v in pod["spec"]["volumes"] if v["name"] == "model")
    assert model == {"name": "model", "emptyDir": {"sizeLimit": "18Gi"}}
    assert {"name": "token", "secret": {"secretName": "llama-token"}} in pod["spec"]["volumes"]
    assert pod["spec"]["initContainers"][0]["name"] == "download"
    calm = m.worker_pod(OWNER, spec(), POOL, "ip-10-0-0-1", 4, 3)
    assert "karpenter.sh/do-not-disrupt" not in calm["metadata"]["annotations"]
    assert m.disruption_annotation(False)["metadata"]["annotations"] == \
        {"karpenter.sh/do-not-disrupt": None}


def test_names_are_dns_labels_even_for_long_nodes() -> None:
    name = m.dns_name("x" * 80, "router")
    assert len(name) <= 63 and name == m.dns_name("x" * 80, "router")
    assert m.worker_pod_name(OWNER, "Node_A.b") == "llama-w-node-a-b"


def test_volume_model_is_mounted_read_only_without_a_download_step() -> None:
    s = spec(model={"volume": {"claimName": "weights", "path": "Llama-3.1-8B"}})
    pod = m.worker_pod(OWNER, s, POOL, "n", 1, 1, model_bytes=10**9)
    assert pod["spec"]["initContainers"] == []
    assert "ephemeral-storage" not in pod["spec"]["containers"][0]["resources"]["requests"]
    assert "--model=/models/Llama-3.1-8B" in pod["spec"]["containers"][0]["args"]
    claim = next(v for v in pod["spec"]["volumes"] if v["name"] == "model")
    assert claim["persistentVolumeClaim"] == {"claimName": "weights", "readOnly": True}


def test_router_capacity_and_secret() -> None:
    dep = m.router_deployment(OWNER, spec(), "llama")
    svc = m.router_service(OWNER, spec())
    assert dep["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    assert dep["spec"]["template"]["metadata"]["labels"][
        "app.kubernetes.io/component"] == "router"
    assert {p["name"] for p in svc["spec"]["ports"]} == {"grpc", "http"}
    assert m.endpoint(OWNER, spec())["grpc"] == "llama-router.llm.svc:50051"
    # the router fetches the tokenizer and config, never the weights (finding 4)
    router_init = dep["spec"]["template"]["spec"]["initContainers"][0]
    assert "--metadata-only" in router_init["args"]
    # a capacity request is a real worker pod of a whole instance, with no node yet, kept
    # off nodes that hold a pod of this service already (finding 6)
    cap = m.capacity_pod(OWNER, spec(), POOL, 4, 0)
    assert cap["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"] == "g5.12xlarge"
    assert cap["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == 4
    assert cap["spec"]["containers"][0]["args"][:2] == ["worker", "--gpus=4"]
    assert cap["metadata"]["labels"]["app.kubernetes.io/component"] == "capacity"
    anti = cap["spec"]["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["labelSelector"]["matchLabels"]["spotserve.dev/service"] == "llama"
    assert "priorityClassName" not in cap["spec"]
    adopt = m.adopted("ip-1", 5, True)["metadata"]
    assert adopt["labels"]["app.kubernetes.io/component"] == "worker"
    assert adopt["annotations"]["spotserve.dev/instance"] == "ip-1"
    secret = m.token_secret(OWNER, "s3cret")
    assert secret["data"]["token"] == "czNjcmV0"
    assert secret["metadata"]["ownerReferences"][0]["name"] == "llama"


def test_router_runs_two_spread_replicas_by_default_and_the_spec_sets_how_many() -> None:
    dep = m.router_deployment(OWNER, spec(), "llama")
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    spread = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
    assert set(spread) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for constraint in spread.values():
        # a one-node cluster still runs both: spreading is a preference
        assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"
        assert constraint["maxSkew"] == 1
        assert constraint["labelSelector"]["matchLabels"] == \
            dep["spec"]["selector"]["matchLabels"]
    # the CPU request an HPA on utilisation measures against
    assert pod["containers"][0]["resources"]["requests"]["cpu"] == "500m"
    three = m.router_deployment(OWNER, spec(router={"replicas": 3}), "llama")
    assert three["spec"]["replicas"] == 3
    # the user's resources are kept; a CPU limit alone is also the request
    own = m.router_deployment(OWNER, spec(router={"resources": {
        "requests": {"cpu": "2", "memory": "1Gi"}}}), "llama")
    assert own["spec"]["template"]["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "2", "memory": "1Gi"}}
    capped = m.router_deployment(OWNER, spec(router={"resources": {
        "limits": {"cpu": "250m"}}}), "llama")
    assert capped["spec"]["template"]["spec"]["containers"][0]["resources"] == {
        "limits": {"cpu": "250m"}, "requests": {"cpu": "250m"}}


def test_router_placement_keeps_the_charts_and_the_specs_choices() -> None:
    defaults = m.Defaults(router_placement={
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "karpenter.sh/capacity-type", "operator": "NotIn",
                 "values": ["spot"]}]}]}}},
        "nodeSelector": {"kubernetes.io/os": "linux"}})
    toleration = {"key": "cpu-only", "operator": "Exists", "effect": "NoSchedule"}
    pod = m.router_deployment(OWNER, spec(router={"nodeSelector": {"pool": "system"},
                                                  "tolerations": [toleration]}),
                              "llama", defaults)["spec"]["template"]["spec"]
    assert pod["affinity"] == defaults.router_placement["affinity"]  # type: ignore[index]
    assert pod["nodeSelector"] == {"pool": "system"} and pod["tolerations"] == [toleration]
    assert len(pod["topologySpreadConstraints"]) == 2


def test_router_services_public_without_control_and_headless_control() -> None:
    public = m.router_service(OWNER, spec())
    assert [p["name"] for p in public["spec"]["ports"]] == ["grpc", "http"]
    assert m.CONTROL_PORT not in {p["port"] for p in public["spec"]["ports"]}
    assert "control" not in {p["targetPort"] for p in public["spec"]["ports"]}
    control = m.router_control_service(OWNER)
    assert control["metadata"]["name"] == "llama-router-control"
    assert control["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert control["spec"]["clusterIP"] == "None"
    assert control["spec"]["publishNotReadyAddresses"] is True
    assert control["spec"]["ports"] == [{"name": "control", "port": 50061,
                                         "targetPort": "control", "protocol": "TCP"}]
    # it selects the router pods, but is not itself a "router" Service (the routers'
    # ServiceMonitor scrapes those on their http port)
    dep = m.router_deployment(OWNER, spec(), "llama")
    assert control["spec"]["selector"] == dep["spec"]["template"]["metadata"]["labels"]
    assert control["metadata"]["labels"][m.COMPONENT] == "router-control"
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "control", "containerPort": 50061} in container["ports"]


def test_router_disruption_budget_takes_one_replica_at_a_time() -> None:
    budget = m.router_disruption_budget(OWNER)
    assert budget["metadata"]["name"] == "llama-router"
    assert budget["metadata"]["ownerReferences"][0]["kind"] == "LLMService"
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    dep = m.router_deployment(OWNER, spec(), "llama")
    assert budget["spec"]["selector"] == dep["spec"]["selector"]
    assert budget["metadata"]["name"] != m.worker_disruption_budget(OWNER)["metadata"]["name"]


def test_router_autoscaler_on_cpu_or_queue_and_none_without_autoscale() -> None:
    assert m.router_autoscaler(OWNER, spec()) is None
    auto = spec(router={"replicas": 2, "autoscale": {"minReplicas": 3, "maxReplicas": 8}})
    hpa = m.router_autoscaler(OWNER, auto)
    assert hpa is not None and hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "llama-router"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 8)
    (metric,) = hpa["spec"]["metrics"]
    assert metric == {"type": "Resource", "resource": {"name": "cpu", "target": {
        "type": "Utilization", "averageUtilization": 70}}}
    # created with the HPA's minimum, then patched without a count: the HPA's to change
    dep = m.router_deployment(OWNER, auto, "llama")
    assert dep["spec"]["replicas"] == 3
    assert "replicas" not in m.without_replicas(dep)["spec"]
    assert m.without_replicas(dep)["spec"]["template"] == dep["spec"]["template"]
    queue = m.router_autoscaler(OWNER, spec(router={"autoscale": {
        "maxReplicas": 4, "metric": "queue", "targetQueueDepth": 32}}))
    assert queue is not None
    assert queue["spec"]["metrics"] == [{"type": "Pods", "pods": {
        "metric": {"name": "spotserve_num_requests_waiting"},
        "target": {"type": "AverageValue", "averageValue": "32"}}}]
    assert queue["spec"]["minReplicas"] == 2


def test_the_queue_metric_is_one_the_router_exports() -> None:
    from spotserve.operator.router.metrics import RouterMetrics

    metrics = RouterMetrics("llama")
    metrics.set_queue(5, 1)
    assert f"{m.QUEUE_METRIC} 5.0" in metrics.render().decode()


def test_control_addresses_from_endpoint_slices() -> None:
    """Every replica with an address, Ready or not (the Service publishes unready ones: a
    router is Ready only once told its topology), never one terminating."""
    def piece(*endpoints: tuple[str, dict[str, bool]], port: int = 50061,
              kind: str = "IPv4") -> dict[str, Any]:
        return {"addressType": kind, "ports": [{"name": "control", "port": port}],
                "endpoints": [{"addresses": [a], "conditions": c} for a, c in endpoints]}
    slices = [piece(("10.0.0.5", {"ready": True}), ("10.0.0.6", {"ready": False}),
                    ("10.0.0.7", {"ready": False, "terminating": True})),
              piece(("10.0.0.5", {"ready": True})),      # a pod in two slices, for a moment
              piece(("fd00::8", {"ready": True}), kind="IPv6"),
              piece(("router.example", {"ready": True}), kind="FQDN")]
    assert m.control_addresses(slices) == ["10.0.0.5:50061", "10.0.0.6:50061",
                                           "[fd00::8]:50061"]
    assert m.control_addresses([]) == []


def test_sequence_limit_reaches_workers_and_router() -> None:
    limited = {**spec(), "serving": {**spec().get("serving", {}), "maxSequenceLength": 8192}}
    worker = m.worker_pod(OWNER, limited, POOL, "n", 1, 1, model_context=131072)
    assert "--max-model-len=8192" in worker["spec"]["containers"][0]["args"]
    router = m.router_deployment(OWNER, limited, "llama")["spec"]["template"]["spec"]
    assert "--max-context=8192" in router["containers"][0]["args"]
    # unset: the workers take the model's context, as the router does by itself
    unset = {**spec(), "serving": {k: v for k, v in (spec().get("serving") or {}).items()
                                   if k != "maxSequenceLength"}}
    worker = m.worker_pod(OWNER, unset, POOL, "n", 1, 1, model_context=131072)
    assert "--max-model-len=131072" in worker["spec"]["containers"][0]["args"]


def test_pod_manifests_pass_the_kubernetes_schema() -> None:
    validate_k8s = pytest.importorskip("kubernetes_validate")
    for obj in (m.worker_pod(OWNER, spec(), POOL, "n", 4, 1, model_bytes=10**9),
                m.capacity_pod(OWNER, spec(), POOL, 4, 0),
                m.router_deployment(OWNER, spec(), "llama"), m.router_service(OWNER, spec()),
                m.router_control_service(OWNER), m.router_disruption_budget(OWNER),
                m.router_autoscaler(OWNER, spec(router={"autoscale": {"maxReplicas": 4}})),
                m.router_autoscaler(OWNER, spec(router={"autoscale": {
                    "maxReplicas": 4, "metric": "queue"}})),
                m.token_secret(OWNER, "t"), m.worker_disruption_budget(OWNER),
                m.event(OWNER, "Migrating", "why", now="2026-12-03T16:00:00Z")):
        validate_k8s.validate(obj, "1.28", strict=True)


# ---- spec -------------------------------------------------------------------------------
def test_valid_spec_gives_settings() -> None:
    result = validate(spec())
    assert isinstance(result, ServiceSpec)
    assert result.model.name == "llama-3.1-8b" and result.pools[0].name == "a10g-spot"
    assert result.settings.limits.max_batch == 4 and result.grace["aws"] == 120


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_example_validates(example: Path) -> None:
    services = [d for d in yaml.safe_load_all(example.read_text())
                if d and d.get("kind") == "LLMService"]
    assert services
    for doc in services:
        result = validate(doc["spec"])
        assert isinstance(result, ServiceSpec), result
        assert all(p.catalog_type for p in result.pools)


def test_a_pool_of_an_unlisted_instance_type_plans_by_its_gpus() -> None:
    gke = {"name": "l4", "capacityType": "spot", "gpuType": "L4", "gpusPerInstance": 8,
           "instanceType": "g2-standard-96", "maxInstances": 2}
    result = validate(spec(gpuPools=[gke]))
    assert isinstance(result, ServiceSpec)
    assert result.pools[0].catalog_type == "g6.48xlarge"
    cap = m.capacity_pod(OWNER, spec(gpuPools=[gke]), gke, 8, 0)
    assert cap["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"] == "g2-standard-96"


@pytest.mark.parametrize(("changes", "field"), [
    ({"model": {"huggingFace": {"repoId": "acme/unknown-model"}}},
     "spec.model.huggingFace.repoId"),
    ({"model": {"url": "ftp://x"}}, "spec.model.url"),
    ({"model": {}}, "spec.model"),
    ({"instances": {"min": 5, "max": 2}}, "spec.instances.min"),
    ({"gpuPools": [{**POOL, "gpuType": "Z9000"}]}, "spec.gpuPools[0].gpuType"),
    ({"gpuPools": [{**POOL, "instanceType": "m9.huge"}]}, "spec.gpuPools[0].instanceType"),
    ({"gpuPools": [{**POOL, "fallbackPool": "nope"}]}, "spec.gpuPools[0].fallbackPool"),
    ({"slo": {"latencySeconds": -1}}, "spec.slo.latencySeconds"),
    ({"gpuPools": []}, "spec.gpuPools"),
    ({"router": {"replicas": 0}}, "spec.router.replicas"),
    ({"router": {"autoscale": {"minReplicas": 5, "maxReplicas": 2}}},
     "spec.router.autoscale.minReplicas"),
    ({"router": {"autoscale": {"minReplicas": 1}}}, "spec.router.autoscale.maxReplicas"),
    ({"router": {"autoscale": {"maxReplicas": 3, "metric": "memory"}}},
     "spec.router.autoscale.metric"),
])
def test_invalid_specs_name_the_field(changes: dict[str, Any], field: str) -> None:
    result = validate(spec(**changes))
    assert isinstance(result, list)
    assert field in [p.field for p in result], result


def test_garbage_never_raises() -> None:
    for junk in ({"gpuPools": "x"}, {"gpuPools": [1, None]}, {"instances": {"max": "a"}}, {}):
        assert isinstance(validate(junk), list)


# ---- status -----------------------------------------------------------------------------
def status_schema() -> dict[str, Any]:
    return dict(SCHEMA["properties"]["status"])


def test_status_matches_the_crd_and_derives_ready() -> None:
    slots = [st.Slot(0, 0, r, f"p{r}", "n1", "a10g-spot", "spot", "A10G", "us-east-1a",
                     f"10.0.0.{r}:50051", True) for r in range(4)]
    seen = st.Observed(generation=2, now=1_700_000_000, current=st.Shape(1, 1, 4, 8, (
        (0, 32, 4, "A10G"),)), slots=slots, router_ready=True, capacity_available=True,
        migration=st.Migration("e1", "idle", "cold start"), selector=m.selector(OWNER),
        endpoint=m.endpoint(OWNER, spec()), controller={
            "epoch": 1, "phase": "serving", "pipeline_ids": ["e1p0"], "placement": None,
            "view": {"rate": 1.0, "instances": [{"name": "n1", "state": "ready"}]}})
    out = st.build(seen)
    jsonschema.validate(out, status_schema())
    assert out["controller"]["pipeline_ids"] == ["e1p0"]
    kinds = {c["type"]: c["status"] for c in out["conditions"]}
    assert set(kinds) == set(st.CONDITIONS)
    assert kinds["Ready"] == "True" and kinds["Migrating"] == "False"
    assert out["parallelism"]["current"]["summary"] == "1/1/4"
    assert out["replicas"]["instances"] == 1 and out["replicas"]["readyWorkers"] == 4
    moving = st.build(st.Observed(generation=2, now=1_700_000_100, slots=[
        *slots[:3], st.Slot(0, 0, 3, "p3", "n1", "a10g-spot", "spot", "A10G", "", "", False)],
        router_ready=True, capacity_available=True,
        migration=st.Migration("e2", "draining", "notice on n1", "aws", ("n1",),
                               1_700_000_050, 1_700_000_170, 10, 0)), out)
    jsonschema.validate(moving, status_schema())
    kinds = {c["type"]: c for c in moving["conditions"]}
    assert kinds["Ready"]["status"] == "False" and kinds["Migrating"]["status"] == "True"
    assert kinds["RouterReady"]["lastTransitionTime"] == \
        next(c for c in out["conditions"] if c["type"] == "RouterReady")["lastTransitionTime"]
    assert moving["migration"]["phase"] == "Draining"
    assert moving["migration"]["deadline"].endswith("Z")


def test_merge_patch_turns_the_old_controller_state_into_the_new_one() -> None:
    apply = merge_patch  # as the API server applies it
    old = {"epoch": 3, "phase": "draining", "placement": {"batch": 4, "pipelines": [1]},
           "view": {"rate": 2.0, "instances": [{"name": "a"}, {"name": "b"}]},
           "extra": {"gone": True}}
    new = {"epoch": 4, "phase": "serving", "placement": {"pipelines": [2]},
           "view": {"rate": 2.0, "instances": [{"name": "a", "deadline": None}]}}
    assert apply(old, st.merge_patch(old, new)) == {
        **new, "view": {"rate": 2.0, "instances": [{"name": "a", "deadline": None}]}}
    # no placement any more: the key goes, and ControllerState reads a missing key as None
    assert "placement" not in apply(old, st.merge_patch(old, {**new, "placement": None}))
    assert st.merge_patch(None, new) == new


def test_degraded_names_the_field_and_keeps_ten_errors() -> None:
    problems = [Problem("spec.instances.min", "min must not exceed spec.instances.max")]
    out = st.build(st.Observed(generation=1, now=0, problems=problems))
    jsonschema.validate(out, status_schema())
    degraded = next(c for c in out["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "InvalidSpecInstancesMin"
    assert "spec.instances.min" in degraded["message"]
    assert out["lastErrors"][0]["field"] == "spec.instances.min"
    failing = st.build(st.Observed(generation=1, now=0, failures=[
        Problem("status.migration", "Configure 10.0.0.1:50051: unavailable")]), out)
    assert {c["type"]: c["status"] for c in failing["conditions"]}["Degraded"] == "False"
    assert [e["field"] for e in failing["lastErrors"]] == ["status.migration",
                                                         "spec.instances.min"]
    many = [{"time": "x", "reason": "R", "field": f"f{i}", "message": "m"} for i in range(12)]
    assert len(st.error_entries(problems, 0, many)) == 10


# ---- cli --------------------------------------------------------------------------------
def test_cli_reads_the_charts_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from spotserve.operator.k8s import cli

    monkeypatch.setenv("SPOTSERVE_WATCH_NAMESPACES", "llm,team-b")
    monkeypatch.setenv("SPOTSERVE_HEALTH_PORT", "8081")
    monkeypatch.setenv("SPOTSERVE_WORKER_IMAGE", "registry/worker:1")
    monkeypatch.setenv("SPOTSERVE_ROUTER_PLACEMENT", '{"nodeSelector": {"pool": "cpu"}}')
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args([])
    assert args.namespace == ["llm", "team-b"] and args.health_port == 8081
    defaults = m.Defaults(**cli.defaults_from_env())  # type: ignore[arg-type]
    assert defaults.worker_image == "registry/worker:1"
    pod = m.router_deployment(OWNER, spec(), "llama", defaults)
    assert pod["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "cpu"}


def test_a_volume_checkpoint_of_an_unsupported_architecture_says_which(tmp_path: Path) -> None:
    """The operator reads the config.json of a model on a volume: an architecture the
    engine cannot serve is named in the problem (the service's Degraded reason), even when
    the path looks like a built-in model's name."""
    folder = tmp_path / "claims" / "models" / "llama-3.1-8b"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 12}))
    volume = {"volume": {"claimName": "models", "path": "llama-3.1-8b"}}
    result = validate(spec(model=volume), model_root=tmp_path / "claims")
    assert isinstance(result, list)
    problem = next(p for p in result if p.field == "spec.model.volume.path")
    assert "unsupported architecture" in problem.message and "GPT2LMHeadModel" in problem.message
