"""The body of `spotserve demo` (see `demo_cli`): build or take a model, play the trace,
print the summary, write the JSON report and the PNG timeline."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path

from spotserve.catalog import Catalog
from spotserve.traces import load_trace

from .cloud import DEFAULT_NO_NOTICE, DEFAULT_TRACE, Script, script
from .report import plot, summary, summary_text, write_json
from .runner import CATALOG, RunOptions, run_local
from .tiny_model import build_tiny_llama

TARGET_SECONDS = 120.0


def load_cloud(args: argparse.Namespace) -> Script:
    """The script to play: the built-in trace, or a trace file fitted into ~2 minutes."""
    if args.trace is None:
        return script(DEFAULT_TRACE, args.compression or 1.0, args.grace,
                      args.no_notice or DEFAULT_NO_NOTICE)
    trace = load_trace(args.trace)
    compression = args.compression or max(1.0, trace.end_s / TARGET_SECONDS)
    return script(trace, compression, args.grace, args.no_notice)


def run_demo(args: argparse.Namespace) -> int:
    Catalog.load(CATALOG).instance(args.instance_type)  # a bad type fails before anything
    cloud = load_cloud(args)
    out: Path = args.out.resolve()  # workers run elsewhere: every path they get is absolute
    out.mkdir(parents=True, exist_ok=True)

    def say(text: str) -> None:
        if not args.quiet:
            print(text, flush=True)

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    model = args.model.resolve() if args.model is not None else None
    if model is None:
        model = build_tiny_llama(out / "tiny-llama")
        say(f"built a tiny random Llama in {model}")
    say(f"playing {cloud.source}: {len(cloud.kills(True))} preemptions with notice "
        f"({args.grace:g} s grace), {len(cloud.kills(False))} without, over "
        f"{cloud.end:.0f} s; {args.rate:g} requests/s of {args.max_tokens} tokens")
    options = RunOptions(model_dir=model, workdir=out, script=cloud,
                         instance_type=args.instance_type, grace=args.grace, rate=args.rate,
                         prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
                         restart_at=args.restart_controller_at,
                         reference=not args.no_reference, say=say)
    result = asyncio.run(run_local(options))
    numbers = summary(result)
    numbers["total_seconds"] = round(time.monotonic() - started, 1)
    report, timeline = out / "report.json", out / "timeline.png"
    write_json(report, result, numbers)
    plot(timeline, result)
    print("\n=== spotserve demo summary ===")
    print(summary_text(numbers))
    print(f"report      {report}\ntimeline    {timeline}\nlogs        {out / 'logs'}, "
          f"{out / 'controller'}")
    good = numbers["failed"] == 0 and (args.no_reference or numbers["outputs_correct"])
    return 0 if good else 1
