"""Plan input: `PlanRequest` and its parsing from a YAML/JSON document.

Document format (every key but `model` and `cluster` optional; paths are relative to the
file):

    model: opt-6.7b            # built-in name or a HF config.json (or its folder)
    dtype: float32
    rate: 2.0                  # required requests/s (α)
    input_tokens: 512
    output_tokens: 128
    grace_seconds: 30          # notice → termination, for doomed instances
    max_batch: 4
    min_gpus_per_replica: 4
    max_tp: 8
    profile: megatron_6.7B_profile.json   # SpotServe profile table (else roofline)
    profile_gpu: T4
    strategy: auto             # auto | homogeneous | heterogeneous
    fill: true                 # use every instance (SpotServe) or the fewest reaching α
    tp_across_instances: true
    latency_slo_s: 20
    extra_capacity: on-demand
    catalog: my-catalog.yaml
    cluster:
      spot_prices: {g4dn.12xlarge: 1.9046}
      instances:
        - {name: node-0, type: g4dn.12xlarge, capacity: spot, zone: us-east-1a,
           state: running}
    current:                   # the running placement (the `pipelines` of `plan --json`)
      batch: 4
      pipelines:
        - stages: [{layers: [0, 32], tp: 4, gpus: [node-0/0, node-0/1, node-0/2, node-0/3]}]
          progress: {cached_tokens: 2300, remaining_steps: 60, decode_step_ms: 35}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from spotserve.catalog import Catalog
from spotserve.errors import SpotserveError
from spotserve.layout import ParallelConfig, PipelineLayout, Position, StageLayout
from spotserve.model_spec import ModelSpec
from spotserve.models import resolve_model

from .cluster import CurrentState, GpuId, Instance, PipelineProgress, Placement
from .cost_model import CostModel, Workload
from .heterogeneous import HeteroLimits
from .homogeneous import SearchLimits
from .profile_table import ProfileCostModel, ProfileTable
from .roofline import RooflineCostModel

STRATEGIES = ("auto", "homogeneous", "heterogeneous")


@dataclass(frozen=True)
class PlanRequest:
    """Everything `plan` needs. Build it directly, or with `parse_request`/`load_request`."""

    model: ModelSpec
    instances: tuple[Instance, ...]
    cost: CostModel
    rate: float = 0.0
    workload: Workload = field(default_factory=Workload)
    grace_seconds: float = 30.0
    limits: SearchLimits = field(default_factory=SearchLimits)
    hetero: HeteroLimits = field(default_factory=HeteroLimits)
    strategy: str = "auto"
    current: CurrentState | None = None
    decode_step_ms: Mapping[int, float] = field(default_factory=dict)
    extra_capacity: str = "on-demand"
    migration_overhead_s: float = 2.0
    # checkpoint reads from each instance's local disk at this rate (None: from remote
    # storage over the NIC, as in a Kubernetes pod that downloads its model)
    local_disk_bytes_per_s: float | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise SpotserveError(f"strategy must be one of {', '.join(STRATEGIES)}")
        if self.rate < 0:
            raise SpotserveError("rate must not be negative")


def load_request(path: str | Path) -> PlanRequest:
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text())
    except FileNotFoundError:
        raise SpotserveError(f"{file}: no such plan input file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpotserveError(f"{file}: cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        raise SpotserveError(f"{file}: malformed YAML/JSON: {exc}".splitlines()[0]) from None
    return parse_request(data, base=file.parent, source=str(file))


def _num(data: Mapping[str, Any], key: str, default: float, source: str, *,
         positive: bool = False) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpotserveError(f"{source}: {key} must be a number (got {value!r})")
    if value < 0 or (positive and value == 0):
        raise SpotserveError(f"{source}: {key} must be {'positive' if positive else '≥ 0'}")
    return float(value)


def _int(data: Mapping[str, Any], key: str, default: int, source: str) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpotserveError(f"{source}: {key} must be a positive integer (got {value!r})")
    return value


def _path(base: Path, value: Any, key: str, source: str) -> Path:
    if not isinstance(value, str):
        raise SpotserveError(f"{source}: {key} must be a path")
    path = Path(value)
    return path if path.is_absolute() else base / path


def parse_request(data: Any, base: Path = Path("."), source: str = "plan input") -> PlanRequest:
    """Validate a plan document (see module docstring) into a `PlanRequest`."""
    if not isinstance(data, dict):
        raise SpotserveError(f"{source}: expected a mapping at the top level")
    unknown = set(data) - _KEYS
    if unknown:
        raise SpotserveError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}")
    if "model" not in data:
        raise SpotserveError(f"{source}: 'model' is required")
    model = _model(data, base, source)
    catalog = Catalog.load(_path(base, data["catalog"], "catalog", source)
                           if "catalog" in data else None)
    instances = parse_instances(data.get("cluster"), catalog, source)
    table = None
    if "profile" in data:
        table = ProfileTable.load(_path(base, data["profile"], "profile", source))
    cost = cost_model(model, table, str(data.get("profile_gpu", "T4")))
    limits = search_limits(data, table, source)
    slo = data.get("latency_slo_s")
    hetero = HeteroLimits(max_batch=limits.max_batch, latency_slo_ms=(
        None if slo is None else _num(data, "latency_slo_s", 0, source, positive=True) * 1000))
    try:
        current, steps = parse_current(data.get("current"), model, instances, source)
    except (TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, SpotserveError):
            raise
        raise SpotserveError(f"{source}: current: malformed entry ({exc})") from None
    return PlanRequest(
        model=model, instances=instances, cost=cost, rate=_num(data, "rate", 0.0, source),
        workload=Workload(_int(data, "input_tokens", 512, source),
                          _int(data, "output_tokens", 128, source)),
        grace_seconds=_num(data, "grace_seconds", 30.0, source), limits=limits, hetero=hetero,
        strategy=str(data.get("strategy", "auto")), current=current, decode_step_ms=steps,
        extra_capacity=str(data.get("extra_capacity", "on-demand")))


_KEYS = {"model", "dtype", "rate", "input_tokens", "output_tokens", "grace_seconds",
         "max_batch", "min_gpus_per_replica", "max_tp", "profile", "profile_gpu", "strategy",
         "fill", "tp_across_instances", "latency_slo_s", "extra_capacity", "catalog",
         "cluster", "current"}


def _model(data: Mapping[str, Any], base: Path, source: str) -> ModelSpec:
    name = data["model"]
    if not isinstance(name, str):
        raise SpotserveError(f"{source}: model must be a name or a path")
    candidate = base / name
    dtype = data.get("dtype")
    if candidate.exists() and not Path(name).is_absolute():
        return resolve_model(str(candidate), dtype)
    return resolve_model(name, dtype)


def cost_model(model: ModelSpec, table: ProfileTable | None, gpu: str = "T4") -> CostModel:
    """A profile-table cost model when a table is given, else the roofline."""
    if table is None:
        return RooflineCostModel(model)
    if table.layer_num != model.num_layers:
        raise SpotserveError(f"profile {table.name} is for {table.layer_num} layers but "
                             f"{model.name} has {model.num_layers}")
    return ProfileCostModel(table, gpu)


def search_limits(data: Mapping[str, Any], table: ProfileTable | None,
                  source: str) -> SearchLimits:
    max_tp = data.get("max_tp", table.max_tp if table else None)
    if max_tp is not None:
        max_tp = _int({"max_tp": max_tp}, "max_tp", 1, source)
    return SearchLimits(
        max_batch=_int(data, "max_batch", 4, source),
        min_gpus_per_replica=_int(data, "min_gpus_per_replica", 1, source),
        max_tp=max_tp, pipeline_divides=table.padded_layer_num if table else None,
        tp_across_instances=bool(data.get("tp_across_instances", True)),
        fill=bool(data.get("fill", True)))


def parse_instances(cluster: Any, catalog: Catalog, source: str) -> tuple[Instance, ...]:
    if not isinstance(cluster, dict) or not isinstance(cluster.get("instances"), list):
        raise SpotserveError(f"{source}: cluster.instances must be a list of instances")
    spot_prices = cluster.get("spot_prices") or {}
    out: list[Instance] = []
    for n, entry in enumerate(cluster["instances"]):
        where = f"{source}: cluster.instances[{n}]"
        if not isinstance(entry, dict) or "type" not in entry:
            raise SpotserveError(f"{where}: needs at least a 'type'")
        itype = catalog.instance(str(entry["type"]))
        price = entry.get("spot_price", spot_prices.get(itype.name))
        if price is not None and (isinstance(price, bool) or not isinstance(price, (int, float))
                                  or price < 0):
            raise SpotserveError(f"{where}: spot_price must be a number ≥ 0 (got {price!r})")
        out.append(Instance(str(entry.get("name", f"node-{n}")), itype,
                            str(entry.get("capacity", "spot")), str(entry.get("zone", "")),
                            str(entry.get("state", "running")),
                            None if price is None else float(price)))
    names = [i.name for i in out]
    if len(set(names)) != len(names):
        raise SpotserveError(f"{source}: instance names must be unique")
    return tuple(out)


def parse_current(current: Any, model: ModelSpec, instances: tuple[Instance, ...],
                  source: str) -> tuple[CurrentState | None, dict[int, float]]:
    """The running placement, in the `pipelines` format `plan --json` prints."""
    if current is None:
        return None, {}
    where = f"{source}: current"
    if not isinstance(current, dict) or not isinstance(current.get("pipelines"), list):
        raise SpotserveError(f"{where}: needs a list of pipelines")
    known = {g for i in instances for g in i.gpus}
    layouts, mapping, progress, steps = [], {}, [], {}
    for d, pipe in enumerate(current["pipelines"]):
        stages = []
        for s, stage in enumerate(pipe.get("stages", []) if isinstance(pipe, dict) else []):
            layers, gpus = stage.get("layers"), stage.get("gpus", [])
            if not (isinstance(layers, list) and len(layers) == 2 and isinstance(gpus, list)):
                raise SpotserveError(f"{where}.pipelines[{d}].stages[{s}]: needs layers "
                                     f"[start, end] and a list of gpus")
            stages.append(StageLayout(int(layers[0]), int(layers[1]), len(gpus),
                                      stage.get("gpu_type")))
            for r, text in enumerate(gpus):
                gpu = GpuId.parse(text)
                if gpu not in known:
                    raise SpotserveError(f"{where}: GPU {gpu} is on no listed instance")
                mapping[Position(d, s, r)] = gpu
        if not stages:
            raise SpotserveError(f"{where}.pipelines[{d}]: has no stages")
        layouts.append(PipelineLayout(tuple(stages)))
        prog = pipe.get("progress") or {}
        progress.append(PipelineProgress(d, int(prog.get("cached_tokens", 0)),
                                         int(prog.get("remaining_steps", 0))))
        if "decode_step_ms" in prog:
            steps[d] = float(prog["decode_step_ms"])
    config = ParallelConfig(tuple(layouts), _int(current, "batch", 1, where))
    config.validate(model)
    return CurrentState(Placement.of(config, mapping), tuple(progress)), steps
