"""Just-in-time arrangement (SpotServe): how many more decode steps a doomed pipeline runs.

A pipeline with a GPU on a doomed instance keeps decoding after the notice, then stops with
its KV cache intact so the migration can carry it off before the deadline:

    steps = ⌊(deadline − migration_seconds − safety) / decode_step⌋, clamped to [0, left]

`steps == 0` means stop now; `steps == remaining_steps` means the batch finishes before the
migration has to start. Either way `steps·decode_step + migration_seconds ≤ deadline`
(nothing is scheduled past the deadline), unless the migration alone overruns it, in which
case the pipeline stops at once and `overruns` says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Arrangement:
    pipeline: int
    steps: int
    remaining_steps: int
    stop_after_s: float  # seconds after the notice at which it stops decoding
    overruns: bool = False

    @property
    def finishes(self) -> bool:
        return self.steps >= self.remaining_steps

    @property
    def action(self) -> str:
        if self.finishes:
            return "finish"
        return "stop-now" if self.steps == 0 else f"decode {self.steps} steps then stop"


def decode_steps(deadline_s: float, migration_s: float, decode_step_s: float,
                 remaining_steps: int, safety_s: float = 0.0) -> int:
    """Decode steps that fit before the migration must start (0 … remaining_steps)."""
    if decode_step_s <= 0:
        raise ValueError("decode step time must be positive")
    if remaining_steps <= 0:
        return 0
    slack = deadline_s - migration_s - safety_s
    if slack <= 0:
        return 0
    steps = math.floor(slack / decode_step_s + 1e-9)
    while steps > 0 and steps * decode_step_s + migration_s > deadline_s:
        steps -= 1
    return min(steps, remaining_steps)


def arrange(deadline_s: float, migration_s: float,
            pipelines: dict[int, tuple[float, int]], safety_s: float = 0.0
            ) -> tuple[Arrangement, ...]:
    """Per doomed pipeline: `pipelines` maps pipeline → (decode step seconds, steps left)."""
    out = []
    for pipeline, (step_s, left) in sorted(pipelines.items()):
        steps = decode_steps(deadline_s, migration_s, step_s, left, safety_s)
        out.append(Arrangement(pipeline, steps, left, steps * step_s,
                               overruns=migration_s > deadline_s))
    return tuple(out)
