"""`spotserve plan`: a parallel configuration, placement and migration for a cluster.

Either a plan input file (YAML or JSON, see `spotserve.operator.planner.request`) or the
homogeneous shorthand `--model --gpu --instances --gpus-per-instance --rate`. Exit status:
0 with a configuration, 1 when nothing fits the usable instances (the plan still says how
many more would do), 2 on bad input.
Only the standard library and the core are imported at module level.
"""

from __future__ import annotations

import argparse
import json
import sys

from spotserve.errors import SpotserveError

HELP = "choose a parallel configuration (D, P, M, B) and its placement and migration"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", nargs="?", help="plan input file (YAML or JSON)")
    parser.add_argument("--model", help="built-in model name or HF config.json (shorthand)")
    parser.add_argument("--gpu", help="GPU type, e.g. T4 (shorthand)")
    parser.add_argument("--instances", type=int, help="number of instances (shorthand)")
    parser.add_argument("--gpus-per-instance", type=int, help="GPUs per instance (shorthand)")
    parser.add_argument("--rate", type=float, help="required requests per second (α)")
    parser.add_argument("--profile", help="SpotServe profile JSON (else the roofline model)")
    parser.add_argument("--min-gpus-per-replica", type=int,
                        help="GPUs a replica needs at least (SpotServe: 4, 12, 16)")
    parser.add_argument("--max-batch", type=int, help="largest batch B (default 4)")
    parser.add_argument("--max-tp", type=int, help="largest TP degree M (default: the "
                                                   "profile's max_tp, else no limit)")
    parser.add_argument("--dtype", help="override the model's dtype (e.g. float32)")
    parser.add_argument("--spot-price", type=float, help="USD per instance-hour (shorthand)")
    parser.add_argument("--input-tokens", type=int, help="prompt tokens S_in (default 512)")
    parser.add_argument("--output-tokens", type=int,
                        help="generated tokens S_out (default 128)")
    parser.add_argument("--fewest-instances", action="store_true",
                        help="use the fewest instances that reach the rate, not all of them "
                             "(SpotServe gives every instance a replica)")
    parser.add_argument("--tp-within-instance", action="store_true",
                        help="never let a TP group span instances (by default one may fill "
                             "whole instances, as SpotServe's TP=8 on 4-GPU T4 instances)")
    parser.add_argument("--json", action="store_true", help="print the full plan as JSON")


def _shorthand(args: argparse.Namespace) -> dict[str, object]:
    from spotserve.catalog import Catalog

    missing = [f"--{k.replace('_', '-')}" for k in ("model", "gpu", "instances",
                                                    "gpus_per_instance")
               if getattr(args, k) is None]
    if missing:
        raise SpotserveError(f"give a plan input file, or all of {', '.join(missing)}")
    if args.instances < 1 or args.gpus_per_instance < 1:
        raise SpotserveError("--instances and --gpus-per-instance must be at least 1")
    catalog = Catalog.load()
    types = catalog.instances_with(args.gpu, args.gpus_per_instance)
    if not types:
        raise SpotserveError(f"no catalog instance type has {args.gpus_per_instance} "
                             f"{args.gpu} GPUs")
    instance: dict[str, object] = {"type": types[0].name}
    if args.spot_price is not None:
        instance["spot_price"] = args.spot_price
    return {"model": args.model, "cluster": {"instances": [
        {**instance, "name": f"node-{n}"} for n in range(args.instances)]}}


def _document(args: argparse.Namespace) -> tuple[dict[str, object], str]:
    from pathlib import Path

    import yaml

    if args.input is None:
        return _shorthand(args), "."
    path = Path(args.input)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpotserveError(f"{path}: no such plan input file") from None
    except yaml.YAMLError as exc:
        raise SpotserveError(f"{path}: malformed YAML/JSON: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise SpotserveError(f"{path}: expected a mapping at the top level")
    return data, str(path.parent)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    try:
        from .planner import plan
        from .request import parse_request
    except ModuleNotFoundError as exc:  # numpy/scipy come with the operator extra
        raise SpotserveError(f"spotserve plan needs {exc.name}: pip install "
                             f"'spotserve[operator]'") from None

    data, base = _document(args)
    overrides = {"rate": args.rate, "profile": args.profile, "dtype": args.dtype,
                 "min_gpus_per_replica": args.min_gpus_per_replica,
                 "max_batch": args.max_batch, "max_tp": args.max_tp,
                 "input_tokens": args.input_tokens, "output_tokens": args.output_tokens}
    data.update({k: v for k, v in overrides.items() if v is not None})
    if args.profile is not None:
        data["profile"] = str(Path(args.profile).resolve())
    if args.fewest_instances:
        data["fill"] = False
    if args.tp_within_instance:
        data["tp_across_instances"] = False
    request = parse_request(data, base=Path(base), source=args.input or "command line")
    result = plan(request)
    if args.json:
        json.dump(result.to_dict(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(result.summary())
    return 0 if result.config is not None else 1
