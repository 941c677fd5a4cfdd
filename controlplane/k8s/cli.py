"""`spotserve operator`: the Kubernetes operator (kopf), configured from the environment
the Helm chart sets (docs/kubernetes.md: SPOTSERVE_* variables). Top level imports only the
standard library; kopf, aiohttp and grpc load inside `run`."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

HELP = "Run the Kubernetes operator: LLMService controllers, node notices, worker pods."


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    watch = [n for n in os.environ.get("SPOTSERVE_WATCH_NAMESPACES", "").split(",") if n]
    parser.add_argument("--namespace", action="append", default=watch, metavar="NS",
                        help="namespace to manage (repeatable; default: all, or "
                             "SPOTSERVE_WATCH_NAMESPACES)")
    parser.add_argument("--health-port", type=int,
                        default=_env_int("SPOTSERVE_HEALTH_PORT", 8080),
                        help="port of /healthz (SPOTSERVE_HEALTH_PORT, 8080)")
    parser.add_argument("--metrics-port", type=int,
                        default=_env_int("SPOTSERVE_METRICS_PORT", 9090),
                        help="port of /metrics (SPOTSERVE_METRICS_PORT, 9090; 0: off)")
    parser.add_argument("--token-file", default=os.environ.get("SPOTSERVE_TOKEN_FILE"),
                        help="the shared token for workers and routers (SPOTSERVE_TOKEN_FILE)")
    parser.add_argument("--model-root", default=os.environ.get("SPOTSERVE_MODEL_ROOT"),
                        metavar="DIR", help="where the operator sees model volume claims as "
                        "DIR/<claimName> (to read a model's config.json; default: built-in "
                        "model shapes only)")
    parser.add_argument("--peering", default=os.environ.get("SPOTSERVE_PEERING") or None,
                        metavar="NAME", help="run as one of several replicas: kopf peering "
                        "through the (Cluster)KopfPeering NAME keeps the newest working and "
                        "the others waiting (SPOTSERVE_PEERING; default: alone)")
    parser.add_argument("--listen-host", default=os.environ.get("SPOTSERVE_LISTEN_HOST",
                                                                 "0.0.0.0"),
                        help="address of /healthz and /metrics (SPOTSERVE_LISTEN_HOST)")
    parser.add_argument("--interval", type=float, default=2.0,
                        help="seconds between a service's reconciliations (2)")
    parser.add_argument("--log-level", default=os.environ.get("SPOTSERVE_LOG_LEVEL", "INFO"),
                        type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="log lines at this level and above ($SPOTSERVE_LOG_LEVEL, else "
                             "INFO)")


def defaults_from_env() -> dict[str, object]:
    placement = os.environ.get("SPOTSERVE_ROUTER_PLACEMENT") or "{}"
    try:
        router_placement = json.loads(placement)
    except ValueError:
        router_placement = {}
    out: dict[str, object] = {"router_placement": router_placement or None}
    for key, env in (("worker_image", "SPOTSERVE_WORKER_IMAGE"),
                     ("router_image", "SPOTSERVE_ROUTER_IMAGE"),
                     ("token_secret", "SPOTSERVE_TOKEN_SECRET")):
        if os.environ.get(env):
            out[key] = os.environ[env]
    return out


def _path(value: str | bytes | os.PathLike[str] | os.PathLike[bytes] | None) -> str | None:
    return None if value is None else os.fsdecode(value)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import time

    import kopf

    from spotserve.auth import load_token

    from . import manifests
    from .api import Connection
    from .app import Runtime, register

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = load_token(args.token_file) if args.token_file else None
    defaults = manifests.Defaults(**defaults_from_env())  # type: ignore[arg-type]
    runtime = Runtime(Connection("https://kubernetes.default.svc"), token=token,
                      list_node_events=bool(args.namespace),
                      defaults=defaults, interval=args.interval,
                      model_root=Path(args.model_root) if args.model_root else None)
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        info = kopf.login_with_service_account(**kwargs) or \
            kopf.login_with_kubeconfig(**kwargs)
        if info is not None:  # the backend's own REST calls use the same credentials
            runtime.connection = Connection(info.server, info.token, _path(info.ca_path),
                                            info.insecure or False,
                                            _path(info.certificate_path),
                                            _path(info.private_key_path))
        return info

    register(registry, runtime)
    if args.metrics_port:
        try:
            import prometheus_client
            prometheus_client.start_http_server(args.metrics_port, addr=args.listen_host)
        except ImportError:
            logging.getLogger("spotserve.operator").warning("prometheus_client missing: "
                                                            "no /metrics")
    settings = kopf.OperatorSettings()
    peering: dict[str, Any] = {"standalone": True}  # one replica: no peering objects
    if args.peering:
        # the newest replica works (highest priority); one that stops leaves the peering
        # at once, one that dies is forgotten after `lifetime`
        settings.peering.mandatory = True
        settings.peering.lifetime = 30
        peering = {"standalone": False, "peering_name": args.peering,
                   "priority": int(time.time() * 1000) % 2**31}
    settings.peering.standalone = not args.peering
    asyncio.run(kopf.operator(
        registry=registry, settings=settings, clusterwide=not args.namespace,
        namespaces=args.namespace, **peering,
        liveness_endpoint=f"http://{args.listen_host}:{args.health_port}/healthz"))
    return 0
