"""An LLMService spec → the controller's settings, or the problems that stop it (pure).

The API server's schema and CEL rules reject most bad objects; this catches what they
cannot know (a model shape or GPU type the operator does not know, a pool the catalog
cannot place) and what slipped past an older CRD. Each problem names its field, so the
`Degraded` condition and `status.lastErrors` point at it; nothing here raises.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spotserve.catalog import Catalog
from spotserve.errors import SpotserveError
from spotserve.model_spec import ModelSpec
from spotserve.models import resolve_model

from ..controller.controller import ControllerSettings
from ..planner.cost_model import Workload
from ..planner.heterogeneous import HeteroLimits
from ..planner.homogeneous import SearchLimits
from ..planner.roofline import RooflineCostModel
from .nodes import grace_periods

URL = r"^(https|s3|gs)://\S+$"   # what a `url` source may be

@dataclass(frozen=True)
class Problem:
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


@dataclass(frozen=True)
class Pool:
    name: str
    capacity: str                  # spot | on-demand
    max_instances: int
    gpu_type: str | None = None
    instance_type: str | None = None
    gpus_per_instance: int | None = None
    price: float | None = None
    fallback: str | None = None
    node_selector: Mapping[str, str] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict)
    catalog_type: str = ""  # the catalog instance type the planner prices and sizes it as

    def accepts(self, labels: Mapping[str, str]) -> bool:
        """Whether a node with these labels belongs to this pool (its nodeSelector)."""
        return all(labels.get(k) == v for k, v in self.node_selector.items())


@dataclass(frozen=True)
class ServiceSpec:
    """A validated LLMService spec."""

    model: ModelSpec
    model_name: str
    pools: tuple[Pool, ...]
    min_instances: int
    max_instances: int
    desired_instances: int | None
    required_rate: float | None
    autoscale_window: float
    autoscale_headroom: float
    grace: Mapping[str, float]
    settings: ControllerSettings


def _model_key(text: str) -> str:
    """'meta-llama/Llama-3.1-8B-Instruct' → 'llama-3.1-8b' (a built-in model's name)."""
    base = text.rstrip("/").rpartition("/")[2].lower()
    return re.sub(r"-(instruct|chat|hf|base)$", "", base)


def hub_source(model: Mapping[str, Any]) -> tuple[str, str] | None:
    """(repository, revision) of a Hugging Face source whose config.json the operator must
    fetch (`model_config`): its name is not a built-in model's."""
    source = model.get("huggingFace") if isinstance(model, Mapping) else None
    if not isinstance(source, Mapping) or not source.get("repoId") or \
            model_of(model)[0] is not None:
        return None
    return str(source["repoId"]), str(source.get("revision") or "main")


def url_source(model: Mapping[str, Any]) -> str | None:
    """The URL of a `url` source whose config.json the operator must fetch: neither its
    path nor its servedName names a built-in model."""
    url = model.get("url") if isinstance(model, Mapping) else None
    if not isinstance(url, str) or not re.match(URL, url) or model_of(model)[0] is not None:
        return None
    return url


def model_of(model: Mapping[str, Any], model_root: Path | None = None,
             fetched: Mapping[str, Any] | None = None, fetch_error: str | None = None
             ) -> tuple[ModelSpec | None, list[Problem]]:
    """The model's shape: the checkpoint's own config.json when there is one (a volume's,
    read through `model_root`, where the operator sees volume claims as folders; a Hugging
    Face repository's, `fetched`), else a built-in model named by the source. `fetch_error`
    says why a repository's config could not be had."""
    sources = [k for k in ("volume", "huggingFace", "url") if model.get(k)]
    if len(sources) != 1:
        return None, [Problem("spec.model", "exactly one of volume, huggingFace and url "
                              f"must be set (got {', '.join(sources) or 'none'})")]
    where = {"volume": "spec.model.volume.path", "huggingFace": "spec.model.huggingFace.repoId",
             "url": "spec.model.url"}[sources[0]]
    source = model[sources[0]]
    text = str(source.get("path") or source.get("claimName") or "") if sources[0] == "volume" \
        else str(source.get("repoId", "")) if sources[0] == "huggingFace" else str(source)
    if sources[0] == "url" and not re.match(URL, text):
        return None, [Problem(where, f"{text!r} is not an https://, s3:// or gs:// URL")]
    dtype = str(model.get("dtype") or "auto")
    candidates = [_model_key(text), _model_key(str(model.get("servedName") or ""))]
    if model_root is not None and sources[0] == "volume":
        folder = model_root / str(source.get("claimName", "")) / str(source.get("path") or ".")
        if (folder / "config.json").is_file():   # the checkpoint's own word is final
            try:
                return resolve_model(str(folder), None if dtype == "auto" else dtype), []
            except (SpotserveError, OSError, ValueError) as exc:
                return None, [Problem(where, f"the model's config.json: {exc}")]
    if fetched is not None:
        try:
            spec = ModelSpec.from_hf_config(fetched, name=_name_in(text),
                                            dtype=None if dtype == "auto" else dtype)
        except (SpotserveError, ValueError) as exc:
            return None, [Problem(where, f"{text}'s config.json: {exc}")]
        if not spec.is_llama_family:
            return None, [Problem(where, f"{text}: family {spec.family!r} cannot be served by "
                                  "the engine")]
        return spec, []
    for key in filter(None, candidates):
        try:
            return resolve_model(key, None if dtype == "auto" else dtype), []
        except (SpotserveError, OSError, ValueError):
            continue
    why = f": {fetch_error}" if fetch_error else ""
    return None, [Problem(where, f"model {text!r} has no shape the operator knows{why} (name a "
                          "built-in model such as llama-3.1-8b in the path or servedName)")]


def _name_in(text: str) -> str:
    """A model's name from its source: a repository's, a URL's last part (no archive
    suffix)."""
    last = text.rstrip("/").rpartition("/")[2] or text
    for suffix in (".tar.gz", ".tgz", ".tar", ".zip"):
        last = last.removesuffix(suffix)
    return last


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _catalog_type(catalog: Catalog, instance: Any, gpu: Any, gpus: int | None) -> str | None:
    """A pool's catalog instance type: its own, else the first with its GPU type (and
    count), so a pool of a cloud the catalog lacks (GKE's g2-standard-96) still plans."""
    if instance and instance in catalog.instances:
        return str(instance)
    if not gpu:
        return None
    try:
        kinds = catalog.instances_with(str(gpu), gpus)
    except SpotserveError:
        return None
    return kinds[0].name if kinds else None


def pools_of(spec: Mapping[str, Any], catalog: Catalog) -> tuple[list[Pool], list[Problem]]:
    raw = spec.get("gpuPools")
    if not isinstance(raw, list) or not raw:
        return [], [Problem("spec.gpuPools", "at least one GPU pool is required")]
    pools, problems = [], []
    names = [str(p.get("name", "")) for p in raw if isinstance(p, Mapping)]
    for i, entry in enumerate(raw):
        where = f"spec.gpuPools[{i}]"
        if not isinstance(entry, Mapping):
            problems.append(Problem(where, "must be an object"))
            continue
        name, capacity = str(entry.get("name", "")), str(entry.get("capacityType", ""))
        if names.count(name) > 1:
            problems.append(Problem(f"{where}.name", f"pool {name!r} is listed twice"))
        if capacity not in ("spot", "on-demand"):
            problems.append(Problem(f"{where}.capacityType", f"{capacity!r} is not spot or "
                                    "on-demand"))
        gpu, instance = entry.get("gpuType"), entry.get("instanceType")
        if gpu:
            try:
                gpu = catalog.gpu(str(gpu)).name
            except SpotserveError:
                problems.append(Problem(f"{where}.gpuType", f"unknown GPU type {gpu!r}"))
        per_instance = int(entry["gpusPerInstance"]) if entry.get("gpusPerInstance") else None
        kind = _catalog_type(catalog, instance, gpu, per_instance)
        if instance and not kind:
            problems.append(Problem(f"{where}.instanceType", f"unknown instance type "
                                    f"{instance!r} (set a known gpuType and gpusPerInstance)"))
        elif gpu and not kind:
            problems.append(Problem(f"{where}.gpusPerInstance",
                                    f"no catalog instance has {per_instance} × {gpu}"))
        if not gpu and not instance:
            problems.append(Problem(f"{where}.gpuType", "set gpuType or instanceType"))
        fallback = entry.get("fallbackPool")
        if fallback and (fallback == name or fallback not in names):
            problems.append(Problem(f"{where}.fallbackPool",
                                    f"unknown pool {fallback!r} (must be another pool)"))
        maximum = _number(entry.get("maxInstances"))
        if maximum is None or maximum < 0:
            problems.append(Problem(f"{where}.maxInstances", "must be a number ≥ 0"))
        price = _number(entry.get("pricePerHour"))
        if entry.get("pricePerHour") is not None and (price is None or price < 0):
            problems.append(Problem(f"{where}.pricePerHour", "must be a number ≥ 0"))
        pools.append(Pool(name, capacity, int(maximum or 0), str(gpu) if gpu else None,
                          str(instance) if instance else None, per_instance, price,
                          str(fallback) if fallback else None,
                          {str(k): str(v) for k, v in (entry.get("nodeSelector") or {}).items()},
                          dict(entry), kind or ""))
    return pools, problems


def _instances(spec: Mapping[str, Any], pools: list[Pool]
               ) -> tuple[tuple[int, int, int | None], list[Problem]]:
    inst = spec.get("instances") or {}
    low, high = _number(inst.get("min", 1)), _number(inst.get("max"))
    desired = _number(inst.get("desired"))
    problems = []
    if high is None or high < 0:
        problems.append(Problem("spec.instances.max", "must be a number ≥ 0"))
    if low is None or low < 0:
        problems.append(Problem("spec.instances.min", "must be a number ≥ 0"))
    elif high is not None and low > high:
        problems.append(Problem("spec.instances.min",
                                "min must not exceed spec.instances.max"))
    elif pools and low > sum(p.max_instances for p in pools):
        problems.append(Problem("spec.instances.min", "min exceeds the pools' maxInstances"))
    if desired is not None and (low is None or high is None or not low <= desired <= high):
        problems.append(Problem("spec.instances.desired", "must lie in [min, max]"))
    return (int(low or 0), int(high or 0), int(desired) if desired is not None else None), \
        problems


def _load_and_slo(spec: Mapping[str, Any]) -> tuple[float | None, float | None, list[Problem]]:
    problems = []
    rate = _number((spec.get("load") or {}).get("requiredRate"))
    if (spec.get("load") or {}).get("requiredRate") is not None and (rate is None or rate <= 0):
        problems.append(Problem("spec.load.requiredRate", "must be a number > 0"))
    slo = spec.get("slo")
    latency = _number((slo or {}).get("latencySeconds")) if slo is not None else None
    if slo is not None and (latency is None or latency <= 0):
        problems.append(Problem("spec.slo.latencySeconds", "must be a number > 0"))
    if spec.get("objective") == "cost" and slo is None:
        problems.append(Problem("spec.slo", "objective cost needs slo.latencySeconds"))
    return rate, latency, problems


def _whole(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def router_problems(spec: Mapping[str, Any]) -> list[Problem]:
    """`spec.router.replicas` and `.autoscale` (the CRD checks them too; an older CRD
    may not)."""
    router = spec.get("router") or {}
    if not isinstance(router, Mapping):
        return [Problem("spec.router", "must be an object")]
    problems = []
    replicas = router.get("replicas")
    if replicas is not None and ((_whole(replicas) or 0) < 1):
        problems.append(Problem("spec.router.replicas", "must be an integer ≥ 1"))
    auto = router.get("autoscale")
    if auto is None:
        return problems
    if not isinstance(auto, Mapping):
        return [*problems, Problem("spec.router.autoscale", "must be an object")]
    where = "spec.router.autoscale"
    low, high = _whole(auto.get("minReplicas", 2)), _whole(auto.get("maxReplicas"))
    if (low or 0) < 1:
        problems.append(Problem(f"{where}.minReplicas", "must be an integer ≥ 1"))
    if high is None or high < 1:
        problems.append(Problem(f"{where}.maxReplicas", "must be an integer ≥ 1 (required)"))
    elif (low or 0) > high:
        problems.append(Problem(f"{where}.minReplicas",
                                f"minReplicas ({low}) must not exceed maxReplicas ({high})"))
    if str(auto.get("metric") or "cpu") not in ("cpu", "queue"):
        problems.append(Problem(f"{where}.metric",
                                f"{auto.get('metric')!r} is not cpu or queue"))
    for name in ("targetCPUUtilization", "targetQueueDepth"):
        if auto.get(name) is not None and (_whole(auto[name]) or 0) < 1:
            problems.append(Problem(f"{where}.{name}", "must be an integer ≥ 1"))
    return problems


def validate(spec: Mapping[str, Any], catalog: Catalog | None = None,
             model_root: Path | None = None, fetched: Mapping[str, Any] | None = None,
             fetch_error: str | None = None) -> ServiceSpec | list[Problem]:
    """The validated spec, or every problem found (never raises on bad input). `fetched`
    and `fetch_error`: a Hugging Face source's config.json, or why it could not be had."""
    catalog = catalog or Catalog.load()
    if not isinstance(spec, Mapping):
        return [Problem("spec", "must be an object")]
    model, problems = model_of(spec.get("model") or {}, model_root, fetched, fetch_error)
    pools, more = pools_of(spec, catalog)
    problems += more
    (low, high, desired), more = _instances(spec, pools)
    problems += more
    rate, latency, more = _load_and_slo(spec)
    problems += more
    problems += router_problems(spec)
    serving = spec.get("serving") or {}
    workload = Workload(int(serving.get("inputTokens") or 512),
                        int(serving.get("outputTokens") or 128))
    if problems or model is None:
        return problems or [Problem("spec.model", "no model")]
    batch = int(serving.get("maxBatch") or 8)
    slo_ms = latency * 1000 if latency is not None else None
    prices = {p.catalog_type: p.price for p in pools
              if p.capacity == "spot" and p.catalog_type and p.price is not None}
    settings = ControllerSettings(
        model=model, cost=RooflineCostModel(model), catalog=catalog, workload=workload,
        limits=SearchLimits(max_batch=batch), spot_prices=prices,
        hetero=HeteroLimits(max_batch=batch, latency_slo_ms=slo_ms),
        grace_seconds=grace_periods(spec.get("gracePeriodSeconds"))["other"],
        replacement_capacity="spot", max_instances=desired or high)
    name = str((spec.get("model") or {}).get("servedName") or model.name)
    autoscale = (spec.get("load") or {}).get("autoscale") or {}
    window = _number(autoscale.get("windowSeconds")) or 120.0
    headroom = _number(autoscale.get("headroom")) or 1.2
    return ServiceSpec(model, name, tuple(pools), low, high, desired, rate, window, headroom,
                       grace_periods(spec.get("gracePeriodSeconds")), settings)
