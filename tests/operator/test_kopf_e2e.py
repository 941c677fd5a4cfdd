"""The kopf app driving real `spotserve worker` processes and the real router on loopback.

Each "node" is a worker process on its own 127.0.0.N (the stand-in kubelet gives the node's
worker pod that IP); the router runs in this process. Requests stream through the router
while a node gets a termination taint and a new node joins: the service migrates off the
doomed node onto the new one (a real Configure of the new worker), every request
finishes, and greedy outputs equal a rerun on the new configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from spotserve.operator.k8s.api import Connection
from spotserve.operator.local.runner import CATALOG
from spotserve.operator.local.tiny_model import build_tiny_llama
from spotserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from ..ports import free_port_range
from .test_kopf_app import (
    LLMS,
    PODS,
    Cluster,
    conditions,
    emulator,
    node,
    running_with,
    service,
    taint,
    until,
)

ROOT = Path(__file__).resolve().parents[2]


def router_args(model_dir: Path) -> argparse.Namespace:
    """The router's flags, as `spotserve router` parses them, on any free local ports."""
    from spotserve.operator.router.cli import add_arguments
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--model", str(model_dir), "--grpc", "127.0.0.1:0",
                              "--http", "127.0.0.1:0", "--shutdown-grace", "1"])
TOKEN = "t"
IPS = {"n1": "127.0.0.2", "n2": "127.0.0.3", "n3": "127.0.0.4"}


def common_port() -> int:
    """A port free on every node's address."""
    return free_port_range(list(IPS.values()))


async def spawn(ip: str, port: int, model: Path, logs: Path) -> asyncio.subprocess.Process:
    env = {**os.environ, "SPOTSERVE_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "spotserve.cli", "worker", "--listen", f"{ip}:{port}",
        "--model", str(model), "--device", "cpu", "--kv-blocks", "640", "--block-size", "8",
        "--max-batched-tokens", "256", "--max-model-len", "512", "--threads", "1",
        "--join-timeout", "20", "--grace", "4", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=(logs / f"worker-{ip}.log").open("w"),
        start_new_session=True)
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 120)).decode()
    assert "worker listening" in line, (logs / f"worker-{ip}.log").read_text()[-2000:]
    return process


async def kubelet(cluster: Cluster) -> None:
    """Worker pods become Ready at their node's address (where its worker listens)."""
    while True:
        for pod in await cluster.items(PODS):
            meta, status = pod["metadata"], pod.get("status") or {}
            labels = meta.get("labels") or {}
            if labels.get("app.kubernetes.io/component") != "worker" or status.get("podIP"):
                continue
            await cluster.call("PATCH", f"{PODS}/{meta['name']}/status", {"status": {
                "phase": "Running", "podIP": IPS[labels["spotserve.dev/node"]],
                "conditions": [{"type": "Ready", "status": "True"}]}})
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def loopback(tmp: Path) -> AsyncIterator[tuple[Path, int, Any]]:
    """Tiny model, one worker per node address, the router; all stopped on exit."""
    from spotserve.operator.router.app import RouterApp

    model = build_tiny_llama(tmp / "claims" / "models" / "tiny")
    port = common_port()
    processes = []
    router = RouterApp.from_args(router_args(model), pipelines=[], token=TOKEN, api_keys=[])
    try:
        for ip in IPS.values():
            processes.append(await spawn(ip, port, model, tmp))
        with contextlib.redirect_stdout(None):
            await router.start()
        yield model, port, router
    finally:
        await router.stop(grace=0)
        for process in processes:
            if process.returncode is None:
                process.terminate()
        for process in processes:
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()


TOKENS = 400  # long enough to be mid-stream when the notice lands


async def generate(stub: inference_pb2_grpc.InferenceStub, prompt: list[int],
                   started: asyncio.Event | None = None) -> list[int]:
    request = inference_pb2.GenerateRequest(
        token_ids=inference_pb2.TokenIds(ids=prompt),
        sampling=common_pb2.SamplingParams(max_tokens=TOKENS, temperature=0.0,
                                           ignore_eos=True))
    out: list[int] = []
    async for message in stub.Generate(request, timeout=120):
        out.extend(message.token_ids)
        if started is not None and out:
            started.set()
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("notice", "grace"), [
    ("aws-node-termination-handler/spot-itn", None),          # 120 s grace
    ("cloud.google.com/impending-node-termination", None),    # 30 s
    ("aws-node-termination-handler/spot-itn", 0)],            # no time to finish: KV moves
    ids=["aws", "gke", "aws-no-grace"])
