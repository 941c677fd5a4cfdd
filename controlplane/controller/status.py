"""What the controller says of itself: a snapshot a runner turns into a status report (the
LLMService's status, the local summary) without reading the journal.

`ControllerStatus` is rebuilt by `Controller.status()` at any moment; it names the epoch and
phase, the configuration serving and the one being moved to, the latest migration (from
its plan to its outcome) and the last few failures, each with a sequence number so that a
reader can tell which it has seen.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from spotserve.layout import ParallelConfig

MAX_ERRORS = 20  # failures kept for the status (the journal has them all)


@dataclass(frozen=True)
class Failure:
    seq: int         # increasing over the controller's life
    time: float      # Unix seconds
    kind: str        # configure-failed, drain-failed, release-failed, failed, ...
    message: str


@dataclass(frozen=True)
class MigrationStatus:
    epoch: int
    phase: str               # planned, preloading, draining, configuring, switching, serving
    reason: str              # the events that started it
    trigger: str             # notice, loss, join, load, restart, retry, broken, worker
    started_at: float        # Unix seconds
    config: str              # the target configuration, described
    doomed: tuple[str, ...] = ()      # instances under notice when it was planned
    deadline: float | None = None     # the earliest of their deadlines
    bytes_planned: int = 0
    bytes_moved: int = 0
    outcome: str = ""        # "" while it runs; completed, aborted or failed

    @property
    def id(self) -> str:
        return f"e{self.epoch}"

    def at(self, phase: str) -> MigrationStatus:
        return replace(self, phase=phase)


@dataclass(frozen=True)
class ControllerStatus:
    epoch: int
    phase: str                       # idle, preloading ... serving, failed
    current: ParallelConfig | None   # what serves now
    target: ParallelConfig | None    # what a migration in progress moves to
    pipelines: tuple[str, ...]       # the serving pipelines' ids
    meets_rate: bool                 # the last plan serves the required rate
    migration: MigrationStatus | None
    failures: tuple[Failure, ...]    # the latest, oldest first

    @property
    def migrating(self) -> bool:
        return self.migration is not None and not self.migration.outcome
