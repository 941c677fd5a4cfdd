"""Router benchmark: bounded closed-loop load against the router and test-double drivers on
loopback, compared in the same run with the same load sent to the drivers directly.

    python bench/router/bench_router.py              # 64 clients, 10 s per phase
    python bench/router/bench_router.py --full       # 64 clients, 60 s per phase

Phases: `direct` (clients call Worker.Submit on the drivers, round robin), `router-grpc`
(Inference.Generate) and `router-http` (OpenAI /v1/completions, SSE). Each reports
throughput, TTFT and end-to-end P50/P99 and errors; the router's overhead per token is
the difference in end-to-end latency per token against `direct`, and the router
process's CPU time per token. Writes bench/results/router.json (or --out DIR).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.append(str(ROOT))  # for tests.router

import aiohttp  # noqa: E402
import grpc  # noqa: E402

from spotserve.v1 import (  # noqa: E402
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from tests.router.tiny_model import build_model_dir  # noqa: E402

TOKEN = "bench-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
VOCAB = 320


@dataclass
class Sample:
    ttft: float
    e2e: float
    tokens: int


@dataclass
class PhaseResult:
    name: str
    seconds: float
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    samples: list[Sample] = field(default_factory=list)
    router_cpu_seconds: float | None = None

    def summary(self) -> dict[str, float | int | str | None]:
        ttft = sorted(s.ttft for s in self.samples) or [0.0]
        e2e = sorted(s.e2e for s in self.samples) or [0.0]
        per_token = [s.e2e / s.tokens for s in self.samples if s.tokens]
        cpu = self.router_cpu_seconds
        return {
            "phase": self.name, "seconds": round(self.seconds, 2), "requests": self.requests,
            "errors": self.errors, "tokens": self.tokens,
            "requests_per_s": round(self.requests / self.seconds, 2),
            "tokens_per_s": round(self.tokens / self.seconds, 1),
            "ttft_p50_ms": _ms(_pct(ttft, 50)), "ttft_p99_ms": _ms(_pct(ttft, 99)),
            "e2e_p50_ms": _ms(_pct(e2e, 50)), "e2e_p99_ms": _ms(_pct(e2e, 99)),
            "e2e_per_token_ms": _ms(statistics.fmean(per_token)) if per_token else None,
            "router_cpu_us_per_token": round(cpu / self.tokens * 1e6, 1)
            if cpu is not None and self.tokens else None,
        }


def _pct(ordered: list[float], q: float) -> float:
    return ordered[min(int(q / 100 * len(ordered)), len(ordered) - 1)]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(16, VOCAB) for _ in range(length)]


# ---- one request per kind of client -------------------------------------------------------

async def direct_request(stubs: list[worker_pb2_grpc.WorkerStub], index: int,
                         prompt: list[int], max_tokens: int) -> tuple[float, int]:
    request = worker_pb2.SubmitRequest(request_id=f"d{index}", prompt_token_ids=prompt,
                                       sampling=common_pb2.SamplingParams(max_tokens=max_tokens))
    start, first, tokens = time.perf_counter(), 0.0, 0
    async for delta in stubs[index % len(stubs)].Submit(request, metadata=AUTH, timeout=120):
        if delta.token_ids and not first:
            first = time.perf_counter() - start
        tokens += len(delta.token_ids)
    return first, tokens


async def grpc_request(stub: inference_pb2_grpc.InferenceStub, index: int, prompt: list[int],
                       max_tokens: int) -> tuple[float, int]:
    request = inference_pb2.GenerateRequest(
        token_ids=inference_pb2.TokenIds(ids=prompt), request_id=f"g{index}",
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens))
    start, first, tokens = time.perf_counter(), 0.0, 0
    async for message in stub.Generate(request, timeout=120):
        if message.token_ids and not first:
            first = time.perf_counter() - start
        tokens += len(message.token_ids)
    return first, tokens


async def http_request(session: aiohttp.ClientSession, url: str, index: int,
                       prompt: list[int], max_tokens: int) -> tuple[float, int]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), 0.0, 0
    async with session.post(url, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event["choices"] and not first:
                first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return first, tokens


# ---- load ---------------------------------------------------------------------------------

RequestFn = Callable[[int, list[int], int], Awaitable[tuple[float, int]]]


async def run_phase(name: str, send: RequestFn, args: argparse.Namespace,
                    router_pid: int | None) -> PhaseResult:
    rng = random.Random(7)
    counter = iter(range(10**9))
    cpu_before = _cpu_seconds(router_pid)
    end = time.perf_counter() + args.duration
    result = PhaseResult(name, 0.0)

    async def client() -> None:
        while time.perf_counter() < end:
            index = next(counter)
            prompt = _prompt(rng, args.prompt_tokens)
            start = time.perf_counter()
            try:
                ttft, tokens = await send(index, prompt, args.max_tokens)
            except (grpc.aio.AioRpcError, aiohttp.ClientError, RuntimeError) as exc:
                result.errors += 1
                print(f"  {name}: error: {exc}", file=sys.stderr)
                continue
            result.requests += 1
            result.tokens += tokens
            result.samples.append(Sample(ttft, time.perf_counter() - start, tokens))

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(args.clients)))
    result.seconds = time.perf_counter() - began
    if router_pid is not None:
        result.router_cpu_seconds = _cpu_seconds(router_pid) - cpu_before
    return result


def _cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- processes ----------------------------------------------------------------------------

async def spawn(*argv: str, ready: str) -> tuple[asyncio.subprocess.Process, dict[str, str]]:
    """Start a process; return it and the `key=value` fields of its ready line."""
    env = {**os.environ, "SPOTSERVE_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, *argv, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
    if ready not in line:
        raise RuntimeError(f"{argv[:3]} did not start: {line!r}")
    words = line.split()
    fields = dict(w.split("=", 1) for w in words if "=" in w)
    return process, {"last": words[-1], **fields}


async def main(args: argparse.Namespace) -> dict[str, object]:
    processes: list[asyncio.subprocess.Process] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model_dir(Path(tmp) / "tiny", max_context=4096)
        try:
            drivers = []
            for i in range(args.pipelines):
                process, ready = await spawn(
                    "-m", "tests.router.fake_worker", "--host", f"127.0.0.{2 + i}",
                    "--vocab-size", str(VOCAB), "--step", str(args.step), "--token", TOKEN,
                    ready="fake worker listening")
                processes.append(process)
                drivers.append(ready["last"])
            router, ports = await spawn(
                "-m", "spotserve.cli", "router", "--model", str(model),
                "--served-model-name", "tiny", "--grpc", "127.0.0.1:0", "--http",
                "127.0.0.1:0", "--log-level", "WARNING", "--max-queue", "1024",
                *[f"--pipeline=p{i}={a}" for i, a in enumerate(drivers)],
                ready="router listening")
            processes.append(router)
            return await _phases(args, drivers, router.pid, ports["grpc"], ports["http"])
        finally:
            for process in processes:
                if process.returncode is None:
                    process.kill()
                await process.wait()


async def _phases(args: argparse.Namespace, drivers: list[str], router_pid: int,
                  grpc_address: str, http_address: str) -> dict[str, object]:
    results: list[PhaseResult] = []
    channels = [grpc.aio.insecure_channel(a) for a in drivers]
    stubs = [worker_pb2_grpc.WorkerStub(c) for c in channels]
    results.append(await run_phase(
        "direct", lambda i, p, m: direct_request(stubs, i, p, m), args, None))
    async with grpc.aio.insecure_channel(grpc_address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        results.append(await run_phase(
            "router-grpc", lambda i, p, m: grpc_request(stub, i, p, m), args, router_pid))
    url = f"http://{http_address}/v1/completions"
    connector = aiohttp.TCPConnector(limit=args.clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        results.append(await run_phase(
            "router-http", lambda i, p, m: http_request(session, url, i, p, m), args,
            router_pid))
    for channel in channels:
        await channel.close()
    return _report(args, results)


def _report(args: argparse.Namespace, results: list[PhaseResult]) -> dict[str, object]:
    rows = [r.summary() for r in results]
    base = rows[0]["e2e_per_token_ms"]
    for row in rows[1:]:
        value = row["e2e_per_token_ms"]
        row["overhead_per_token_ms"] = round(float(value) - float(base), 3) \
            if isinstance(value, float) and isinstance(base, float) else None
    return {"benchmark": "router", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": "python " + " ".join(sys.argv),
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "cpus": os.cpu_count(), "phases": rows}


def print_table(report: dict[str, object]) -> None:
    columns = ["phase", "requests", "errors", "requests_per_s", "tokens_per_s", "ttft_p50_ms",
               "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms", "e2e_per_token_ms",
               "overhead_per_token_ms", "router_cpu_us_per_token"]
    phases = report["phases"]
    assert isinstance(phases, list)
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in phases:
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--full", action="store_true", help="60 s per phase")
    parser.add_argument("--pipelines", type=int, default=4)
    parser.add_argument("--step", type=float, default=0.02,
                        help="the test-double driver's seconds per token")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if args.full:
        args.duration = 60.0
    return args


def cli() -> int:
    args = parse_args()
    report = asyncio.run(main(args))
    print_table(report)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "router.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    phases = report["phases"]
    assert isinstance(phases, list)
    return 1 if any(row["errors"] for row in phases) else 0


if __name__ == "__main__":
    sys.exit(cli())
