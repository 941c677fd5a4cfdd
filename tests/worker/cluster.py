"""Real `spotserve worker` processes on loopback (127.0.0.N, OS-chosen ports) and the
controller's side of the contract, for the integration tests: configure epochs from a
`ParallelConfig` and a placement, submit, drain. Every wait is bounded."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from spotserve.auth import call_metadata
from spotserve.layout import ParallelConfig, Position
from spotserve.model_spec import ModelSpec
from spotserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from spotserve.worker import sources
from spotserve.worker.transfer import CHANNEL_OPTIONS

TOKEN = "worker-test-token"
META = call_metadata(TOKEN)
ROOT = Path(__file__).resolve().parents[2]
FR = common_pb2.FinishReason


@dataclass
class Worker:
    process: asyncio.subprocess.Process
    address: str
    log: Path
    channel: grpc.aio.Channel = field(init=False)
    stub: worker_pb2_grpc.WorkerStub = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0]

    async def status(self) -> worker_pb2.WorkerStatus:
        return await self.stub.Status(worker_pb2.StatusRequest(), metadata=META, timeout=10)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        await self.channel.close()
        if self.process.returncode is None:
            self.process.send_signal(sig)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
                return None
        return self.process.returncode


async def spawn(host: str, model: Path, logs: Path, *extra: str) -> Worker:
    env = {**os.environ, "SPOTSERVE_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    log = logs / f"worker-{host}.log"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "spotserve.cli", "worker", "--listen", f"{host}:0",
        "--model", str(model), "--kv-blocks", "64", "--block-size", "4",
        "--max-batched-tokens", "24", "--threads", "1", "--join-timeout", "30",
        "--grace", "10", *extra, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=log.open("w"))
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 90)).decode()
    assert "worker listening" in line, f"{line!r}; see {log}: {log.read_text()[-2000:]}"
    return Worker(process, line.split()[-1], log)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def configure_request(spec: ModelSpec, epoch: int, config: ParallelConfig, position: Position,
                      placement: Mapping[Position, Worker], *,
                      old: ParallelConfig | None = None,
                      old_placement: Mapping[Position, Worker] | None = None,
                      kv_imports: Sequence[worker_pb2.KVImport] = ()
                      ) -> worker_pb2.ConfigureRequest:
    """What a controller sends the worker at `position` of `config` (one pipeline)."""
    driver = placement[Position(position.pipeline, 0, 0)]
    master = f"{driver.host}:{free_port(driver.host)}" if config.num_gpus > 1 else ""
    return sources.configure_request(
        spec, epoch, config, position, {p: w.address for p, w in placement.items()},
        master_address=master, old=old,
        old_addresses={p: w.address for p, w in (old_placement or {}).items()}, kv=kv_imports)


async def configure_pipeline(spec: ModelSpec, epoch: int, config: ParallelConfig,
                             placement: Mapping[Position, Worker], **kwargs: object
                             ) -> list[worker_pb2.ConfigureResponse]:
    """Configure every worker of a one-pipeline `config` concurrently (they rendezvous)."""
    master = ""
    requests = []
    for position in config.positions():
        request = configure_request(spec, epoch, config, position, placement,
                                    **kwargs)  # type: ignore[arg-type]
        master = master or request.rendezvous.master_address
        request.rendezvous.master_address = master
        requests.append((placement[position], request))
    return list(await asyncio.gather(*(
        w.stub.Configure(r, metadata=META, timeout=90) for w, r in requests)))


def submit_request(request_id: str, prompt: Sequence[int], max_tokens: int,
                   generated: Sequence[int] = (), mode: int = 0) -> worker_pb2.SubmitRequest:
    request = worker_pb2.SubmitRequest(
        request_id=request_id, prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                           ignore_eos=True))
    if generated or mode:
        request.resume.generated_token_ids.extend(generated)
        request.resume.mode = mode  # type: ignore[assignment]
    return request


class Stream:
    """One Submit call's tokens as they arrive, checked for position continuity."""

    def __init__(self, worker: Worker, request: worker_pb2.SubmitRequest) -> None:
        self.tokens = list(request.resume.generated_token_ids)
        self.finish = 0
        self.first = asyncio.Event()
        self.call = worker.stub.Submit(request, metadata=META, timeout=90)
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> list[int]:
        async for delta in self.call:
            assert delta.position == len(self.tokens), (delta.position, len(self.tokens))
            self.tokens.extend(delta.token_ids)
            if self.tokens:
                self.first.set()
            self.finish = delta.finish_reason
        return self.tokens

    async def result(self, timeout: float = 90) -> list[int]:
        return await asyncio.wait_for(self.task, timeout)
