"""`spotserve router`: the public gRPC + OpenAI HTTP API in front of the pipelines.

The controller sends the pipelines over `Control.UpdateTopology`; `--pipeline` gives a
static set instead (local use, benchmarks). Top level imports only the standard library
and the core; grpc, aiohttp and tokenizers load inside `run`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from spotserve.errors import SpotserveError

HELP = "Run the router: public gRPC and OpenAI-compatible HTTP API, dispatch and resume."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, metavar="DIR",
                        help="model directory with tokenizer.json (and config.json, "
                             "tokenizer_config.json, and the chat template in "
                             "chat_template.jinja or tokenizer_config.json)")
    parser.add_argument("--served-model-name", metavar="NAME",
                        help="model name clients use (default: the directory's name)")
    parser.add_argument("--max-context", type=int, metavar="TOKENS",
                        help="context length (default: from config.json)")
    parser.add_argument("--grpc", default="0.0.0.0:50051", metavar="HOST:PORT",
                        help="public gRPC listen address (Inference); port 0 = any")
    parser.add_argument("--http", default="0.0.0.0:8000", metavar="HOST:PORT",
                        help="OpenAI-compatible HTTP listen address; port 0 = any")
    parser.add_argument("--control", default=None, metavar="HOST:PORT",
                        help="the controller's Control service, on a port of its own: never "
                             "expose it publicly (default: the --grpc host, port 50061; any "
                             "free port when --grpc's port is 0). It needs the internal "
                             "token and answers whatever the router's readiness")
    parser.add_argument("--pipeline", action="append", default=[], metavar="ID=HOST:PORT",
                        help="a static pipeline driver (repeatable), optionally "
                             "ID=HOST:PORT@CAPACITY")
    parser.add_argument("--token-file", metavar="FILE",
                        help="shared internal token (else $SPOTSERVE_TOKEN); required on "
                             "Control calls and sent to workers")
    parser.add_argument("--api-key", action="append", default=[], metavar="KEY",
                        help="accepted public API key (repeatable; else $SPOTSERVE_API_KEYS, "
                             "comma-separated); none = open")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="requests that may wait for a slot before 429 (default 256)")
    parser.add_argument("--max-concurrency", type=int, default=64,
                        help="per-pipeline cap when the topology sets none (default 64)")
    parser.add_argument("--queue-timeout", type=float, default=60.0, metavar="S",
                        help="longest wait in the queue (default 60)")
    parser.add_argument("--request-timeout", type=float, default=600.0, metavar="S",
                        help="deadline of requests that set none (default 600)")
    parser.add_argument("--resume-timeout", type=float, default=60.0, metavar="S",
                        help="longest time an interrupted request may take to resume "
                             "(default 60)")
    parser.add_argument("--hint-wait", type=float, default=10.0, metavar="S",
                        help="how long a drained request waits for a KV resume hint "
                             "(default 10)")
    parser.add_argument("--shutdown-grace", type=float, default=10.0, metavar="S",
                        help="on SIGTERM, how long running requests may finish (default 10)")
    parser.add_argument("--request-log", type=Path, metavar="FILE",
                        help="append one JSON line per finished request: how it ended, its "
                             "tokens, its latency and every interruption and resume")
    parser.add_argument("--log-level", default="INFO",
                        type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="log lines at this level and above (INFO)")


def parse_pipeline(spec: str) -> tuple[str, str, float]:
    """`ID=HOST:PORT[@CAPACITY]` → (id, address, capacity)."""
    name, sep, rest = spec.partition("=")
    address, _, capacity = rest.partition("@")
    if not sep or not name or ":" not in address:
        raise SpotserveError(f"--pipeline {spec!r}: expected ID=HOST:PORT[@CAPACITY]")
    try:
        return name, address, float(capacity) if capacity else 1.0
    except ValueError:
        raise SpotserveError(f"--pipeline {spec!r}: capacity must be a number") from None


def run(args: argparse.Namespace) -> int:
    from spotserve.lifetime import die_with_parent_if_asked

    die_with_parent_if_asked()  # local mode's router goes with its parent, before threads start

    import asyncio
    import logging

    from spotserve.auth import load_token

    from .app import RouterApp

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.model.is_dir():
        raise SpotserveError(f"--model {args.model}: no such directory")
    pipelines = [parse_pipeline(spec) for spec in args.pipeline]
    api_keys = args.api_key or [k for k in os.environ.get("SPOTSERVE_API_KEYS", "").split(",")
                                if k]
    app = RouterApp.from_args(args, pipelines=pipelines, token=load_token(args.token_file) or None,
                              api_keys=api_keys)
    asyncio.run(app.serve_forever())
    return 0
