"""Prometheus metrics of the control loop (one registry per controller)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.replans = Counter("spotserve_replans", "Re-plans by reason.", ["reason"], registry=r)
        self.migrations = Counter(
            "spotserve_migrations",
            "Migrations by what started them (notice, loss, broken, worker, join, load, "
            "restart, retry) and "
            "outcome (completed, aborted, failed).", ["reason", "outcome"], registry=r)
        self.bytes_moved = Counter("spotserve_migration_bytes_moved",
                                   "Bytes workers pulled from peers or read from the "
                                   "checkpoint, preloads included.", registry=r)
        self.notice_to_serving = Histogram(
            "spotserve_notice_to_serving_seconds",
            "From a termination notice to the new configuration serving.",
            buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300), registry=r)
        self.bytes_planned = Counter("spotserve_migration_bytes_planned",
                                     "Bytes the migration plans said to move.", registry=r)
        self.bytes_preloaded = Counter(
            "spotserve_migration_bytes_preloaded",
            "Weight bytes joining GPUs gathered while the old configuration kept serving.",
            registry=r)
        self.deadline_misses = Counter("spotserve_deadline_misses",
                                       "Migrations that finished after a notice deadline.",
                                       registry=r)
        self.resumed = Counter("spotserve_controller_resumed_requests",
                               "Interrupted requests by how they resume.", ["mode"], registry=r)
        self.abandoned = Counter(
            "spotserve_pipelines_abandoned",
            "Pipelines given up without a drain because a member died, stopped answering or "
            "was replaced (their requests resume by re-prefill).", registry=r)
        self.phase_timeouts = Counter("spotserve_phase_timeouts",
                                      "Migration phases that ran past their deadline.",
                                      ["phase"], registry=r)
        self.epoch = Gauge("spotserve_epoch", "Current configuration epoch.", registry=r)
        self.instances = Gauge("spotserve_instances", "Instances by state.", ["state"],
                               registry=r)
