"""Builders shared by the simulator tests: the paper's 6.7B/20B setups and tiny traces."""

from __future__ import annotations

from pathlib import Path

from spotserve.operator.sim.runner import Setup
from spotserve.operator.sim.workload import Arrival
from spotserve.traces import Trace, TraceEvent

PROFILES = {"6.7b": ("megatron_6.7B_profile.json", 4), "20b": ("megatron_h6144_profile.json", 12)}


def nodes(count: int) -> tuple[str, ...]:
    return tuple(f"node-{k}" for k in range(count))


def trace(count: int, end_s: float, *events: TraceEvent) -> Trace:
    return Trace((TraceEvent(0.0, "add", nodes(count)), *events), end_s, "test")


def every(gap_s: float, until_s: float, output_tokens: int = 128) -> tuple[Arrival, ...]:
    """Deterministic arrivals `gap_s` apart."""
    count = int(until_s // gap_s)
    return tuple(Arrival(k, (k + 1) * gap_s, 512, output_tokens) for k in range(count))


def paper_setup(reference: Path, model: str, the_trace: Trace,
                arrivals: tuple[Arrival, ...], rate: float, **extra: object) -> Setup:
    profile, min_gpus = PROFILES[model]
    return Setup(model=model, trace=the_trace, arrivals=arrivals, rate=rate,
                 profile=reference / "profiles" / profile, min_gpus_per_replica=min_gpus,
                 spot_prices={"g4dn.12xlarge": 1.9046}, **extra)  # type: ignore[arg-type]
