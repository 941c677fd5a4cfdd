"""Reproduction runs of the SpotServe evaluation (and a ShuntServe-style heterogeneous one).

Writes bench/results/paper/paper.md and paper.json:

1. main: OPT-6.7B at 1.5 req/s, GPT-20B at 0.35, OPT-30B-shaped at 0.2 (the artifact's query
   traces, 512 in / 128 out, batch ≤ 4, fp32 on g4dn.12xlarge with the T4 profiles) on
   traces A_S, B_S, A_S+O, B_S+O × spotserve, reparallelize, reroute, ondemand;
   average and P99 latency, $ per 1k tokens, and the P99 ratio of the best baseline
   (reparallelize, reroute) to spotserve;
2. fluctuating load: GPT-20B on the `*_workload` traces, arrivals from arrival-rates.csv;
3. ablation: GPT-20B on A_S and B_S, cumulative;
4. on-demand only: GPT-20B with 3, 4, 6, 8 on-demand instances (trace_0506_node*.txt);
5. heterogeneous: 2× g5.12xlarge, 3× g6.12xlarge, 4× g6e.xlarge (roofline model),
   Llama-3.1-70B and Qwen3-32B: heterogeneous placement vs the best single-type subset,
   without and with an interruption;
6. sensitivity: for 20B and 30B on A_S and B_S, the P99 ratio (best baseline ÷ spotserve)
   as each uncertain parameter moves over its plausible range (SENSITIVITY), and whether
   the main table's ratio is robust to them;
7. cost (with main and ondemand): spotserve's saving against on-demand only, three ways,
   and the same three on the authors' measured figures, showing which gives the paper's
   54%.

    python bench/paper/run.py            # everything, minutes on 2 cores
    python bench/paper/run.py --only main,ablation
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from spotserve.catalog import Catalog
from spotserve.models import resolve_model
from spotserve.operator.planner import Instance, PlanRequest, RooflineCostModel, plan
from spotserve.operator.sim.runner import Setup, run
from spotserve.operator.sim.workload import from_queries, generated
from spotserve.traces import Trace, TraceEvent, load_queries, load_rates, load_trace

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT.parent / "shared" / "reference" / "spotserve-artifact"
SPOT = {"g4dn.12xlarge": 1.9046}
MODELS = {  # name: (profile, min GPUs per replica, queries, rate)
    "6.7b": ("megatron_6.7B_profile.json", 4, "query6144_tpt1.5_cv6.txt", 1.5),
    "20b": ("megatron_h6144_profile.json", 12, "query_tpt0.35_cv6.txt", 0.35),
    "30b": ("megatron_h7168_profile.json", 16, "query_tpt0.2_cv6.txt", 0.2),
}
TRACES = {"A_S": "trace_0304_real.txt", "B_S": "trace_0506_real.txt",
          "A_S+O": "trace_0304_ondemand.txt", "B_S+O": "trace_0506_ondemand.txt"}
BASELINES = ("reparallelize", "reroute")


BATCHING = ["static"]


def setup(ref: Path, model: str, trace_name: str, **extra: Any) -> Setup:
    profile, min_gpus, queries, rate = MODELS[model]
    trace = load_trace(ref / "traces" / trace_name)
    on_demand: frozenset[str] = frozenset()
    if trace_name.endswith("_ondemand.txt"):
        # the +O traces do not label their on-demand instances: the nodes the matching
        # spot-only trace never has are taken as on-demand
        spot = load_trace(ref / "traces" / trace_name.replace("_ondemand", "_real"))
        on_demand = frozenset(trace.nodes()) - frozenset(spot.nodes())
    arrivals = from_queries(load_queries(ref / "queries" / queries), 128, trace.end_s, 512)
    fields: dict[str, Any] = dict(model=model, trace=trace, arrivals=arrivals, rate=rate,
                                  profile=ref / "profiles" / profile,
                                  min_gpus_per_replica=min_gpus, spot_prices=SPOT,
                                  on_demand_nodes=on_demand, batching=BATCHING[0])
    fields.update(extra)
    return Setup(**fields)


def row(cell: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    lat = entry["latency"]
    return {**cell, "approach": entry["approach"], "requests": entry["requests"],
            "failed": entry["failed"], "avg_s": lat["avg_s"], "p99_s": lat["p99_s"],
            "cost_usd": entry["cost_usd"], "usd_per_1k_tokens": entry["usd_per_1k_tokens"],
            "ondemand_equivalent_usd": entry["ondemand_equivalent_usd"],
            "replans": entry["replans"], "migrations": entry["migrations"],
            "reloads": entry["reloads"], "restarts": entry["restarts"]}


def main_runs(ref: Path) -> list[dict[str, Any]]:
    rows = []
    for model in MODELS:
        for trace_label, trace_name in TRACES.items():
            s = setup(ref, model, trace_name)
            for approach in ("spotserve", *BASELINES, "ondemand"):
                rows.append(row({"model": model, "trace": trace_label}, run(s, approach)))
    return rows


def fluctuating_runs(ref: Path) -> list[dict[str, Any]]:
    rates = load_rates(ref / "queries" / "arrival-rates.csv")
    rows = []
    for label, name in (("A_S workload", "trace_0304_workload.txt"),
                        ("B_S workload", "trace_0506_workload.txt")):
        trace = load_trace(ref / "traces" / name)
        arrivals = generated(rates, 60.0, trace.end_s, 1.0, 0, 512, 128)
        s = setup(ref, "20b", name, arrivals=arrivals, rate=rates[0])
        for approach in ("spotserve", *BASELINES, "ondemand"):
            rows.append(row({"model": "20b", "trace": label}, run(s, approach)))
    return rows


def ablation_runs(ref: Path) -> list[dict[str, Any]]:
    rows = []
    for label in ("A_S", "B_S"):
        s = setup(ref, "20b", TRACES[label])
        for approach in ("spotserve", "no-controller", "no-migration-planner", "no-arranger",
                         "no-device-mapper"):
            rows.append(row({"model": "20b", "trace": label}, run(s, approach)))
    return rows


def ondemand_runs(ref: Path) -> list[dict[str, Any]]:
    rows = []
    for count in (3, 4, 6, 8):
        s = setup(ref, "20b", f"trace_0506_node{count}.txt", ondemand_instances=count)
        rows.append(row({"model": "20b", "trace": f"{count} on-demand"}, run(s, "ondemand")))
    s = setup(ref, "20b", TRACES["B_S"])
    rows.append(row({"model": "20b", "trace": "B_S"}, run(s, "spotserve")))
    return rows


# -- the cost claim ----------------------------------------------------------------------
# The authors' own measured GPT-20B runs, as their artifact's plotting script holds them
# (Hsword/SpotServe, branch artifact, elastic-switch/scripts_ae/tradeoff_plot.py): P99 per
# trace, node-minutes per trace (spot at $1.9046/h, on-demand at $3.912/h), and the
# on-demand fleets of 3, 4, 6 and 8 nodes over the same 18 minutes, before the 9 s "batching
# bias" the script subtracts from the on-demand line only.
ARTIFACT_20B = {
    "spotserve_p99_s": {"A_S": 46.108, "B_S": 37.083, "A_S+O": 49.005, "B_S+O": 33.388},
    "node_minutes": {"A_S": (203, 0), "B_S": (137, 0), "A_S+O": (210, 27),
                     "B_S+O": (92, 26)},           # (spot, on-demand)
    "ondemand_p99_s": {3: 253.343, 4: 175.346, 6: 43.47, 8: 34.45},
    "minutes": 18, "spot_price": 1.9046, "ondemand_price": 3.912, "p99_bias_s": 9.0,
}


def _matched(p99: float, fleets: dict[int, tuple[float, float]]) -> tuple[int, float] | None:
    """The smallest on-demand fleet whose P99 is at most `p99`: (instances, its cost)."""
    fits = sorted((n, cost) for n, (fleet_p99, cost) in fleets.items() if fleet_p99 <= p99)
    return fits[0] if fits else None


def artifact_cost() -> list[dict[str, Any]]:
    """The three comparisons on the authors' measured figures (equal request counts, as
    every request of the same arrival trace is served): which one gives the paper's 54%."""
    a = ARTIFACT_20B
    out = []
    for bias in (0.0, a["p99_bias_s"]):
        fleets = {n: (p99 - bias, n * a["ondemand_price"] * a["minutes"] / 60)
                  for n, p99 in a["ondemand_p99_s"].items()}
        for trace, p99 in a["spotserve_p99_s"].items():
            spot_min, od_min = a["node_minutes"][trace]
            cost = spot_min / 60 * a["spot_price"] + od_min / 60 * a["ondemand_price"]
            hours_od = (spot_min + od_min) / 60 * a["ondemand_price"]
            match = _matched(p99, fleets)
            out.append({"source": "artifact (measured)", "trace": trace,
                        "ondemand_p99_bias_s": bias,
                        "equal_instance_hours": round(1 - cost / hours_od, 3),
                        "matched_p99_fleet": match[0] if match else None,
                        "matched_p99": round(1 - cost / match[1], 3) if match else None})
    return out


