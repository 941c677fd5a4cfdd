"""`spotserve demo`: the whole system on this machine in a few minutes.

Serves SmolLM2-135M-Instruct (fetched and imported on first use; `--model` takes a folder,
or `tiny` for a random Llama), starts the router, the controller and emulated spot
instances (worker processes on 127.0.0.N), replays an availability trace (the built-in one
by default) while chat questions stream through the router, then replays every prompt on
the final configuration to check the outputs against a run with no preemption. Prints
live progress, answers from before, across and after the migrations, and a summary;
writes `report.json` and `timeline.png` to `--out`. Top level imports only the standard
library and the core.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from spotserve.errors import SpotserveError

from .model_choice import MODEL_HELP, check_model_arg

HELP = "run the whole system locally on a compressed spot trace and print a summary"
TARGET_SECONDS = 120.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR|smollm2|tiny", help=MODEL_HELP)
    parser.add_argument("--trace", metavar="FILE",
                        help="SpotServe availability trace (g4dn.csv or a JSON-lines "
                             "segment; default: the built-in synthetic trace)")
    parser.add_argument("--compression", type=float, metavar="X",
                        help="divide trace times by X (default: 1 for the built-in trace, "
                             f"else fit the trace into {TARGET_SECONDS:g} s)")
    parser.add_argument("--grace", type=float, default=10.0, metavar="S",
                        help="seconds between a termination notice and the kill (10)")
    parser.add_argument("--no-notice", action="append", default=[], metavar="NODE",
                        help="kill this trace node without a notice (repeatable; the "
                             "built-in trace kills n4 without one)")
    parser.add_argument("--instance-type", default="cpu-1x",
                        help="emulated instance type: cpu-1x, cpu-2x or cpu-4x (cpu-1x)")
    parser.add_argument("--rate", type=float, metavar="REQ/S",
                        help="requests per second sent to the router (0.8 for a chat "
                             "model, 4 for the tiny random one)")
    parser.add_argument("--max-tokens", type=int,
                        help="tokens generated per request at most: a chat model's answer "
                             "ends at its end of turn (40), the tiny random model's random "
                             "prompts run to it (128)")
    parser.add_argument("--prompt-tokens", type=int, default=12,
                        help="prompt length in tokens, for the tiny random model or one "
                             "without a chat template (12)")
    parser.add_argument("--restart-controller-at", type=float, metavar="S",
                        help="restart the controller this many seconds in (it resumes from "
                             "its state file)")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the no-preemption reference run")
    parser.add_argument("--out", type=Path, default=Path("spotserve-demo"), metavar="DIR",
                        help="where the model, logs, report.json and timeline.png go "
                             "(./spotserve-demo)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")


def _check(args: argparse.Namespace) -> None:
    for name, value, ok in (("--rate", args.rate, args.rate is None or args.rate > 0),
                            ("--max-tokens", args.max_tokens,
                             args.max_tokens is None or args.max_tokens > 0),
                            ("--prompt-tokens", args.prompt_tokens, args.prompt_tokens > 0),
                            ("--grace", args.grace, args.grace >= 0),
                            ("--compression", args.compression,
                             args.compression is None or args.compression > 0)):
        if not ok:
            raise SpotserveError(f"{name} {value}: must be a positive number")
    check_model_arg(args.model)


def run(args: argparse.Namespace) -> int:
    _check(args)
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # no fork() notices from gRPC core
    from .demo import run_demo

    return run_demo(args)
