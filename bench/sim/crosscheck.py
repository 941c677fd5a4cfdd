"""Cross-check: one compressed spot trace through local mode and through the simulator.

1. builds the tiny Llama that `spotserve demo` serves and measures its profile on this
   machine (`spotserve profile`, CPU);
2. plays the demo's built-in trace in local mode (real worker processes, real migrations),
   its controller planning with that profile;
3. replays the same trace, with the very arrivals local mode sent (times and output
   lengths), through `spotserve simulate`'s engine with the same profile, the local
   catalog, grace, boot time and batching;
4. compares the latency distributions (of the requests sent once local mode served its
   first token: it starts cold, the simulation warm), the configurations, and the
   migrations (count, and each one's planned against its measured duration); writes
   bench/results/crosscheck.json.

    python bench/sim/crosscheck.py           # about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from spotserve.catalog import Catalog
from spotserve.operator.local.cloud import DEFAULT_NO_NOTICE, DEFAULT_TRACE, script
from spotserve.operator.local.runner import CATALOG, RunOptions, RunResult, run_local
from spotserve.operator.local.tiny_model import build_tiny_llama
from spotserve.operator.planner.cost_model import Workload
from spotserve.operator.sim.runner import Setup, run
from spotserve.operator.sim.workload import Arrival

ROOT = Path(__file__).resolve().parents[2]
PERCENTILES = (50, 90, 99)


def progress(line: str) -> None:
    print(f"crosscheck: {line}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))], 3)


def measure_profile(model: Path, out: Path, prompt_tokens: int, tp: str) -> Path:
    progress(f"measuring the tiny model's profile on this CPU (spotserve profile, TP {tp})")
    subprocess.run([sys.executable, "-m", "spotserve.cli", "profile", "--model", str(model),
                    "--tp", tp, "--batch", "1,2,4,8", "--seq-in", str(prompt_tokens),
                    "--device", "cpu", "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    return out


def local_migrations(result: RunResult) -> list[dict[str, Any]]:
    """Per epoch that served: the planner's estimate and the measured plan → serving time."""
    planned: dict[int, dict[str, Any]] = {}
    out = []
    for e in result.journal:
        if e["kind"] == "planned":
            planned[e["epoch"]] = e
        elif e["kind"] == "serving" and e["epoch"] in planned:
            p = planned[e["epoch"]]
            out.append({"epoch": e["epoch"], "config": e.get("config"),
                        "planned_s": round(float(p.get("seconds", 0.0)), 3),
                        "measured_s": round(e["time"] - p["time"], 3),
                        "bytes": int(p.get("bytes", 0))})
    return out


def boot_seconds(result: RunResult) -> float | None:
    """Median InstanceBooting → InstanceReady of local mode's instances."""
    booting: dict[str, float] = {}
    spans = []
    for e in result.journal:
        if e.get("event") == "InstanceBooting":
            booting[e["name"]] = e["time"]
        elif e.get("event") == "InstanceReady" and e["name"] in booting:
            spans.append(e["time"] - booting.pop(e["name"]))
    return percentile(spans, 50)