def cost_rows(main: list[dict[str, Any]], ondemand: list[dict[str, Any]]
              ) -> list[dict[str, Any]]:
    """The simulated GPT-20B cells: spotserve's $/token against (a) the same instance-hours
    on demand, (b) the smallest on-demand fleet whose P99 matches spotserve's, (c) the
    smallest on-demand fleet that reaches the rate."""
    fleets = {int(r["trace"].split()[0]): (r["p99_s"], r["usd_per_1k_tokens"])
              for r in ondemand if r["trace"].endswith("on-demand")}
    out = []
    for r in main:
        if r["model"] != "20b" or r["approach"] != "spotserve":
            continue
        smallest = next(x for x in main if x["model"] == "20b" and x["trace"] == r["trace"]
                        and x["approach"] == "ondemand")
        match = _matched(r["p99_s"], fleets)
        per = r["usd_per_1k_tokens"]
        out.append({"source": "simulated", "trace": r["trace"],
                    "equal_instance_hours": round(1 - r["cost_usd"]
                                                  / r["ondemand_equivalent_usd"], 3),
                    "matched_p99_fleet": match[0] if match else None,
                    "matched_p99": round(1 - per / match[1], 3) if match else None,
                    "smallest_meeting_rate": round(1 - per / smallest["usd_per_1k_tokens"], 3)})
    return out


