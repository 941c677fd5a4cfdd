"""The router as local mode runs it: `spotserve router` in a process of its own, as on a
cluster, with the flags local mode needs and a request log it reads back.

`RouterProcess.start` launches it on the given addresses (port 0: any), waits for its
"router listening" line and learns the ports; `requests()` reads its request log (how
each request ended and every interruption and resume on the way); `stop` ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spotserve.errors import SpotserveError
from spotserve.lifetime import DIE_WITH_PARENT_ENV

from .backend import ROOT

LISTENING = re.compile(r"router listening grpc=(\S+) http=(\S+) control=(\S+)")
# Local mode's requests wait for capacity and resumes longer than the defaults allow: an
# emulated outage (every instance gone until a replacement boots) lasts that long.
# (`router_args` adds the queue and concurrency limits: 512 and 8 unless the caller says)
FLAGS = ("--queue-timeout", "120",
         "--request-timeout", "300", "--resume-timeout", "120", "--hint-wait", "60",
         "--shutdown-grace", "1")


def router_args(model_dir: Path, grpc: str, http: str, request_log: Path,
                served_name: str | None = None, max_queue: int = 512,
                max_concurrency: int = 8, control: str | None = None) -> list[str]:
    """`spotserve router`'s arguments in local mode (Control on a port of its own: any
    free one on the --grpc host unless `control` says)."""
    control = control or f"{grpc.rpartition(':')[0]}:0"
    out = ["router", "--model", str(model_dir), "--grpc", grpc, "--http", http,
           "--control", control,
           "--request-log", str(request_log), *FLAGS, "--max-queue", str(max_queue),
           "--max-concurrency", str(max_concurrency)]
    return [*out, "--served-model-name", served_name] if served_name else out


@dataclass
class RouterProcess:
    process: asyncio.subprocess.Process
    grpc_address: str
    http_address: str
    control_address: str
    request_log: Path

    @classmethod
    async def start(cls, model_dir: Path, workdir: Path, token: str,
                    grpc: str = "127.0.0.1:0", http: str = "127.0.0.1:0",
                    served_name: str | None = None, max_queue: int = 512,
                    max_concurrency: int = 8, name: str = "router",
                    control: str | None = None) -> RouterProcess:
        """`name` names its log files (several replicas share `workdir`)."""
        workdir.mkdir(parents=True, exist_ok=True)
        suffix = name.removeprefix("router")
        log, request_log = workdir / f"{name}.log", workdir / f"requests{suffix}.jsonl"
        request_log.unlink(missing_ok=True)
        env = {**os.environ, "SPOTSERVE_TOKEN": token, "PYTHONUNBUFFERED": "1",
               DIE_WITH_PARENT_ENV: str(os.getpid())}
        with log.open("w") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "spotserve.cli",
                *router_args(model_dir, grpc, http, request_log, served_name, max_queue,
                             max_concurrency, control),
                cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=stderr)
        assert process.stdout is not None
        try:
            line = (await asyncio.wait_for(process.stdout.readline(), 120)).decode()
        except TimeoutError:
            line = ""
        found = LISTENING.search(line)
        if found is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise SpotserveError(f"the router did not start: {_tail(log)}")
        return cls(process, found.group(1), found.group(2), found.group(3), request_log)

    @property
    def http_port(self) -> int:
        return int(self.http_address.rpartition(":")[2])

    def requests(self) -> dict[str, dict[str, Any]]:
        """What the router logged of each finished request, by id."""
        if not self.request_log.exists():
            return {}
        lines = self.request_log.read_text().splitlines()
        return {entry["id"]: entry for entry in map(json.loads, filter(None, lines))}

    async def kill(self) -> None:
        """SIGKILL: what losing its pod or node does (no drain, no last word)."""
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        await self.process.wait()

    async def stop(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


def _tail(log: Path) -> str:
    text = log.read_text().strip() if log.exists() else ""
    return text.splitlines()[-1] if text else f"no output (see {log})"
