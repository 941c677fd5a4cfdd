"""`spotserve simulate`: replay a preemption trace against every approach, report latency
and cost. Only the standard library and the core are imported at module level."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from spotserve.errors import SpotserveError

HELP = "simulate serving on a spot-instance trace and compare approaches (latency, cost)"

DEFAULT_SPOT_PRICES = {"g4dn.12xlarge": 1.9046}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="6.7b, 20b, 30b, a built-in name or an "
                        "HF config.json")
    parser.add_argument("--trace", required=True, help="availability trace (g4dn.csv format "
                        "or trace_*.txt JSON lines)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--queries", help="request arrival trace (id, arrival_s, seq_len, "
                        "offset)")
    source.add_argument("--rate", type=float, help="generated arrivals, requests/s")
    source.add_argument("--rates", help="file of per-minute rates (requests/s)")
    parser.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of "
                        "generated inter-arrival times (1: Poisson; else Gamma)")
    parser.add_argument("--seed", type=int, default=0, help="seed of generated arrivals")
    parser.add_argument("--plan-rate", type=float, help="the planner's required rate α "
                        "(default: the mean arrival rate)")
    parser.add_argument("--approach", default="all", help="all (spotserve, reparallelize, "
                        "reroute, ondemand), ablation, every, or one name")
    parser.add_argument("--profile", help="SpotServe profile JSON (else the roofline model)")
    parser.add_argument("--min-gpus-per-replica", type=int, default=1,
                        help="fewest GPUs one pipeline may use (the model must fit: 1)")
    parser.add_argument("--max-batch", type=int, default=4,
                        help="largest batch B the planner may choose (4)")
    parser.add_argument("--instance-type", default="g4dn.12xlarge",
                        help="catalog instance type of the trace's nodes")
    parser.add_argument("--prices", default="", help="spot prices as TYPE=USD_PER_HOUR,... "
                        "(default g4dn.12xlarge=1.9046; on-demand prices from the catalog)")
    parser.add_argument("--on-demand-nodes", default="", help="trace nodes that are on-demand")
    parser.add_argument("--no-notice", default="",
                        help="trace nodes killed without a termination notice, comma-separated")
    parser.add_argument("--ondemand-instances", type=int, help="fleet size of the ondemand "
                        "approach (default: the fewest that reach the rate)")
    parser.add_argument("--grace", type=float, default=30.0, help="notice → termination, s")
    parser.add_argument("--boot-delay", type=float, default=0.0,
                        help="trace add → instance usable, s")
    parser.add_argument("--disk-gb-per-s", type=float, default=2.0,
                        help="each instance reads the checkpoint from its own disk at this "
                        "rate, GB/s (2.0: one NVMe SSD; see docs/simulator.md)")
    parser.add_argument("--engine-start", type=float, default=5.0,
                        help="a baseline engine's start after its weights are read, s (5)")
    parser.add_argument("--nic-gbps", type=float,
                        help="network bandwidth of every instance, Gbit/s (default: the "
                        "instance type's, 50 for g4dn.12xlarge)")
    parser.add_argument("--batching", choices=("static", "continuous"), default="static",
                        help="static batches (SpotServe's engine, default) or continuous "
                        "batching (this project's worker engine)")
    parser.add_argument("--input-tokens", type=int, default=512,
                        help="prompt tokens of every generated request (512)")
    parser.add_argument("--output-tokens", type=int, default=128,
                        help="output tokens of every generated request (128)")
    parser.add_argument("--out", help="directory for report.json, report.md and plots")
    parser.add_argument("--no-plots", action="store_true",
                        help="write report.json and report.md only, no PNG plots")
    parser.add_argument("--json", action="store_true", help="print the JSON report")


def _positive(args: argparse.Namespace) -> None:
    for flag in ("rate", "cv", "plan_rate", "disk_gb_per_s", "nic_gbps"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            raise SpotserveError(f"--{flag.replace('_', '-')} must be positive (got {value})")
    for flag in ("min_gpus_per_replica", "max_batch", "input_tokens", "output_tokens",
                 "ondemand_instances"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SpotserveError(f"--{flag.replace('_', '-')} must be at least 1 (got {value})")
    if args.grace < 0 or args.boot_delay < 0 or args.engine_start < 0:
        raise SpotserveError("--grace, --boot-delay and --engine-start must not be negative")


def _prices(text: str) -> dict[str, float]:
    if not text:
        return dict(DEFAULT_SPOT_PRICES)
    out = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise SpotserveError(f"--prices: expected TYPE=USD, got {item!r}") from None
        if not sep or out[name.strip()] < 0:
            raise SpotserveError(f"--prices: expected TYPE=USD, got {item!r}")
    return out


def build_setup(args: argparse.Namespace) -> Any:
    from spotserve.operator.planner.cost_model import Workload
    from spotserve.traces import load_queries, load_rates, load_trace

    from .runner import Setup
    from .workload import from_queries, generated

    _positive(args)
    trace = load_trace(args.trace)
    if args.queries:
        arrivals = from_queries(load_queries(args.queries), args.output_tokens, trace.end_s,
                                args.input_tokens)
    else:
        rates = (args.rate,) if args.rate else load_rates(args.rates)
        arrivals = generated(rates, 60.0, trace.end_s, args.cv, args.seed, args.input_tokens,
                             args.output_tokens)
    mean = len(arrivals) / trace.end_s if trace.end_s > 0 else 0.0
    return Setup(
        model=args.model, trace=trace, arrivals=arrivals, rate=args.plan_rate or mean,
        profile=Path(args.profile) if args.profile else None,
        min_gpus_per_replica=args.min_gpus_per_replica, max_batch=args.max_batch,
        instance_type=args.instance_type, spot_prices=_prices(args.prices),
        on_demand_nodes=frozenset(n for n in args.on_demand_nodes.split(",") if n),
        no_notice_nodes=frozenset(n for n in args.no_notice.split(",") if n),
        ondemand_instances=args.ondemand_instances, grace_s=args.grace,
        boot_s=args.boot_delay, disk_gb_per_s=args.disk_gb_per_s,
        engine_start_s=args.engine_start, nic_gbps=args.nic_gbps,
        workload=Workload(args.input_tokens, args.output_tokens), batching=args.batching)


def run(args: argparse.Namespace) -> int:
    from spotserve.catalog import Catalog
    from spotserve.models import resolve_model

    from . import report
    from .runner import approaches
    from .runner import run as simulate

    setup = build_setup(args)
    catalog = Catalog.load()
    catalog.instance(setup.instance_type)
    resolve_model(setup.model)
    names = approaches(args.approach)
    entries = [simulate(setup, name, catalog) for name in names]
    meta = {"model": setup.model, "trace": setup.trace.source, "duration_s": setup.trace.end_s,
            "requests": len(setup.arrivals), "plan_rate": setup.rate, "grace_s": setup.grace_s,
            "seed": args.seed, "batching": setup.batching}
    if args.out:
        report.write(Path(args.out), entries, meta, plots=not args.no_plots)
    if args.json:
        json.dump({"meta": meta, "approaches": entries}, sys.stdout, indent=1)
        print()
    else:
        print(f"{setup.model} on {setup.trace.source}: {len(setup.arrivals)} requests, "
              f"{setup.trace.end_s:.0f} s, α={setup.rate:.3f} req/s")
        print(report.markdown(entries), end="")
    return 0
