"""One simulation setup (`Setup`), the approaches over it, and their runs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from spotserve.catalog import Catalog, InstanceType
from spotserve.errors import SpotserveError
from spotserve.models import resolve_model
from spotserve.traces import Trace, TraceEvent

from ..planner.cluster import Instance
from ..planner.cost_model import Workload
from ..planner.heterogeneous import HeteroLimits
from ..planner.homogeneous import PipelineShape
from ..planner.profile_table import ProfileTable
from ..planner.request import cost_model, search_limits
from . import report
from .engine import ClusterSpec, Policy, Simulation
from .policies import Reparallelize, Reroute, SpotServe, Variant, best_shape
from .scenario import Scenario
from .workload import Arrival

BASELINES = ("spotserve", "reparallelize", "reroute", "ondemand")
# cumulative, as in the paper: each drops one more component
ABLATIONS = {
    "no-controller": Variant(controller=False),
    "no-migration-planner": Variant(controller=False, migration_planner=False),
    "no-arranger": Variant(controller=False, migration_planner=False, arranger=False),
    "no-device-mapper": Variant(False, False, False, False),
}
APPROACHES = BASELINES + tuple(ABLATIONS)
GROUPS = {"all": BASELINES, "ablation": ("spotserve", *ABLATIONS), "every": APPROACHES}


@dataclass(frozen=True)
class Setup:
    """Everything but the approach: model and planning inputs, cluster, trace, requests."""

    model: str
    trace: Trace
    arrivals: tuple[Arrival, ...]
    rate: float                       # the planner's required rate α at the start
    profile: Path | None = None
    min_gpus_per_replica: int = 1
    max_batch: int = 4
    instance_type: str = "g4dn.12xlarge"
    node_types: dict[str, str] = field(default_factory=dict)
    spot_prices: dict[str, float] = field(default_factory=dict)
    on_demand_nodes: frozenset[str] = frozenset()
    no_notice_nodes: frozenset[str] = frozenset()   # killed without a termination notice
    ondemand_instances: int | None = None
    grace_s: float = 30.0
    boot_s: float = 0.0
    disk_gb_per_s: float = 2.0        # each instance's checkpoint reads from its disk, GB/s
    engine_start_s: float = 5.0       # a baseline engine's start, weights aside
    nic_gbps: float | None = None     # override the instance type's network bandwidth
    migration_overhead_s: float = 2.0
    workload: Workload = field(default_factory=Workload)
    strategy: str = "auto"
    latency_slo_s: float | None = None
    batching: str = "static"          # static (SpotServe) | continuous (the worker engine)

    def scenario(self, catalog: Catalog | None = None) -> Scenario:
        """The planning inputs; a profile prices the GPU of `instance_type` in `catalog`
        (the default catalog when None)."""
        model = resolve_model(self.model)
        table = ProfileTable.load(self.profile) if self.profile else None
        gpu = (catalog or Catalog.load()).instance(self.instance_type).gpu.name
        limits = search_limits({"max_batch": self.max_batch,
                                "min_gpus_per_replica": self.min_gpus_per_replica},
                               table, "simulate")
        slo = None if self.latency_slo_s is None else self.latency_slo_s * 1000
        return Scenario(model, cost_model(model, table, gpu), self.workload, limits,
                        HeteroLimits(max_batch=self.max_batch, latency_slo_ms=slo),
                        self.strategy, self.migration_overhead_s,
                        disk_bytes_per_s=self.disk_gb_per_s * 1e9,
                        engine_start_s=self.engine_start_s)

    def cluster(self, catalog: Catalog) -> ClusterSpec:
        def typed(name: str) -> InstanceType:
            itype = catalog.instance(name)
            if self.nic_gbps is None:
                return itype
            return replace(itype, nic_gbps=self.nic_gbps)

        default = typed(self.instance_type)
        types = {n: typed(t) for n, t in self.node_types.items()}

        def node_type(node: str) -> InstanceType:
            return types.get(node, default)

        return ClusterSpec(node_type, self.on_demand_nodes, dict(self.spot_prices),
                           self.grace_s, self.boot_s, self.no_notice_nodes)


def run(setup: Setup, approach: str, catalog: Catalog | None = None) -> dict[str, Any]:
    """Simulate one approach; the report entry (see report.summarize)."""
    if setup.batching not in ("static", "continuous"):
        raise SpotserveError(f"batching must be static or continuous (got {setup.batching!r})")
    if approach not in APPROACHES:
        raise SpotserveError(f"unknown approach {approach!r}; choose from "
                             f"{', '.join(APPROACHES)}, all, ablation or every")
    catalog = catalog or Catalog.load()
    scenario = setup.scenario(catalog)
    started = time.perf_counter()
    if approach == "ondemand":
        setup = _ondemand(setup, scenario, catalog)
    cluster = setup.cluster(catalog)
    sim = Simulation(setup.trace, setup.arrivals, cluster,
                     policy(approach, setup, scenario, cluster), setup.rate,
                     continuous=setup.batching == "continuous")
    sim.run()
    entry = report.summarize(approach, sim)
    entry["wall_s"] = round(time.perf_counter() - started, 3)
    return entry


def policy(approach: str, setup: Setup, scenario: Scenario, cluster: ClusterSpec) -> Policy:
    if approach in ("spotserve", "ondemand"):
        return SpotServe(scenario, approach)
    if approach == "reparallelize":
        return Reparallelize(scenario)
    shape = _max_shape(setup, scenario, cluster)
    if approach == "reroute":
        if shape is None:
            raise SpotserveError(f"{setup.model} fits on no configuration of the trace's "
                                 f"{setup.trace.max_instances} instances")
        return Reroute(scenario, shape, cluster.node_type(setup.trace.nodes()[0]).gpus)
    return SpotServe(scenario, approach, ABLATIONS[approach], shape)


def _max_shape(setup: Setup, scenario: Scenario, cluster: ClusterSpec
               ) -> PipelineShape | None:
    """The planner's shape for the most instances the trace ever holds."""
    first = setup.trace.nodes()[0]
    instances = tuple(Instance(f"max-{k}", cluster.node_type(first),
                               spot_price=cluster.price(first))
                      for k in range(setup.trace.max_instances))
    return best_shape(scenario, setup.rate, instances)


def _ondemand(setup: Setup, scenario: Scenario, catalog: Catalog) -> Setup:
    """A fixed on-demand fleet for the trace's duration: `ondemand_instances`, else the
    fewest instances whose best configuration reaches the rate."""
    from ..planner.planner import plan

    itype = catalog.instance(setup.instance_type)
    count = setup.ondemand_instances
    if count is None:
        count = 1
        probe = plan(scenario.request((Instance("probe-0", itype, "on-demand"),), setup.rate))
        if probe.config is None or not probe.meets_rate:
            count += probe.extra_instances
    names = tuple(f"ondemand-{k}" for k in range(count))
    trace = Trace((TraceEvent(0.0, "add", names),), setup.trace.end_s, setup.trace.source)
    return replace(setup, trace=trace, on_demand_nodes=frozenset(names), node_types={})


def approaches(name: str) -> tuple[str, ...]:
    return GROUPS.get(name, (name,))
