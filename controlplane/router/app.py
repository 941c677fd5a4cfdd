"""One router process: the `Router`, its gRPC server and its HTTP server in one event loop.

Used by the CLI, the tests and the benchmark alike.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from dataclasses import dataclass

import grpc
from aiohttp import web

from spotserve.auth import BearerCheck
from spotserve.errors import SpotserveError
from spotserve.tokenizer import ModelTokenizer

from .dispatch import Pipeline
from .openai_http import build_app
from .request_log import RequestLog
from .router import Router, RouterConfig
from .server import start_grpc
from .worker_client import WorkerClients

log = logging.getLogger(__name__)
CONTROL_PORT = 50061


def default_control(grpc_address: str) -> str:
    """Control's address when none is given: the public gRPC host, port 50061 (any free
    port when the public one is chosen by the OS, as in tests and local mode)."""
    host, _, port = grpc_address.rpartition(":")
    return f"{host}:{0 if port == '0' else CONTROL_PORT}"


@dataclass
class RouterApp:
    router: Router
    grpc_address: str
    http_address: str
    internal_token: str | None
    api_keys: list[str]
    static_pipelines: list[tuple[str, str, float]]
    shutdown_grace: float = 10.0
    control_address: str | None = None  # None: the --grpc host, port 50061 (0 if --grpc's is)
    grpc_port: int = 0
    http_port: int = 0
    control_port: int = 0
    _grpc: grpc.aio.Server | None = None
    _control: grpc.aio.Server | None = None
    _http: web.AppRunner | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, pipelines: list[tuple[str, str, float]],
                  token: str | None, api_keys: list[str]) -> RouterApp:
        tokenizer = ModelTokenizer.from_dir(args.model, max_context=args.max_context)
        config = RouterConfig(
            model_name=args.served_model_name or args.model.resolve().name,
            max_queue=args.max_queue, default_concurrency=args.max_concurrency,
            queue_timeout=args.queue_timeout, request_timeout=args.request_timeout,
            resume_timeout=args.resume_timeout, hint_wait=args.hint_wait)
        router = Router(config, tokenizer, WorkerClients(token))
        if getattr(args, "request_log", None):
            router.request_log = RequestLog(args.request_log)
        return cls(router, args.grpc, args.http, token, api_keys, pipelines,
                   shutdown_grace=args.shutdown_grace,
                   control_address=getattr(args, "control", None))

    async def start(self) -> None:
        if not self.internal_token:
            log.warning("no internal token: Control is open and workers get no token")
        if self.static_pipelines:
            await self.router.update_topology(0, [Pipeline(pid, address, capacity)
                                                  for pid, address, capacity
                                                  in self.static_pipelines], [])
        internal = BearerCheck([self.internal_token] if self.internal_token else [])
        self._grpc, self.grpc_port = await start_grpc(
            self.router, self.grpc_address, internal_token=internal,
            api_keys=BearerCheck(self.api_keys), control=False)
        control = self.control_address or default_control(self.grpc_address)
        self._control, self.control_port = await start_grpc(
            self.router, control, internal_token=internal,
            api_keys=BearerCheck(self.api_keys), inference=False)
        self._http = web.AppRunner(build_app(self.router, BearerCheck(self.api_keys)),
                                   handler_cancellation=True, access_log=None,
                                   shutdown_timeout=self.shutdown_grace)
        await self._http.setup()
        host, _, port = self.http_address.rpartition(":")
        site = web.TCPSite(self._http, host, int(port))
        await site.start()
        self.http_port = self._http.addresses[0][1]
        # Tests and scripts read this line to learn the ports chosen by the OS.
        grpc_host = self.grpc_address.rpartition(":")[0]
        control_host = control.rpartition(":")[0]
        print(f"router listening grpc={grpc_host}:{self.grpc_port} "
              f"http={host}:{self.http_port} control={control_host}:{self.control_port}",
              flush=True)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting requests (and say so on /readyz); give running ones `grace`
        seconds to finish on both servers at once; then close the driver channels."""
        self.router.closing = True
        stops = []
        if self._http is not None:
            stops.append(self._http.cleanup())  # waits up to shutdown_grace
        if self._grpc is not None:
            stops.append(self._grpc.stop(grace))
        if self._control is not None:
            stops.append(self._control.stop(grace))
        await asyncio.gather(*stops)
        await self.router.close()
        if self.router.request_log is not None:
            self.router.request_log.close()

    async def serve_forever(self) -> None:
        try:
            await self.start()
        except OSError as exc:   # a port in use, say: close what did start, then say why
            await self.stop(grace=0)
            raise SpotserveError(f"cannot listen: {exc.strerror or exc}") from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("router stopping", file=sys.stderr, flush=True)
        await self.stop(grace=self.shutdown_grace)