def summarize(latencies: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {"requests": len(latencies)}
    out.update({f"p{q}_s": percentile(latencies, q) for q in PERCENTILES})
    out["mean_s"] = round(sum(latencies) / len(latencies), 3) if latencies else None
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=2.0, help="requests per second (2)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (64)")
    p.add_argument("--prompt-tokens", type=int, default=12)
    p.add_argument("--grace", type=float, default=10.0, help="notice → kill, s (10)")
    p.add_argument("--tp", default="1",
                   help="TP degrees profiled, so planned (default 1: pipelines of 2 "
                        "stages; `spotserve profile` leaves TP communication out, so with "
                        "TP 2 allowed the simulation prices it as free)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "crosscheck.json")
    args = p.parse_args()
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_tiny_llama(work / "tiny-llama")
        profile = measure_profile(model, work / "profile.json", args.prompt_tokens, args.tp)
        cloud = script(DEFAULT_TRACE, 1.0, args.grace, DEFAULT_NO_NOTICE)
        progress(f"local mode: {cloud.source}, {cloud.end:.0f} s, {args.rate:g} req/s of "
                 f"{args.max_tokens} tokens")
        options = RunOptions(model_dir=model, workdir=work / "local", script=cloud,
                             grace=args.grace, rate=args.rate, planned_rate=args.rate,
                             prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
                             reference=False, profile=profile, say=progress)
        local = asyncio.run(run_local(options))
        served = [r for r in local.records if not r.error]
        arrivals = tuple(Arrival(k, r.sent, len(r.prompt), max(1, len(r.tokens)))
                         for k, r in enumerate(sorted(served, key=lambda r: r.sent)))
        boot = boot_seconds(local) or 0.0
        progress(f"simulating the same {len(arrivals)} arrivals (boot {boot:.1f} s)")
        setup = Setup(model=str(model), trace=DEFAULT_TRACE, arrivals=arrivals, rate=args.rate,
                      profile=profile, min_gpus_per_replica=options.min_gpus_per_replica,
                      max_batch=8, instance_type=options.instance_type, spot_prices={},
                      grace_s=args.grace, boot_s=boot,
                      no_notice_nodes=frozenset(DEFAULT_NO_NOTICE),
                      workload=Workload(args.prompt_tokens, args.max_tokens),
                      batching="continuous")
        catalog = Catalog.load(CATALOG)
        sim = run(setup, "spotserve", catalog)
        # the same, with the migration fixed cost local mode measured instead of the
        # planner's default (the bytes here are tiny: the fixed cost is nearly all of it)
        migrations = local_migrations(local)
        measured = percentile([m["measured_s"] for m in migrations], 50) or 0.0
        sim_measured = run(replace(setup, migration_overhead_s=measured), "spotserve", catalog)
        profile_data = json.loads(profile.read_text())
    # local mode starts cold (workers boot and load before the first configuration
    # serves) where the simulation starts warm: compare the requests sent once local mode
    # served its first token
    warm = min((r.token_times[0] for r in served if r.token_times), default=0.0)
    local_lat = [r.latency for r in served if r.sent >= warm]
    sim_lat = [s[1] for s in sim["series"] if s[0] >= warm]
    sim_measured_lat = [s[1] for s in sim_measured["series"] if s[0] >= warm]
    gaps = [b - a for r in served for a, b in itertools.pairwise(r.token_times) if b > a]
    report = {
        "benchmark": "crosscheck", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python " + " ".join(sys.argv),
        "config": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "trace": DEFAULT_TRACE.source, "no_notice": list(DEFAULT_NO_NOTICE),
                   "boot_s": boot, "batching": "continuous",
                   "compared_from_s": round(warm, 3)},
        "profile": {k: profile_data[k] for k in ("device", "dtype", "seq_in") if k in profile_data},
        "latency": {"local": summarize(local_lat), "simulated": summarize(sim_lat),
                    "simulated_measured_overhead": summarize(sim_measured_lat)},
        "per_token_s": {"local_gap_p50": percentile(gaps, 50),
                        "simulated_mean": round(statistics.fmean(
                            s[1] / max(1, args.max_tokens) for s in sim["series"]), 4)},
        "migration_overhead_s": {"planner": setup.migration_overhead_s,
                                 "measured_median": measured},
        "failed": {"local": len(local.failed), "simulated": sim["failed"]},
        "configurations": {"local": [c["config"] for c in local.configs],
                           "simulated": [t["config"] for t in sim["timeline"]
                                         if t["event"] == "switch"]},
        "migrations": {"local": migrations, "local_count": len(migrations),
                       "local_moving_bytes": sum(m["bytes"] > 0 for m in migrations),
                       "simulated_count": sum(t["event"] == "switch" for t in sim["timeline"]),
                       "simulated_moving_bytes": sim["migrations"],
                       "simulated_seconds": sim["migration_s"]},
        "resumed": {"local": local.resumed, "simulated_reprefills": sim["reprefills"]},
        "run_seconds": round(time.monotonic() - began, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    print(f"wrote {args.out} in {report['run_seconds']} s")
    return 0


def render(report: dict[str, Any]) -> str:
    lat, fixed = report["latency"], report["migration_overhead_s"]
    lines = [f"| latency | local mode | simulated (migration fixed cost {fixed['planner']} s) "
             f"| ÷ local | simulated ({fixed['measured_median']} s, as measured) | ÷ local |",
             "|---|---|---|---|---|---|"]
    for key in ("mean_s", *(f"p{q}_s" for q in PERCENTILES)):
        a = lat["local"][key]
        cells = []
        for variant in ("simulated", "simulated_measured_overhead"):
            b = lat[variant][key]
            cells += [f"{b} s", f"{b / a:.2f}" if a and b is not None else "—"]
        lines.append(f"| {key[:-2]} | {a} s | " + " | ".join(cells) + " |")
    per = report["per_token_s"]
    lines += ["", f"per token: local mode's inter-token gap P50 {per['local_gap_p50']} s, "
              f"the simulation's latency per token {per['simulated_mean']} s"]
    m = report["migrations"]
    lines += ["", f"configurations served: local {m['local_count']}, simulated "
              f"{m['simulated_count']}; of them moving bytes: local {m['local_moving_bytes']}, "
              f"simulated {m['simulated_moving_bytes']} ({m['simulated_seconds']:.2f} s "
              "planned in all)",
              "| epoch | config | planned s | measured s | measured ÷ planned |",
              "|---|---|---|---|---|"]
    for e in m["local"]:
        ratio = f"{e['measured_s'] / e['planned_s']:.2f}" if e["planned_s"] else "—"
        lines.append(f"| {e['epoch']} | {e['config']} | {e['planned_s']} | "
                     f"{e['measured_s']} | {ratio} |")
    c = report["configurations"]
    lines += ["", f"configurations: local {' → '.join(c['local'])}",
              f"                simulated {' → '.join(c['simulated'])}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