def cost_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| source | trace | on-demand P99 bias | (a) equal instance-hours | (b) matched P99 "
             "(fleet) | (c) smallest fleet reaching the rate |", "|" + "---|" * 6]

    def pct(x: float | None) -> str:
        return "—" if x is None else f"{x * 100:.1f}%"
    for r in rows:
        fleet = f" ({r['matched_p99_fleet']} on-demand)" if r["matched_p99_fleet"] else \
            " (none of 3–8 matches)"
        lines.append(f"| {r['source']} | {r['trace']} | {r.get('ondemand_p99_bias_s', '—')} | "
                     f"{pct(r['equal_instance_hours'])} | {pct(r['matched_p99'])}{fleet} | "
                     f"{pct(r.get('smallest_meeting_rate'))} |")
    return "\n".join(lines)


# Each uncertain parameter over its plausible range (docs/simulator.md has the sources);
# the first value of each is the default the other sections use.
SENSITIVITY: dict[str, tuple[Any, ...]] = {
    "disk_gb_per_s": (2.0, 0.5, 12.0),          # one NVMe SSD; EBS-like; page cache
    "nic_gbps": (None, 10.0, 100.0),            # the instance type's 50 Gbit/s
    "boot_s": (0.0, 30.0, 60.0),
    "grace_s": (30.0, 15.0, 120.0),             # the artifact's; AWS gives 120 s
    "migration_overhead_s": (2.0, 0.5, 4.0),    # spotserve's fixed cost; the artifact's 0.5
    "engine_start_s": (5.0, 0.0, 20.0),         # a baseline engine's start
    "batching": ("static", "continuous"),
}
SENSITIVITY_CELLS = (("20b", "A_S"), ("20b", "B_S"), ("30b", "A_S"), ("30b", "B_S"))


