"""`spotserve up --local`: serve a model on this machine behind the router, no trace.

Starts the router (OpenAI HTTP + gRPC), the controller and `--instances` emulated
instances (one `spotserve worker` process per GPU, on 127.0.0.N), then serves until
Ctrl-C, which stops it at any moment, while starting too. Each run starts clean: a
previous run's controller state (its workers ended with it) is cleared. Top level imports
only the standard library and the core.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from spotserve.errors import SpotserveError

from .model_choice import MODEL_HELP, check_model_arg

HELP = "serve a model locally behind the router (SmolLM2-135M-Instruct by default)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--local", action="store_true",
                        help="run everything on this machine (the only mode of `up`; on "
                             "Kubernetes install the Helm chart instead)")
    parser.add_argument("--model", metavar="DIR|smollm2|tiny", help=MODEL_HELP)
    parser.add_argument("--instances", type=int, default=1,
                        help="emulated instances to start (1)")
    parser.add_argument("--instance-type", default="cpu-1x",
                        help="cpu-1x, cpu-2x or cpu-4x: worker processes per instance")
    parser.add_argument("--device", default="cpu",
                        help="worker device: cpu, or cuda: each emulated GPU a GPU of this "
                        "machine of its own (cuda:0, cuda:1, ...; instances that find none "
                        "free fail to boot) (cpu)")
    parser.add_argument("--http", default="127.0.0.1:8000", metavar="HOST:PORT",
                        help="OpenAI-compatible HTTP address (127.0.0.1:8000)")
    parser.add_argument("--grpc", default="127.0.0.1:50051", metavar="HOST:PORT",
                        help="gRPC Inference address (127.0.0.1:50051)")
    parser.add_argument("--max-queue", type=int, default=512, metavar="N",
                        help="requests that may wait for a slot before the router answers "
                             "429 (512: more than `spotserve router`'s 256, since a local "
                             "CPU worker is slow to free slots)")
    parser.add_argument("--max-concurrency", type=int, default=8, metavar="N",
                        help="requests one pipeline runs at once when the plan sets no cap "
                             "(8: what a CPU worker serves well; `spotserve router` says 64)")
    parser.add_argument("--out", type=Path, default=Path("spotserve-up"), metavar="DIR",
                        help="logs and this run's controller state, cleared at each start "
                             "(./spotserve-up)")


def run(args: argparse.Namespace) -> int:
    if not args.local:
        raise SpotserveError("spotserve up needs --local (on Kubernetes, install the Helm "
                             "chart: charts/spotserve)")
    for flag, number in (("--instances", args.instances), ("--max-queue", args.max_queue),
                         ("--max-concurrency", args.max_concurrency)):
        if number < 1:
            raise SpotserveError(f"{flag} {number}: must be at least 1")
    check_model_arg(args.model)
    for flag, value in (("--http", args.http), ("--grpc", args.grpc)):
        if ":" not in value or not value.rpartition(":")[2].isdigit():
            raise SpotserveError(f"{flag} {value!r}: expected HOST:PORT")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # no fork() notices from gRPC core
    from .up import serve

    return serve(args)
