"""Cost source 1: measured per-layer latencies, in the SpotServe artifact's profile format.

A profile JSON holds, per TP degree (`tp-N`) and batch (`bsz-B`), the milliseconds one layer
takes for a prompt (`init`) and for one decode step (`incr`), plus the pipeline hop costs
(`pp_init_comm`, `pp_incr_comm`), the embedding cost per batch (`embed`, for batches
1, 2, 4, 8), `final_fix_factor`, `padded_layer_num` (SpotServe requires P to divide it) and
`max_tp` (when absent: the largest TP degree measured). Batches not measured are
interpolated linearly (extrapolated from the last two points beyond the largest).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spotserve.catalog import GPUSpec, InstanceType
from spotserve.errors import SpotserveError

from .cost_model import CostModel, Phase, StageHardware, Workload

_EMBED_BATCHES = (1, 2, 4, 8)


@dataclass(frozen=True)
class ProfileTable:
    name: str
    layer_num: int
    padded_layer_num: int
    final_fix_factor: float
    pp_init_comm: float
    pp_incr_comm: float
    hidden_size: int
    max_tp: int
    embed: tuple[float, ...]
    # tp -> ((batch, init_ms, incr_ms), ...) sorted by batch
    layers: Mapping[int, tuple[tuple[int, float, float], ...]]

    @classmethod
    def load(cls, path: str | Path) -> ProfileTable:
        file = Path(path)
        try:
            data = json.loads(file.read_text())
        except FileNotFoundError:
            raise SpotserveError(f"{file}: no such profile file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SpotserveError(f"{file}: cannot read profile: {exc}") from None
        return cls.from_dict(data, file.stem)

    @classmethod
    def from_dict(cls, data: Any, default_name: str = "profile") -> ProfileTable:
        if not isinstance(data, dict):
            raise SpotserveError(f"{default_name}: a profile must be a JSON object")
        layers = {int(k[3:]): _batches(default_name, k, v)
                  for k, v in data.items() if k.startswith("tp-")}
        if not layers:
            raise SpotserveError(f"{default_name}: profile has no tp-N entries")
        try:
            return cls(
                name=str(data.get("name", default_name)), layer_num=int(data["layer_num"]),
                padded_layer_num=int(data.get("padded_layer_num") or data["layer_num"]),
                final_fix_factor=float(data.get("final_fix_factor", 1.0)),
                pp_init_comm=float(data.get("pp_init_comm", 0.0)),
                pp_incr_comm=float(data.get("pp_incr_comm", 0.0)),
                hidden_size=int(data.get("hidden_size", 0)),
                max_tp=int(data.get("max_tp", max(layers))),
                embed=tuple(float(x) for x in data.get("embed", [0.0])),
                layers=layers)
        except (KeyError, TypeError, ValueError) as exc:
            raise SpotserveError(f"{default_name}: malformed profile ({exc})") from None

    @property
    def tp_degrees(self) -> tuple[int, ...]:
        return tuple(sorted(tp for tp in self.layers if tp <= self.max_tp))

    def layer_ms(self, tp: int, batch: int, phase: Phase) -> float:
        """Milliseconds per layer at TP degree `tp` for a (micro-)batch of `batch`."""
        rows = self.layers.get(tp)
        if rows is None:
            raise SpotserveError(f"profile {self.name} has no measurements for TP={tp}")
        column = 1 if phase is Phase.PREFILL else 2
        return _interpolate([(r[0], r[column]) for r in rows], batch)

    def embed_ms(self, batch: int) -> float:
        points = list(zip(_EMBED_BATCHES, self.embed, strict=False))
        return _interpolate(points, batch)


def _batches(name: str, key: str, entry: Any) -> tuple[tuple[int, float, float], ...]:
    if not isinstance(entry, dict):
        raise SpotserveError(f"{name}: {key} must map bsz-B to {{init, incr}}")
    try:
        rows = [(int(b[4:]), float(v["init"]), float(v["incr"])) for b, v in entry.items()]
    except (KeyError, TypeError, ValueError) as exc:
        raise SpotserveError(f"{name}: {key}: malformed entry ({exc})") from None
    return tuple(sorted(rows))


def _interpolate(points: list[tuple[int, float]], x: int) -> float:
    for bx, by in points:
        if bx == x:
            return by
    if len(points) == 1:
        return points[0][1] * x / points[0][0]
    lower = [p for p in points if p[0] < x]
    upper = [p for p in points if p[0] > x]
    if lower and upper:
        (x0, y0), (x1, y1) = lower[-1], upper[0]
    elif upper:
        (x0, y0), (x1, y1) = upper[0], upper[1]
    else:
        (x0, y0), (x1, y1) = lower[-2], lower[-1]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclass(frozen=True)
class ProfileCostModel:
    """`CostModel` backed by a `ProfileTable` measured on one GPU type."""

    table: ProfileTable
    gpu_name: str = "T4"
    name: str = "profile"

    @property
    def fix_factor(self) -> float:
        return self.table.final_fix_factor

    def supports(self, gpu: GPUSpec, tp: int) -> bool:
        return gpu.name.lower() == self.gpu_name.lower() and tp in self.table.tp_degrees

    def stage_ms(self, stage: StageHardware, micro_batch: int, phase: Phase,
                 workload: Workload) -> float:
        return self.table.layer_ms(stage.tp, micro_batch, phase) * stage.layers

    def hop_ms(self, stage: StageHardware, batch: int, phase: Phase,
               workload: Workload) -> float:
        return self.table.pp_init_comm if phase is Phase.PREFILL else self.table.pp_incr_comm

    def overhead_ms(self, batch: int) -> float:
        return 2 * self.table.embed_ms(batch)


@dataclass(frozen=True)
class ProfileError:
    """One cell of a profile table against another cost model's estimate (ms per layer)."""

    tp: int
    batch: int
    phase: Phase
    measured_ms: float
    predicted_ms: float

    @property
    def relative(self) -> float:
        return (self.predicted_ms - self.measured_ms) / self.measured_ms


def compare_with_profile(cost: CostModel, table: ProfileTable,
                         itype: InstanceType) -> tuple[ProfileError, ...]:
    """How far `cost` is from every measured (TP, batch, phase) cell of `table`, for one
    middle layer on `itype` (TP over the intra-node link, or the NIC when it spans
    instances)."""
    out = []
    for tp in table.tp_degrees:
        link = itype.intra_node_bytes_per_s if tp <= itype.gpus else itype.nic_bytes_per_s
        layer = StageHardware(itype.gpu, tp, 1, link, itype.nic_bytes_per_s)
        for batch, _, _ in table.layers[tp]:
            for phase in Phase:
                out.append(ProfileError(tp, batch, phase, table.layer_ms(tp, batch, phase),
                                        cost.stage_ms(layer, batch, phase, Workload())))
    return tuple(out)