def sensitivity_runs(ref: Path) -> list[dict[str, Any]]:
    """Per cell, at the defaults and at each other value of each parameter (the rest at
    their defaults): the P99 of spotserve and of both baselines, and the ratio best
    baseline ÷ spotserve."""
    rows = []
    for model, trace in SENSITIVITY_CELLS:
        runs = [("defaults", None)] + [(param, value) for param, values in SENSITIVITY.items()
                                       for value in values[1:]]
        for param, value in runs:
            extra = {} if param == "defaults" else {param: value}
            s = setup(ref, model, TRACES[trace], **extra)
            p99 = {a: run(s, a)["latency"]["p99_s"] for a in ("spotserve", *BASELINES)}
            best = min(BASELINES, key=lambda b: p99[b] if p99[b] is not None else math.inf)
            ratio = None if not p99["spotserve"] or p99[best] is None \
                else round(p99[best] / p99["spotserve"], 2)
            rows.append({"model": model, "trace": trace, "param": param, "value": value,
                         "spotserve_p99_s": p99["spotserve"],
                         "reparallelize_p99_s": p99["reparallelize"],
                         "reroute_p99_s": p99["reroute"], "best_baseline": best,
                         "p99_ratio": ratio})
    return rows


def robustness(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per cell: the smallest and largest ratio over the sensitivity runs, which parameter
    gives each, and whether spotserve stays ahead (ratio > 1) throughout."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        if r["p99_ratio"] is None:
            continue
        cell = out.setdefault((r["model"], r["trace"]), {"min": None, "max": None})
        label = f"{r['param']}={r['value']}" if r["param"] != "defaults" else "defaults"
        if cell["min"] is None or r["p99_ratio"] < cell["min"][0]:
            cell["min"] = (r["p99_ratio"], label)
        if cell["max"] is None or r["p99_ratio"] > cell["max"][0]:
            cell["max"] = (r["p99_ratio"], label)
    for cell in out.values():
        cell["robust"] = cell["min"][0] > 1.0
    return out


def sensitivity_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | trace | parameter | value | spotserve P99 s | reparallelize P99 s "
             "| reroute P99 s | best baseline | P99 ratio |", "|" + "---|" * 9]
    for r in rows:
        value = "" if r["param"] == "defaults" else r["value"] if r["value"] is not None \
            else "the instance type's"
        lines.append(f"| {r['model']} | {r['trace']} | {r['param']} | {value} | "
                     f"{_f(r['spotserve_p99_s'])} | {_f(r['reparallelize_p99_s'])} | "
                     f"{_f(r['reroute_p99_s'])} | {r['best_baseline']} | "
                     f"{_f(r['p99_ratio'])}× |")
    return "\n".join(lines)


HETERO_POOL = (("g5.12xlarge", "g5", 2), ("g6.12xlarge", "g6", 3), ("g6e.xlarge", "g6e", 4))
HETERO_RATES = {"llama-3.1-70b": 0.3, "qwen3-32b": 1.0}


def hetero_runs() -> list[dict[str, Any]]:
    catalog = Catalog.load()
    names = {f"{short}-{k}": itype for itype, short, n in HETERO_POOL for k in range(n)}
    rows = []
    for model, rate in HETERO_RATES.items():
        spec = resolve_model(model)
        cost = RooflineCostModel(spec)
        subsets = {"heterogeneous": tuple(names)}
        subsets.update({itype: tuple(n for n in names if names[n] == itype)
                        for itype, _, _ in HETERO_POOL})
        planned = {}
        for label, nodes in subsets.items():
            instances = tuple(Instance(n, catalog.instance(names[n])) for n in nodes)
            result = plan(PlanRequest(spec, instances, cost, rate=rate,
                                      strategy="auto" if label == "heterogeneous"
                                      else "homogeneous"))
            planned[label] = result
        homes = [k for k in planned if k != "heterogeneous" and planned[k].config is not None]
        best_home = max(homes, key=lambda k: (planned[k].meets_rate, planned[k].throughput
                                              / planned[k].cost_per_hour))
        for label in ("heterogeneous", best_home):
            result = planned[label]
            base = {"model": model, "pool": label, "config": result.config.describe()
                    if result.config else None, "plan_throughput": round(result.throughput, 3),
                    "usd_per_hour": round(result.cost_per_hour, 2),
                    "throughput_per_usd_hour": round(result.throughput / result.cost_per_hour,
                                                     4) if result.cost_per_hour else None}
            for interrupted in (False, True):
                rows.append({**base, "interruption": interrupted,
                             **_hetero_sim(model, rate, subsets[label], names, interrupted)})
    return rows


