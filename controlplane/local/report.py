"""What a local-mode run produced: the summary numbers, the JSON report and the PNG
timeline (instances and configuration over time, request latency)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .runner import RunResult


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(result: RunResult) -> dict[str, Any]:
    served = [r for r in result.records if not r.error and r not in result.failed]
    latency = [r.latency for r in served]
    kinds = [e["kind"] for e in result.journal]
    checked = [r for r in served if r.request_id in result.reference]
    return {
        "trace": result.script_source,
        "wall_seconds": round(result.wall_seconds, 1),
        "requests": len(result.records), "served": len(served),
        "failed": len(result.failed),
        "resumed_kv": result.resumed.get("kv", 0),
        "resumed_reprefill": result.resumed.get("reprefill", 0),
        "latency_p50_s": round(percentile(latency, 50), 3),
        "latency_p90_s": round(percentile(latency, 90), 3),
        "latency_p99_s": round(percentile(latency, 99), 3),
        "replans": sum(k in ("planned", "unchanged", "no-configuration") for k in kinds),
        "migrations": kinds.count("serving"),
        "aborted_migrations": kinds.count("aborted"),
        "configurations": [c["config"] for c in result.configs],
        "bytes_pulled": result.moved.get("pulled", 0),
        "bytes_kept": result.moved.get("kept", 0),
        "bytes_from_checkpoint": result.moved.get("checkpoint", 0),
        "bytes_planned": sum(int(e.get("bytes", 0)) for e in result.journal
                             if e["kind"] == "planned"),
        # concurrent initialization: gathered by joining GPUs while the old configuration
        # served (part of the pulled and checkpoint figures above)
        "bytes_preloaded": sum(int(e.get("bytes", 0)) for e in result.journal
                               if e["kind"] == "preloaded"),
        "reference_checked": len(checked) if result.reference else 0,
        "greedy_checked": len(result.greedy),
        "identical_to_reference": bool(result.reference) and not result.differing
        and len(checked) == len(served),
        "differing_from_reference": result.differing,
        "mismatched": result.mismatched,
        "outputs_correct": bool(result.greedy) and not result.mismatched
        and len(result.greedy) == len(served),
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def summary_text(s: dict[str, Any]) -> str:
    configs: list[str] = []
    for c in s["configurations"]:
        if not configs or configs[-1] != c:
            configs.append(c)
    if s["greedy_checked"]:
        differ = len(s["differing_from_reference"])
        reference = ("all identical to the no-preemption reference" if not differ else
                     f"{s['reference_checked'] - differ} identical to the no-preemption "
                     f"reference, {differ} differ from it at fp32 near-ties")
        same = (f"all {s['greedy_checked']} greedy token by token ({reference})"
                if s["outputs_correct"] else
                f"{len(s['mismatched'])} WRONG: a token that is not the greedy choice "
                f"for the tokens before it ({', '.join(s['mismatched'][:5])})")
    else:
        same = "not checked (no reference run)"
    return "\n".join([
        f"trace       {s['trace']} ({s['wall_seconds']} s wall)",
        f"requests    served {s['served']}, failed {s['failed']}",
        f"resumed     by KV {s['resumed_kv']}, by re-prefill {s['resumed_reprefill']}",
        f"latency     P50 {s['latency_p50_s']:.2f} s, P90 {s['latency_p90_s']:.2f} s, "
        f"P99 {s['latency_p99_s']:.2f} s",
        f"control     re-plans {s['replans']}, migrations {s['migrations']} "
        f"({s['aborted_migrations']} aborted and re-planned)",
        f"configs     {' → '.join(configs) or '-'}",
        f"bytes       pulled from peers {_mb(s['bytes_pulled'])}, kept in place "
        f"{_mb(s['bytes_kept'])}, from the checkpoint {_mb(s['bytes_from_checkpoint'])}",
        f"preloaded   {_mb(s['bytes_preloaded'])} (by joining GPUs while the old "
        f"configuration served)",
        f"outputs     {same}",
    ])


def write_json(path: Path, result: RunResult, s: dict[str, Any]) -> None:
    data = {
        "summary": s,
        "configurations": result.configs,
        "timeline": result.timeline,
        "controller_journal": result.journal,
        "requests": [{"id": r.request_id, "sent_s": round(r.sent, 3),
                      "latency_s": round(r.latency, 3), "tokens": len(r.tokens),
                      "error": r.error,
                      "identical": result.reference.get(r.request_id) == r.tokens
                      if result.reference else None,
                      "greedy": result.greedy.get(r.request_id)} for r in result.records],
    }
    path.write_text(json.dumps(data, indent=1, default=str))


def _instance_counts(timeline: list[dict[str, Any]]) -> tuple[list[float], dict[str, list[int]]]:
    state: dict[str, str] = {}
    times: list[float] = [0.0]
    counts: dict[str, list[int]] = {k: [0] for k in ("booting", "ready", "notice")}
    moves = {"booting": "booting", "ready": "ready", "notice": "notice", "killed": "gone",
             "released": "gone", "boot-failed": "gone"}
    for entry in timeline:
        new = moves.get(entry["kind"])
        if new is None:
            continue
        state[entry["instance"]] = new
        times.append(entry["t"])
        for k in counts:
            counts[k].append(sum(v == k for v in state.values()))
    return times, counts


def plot(path: Path, result: RunResult) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True,
                                      gridspec_kw={"height_ratios": [1, 1.2]})
    times, counts = _instance_counts(result.timeline)
    end = max([*(r.done for r in result.records), *times])  # the reference run not shown
    times.append(end)
    bottoms = [0] * len(times)
    colours = {"ready": "#4c9f70", "notice": "#e0a030", "booting": "#9db4d8"}
    for state in ("ready", "notice", "booting"):
        values = [*counts[state], counts[state][-1]]
        top.fill_between(times, bottoms, [b + v for b, v in zip(bottoms, values, strict=True)],
                         step="post", color=colours[state], label=state, alpha=0.9)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    for entry in result.timeline:
        if entry["kind"] in ("notice", "killed"):
            colour = "#e0a030" if entry["kind"] == "notice" else "#c03030"
            for axis in (top, bottom):
                axis.axvline(entry["t"], color=colour, lw=1, ls="--")
            top.annotate(f"{entry['kind']} {entry['instance']}", (entry["t"], 0.1),
                         rotation=90, fontsize=7, va="bottom", ha="right")
    for n, config in enumerate(result.configs):
        top.annotate(f"e{config['epoch']}: {config['config']}",
                     (config["t"], max(bottoms) + 0.3 + 0.7 * (n % 3)), fontsize=7)
    top.set_ylabel("instances")
    top.set_ylim(0, max(bottoms) + 3)
    top.legend(loc="lower right", fontsize=8)
    top.set_title("spotserve local mode: instances, configuration and request latency")
    ok = [r for r in result.records if not r.error]
    bottom.scatter([r.sent for r in ok], [r.latency for r in ok], s=6, color="#3060a0",
                   label="request (by arrival)")
    bad = [r for r in result.records if r.error]
    if bad:
        bottom.scatter([r.sent for r in bad], [r.latency for r in bad], s=12, color="red",
                       marker="x", label="failed")
    bottom.set_ylabel("latency (s)")
    bottom.set_xlabel("time (s)")
    bottom.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
