"""Metrics of one run and the report: JSON, a markdown table, and PNG plots (matplotlib Agg)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .engine import Simulation

PERCENTILES = (50, 90, 95, 96, 97, 98, 99)


def summarize(approach: str, sim: Simulation) -> dict[str, Any]:
    done = [r for r in sim.requests if r.finish_s is not None]
    latency = np.array([r.finish_s - r.arrival.time_s for r in done if r.finish_s is not None])
    tokens = sum(r.arrival.output_tokens for r in done)
    stats: dict[str, Any] = {"avg_s": _round(latency.mean()) if latency.size else None}
    for q in PERCENTILES:
        stats[f"p{q}_s"] = _round(np.percentile(latency, q)) if latency.size else None
    stats["max_s"] = _round(latency.max()) if latency.size else None
    c = sim.counters
    return {
        "approach": approach,
        "requests": len(sim.requests), "completed": len(done),
        "failed": len(sim.requests) - len(done),
        "latency": stats,
        "cost_usd": _round(sim.cost_usd), "tokens": tokens,
        "instance_hours": _round(sim.instance_hours),
        "ondemand_equivalent_usd": _round(sim.ondemand_usd),
        "usd_per_1k_tokens": _round(sim.cost_usd / tokens * 1000, 6) if tokens else None,
        "replans": c.replans, "migrations": c.migrations, "reloads": c.reloads,
        "bytes_moved": c.bytes_moved, "migration_s": _round(c.migration_s),
        "restarts": sum(r.restarts for r in sim.requests),
        "reprefills": sum(r.reprefills for r in sim.requests),
        "timeline": sim.timeline,
        "series": [[_round(r.arrival.time_s), _round(r.finish_s - r.arrival.time_s)]
                   for r in done if r.finish_s is not None],
    }


def _round(x: float, digits: int = 4) -> float:
    return round(float(x), digits)


def markdown(entries: Sequence[dict[str, Any]]) -> str:
    head = ("| approach | done/total | avg s | P50 s | P90 s | P99 s | cost $ | $/1k tok "
            "| re-plans | migrations | reloads | GB moved |")
    lines = [head, "|" + "---|" * 12]
    for e in entries:
        lat = e["latency"]
        lines.append(
            f"| {e['approach']} | {e['completed']}/{e['requests']} | {_fmt(lat['avg_s'])} | "
            f"{_fmt(lat['p50_s'])} | {_fmt(lat['p90_s'])} | {_fmt(lat['p99_s'])} | "
            f"{e['cost_usd']:.2f} | {_fmt(e['usd_per_1k_tokens'], 4)} | {e['replans']} | "
            f"{e['migrations']} | {e['reloads']} | {e['bytes_moved'] / 1e9:.1f} |")
    return "\n".join(lines) + "\n"


def _fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def write(out: Path, entries: Sequence[dict[str, Any]], meta: dict[str, Any],
          plots: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "report.json", out / "report.md"]
    files[0].write_text(json.dumps({"meta": meta, "approaches": list(entries)}, indent=1))
    files[1].write_text(markdown(entries))
    if plots:
        from .plots import latency_plot, timeline_plot
        files += [latency_plot(out / "latency.png", entries),
                  timeline_plot(out / "timeline.png", entries)]
    return files