def _hetero_sim(model: str, rate: float, nodes: tuple[str, ...], types: dict[str, str],
                interrupted: bool) -> dict[str, Any]:
    end = 1200.0
    events = [TraceEvent(0.0, "add", nodes)]
    victim = next(n for n in nodes if n.startswith("g6e")) if any(
        n.startswith("g6e") for n in nodes) else nodes[0]
    if interrupted:
        events += [TraceEvent(600.0, "remove", (victim,)),
                   TraceEvent(900.0, "add", (victim + "-new",))]
    node_types = {**types, victim + "-new": types[victim]}
    trace = Trace(tuple(events), end, "synthetic")
    arrivals = generated((rate,), 60.0, end, 1.0, 0, 512, 128)
    s = Setup(model=model, trace=trace, arrivals=arrivals, rate=rate, node_types=node_types,
              instance_type=types[nodes[0]], spot_prices={}, batching=BATCHING[0])
    entry = run(s, "spotserve")
    lat = entry["latency"]
    return {"requests": entry["requests"], "failed": entry["failed"],
            "throughput_req_s": round(entry["completed"] / end, 3), "avg_s": lat["avg_s"],
            "p99_s": lat["p99_s"], "usd_per_1k_tokens": entry["usd_per_1k_tokens"],
            "migrations": entry["migrations"]}


