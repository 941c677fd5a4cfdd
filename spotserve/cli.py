"""The `spotserve` command. Subcommands load lazily, so `spotserve plan` never imports torch
and `spotserve worker` never imports kopf.

Each subcommand is a module exposing `HELP` (one line), `add_arguments(parser)` and
`run(args) -> int`. Those modules import only the standard library and the core at top
level; anything heavy is imported inside `run`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from spotserve import __version__
from spotserve.errors import SpotserveError

# subcommand -> module. Order is the order `--help` lists them.
SUBCOMMANDS: dict[str, str] = {
    "model-info": "spotserve.model_info",
    "download": "spotserve.download",
    "import-gguf": "spotserve.gguf_import",
    "plan": "spotserve.operator.planner.cli",
    "simulate": "spotserve.operator.sim.cli",
    "demo": "spotserve.operator.local.demo_cli",
    "chaos": "spotserve.operator.local.chaos_cli",
    "up": "spotserve.operator.local.up_cli",
    "worker": "spotserve.worker.cli",
    "router": "spotserve.operator.router.cli",
    "operator": "spotserve.operator.k8s.cli",
    "profile": "spotserve.worker.profile_cli",
    "bench": "spotserve.bench_cli",
}


# optional dependency -> the extra that brings it
_EXTRA_OF = {"torch": "worker", "safetensors": "worker", "kopf": "operator",
             "kubernetes": "operator", "scipy": "operator", "matplotlib": "operator",
             "aiohttp": "operator", "jinja2": "operator", "tokenizers": "operator",
             "prometheus_client": "operator"}


def _load(module: str) -> ModuleType | None:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        # A subcommand not built yet, or an extra not installed: leave it out of --help.
        if exc.name and (module.startswith(exc.name) or exc.name.split(".")[0] != "spotserve"):
            return None
        raise


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spotserve",
        description="Serve large language models on preemptible (spot) GPUs without losing "
                    "requests: plan parallel configurations, simulate preemption traces, run "
                    "workers, the router and the Kubernetes operator.")
    parser.add_argument("--version", action="version", version=f"spotserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        if only is not None and name != only:
            continue
        module = _load(module_name)
        if module is None:
            continue
        child = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(child)
        child.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    wanted = next((a for a in args_list if not a.startswith("-")), None)
    parser = build_parser(wanted if wanted in SUBCOMMANDS else None)
    args = parser.parse_args(args_list)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0 if not args_list else 2
    try:
        code: int = args._run(args)
    except SpotserveError as exc:
        print(f"spotserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        extra = _EXTRA_OF.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"spotserve {args.command}: error: needs the '{exc.name}' package; install it "
              f"with pip install 'spotserve[{extra}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:   # `spotserve ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