async def test_requests_keep_streaming_through_a_notice(tmp_path: Path, notice: str,
                                                        grace: int | None) -> None:
    """Every request finishes, identical to a rerun. None resumes by re-prefill: within
    the grace, requests finish on the doomed pipeline or move with their KV cache; with no
    grace at all, the doomed pipeline stops at once and its requests resume from KV."""
    from spotserve.catalog import Catalog
    from spotserve.operator.controller.wire import GrpcWire
    from spotserve.operator.k8s.app import Runtime
    from spotserve.operator.k8s.backend import BackendOptions

    spec: dict[str, Any] = {
        "model": {"volume": {"claimName": "models", "path": "tiny"}},
        "gpuPools": [{"name": "cpu-spot", "capacityType": "spot", "instanceType": "cpu-1x",
                      "maxInstances": 3,
                      "nodeSelector": {"karpenter.sh/capacity-type": "spot"}}],
        "instances": {"min": 1, "max": 3}, "serving": {"maxBatch": 8},
        "load": {"requiredRate": 2.0}}
    if grace is not None:
        spec["gracePeriodSeconds"] = {"aws": grace}
    nodes = []
    for name in IPS:
        n = node(name)
        n["metadata"]["labels"]["node.kubernetes.io/instance-type"] = "cpu-1x"
        n["status"]["capacity"] = {"nvidia.com/gpu": "1"}
        nodes.append(n)
    async with loopback(tmp_path) as (model, port, router_app):
        router = f"127.0.0.1:{router_app.grpc_port}"
        control = f"127.0.0.1:{router_app.control_port}"   # the controller's way in
        spec["worker"] = {"port": port}
        # n3's worker runs from the start, its node joins with the notice: the new pipeline
        # there is configured for real (weights from the checkpoint or its peers)
        async with emulator([*nodes[:2], service("tiny", spec)], kubelet) as cluster:
            runtime = Runtime(Connection(cluster.url, insecure=True), token=TOKEN,
                              wire=lambda: GrpcWire(TOKEN),
                              options=BackendOptions(ready_timeout=60, poll_seconds=0.2,
                                                     router_address=control,
                                                     model_dir=str(model)),
                              interval=0.3, catalog=Catalog.load(CATALOG),
                              model_root=tmp_path / "claims")
            async with running_with(cluster, runtime), \
                    grpc.aio.insecure_channel(router) as channel:
                stub = inference_pb2_grpc.InferenceStub(channel)

                async def ready() -> dict[str, Any] | None:
                    obj = await cluster.get(f"{LLMS}/tiny")
                    return obj if conditions(obj).get("Ready", {}).get("status") == "True" \
                        else None
                status = (await until(ready, 120))["status"]
                doomed = sorted({s["node"] for s in status["placement"]})[0]
                prompts = [[1 + (i * 7 + j) % 50 for j in range(6 + i % 5)] for i in range(16)]
                started = [asyncio.Event() for _ in prompts]
                streams = [asyncio.create_task(generate(stub, p, e))
                           for p, e in zip(prompts, started, strict=True)]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
                await taint(notice)(cluster, doomed)
                await cluster.call("POST", "/api/v1/nodes", nodes[2])

                async def moved() -> bool:
                    s = (await cluster.get(f"{LLMS}/tiny")).get("status") or {}
                    nodes_now = {p["node"] for p in s.get("placement") or ()}
                    return "n3" in nodes_now and doomed not in nodes_now and \
                        s.get("migration", {}).get("phase") == "Completed"
                assert await until(moved, 120)
                migration = (await cluster.get(f"{LLMS}/tiny"))["status"]["migration"]
                assert migration["bytesMoved"] > 0, migration  # n3's worker loaded weights
                assert migration.get("noticeSource") == ("gcp" if "google" in notice else "aws")
                outputs = await asyncio.wait_for(asyncio.gather(*streams), 120)
                assert all(len(o) == TOKENS for o in outputs)
                resumed = router_app.router.metrics.registry.get_sample_value
                kv = resumed("spotserve_requests_resumed_total", {"mode": "kv"}) or 0
                reprefill = resumed("spotserve_requests_resumed_total",
                                    {"mode": "reprefill"}) or 0
                assert reprefill == 0, "a notice must never cost a request its KV cache"
                if grace == 0:
                    assert kv >= 1, "the doomed pipeline's requests move with their KV"
                again = [await generate(stub, p) for p in prompts]
                assert outputs == again