# -- rendering ------------------------------------------------------------------------
def _f(x: Any, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, trace): best baseline P99 / spotserve P99, and cost vs on-demand."""
    cells: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["model"], r["trace"]), {})[r["approach"]] = r
    out = []
    for (model, trace), by in cells.items():
        spot = by.get("spotserve")
        base = [by[b] for b in BASELINES if b in by and by[b]["p99_s"] is not None]
        if spot is None or not base or spot["p99_s"] is None:
            continue
        best = min(base, key=lambda b: b["p99_s"])
        demand = by.get("ondemand")
        saving = None
        if demand and demand["usd_per_1k_tokens"] and spot["usd_per_1k_tokens"]:
            saving = 1 - spot["usd_per_1k_tokens"] / demand["usd_per_1k_tokens"]
        out.append({"model": model, "trace": trace, "best_baseline": best["approach"],
                    "p99_ratio": round(best["p99_s"] / spot["p99_s"], 2),
                    "avg_ratio": round(best["avg_s"] / spot["avg_s"], 2),
                    "cost_saving_vs_ondemand": None if saving is None else round(saving, 3)})
    return out


def latency_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | trace | approach | done/total | avg s | P99 s | $/1k tok | re-plans "
             "| migrations | reloads | restarted |", "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['model']} | {r['trace']} | {r['approach']} | "
                     f"{r['requests'] - r['failed']}/{r['requests']} | {_f(r['avg_s'])} | "
                     f"{_f(r['p99_s'])} | {_f(r['usd_per_1k_tokens'], 4)} | {r['replans']} | "
                     f"{r['migrations']} | {r['reloads']} | {r['restarts']} |")
    return "\n".join(lines)


def ratio_table(rows: list[dict[str, Any]],
                robust: dict[tuple[str, str], dict[str, Any]] | None = None) -> str:
    lines = ["| model | trace | best baseline | P99 ratio (baseline / spotserve) | avg ratio "
             "| $/token vs on-demand | P99 ratio under sensitivity | robust |",
             "|" + "---|" * 8]
    for r in rows:
        saving = r["cost_saving_vs_ondemand"]
        cell = (robust or {}).get((r["model"], r["trace"]))
        span = "—" if cell is None else \
            f"{cell['min'][0]:.2f}× ({cell['min'][1]}) – {cell['max'][0]:.2f}× ({cell['max'][1]})"
        verdict = "—" if cell is None else "yes" if cell["robust"] else "no"
        lines.append(f"| {r['model']} | {r['trace']} | {r['best_baseline']} | "
                     f"{r['p99_ratio']:.2f}× | {r['avg_ratio']:.2f}× | "
                     f"{'—' if saving is None else f'{-saving * 100:+.0f}%'} | {span} | "
                     f"{verdict} |")
    return "\n".join(lines)


def hetero_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | pool | config | planned req/s | $/h | req/s per $/h | interrupted "
             "| served req/s | avg s | P99 s | $/1k tok (all held) | failed |", "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['model']} | {r['pool']} | {r['config']} | {r['plan_throughput']} "
                     f"| {r['usd_per_hour']} | {r['throughput_per_usd_hour']} | "
                     f"{'yes' if r['interruption'] else 'no'} | {r['throughput_req_s']} | "
                     f"{_f(r['avg_s'])} | {_f(r['p99_s'])} | {_f(r['usd_per_1k_tokens'], 4)} | "
                     f"{r['failed']} |")
    return "\n".join(lines)


SECTIONS = {"main": main_runs, "fluctuating": fluctuating_runs, "ablation": ablation_runs,
            "ondemand": ondemand_runs, "sensitivity": sensitivity_runs}
ALL = "main,fluctuating,ablation,ondemand,hetero,sensitivity"


def render(result: dict[str, Any], command: str) -> str:
    md = ["# SpotServe reproduction (simulated)", "", f"Command: `{command}`", "",
          "Every timing parameter, its source and what it affects: docs/simulator.md.", ""]
    robust = robustness(result.get("sensitivity", []))
    for name, rows in result.items():
        if name.endswith("_ratios"):
            continue
        if name == "hetero":
            md += ["## heterogeneous pool (roofline)", "", hetero_table(rows), ""]
            continue
        if name == "cost":
            md += ["## cost", "",
                   "Spotserve's cost per token against on-demand only, three ways: (a) the "
                   "same instance-hours at on-demand prices; (b) the smallest on-demand fleet "
                   "(3, 4, 6 or 8 instances) whose P99 is at most spotserve's; (c) the smallest "
                   "on-demand fleet that reaches the rate. On the authors' measured GPT-20B "
                   "runs (their artifact's figures), the paper's 54% saving is (b) on B_S "
                   "without the 9 s bias the plot subtracts from the on-demand P99: against "
                   "8 on-demand nodes. With the bias, 6 nodes match and it is 38%.", "",
                   cost_table(rows), ""]
            continue
        if name == "sensitivity":
            md += ["## sensitivity", "",
                   "P99 of the best baseline over spotserve's as each uncertain parameter "
                   "moves over its plausible range, the others at their defaults:", "",
                   sensitivity_table(rows), ""]
            continue
        md += [f"## {name}", "", latency_table(rows), ""]
        if name in ("main", "fluctuating"):
            md += ["P99 and average latency of the best baseline over spotserve's; cost per "
                   "token of spotserve against on-demand only; for the cells the sensitivity "
                   "section covers, the range of the P99 ratio there and whether spotserve "
                   "stays ahead throughout (robust):", "",
                   ratio_table(result[f"{name}_ratios"], robust), ""]
    return "\n".join(md)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", type=Path, default=REFERENCE)
    p.add_argument("--only", default=ALL, help=f"sections, comma-separated ({ALL})")
    p.add_argument("--batching", choices=("static", "continuous"), default="static",
                   help="static: SpotServe's engine (the paper's setting)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "paper")
    args = p.parse_args()
    BATCHING[0] = args.batching
    wanted = args.only.split(",")
    unknown = [w for w in wanted if w not in (*SECTIONS, "hetero")]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; choose from {ALL}")
    if not args.reference.is_dir():
        p.error(f"{args.reference}: no SpotServe reference data (traces, queries, profiles)")
    began = time.perf_counter()
    result: dict[str, Any] = {}
    for name in wanted:
        started = time.perf_counter()
        print(f"{name}: running", flush=True)
        rows = hetero_runs() if name == "hetero" else SECTIONS[name](args.reference)
        result[name] = rows
        if name in ("main", "fluctuating"):
            result[f"{name}_ratios"] = ratios(rows)
        print(f"{name}: {len(rows)} rows in {time.perf_counter() - started:.1f} s", flush=True)
    if "main" in result and "ondemand" in result:
        result["cost"] = cost_rows(result["main"], result["ondemand"]) + artifact_cost()
    robust = robustness(result.get("sensitivity", []))
    for name in ("main_ratios", "fluctuating_ratios"):
        for r in result.get(name, []):
            cell = robust.get((r["model"], r["trace"]))
            if cell:
                r["sensitivity"] = {"min": cell["min"], "max": cell["max"],
                                    "robust": cell["robust"]}
    command = f"python bench/paper/run.py --only {args.only} --batching {args.batching}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "paper.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "paper.md").write_text(render(result, command))
    print((args.out / "paper.md").read_text())
    print(f"all sections in {time.perf_counter() - began:.0f} s", flush=True)


if __name__ == "__main__":
    main()
