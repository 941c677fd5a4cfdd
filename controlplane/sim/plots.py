"""PNG plots of a report: latency percentiles per approach; instances, configuration and
latency over time."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .report import PERCENTILES


def latency_plot(path: Path, entries: Sequence[dict[str, Any]]) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    for e in entries:
        values = [e["latency"][f"p{q}_s"] for q in PERCENTILES]
        if None not in values:
            ax.plot(PERCENTILES, values, marker="o", label=e["approach"])
    ax.set(xlabel="percentile", ylabel="latency (s)", yscale="log",
           title="request latency per approach")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def timeline_plot(path: Path, entries: Sequence[dict[str, Any]]) -> Path:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for e in entries:
        times = [p["t"] for p in e["timeline"]]
        top.step(times, [p["pipelines"] for p in e["timeline"]], where="post",
                 label=e["approach"])
        series = e["series"]
        if series:
            bottom.scatter([s[0] for s in series], [s[1] for s in series], s=2,
                           label=e["approach"])
    if entries and entries[0]["timeline"]:
        first = entries[0]["timeline"]
        top.step([p["t"] for p in first], [p["instances"] for p in first], where="post",
                 color="black", linestyle="--", label="instances")
        for p in first:
            if p["event"] in ("switch", "restart"):
                top.annotate(p["config"], (p["t"], p["pipelines"]), fontsize=6)
    top.set(ylabel="pipelines / instances", title="cluster and configuration over time")
    bottom.set(xlabel="arrival time (s)", ylabel="latency (s)", yscale="log")
    top.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
