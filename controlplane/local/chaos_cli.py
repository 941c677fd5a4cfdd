"""`spotserve chaos`: the chaos campaign on this machine, with a table of what it found.

Each seed draws a run of faults (joins, notices with random grace, kills without notice
of drivers, followers and any instance, kills and notices timed to the controller's
preload, drain and configure phases, cascades, a stopped worker, a controller restart;
see `chaos`), plays it against local mode with the tiny model while another process keeps
a core busy, and checks that every request completed with exactly the output of a run
without preemption, and that nothing hung. Prints one line per seed and a table of
recovery times per fault kind; `--json` keeps it all. Exits 1 when any run was not clean.
Top level imports only the standard library and the core.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from spotserve.errors import SpotserveError

HELP = "run a seeded chaos campaign against local mode and check no request was lost"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, default=5, metavar="N",
                        help="runs to play, one seed each (5)")
    parser.add_argument("--first-seed", type=int, default=0, metavar="S",
                        help="the first seed; runs use S, S+1, ... (0)")
    parser.add_argument("--duration", type=float, default=40.0, metavar="S",
                        help="seconds of faults per run (40)")
    parser.add_argument("--rate", type=float, default=2.0, metavar="REQ/S",
                        help="requests per second sent during a run (2)")
    parser.add_argument("--routers", type=int, default=1, metavar="N",
                        help="router replicas (1); with 2 or more, SIGKILLs of the busiest "
                             "replica are among the faults and clients resume their streams")
    parser.add_argument("--busy-cores", type=int, default=1, metavar="N",
                        help="processes spinning on a core each meanwhile (1)")
    parser.add_argument("--out", type=Path, default=Path("spotserve-chaos"), metavar="DIR",
                        help="where the model and each run's logs go (./spotserve-chaos)")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="write every run's outcome and the summary here")


def _check(args: argparse.Namespace) -> None:
    for name, ok in (("--seeds", args.seeds > 0), ("--duration", args.duration >= 15),
                     ("--rate", args.rate > 0), ("--busy-cores", args.busy_cores >= 0),
                     ("--routers", 1 <= args.routers <= 4)):
        if not ok:
            raise SpotserveError(f"{name} {getattr(args, name[2:].replace('-', '_'))}: "
                                 "out of range (seeds > 0, duration >= 15, rate > 0, "
                                 "busy cores >= 0, routers 1 to 4)")


def _line(outcome: Any) -> str:
    verdict = "clean" if outcome.clean else "NOT CLEAN"
    faults = ", ".join(f"{k} {v}" for k, v in sorted(outcome.faults.items())) or "none fired"
    extra = f" error: {outcome.error}" if outcome.error else ""
    return (f"seed {outcome.seed:4d}  {verdict:9s}  requests {outcome.requests:4d}  failed "
            f"{outcome.failed}  hung {outcome.hung}  wrong {outcome.mismatched}  "
            f"(ties {outcome.differing})  {outcome.seconds:6.1f} s  faults: {faults}{extra}")


def _seconds(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def table_text(table: dict[str, dict[str, float]]) -> str:
    rows = [f"{'fault':24s} {'fired':>6s} {'interrupted':>12s} {'P50 s':>7s} {'P99 s':>7s} "
            f"{'max s':>7s}"]
    rows += [f"{label:24s} {int(r['faults']):6d} {int(r['interrupted']):12d} "
             f"{_seconds(r['p50_s']):>7s} {_seconds(r['p99_s']):>7s} {_seconds(r['max_s']):>7s}"
             for label, r in table.items()]
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    _check(args)
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    import asyncio
    import logging

    from .chaos import recovery_table, totals
    from .chaos_run import busy_cores, run_campaign

    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    started = time.monotonic()
    print(f"chaos campaign: {len(seeds)} seeds from {seeds[0]}, {args.duration:g} s of faults "
          f"each, {args.rate:g} req/s, {args.routers} router(s), {args.busy_cores} busy "
          f"core(s); logs in {out}",
          flush=True)
    with busy_cores(args.busy_cores):
        outcomes = asyncio.run(run_campaign(
            seeds, out, args.duration, args.rate, lambda text: print(text, flush=True),
            lambda outcome: print(_line(outcome), flush=True), args.routers))
    elapsed = time.monotonic() - started
    table, summary = recovery_table(outcomes), dict[str, float](totals(outcomes))
    summary["seconds"] = round(elapsed, 1)
    print(f"\n=== chaos summary: {summary['runs']} runs in {elapsed / 60:.1f} min ===")
    print(f"requests {summary['requests']}, failed {summary['failed']}, hung "
          f"{summary['hung']}, wrong outputs {summary['mismatched']} (a token not the greedy "
          f"choice for the tokens before it), harness errors {summary['errors']}; clean runs "
          f"{summary['clean_runs']}/{summary['runs']}")
    print(f"outputs that differ from the no-preemption reference at fp32 near-ties (correct, "
          f"batch-dependent rounding): {summary['differing_from_reference']}")
    print("recovery: from the fault to the next token of each request it interrupted")
    print(table_text(table))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": "spotserve chaos " + " ".join(sys.argv[2:]),
            "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()},
            "summary": summary, "recovery": {  # no interrupted request: null, not NaN
                label: {k: None if isinstance(v, float) and math.isnan(v) else v
                        for k, v in row.items()} for label, row in table.items()},
            "runs": [vars(o) for o in outcomes]}, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(o.clean for o in outcomes) else 1
