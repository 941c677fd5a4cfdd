"""What is being served and how it is planned: the model, cost model, search limits and the
timings of the transitions. Every timing parameter, its value, its source and what it
affects: the table in docs/simulator.md."""

from __future__ import annotations

from dataclasses import dataclass, field

from spotserve.model_spec import ModelSpec

from ..planner.cluster import Instance
from ..planner.cost_model import CostModel, Workload
from ..planner.heterogeneous import HeteroLimits
from ..planner.homogeneous import SearchLimits
from ..planner.request import PlanRequest
from .engine import ClusterSpec, Simulation


@dataclass(frozen=True)
class Scenario:
    model: ModelSpec
    cost: CostModel
    workload: Workload = field(default_factory=Workload)
    limits: SearchLimits = field(default_factory=SearchLimits)
    hetero: HeteroLimits = field(default_factory=HeteroLimits)
    strategy: str = "auto"
    migration_overhead_s: float = 2.0    # SpotServe's fixed cost of a migration
    disk_bytes_per_s: float = 2e9        # each instance reads the checkpoint from its own disk
    engine_start_s: float = 5.0          # a baseline's engine (re)start, weights aside
    baseline_cut_s: float = 0.5          # a baseline's migration estimate (the artifact's)
    reroute_start_factor: float = 2.0    # a new rerouting engine waits its start-up twice

    def instances(self, sim: Simulation, nodes: list[str], lost: tuple[str, ...] = ()
                  ) -> tuple[Instance, ...]:
        """Planner instances for `nodes` (doomed ones marked) and `lost` ones."""
        cluster: ClusterSpec = sim.cluster
        out = [Instance(n, cluster.node_type(n), cluster.capacity(n),
                        state="doomed" if n in sim.doomed else "running",
                        spot_price=cluster.price(n) if cluster.capacity(n) == "spot" else None)
               for n in nodes]
        out += [Instance(n, cluster.node_type(n), cluster.capacity(n), state="lost")
                for n in lost if n not in nodes]
        return tuple(out)

    def request(self, instances: tuple[Instance, ...], rate: float, **extra: object
                ) -> PlanRequest:
        return PlanRequest(self.model, instances, self.cost, rate=rate, workload=self.workload,
                           limits=self.limits, hetero=self.hetero, strategy=self.strategy,
                           migration_overhead_s=self.migration_overhead_s,
                           local_disk_bytes_per_s=self.disk_bytes_per_s,
                           **extra)  # type: ignore[arg-type]
