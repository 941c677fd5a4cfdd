"""Real `spotserve worker` processes on loopback (127.0.0.N, OS-chosen ports) and the
controller's side of the contract, for the integration tests: configure epochs from a
`ParallelConfig` and a placement, submit, drain. Every wait is bounded."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from spotserve.auth import call_metadata
from spotserve.catalog import Catalog
from spotserve.layout import ParallelConfig, Position
from spotserve.model_spec import ModelSpec
from spotserve.operator.controller.actuator import DrainedRequest
from spotserve.operator.controller.configure import explicit_epoch
from spotserve.operator.local.runner import CATALOG
from spotserve.operator.planner.cluster import GpuId, Placement
from spotserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from spotserve.worker.transfer import CHANNEL_OPTIONS

TOKEN = "worker-test-token"
KIND = Catalog.load(CATALOG).instance("cpu-1x")  # one GPU per instance: a worker per host
META = call_metadata(TOKEN)
ROOT = Path(__file__).resolve().parents[2]
FR = common_pb2.FinishReason


@dataclass
class Worker:
    process: asyncio.subprocess.Process
    address: str
    log: Path
    model: Path
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


async def spawn(host: str, model: Path, logs: Path, *extra: str,
                env: Mapping[str, str] | None = None) -> Worker:
    env = {**os.environ, "SPOTSERVE_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", **(env or {})}
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
    return Worker(process, line.split()[-1], log, model)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def gpu_of(worker: Worker) -> GpuId:
    """The GPU a worker plays in the controller's placements: one per host."""
    return GpuId(worker.host, 0)


def epoch_configures(spec: ModelSpec, epoch: int, config: ParallelConfig,
                     placement: Mapping[Position, Worker], *,
                     old: ParallelConfig | None = None,
                     old_placement: Mapping[Position, Worker] | None = None,
                     old_ids: Sequence[str] = ("p0",),
                     drained: Sequence[common_pb2.RequestProgress] = (),
                     lost: Collection[Worker] = (), doomed: Collection[Worker] = ()
                     ) -> list[tuple[Worker, worker_pb2.ConfigureRequest]]:
    """Every Configure of epoch `epoch`, built as the controller builds them: `config`
    placed on `placement`, coming from `old` on `old_placement` (`lost` workers gone with
    their data, `doomed` ones still readable), whose old pipeline 0 hands its `drained`
    requests' KV caches to new pipeline 0."""
    workers = {gpu_of(w): w for w in [*placement.values(), *(old_placement or {}).values()]}
    new = Placement.of(config, {p: gpu_of(w) for p, w in placement.items()})
    before = Placement.of(old, {p: gpu_of(w) for p, w in old_placement.items()}) \
        if old is not None and old_placement is not None else None
    requests = [DrainedRequest(r.request_id, r.prompt_tokens, r.generated_tokens,
                               r.kv_tokens if r.kv_kept else 0) for r in drained]
    model_dir = str(next(iter(workers.values())).model)
    built = explicit_epoch(spec, model_dir, epoch, new, before,
                           {g: w.address for g, w in workers.items()}, KIND, old_ids=old_ids,
                           drained=requests, lost={gpu_of(w) for w in lost},
                           doomed={gpu_of(w) for w in doomed}, free_port=free_port)
    return [(workers[gpu], request) for gpu, request in built]


def configure_request(spec: ModelSpec, epoch: int, config: ParallelConfig, position: Position,
                      placement: Mapping[Position, Worker], **kwargs: Any
                      ) -> worker_pb2.ConfigureRequest:
    """What the controller sends the worker at `position` of `config`."""
    want = placement[position]
    return next(r for w, r in epoch_configures(spec, epoch, config, placement, **kwargs)
                if w is want)


async def configure_pipeline(spec: ModelSpec, epoch: int, config: ParallelConfig,
                             placement: Mapping[Position, Worker], **kwargs: Any
                             ) -> list[worker_pb2.ConfigureResponse]:
    """Configure every worker of `config` concurrently (a pipeline's ranks rendezvous), in
    the order of `placement`."""
    built = dict((id(w), r) for w, r in epoch_configures(spec, epoch, config, placement,
                                                          **kwargs))
    workers = [w for w in placement.values() if id(w) in built]
    return list(await asyncio.gather(*(
        w.stub.Configure(built[id(w)], metadata=META, timeout=90) for w in workers)))


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
