"""The controller's record: every transition as a JSON line, plus the state to resume from.

`Journal.record(kind, **fields)` appends a line (time, epoch, kind, fields). The record is
bounded: the latest `max_entries` stay in memory, and the file rolls over to
`events.jsonl.1` past `max_bytes` (`read` returns both, oldest first). The state
snapshot (view, committed placement, pipeline ids, epoch) is rewritten atomically after
every transition, so a controller that restarts mid-migration re-plans from the last
committed placement and the instances it knew about. In Kubernetes the same snapshot
lives in the LLMService status instead of a file.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..planner.cluster import Placement

log = logging.getLogger("spotserve.controller.journal")


def placement_to_dict(placement: Placement | None) -> dict[str, Any] | None:
    """The `current:` format of a plan input (what `parse_current` reads back)."""
    if placement is None:
        return None
    config, at = placement.config, placement.by_position
    pipelines = []
    for d, pipe in enumerate(config.pipelines):
        stages = []
        for s, stage in enumerate(pipe.stages):
            gpus = [str(g) for p, g in sorted(at.items()) if p.pipeline == d and p.stage == s]
            stages.append({"layers": [stage.layer_start, stage.layer_end], "gpus": gpus,
                           **({"gpu_type": stage.gpu_type} if stage.gpu_type else {})})
        pipelines.append({"stages": stages})
    return {"batch": config.batch, "pipelines": pipelines}


@dataclass
class ControllerState:
    epoch: int = 0
    phase: str = "idle"  # idle | draining | configuring | switching | serving
    view: dict[str, Any] = field(default_factory=dict)
    placement: dict[str, Any] | None = None
    pipeline_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "phase": self.phase, "view": self.view,
                "placement": self.placement, "pipeline_ids": self.pipeline_ids}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ControllerState:
        return cls(int(data.get("epoch", 0)), str(data.get("phase", "idle")),
                   dict(data.get("view") or {}), data.get("placement"),
                   list(data.get("pipeline_ids") or []))


class Journal:
    """In memory, or backed by a folder (`events.jsonl` + `state.json`)."""

    def __init__(self, folder: str | Path | None = None, max_entries: int = 5000,
                 max_bytes: int = 8 << 20) -> None:
        self.folder = Path(folder) if folder else None
        self.entries: deque[dict[str, Any]] = deque(maxlen=max_entries)
        self.max_bytes = max_bytes
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)

    @property
    def path(self) -> Path | None:
        return self.folder / "events.jsonl" if self.folder else None

    def record(self, kind: str, epoch: int, **fields: Any) -> None:
        entry = {"time": round(time.time(), 3), "epoch": epoch, "kind": kind, **fields}
        self.entries.append(entry)
        log.info("epoch %d %s %s", epoch, kind, fields)
        path = self.path
        if path is None:
            return
        with path.open("a") as out:
            out.write(json.dumps(entry, default=str) + "\n")
            full = out.tell() > self.max_bytes
        if full:
            os.replace(path, path.with_name(path.name + ".1"))

    def read(self) -> list[dict[str, Any]]:
        """Every entry still on disk (the rolled-over file first), else those in memory."""
        path = self.path
        if path is None:
            return list(self.entries)
        out = []
        for part in (path.with_name(path.name + ".1"), path):
            if part.exists():
                out += [json.loads(line) for line in part.read_text().splitlines() if line]
        return out

    def save(self, state: ControllerState) -> None:
        if not self.folder:
            return
        tmp = self.folder / "state.json.tmp"
        tmp.write_text(json.dumps(state.to_dict(), indent=1))
        os.replace(tmp, self.folder / "state.json")

    def load(self) -> ControllerState | None:
        path = self.folder / "state.json" if self.folder else None
        if path is None or not path.exists():
            return None
        return ControllerState.from_dict(json.loads(path.read_text()))
