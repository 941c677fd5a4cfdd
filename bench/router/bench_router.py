"""Router benchmark: bounded closed-loop load against the router and test-double drivers on
loopback, compared in the same run with the same load sent to the drivers directly, then
how throughput scales with the number of router replicas.

    python bench/router/bench_router.py                  # 10 s per phase, about 2 min
    python bench/router/bench_router.py --full           # 60 s per phase
    python bench/router/bench_router.py --replicas ''    # the overhead phases only
    python bench/router/bench_router.py --replicas 1,2,4,8 --load-procs 8

Overhead phases (64 clients, 4 drivers at 20 ms a token, one router): `direct` (clients
call Worker.Submit on the drivers, round robin), `router-grpc` (Inference.Generate) and
`router-http` (OpenAI /v1/completions, SSE). Each reports throughput, TTFT and end-to-end
P50/P99 and errors; the router's overhead per token is the difference in end-to-end
latency per token against `direct`, and the router process's CPU time per token. Their
clients run in this process, as they always have, so the figures compare across runs.

Replica scaling (`--replicas 1,2,4`, on by default): one set of drivers, started once: 8
by default at 2 ms a token, far from the bottleneck (a fake driver has no batch limit and
streams each request at 500 tokens/s, so 128 clients could draw 64,000 tokens/s from them,
about nine times what the `direct` phase reaches on 2 cores). For each N: N `spotserve router`
processes with the same static `--pipeline` list, then the same closed-loop load over gRPC
and over HTTP, each request sent to replica (request number mod N), that is round robin.
Each replica caps concurrency per pipeline on its own, so each gets `--max-concurrency`
ceil(cap / N): the fleet's cap per pipeline stays `--replica-cap` (64, the router's
default) whatever N. At this load (16 / N clients per pipeline per replica, against a cap
of 64 / N) it never binds, so what scales is the routers' own work, not admission. A
`direct` phase on the same drivers and load gives the ceiling without any router.
Reported per phase: tokens/s, requests/s, TTFT and end-to-end P50/P99, errors, the
routers' CPU time per token and each one's share of a core (from /proc/<pid>/stat), the
drivers' and the load generator's CPU time, how busy the whole machine was (/proc/stat)
and the share the benchmark's own processes used (less means something else ran); every
figure also as a ratio to N = 1 (the smallest N) of the same run.

The replica phases' load generator runs in `--load-procs` processes (4 by default, the
same for every N), each with its share of the clients, started once and synchronised at
the start of each phase. Parsing every token of every stream costs a Python client CPU
of the order of what the router spends on it, so one client process would cap the load
near the rate a single router serves and hide any scaling. The output says when a load
process used 90 % of a core or more (then it, not the routers, may cap the figure), and
that the clients, drivers and routers share os.cpu_count() CPUs: on a 2-core machine the
whole run is CPU-bound once those are busy, so the ratios there measure the machine, and
the routers' scaling shows only on a machine with cores to spare (the routers' CPU per
token is the figure that carries over).

Resume path (`--resume`, on by default): two routers over 4 drivers at `--step`; the same
requests (resumable gRPC, `--resume-requests` of them, 32 at a time) run once
uninterrupted through one replica, and once with every stream broken half-way (the
client drops its connection, as when its replica dies) and taken up on the other replica
with `Inference.Resume` (Lookup on every driver, Attach, skip what the client has).
Reported: end-to-end latency per token of both and the difference (the added latency per
token of the resume path, spread over the request), the reconnect gap (from the last
token before the break to the first after it; compare the inter-token gap) and the
inter-token gap after the take-over as a ratio to the uninterrupted one.

Writes bench/results/router.json (or --out DIR): `phases` (the overhead phases),
`replicas` (the scaling phases, their ratios and the notes printed) and `resume`. Exits 1
on any error.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
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
BUSY_CORE = 0.9  # a process using this share of a core or more is saturated
RESULT = "load result "  # a load process's result line starts with this


@dataclass
class Load:
    clients: int
    duration: float
    prompt_tokens: int
    max_tokens: int


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
    # CPU seconds each watched process used in the phase, by role: router, drivers, loadgen
    cpu: dict[str, list[float]] = field(default_factory=dict)
    machine_busy: float | None = None  # share of all the machine's CPU time that was busy

    def summary(self) -> dict[str, object]:
        ttft = sorted(s.ttft for s in self.samples) or [0.0]
        e2e = sorted(s.e2e for s in self.samples) or [0.0]
        per_token = [s.e2e / s.tokens for s in self.samples if s.tokens]
        router = self.cpu.get("router")
        row: dict[str, object] = {
            "phase": self.name, "seconds": round(self.seconds, 2), "requests": self.requests,
            "errors": self.errors, "tokens": self.tokens,
            "requests_per_s": round(self.requests / self.seconds, 2),
            "tokens_per_s": round(self.tokens / self.seconds, 1),
            "ttft_p50_ms": _ms(_pct(ttft, 50)), "ttft_p99_ms": _ms(_pct(ttft, 99)),
            "e2e_p50_ms": _ms(_pct(e2e, 50)), "e2e_p99_ms": _ms(_pct(e2e, 99)),
            "e2e_per_token_ms": _ms(statistics.fmean(per_token)) if per_token else None,
            "router_cpu_us_per_token": round(sum(router) / self.tokens * 1e6, 1)
            if router and self.tokens else None,
        }
        for role, seconds in self.cpu.items():
            row[f"{role}_cpu_s"] = round(sum(seconds), 2)
            row[f"{role}_core_use"] = [round(s / self.seconds, 2) for s in seconds]
        row["machine_cpu_busy"] = self.machine_busy
        # the share of the machine's CPU time the watched processes used: well under
        # machine_cpu_busy means something else was running
        row["own_cpu_share"] = round(sum(map(sum, self.cpu.values())) / self.seconds
                                     / (os.cpu_count() or 1), 3) if self.cpu else None
        return row


def _pct(ordered: list[float], q: float) -> float:
    return ordered[min(int(q / 100 * len(ordered)), len(ordered) - 1)]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(16, VOCAB) for _ in range(length)]


# ---- one request per kind of client; request `index` goes to target index mod len ---------

async def direct_request(stubs: Sequence[worker_pb2_grpc.WorkerStub], index: int,
                         prompt: list[int], max_tokens: int) -> tuple[float, int]:
    request = worker_pb2.SubmitRequest(request_id=f"d{index}", prompt_token_ids=prompt,
                                       sampling=common_pb2.SamplingParams(max_tokens=max_tokens))
    start, first, tokens = time.perf_counter(), 0.0, 0
    async for delta in stubs[index % len(stubs)].Submit(request, metadata=AUTH, timeout=120):
        if delta.token_ids and not first:
            first = time.perf_counter() - start
        tokens += len(delta.token_ids)
    return first, tokens


async def grpc_request(stubs: Sequence[inference_pb2_grpc.InferenceStub], index: int,
                       prompt: list[int], max_tokens: int) -> tuple[float, int]:
    request = inference_pb2.GenerateRequest(
        token_ids=inference_pb2.TokenIds(ids=prompt), request_id=f"g{index}",
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens))
    start, first, tokens = time.perf_counter(), 0.0, 0
    async for message in stubs[index % len(stubs)].Generate(request, timeout=120):
        if message.token_ids and not first:
            first = time.perf_counter() - start
        tokens += len(message.token_ids)
    return first, tokens


async def http_request(session: aiohttp.ClientSession, urls: Sequence[str], index: int,
                       prompt: list[int], max_tokens: int) -> tuple[float, int]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), 0.0, 0
    async with session.post(urls[index % len(urls)], json=body) as response:
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


RequestFn = Callable[[int, list[int], int], Awaitable[tuple[float, int]]]


@asynccontextmanager
async def open_sender(kind: str, targets: list[str], clients: int) -> AsyncIterator[RequestFn]:
    """Connections to `targets` (driver addresses for `direct`, routers' gRPC addresses for
    `grpc`, their HTTP addresses for `http`) and the function sending one request."""
    if kind == "http":
        urls = [f"http://{t}/v1/completions" for t in targets]
        connector = aiohttp.TCPConnector(limit=clients)
        async with aiohttp.ClientSession(connector=connector) as session:
            yield lambda i, p, m: http_request(session, urls, i, p, m)
        return
    channels = [grpc.aio.insecure_channel(t) for t in targets]
    try:
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), 30)
        if kind == "direct":
            workers = [worker_pb2_grpc.WorkerStub(c) for c in channels]
            yield lambda i, p, m: direct_request(workers, i, p, m)
        else:
            routers = [inference_pb2_grpc.InferenceStub(c) for c in channels]
            yield lambda i, p, m: grpc_request(routers, i, p, m)
    finally:
        for channel in channels:
            await channel.close()


# ---- load ---------------------------------------------------------------------------------

def progress(line: str) -> None:
    """One line of progress on stderr (the tables come on stdout at the end)."""
    print(f"bench/router: {line}", file=sys.stderr, flush=True)


async def run_phase(name: str, send: RequestFn, load: Load, *, seed: int = 7,
                    first_index: int = 0) -> PhaseResult:
    """`load.clients` clients, each sending its next request when the last one ends, until
    `load.duration` seconds have passed; the phase ends when the last request does."""
    rng = random.Random(seed)
    counter = iter(range(first_index, first_index + 10**9))
    end = time.perf_counter() + load.duration
    result = PhaseResult(name, 0.0)

    async def client() -> None:
        while time.perf_counter() < end:
            index = next(counter)
            prompt = _prompt(rng, load.prompt_tokens)
            start = time.perf_counter()
            try:
                ttft, tokens = await send(index, prompt, load.max_tokens)
            except (grpc.aio.AioRpcError, aiohttp.ClientError, RuntimeError) as exc:
                result.errors += 1
                print(f"  {name}: error: {exc}", file=sys.stderr)
                continue
            result.requests += 1
            result.tokens += tokens
            result.samples.append(Sample(ttft, time.perf_counter() - start, tokens))

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(load.clients)))
    result.seconds = time.perf_counter() - began
    return result


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far, from /proc/stat."""
    ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    total = sum(ticks[:8])  # guest time is already counted in user
    return total - idle, total


class CpuMeter:
    """CPU time of the watched processes, by role, and the machine's busy share, between
    construction and `stop`."""

    def __init__(self, watch: dict[str, list[int]]) -> None:
        self.watch = watch
        self.start = {role: [_cpu_seconds(p) for p in pids] for role, pids in watch.items()}
        self.ticks = _machine_ticks()

    def stop(self, result: PhaseResult) -> PhaseResult:
        busy, total = _machine_ticks()
        result.cpu = {
            role: [round(_cpu_seconds(p) - s, 3)
                   for p, s in zip(pids, self.start[role], strict=True)]
            for role, pids in self.watch.items()}
        if total > self.ticks[1]:
            result.machine_busy = round((busy - self.ticks[0]) / (total - self.ticks[1]), 3)
        return result


def merge(name: str, parts: list[PhaseResult]) -> PhaseResult:
    """One phase's result from the results of the processes that shared its clients."""
    result = PhaseResult(name, max(p.seconds for p in parts))
    for part in parts:
        result.requests += part.requests
        result.errors += part.errors
        result.tokens += part.tokens
        result.samples += part.samples
    return result


class LoadProcesses:
    """The load generator in separate processes (this script with --load-worker), started
    once: each phase, every process gets its share of the clients, connects, and starts
    when all of them have."""

    def __init__(self, processes: list[asyncio.subprocess.Process]) -> None:
        self.processes = processes

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    async def run(self, name: str, kind: str, targets: list[str], load: Load,
                  watch: dict[str, list[int]]) -> PhaseResult:
        count = len(self.processes)
        shares = [load.clients // count + (i < load.clients % count) for i in range(count)]
        busy = [(i, p) for i, p in enumerate(self.processes) if shares[i]]
        for i, process in busy:
            spec = {"name": name, "kind": kind, "targets": targets, "seed": 7 + i,
                    "first_index": i * 10**8, "load": asdict(load) | {"clients": shares[i]}}
            await _send_line(process, json.dumps(spec))
        await asyncio.gather(*(_read_line(p, "load connected") for _, p in busy))
        meter = CpuMeter({**watch, "loadgen": self.pids})
        for _, process in busy:
            await _send_line(process, "go")
        lines = await asyncio.gather(*(_read_line(p, RESULT) for _, p in busy))
        parts = []
        for line in lines:
            data = json.loads(line[len(RESULT):])
            samples = [Sample(*s) for s in data.pop("samples")]
            parts.append(PhaseResult(name, samples=samples, **data))
        return meter.stop(merge(name, parts))


async def _send_line(process: asyncio.subprocess.Process, line: str) -> None:
    assert process.stdin is not None
    process.stdin.write(line.encode() + b"\n")
    await process.stdin.drain()


async def _read_line(process: asyncio.subprocess.Process, prefix: str,
                     timeout: float = 600) -> str:
    assert process.stdout is not None
    while True:
        line = (await asyncio.wait_for(process.stdout.readline(), timeout)).decode()
        if not line:
            raise RuntimeError(f"process {process.pid} exited before {prefix!r}")
        if line.startswith(prefix):
            return line


async def load_worker() -> int:
    """The load process's side of LoadProcesses: one phase per line of standard input."""
    loop = asyncio.get_running_loop()
    print("load worker ready", flush=True)
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        spec = json.loads(line)
        load = Load(**spec["load"])
        async with open_sender(spec["kind"], spec["targets"], load.clients) as send:
            print("load connected", flush=True)
            await loop.run_in_executor(None, sys.stdin.readline)  # "go"
            result = await run_phase(spec["name"], send, load, seed=spec["seed"],
                                     first_index=spec["first_index"])
        data = {"seconds": result.seconds, "requests": result.requests,
                "errors": result.errors, "tokens": result.tokens,
                "samples": [[s.ttft, s.e2e, s.tokens] for s in result.samples]}
        print(RESULT + json.dumps(data), flush=True)
    return 0


# ---- processes ----------------------------------------------------------------------------

async def spawn(processes: list[asyncio.subprocess.Process], *argv: str, ready: str,
                stdin: bool = False) -> tuple[asyncio.subprocess.Process, dict[str, str]]:
    """Start a process (added to `processes`, which the caller kills); return it and the
    `key=value` fields of its ready line."""
    env = {**os.environ, "SPOTSERVE_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, *argv, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        # a load process's errors are shown; its result line holds every sample
        stderr=None if stdin else asyncio.subprocess.DEVNULL, limit=1 << 26)
    processes.append(process)
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
    if ready not in line:
        raise RuntimeError(f"{argv[:3]} did not start: {line!r}")
    words = line.split()
    fields = dict(w.split("=", 1) for w in words if "=" in w)
    return process, {"last": words[-1], **fields}


async def kill(processes: list[asyncio.subprocess.Process]) -> None:
    for process in processes:
        if process.returncode is None:
            process.kill()
        await process.wait()
    processes.clear()


async def start_drivers(processes: list[asyncio.subprocess.Process], count: int,
                        step: float) -> tuple[list[str], list[int]]:
    """`count` test-double drivers, each on a loopback address of its own; their
    addresses and pids."""
    started = await asyncio.gather(*(spawn(
        processes, "-m", "tests.router.fake_worker", "--host", f"127.0.0.{2 + i}",
        "--vocab-size", str(VOCAB), "--step", str(step), "--token", TOKEN,
        ready="fake worker listening") for i in range(count)))
    return [ready["last"] for _, ready in started], [p.pid for p, _ in started]


async def start_routers(processes: list[asyncio.subprocess.Process], count: int, model: Path,
                        drivers: list[str], max_concurrency: int) -> list[dict[str, str]]:
    """`count` routers with the same static pipelines; each one's pid, grpc and http."""
    started = await asyncio.gather(*(spawn(
        processes, "-m", "spotserve.cli", "router", "--model", str(model),
        "--served-model-name", "tiny", "--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0",
        "--log-level", "WARNING", "--max-queue", "1024",
        "--max-concurrency", str(max_concurrency),
        *[f"--pipeline=p{i}={a}" for i, a in enumerate(drivers)],
        ready="router listening") for _ in range(count)))
    return [{"pid": str(p.pid), **ready} for p, ready in started]


async def main(args: argparse.Namespace) -> dict[str, object]:
    processes: list[asyncio.subprocess.Process] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model_dir(Path(tmp) / "tiny", max_context=4096)
        try:
            drivers, pids = await start_drivers(processes, args.pipelines, args.step)
            (router,) = await start_routers(processes, 1, model, drivers, 64)
            report = _report(args, await _phases(args, drivers, pids, router))
            await kill(processes)
            if args.resume:
                report["resume"] = await resume_path(args, model, processes)
                await kill(processes)
            if args.replicas:
                report["replicas"] = await replica_scaling(args, model, processes)
            return report
        finally:
            await kill(processes)


async def _phases(args: argparse.Namespace, drivers: list[str], driver_pids: list[int],
                  router: dict[str, str]) -> list[PhaseResult]:
    """The overhead phases, their clients in this process."""
    load = Load(args.clients, args.duration, args.prompt_tokens, args.max_tokens)
    results = []
    for name, kind, targets in (("direct", "direct", drivers),
                                ("router-grpc", "grpc", [router["grpc"]]),
                                ("router-http", "http", [router["http"]])):
        watch = {"drivers": driver_pids, "loadgen": [os.getpid()]}
        if kind != "direct":
            watch = {"router": [int(router["pid"])], **watch}
        progress(f"overhead phase {name}: {load.clients} clients for {load.duration:g} s")
        async with open_sender(kind, targets, load.clients) as send:
            meter = CpuMeter(watch)
            results.append(meter.stop(await run_phase(name, send, load)))
        progress(f"  {results[-1].tokens} tokens, {results[-1].errors} errors")
    return results


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


# ---- the resume path ----------------------------------------------------------------------

async def _resumable(stubs: Sequence[inference_pb2_grpc.InferenceStub], request_id: str,
                     prompt: list[int], max_tokens: int, break_after: int | None
                     ) -> tuple[float, list[float], int]:
    """One resumable request on stubs[0]; with `break_after`, its connection dropped after
    that many tokens and the rest taken up on stubs[1]. (start, token arrival times, the
    index of the first token after the break or -1)."""
    request = inference_pb2.GenerateRequest(
        token_ids=inference_pb2.TokenIds(ids=prompt), request_id=request_id, resumable=True,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens))
    start, times = time.perf_counter(), []
    call = stubs[0].Generate(request, timeout=120)
    async for message in call:
        times += [time.perf_counter()] * len(message.token_ids)
        if break_after is not None and len(times) >= break_after:
            break
    call.cancel()
    if break_after is None:
        return start, times, -1
    resumed_at = len(times)
    async for message in stubs[1].Resume(inference_pb2.ResumeRequest(
            request_id=request_id, received_tokens=len(times)), timeout=120):
        times += [time.perf_counter()] * len(message.token_ids)
    return start, times, resumed_at


async def resume_path(args: argparse.Namespace, model: Path,
                      processes: list[asyncio.subprocess.Process]) -> dict[str, object]:
    drivers, _ = await start_drivers(processes, args.pipelines, args.step)
    routers = await start_routers(processes, 2, model, drivers, 64)
    channels = [grpc.aio.insecure_channel(r["grpc"]) for r in routers]
    stubs = [inference_pb2_grpc.InferenceStub(c) for c in channels]
    rng = random.Random(11)
    prompts = [_prompt(rng, args.prompt_tokens) for _ in range(args.resume_requests)]
    half = args.max_tokens // 2
    limit = asyncio.Semaphore(32)
    rows: dict[str, dict[str, object]] = {}
    try:
        for variant, break_after in (("uninterrupted", None), ("resumed", half)):
            progress(f"resume path: {len(prompts)} {variant} requests"
                     + (f", each broken after {half} tokens" if break_after else ""))

            async def one(i: int, prompt: list[int], variant: str = variant,
                          break_after: int | None = break_after
                          ) -> tuple[float, list[float], int]:
                async with limit:
                    return await _resumable(stubs, f"{variant}-{i}", prompt,
                                            args.max_tokens, break_after)

            runs = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
            per_token = sorted((t[-1] - s) / len(t) for s, t, _ in runs)
            gaps = sorted(b - a for _, t, at in runs for k, (a, b) in
                          enumerate(itertools.pairwise(t)) if k + 1 != at and b > a)
            reconnects = sorted(t[at] - t[at - 1] for _, t, at in runs if at > 0)
            rows[variant] = {
                "requests": len(runs), "tokens": sum(len(t) for _, t, _ in runs),
                "e2e_per_token_ms_mean": _ms(statistics.fmean(per_token)),
                "e2e_per_token_ms_p99": _ms(_pct(per_token, 99)),
                "gap_p50_ms": _ms(_pct(gaps, 50)), "gap_p99_ms": _ms(_pct(gaps, 99)),
                **({"reconnect_p50_ms": _ms(_pct(reconnects, 50)),
                    "reconnect_p99_ms": _ms(_pct(reconnects, 99))} if reconnects else {})}
            complete = all(len(t) == args.max_tokens for _, t, _ in runs)
            rows[variant]["errors"] = 0 if complete else 1
    finally:
        for channel in channels:
            await channel.close()
    plain, resumed = rows["uninterrupted"], rows["resumed"]
    added = float(resumed["e2e_per_token_ms_mean"]) - float(plain["e2e_per_token_ms_mean"])
    return {"config": {"drivers": args.pipelines, "step_s": args.step,
                       "requests": args.resume_requests, "concurrency": 32,
                       "max_tokens": args.max_tokens, "broken_after": half},
            "uninterrupted": plain, "resumed": resumed,
            "added_ms_per_token": round(added, 3),
            "gap_ratio_after_takeover": _ratio(resumed["gap_p50_ms"], plain["gap_p50_ms"])}


# ---- replica scaling ----------------------------------------------------------------------

RATIOS = ["tokens_per_s", "requests_per_s", "ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms",
          "e2e_p99_ms", "router_cpu_us_per_token"]


async def replica_scaling(args: argparse.Namespace, model: Path,
                          processes: list[asyncio.subprocess.Process]) -> dict[str, object]:
    load = Load(args.replica_clients, args.duration, args.prompt_tokens, args.max_tokens)
    drivers, driver_pids = await start_drivers(processes, args.replica_pipelines,
                                               args.replica_step)
    started = await asyncio.gather(*(spawn(processes, str(Path(__file__).resolve()),
                                           "--load-worker", ready="load worker ready",
                                           stdin=True) for _ in range(args.load_procs)))
    loadgen = LoadProcesses([p for p, _ in started])
    watch = {"drivers": driver_pids}
    progress(f"replica scaling: direct to {len(drivers)} drivers (the ceiling)")
    direct = (await loadgen.run("direct", "direct", drivers, load, watch)).summary()
    rows: list[dict[str, object]] = []
    for n in args.replicas:
        routers: list[asyncio.subprocess.Process] = []
        cap = math.ceil(args.replica_cap / n)
        try:
            replicas = await start_routers(routers, n, model, drivers, cap)
            pids = [int(r["pid"]) for r in replicas]
            for kind in ("grpc", "http"):
                progress(f"replica scaling: {n} replica(s), {kind}, {load.clients} clients "
                         f"for {load.duration:g} s")
                result = await loadgen.run(f"router-{kind}", kind, [r[kind] for r in replicas],
                                           load, {"router": pids, **watch})
                rows.append({"replicas": n, "max_concurrency": cap, **result.summary()})
        finally:
            await kill(routers)
    for row in rows:
        first = next(r for r in rows if r["phase"] == row["phase"])
        row["ratio"] = {k: _ratio(row[k], first[k]) for k in RATIOS}
    return {
        "config": {"replicas": args.replicas, "pipelines": args.replica_pipelines,
                   "step_s": args.replica_step, "clients": args.replica_clients,
                   "cap_per_pipeline": args.replica_cap, "load_procs": args.load_procs,
                   "duration_s": args.duration, "balancing": "round robin by request"},
        "cpus": os.cpu_count(), "direct": direct, "rows": rows,
        "notes": _notes(args, direct, rows)}


def _ratio(value: object, base: object) -> float | None:
    if isinstance(value, int | float) and isinstance(base, int | float) and base:
        return round(value / base, 2)
    return None


def _notes(args: argparse.Namespace, direct: dict[str, object],
           rows: list[dict[str, object]]) -> list[str]:
    cpus = os.cpu_count() or 1
    most = max(args.replicas)
    notes = [
        f"cpus={cpus}: the load generator ({args.load_procs} processes), the "
        f"{args.replica_pipelines} drivers and up to {most} routers share these {cpus} CPUs."
        + (" Once they are busy the run is CPU-bound: the ratios measure this machine, not "
           "how far router replicas scale; the routers' CPU per token is what carries over."
           if cpus < most + args.load_procs + 1 else ""),
        f"ratios are to N={min(args.replicas)} of the same run; direct (no router, same "
        f"drivers and load) reached {direct['tokens_per_s']} tokens/s, the ceiling here.",
    ]
    busy, capped = [], []
    for row in [direct, *rows]:
        where = f"{row['phase']} N={row['replicas']}" if "replicas" in row else "direct"
        load = row.get("loadgen_core_use")
        if isinstance(load, list) and max(load) >= BUSY_CORE:
            capped.append(f"{where} ({max(load)} of a core)")
        share = row.get("machine_cpu_busy")
        if isinstance(share, float) and share >= BUSY_CORE:
            busy.append(f"{where} ({share:.0%})")
        use = row.get("router_core_use")
        if row.get("replicas") == min(args.replicas) and isinstance(use, list):
            if use[0] >= BUSY_CORE:
                verdict = "router-bound, as a replica-scaling run needs"
            elif isinstance(share, float) and share >= BUSY_CORE:
                verdict = ("not saturated while the machine was, so more replicas cannot "
                           "raise throughput much here")
            else:
                verdict = "not saturated: the load does not need more replicas"
            notes.append(f"{where}: the one router used {use[0]} of a core: {verdict}")
    if busy:
        notes.append("the machine's CPUs were busy (CPU-bound) in: " + ", ".join(busy))
    others = [f"{r.get('phase')} N={r.get('replicas', '-')}" for r in [direct, *rows]
              if isinstance(r["machine_cpu_busy"], float) and isinstance(r["own_cpu_share"], float)
              and r["machine_cpu_busy"] - r["own_cpu_share"] > 0.15]
    if others:
        notes.append("other processes used over 15% of the machine's CPU time in: "
                     + ", ".join(others) + " (figures disturbed; rerun on a quiet machine)")
    notes.append("a load process used 90% of a core or more (the load generator may cap the "
                 "figure) in: " + ", ".join(capped) if capped else
                 "no load process used 90% of a core: the load generator did not cap the "
                 "figures")
    return notes


# ---- output -------------------------------------------------------------------------------

def _markdown(columns: list[str], rows: list[dict[str, object]]) -> None:
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")


def print_table(report: dict[str, object]) -> None:
    phases = report["phases"]
    assert isinstance(phases, list)
    _markdown(["phase", "requests", "errors", "requests_per_s", "tokens_per_s", "ttft_p50_ms",
               "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms", "e2e_per_token_ms",
               "overhead_per_token_ms", "router_cpu_us_per_token", "loadgen_core_use"],
              phases)
    resume = report.get("resume")
    if isinstance(resume, dict):
        print(f"\nresume path: {resume['config']}")
        _markdown(["variant", "requests", "tokens", "e2e_per_token_ms_mean",
                   "e2e_per_token_ms_p99", "gap_p50_ms", "gap_p99_ms", "reconnect_p50_ms",
                   "reconnect_p99_ms"],
                  [{"variant": k, **resume[k]} for k in ("uninterrupted", "resumed")])
        print(f"added latency per token of the resume path: {resume['added_ms_per_token']} "
              f"ms; inter-token gap after a take-over: {resume['gap_ratio_after_takeover']}x "
              "the uninterrupted one")
    replicas = report.get("replicas")
    if not isinstance(replicas, dict):
        return
    print(f"\nreplica scaling: {replicas['config']}")
    rows = [replicas["direct"], *replicas["rows"]]
    _markdown(["phase", "replicas", "max_concurrency", "requests", "errors", "requests_per_s",
               "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms",
               "router_cpu_us_per_token", "router_core_use", "drivers_cpu_s",
               "loadgen_cpu_s", "loadgen_core_use", "machine_cpu_busy", "own_cpu_share"],
              rows)
    print("\nratio to N=1 (same run)")
    _markdown(["phase", "replicas", *RATIOS],
              [{"phase": r["phase"], "replicas": r["replicas"], **r["ratio"]}
               for r in replicas["rows"]])
    for note in replicas["notes"]:
        print(f"note: {note}")


def _replica_list(text: str) -> list[int]:
    counts = sorted({int(n) for n in text.split(",") if n.strip()})
    if any(n < 1 for n in counts):
        raise argparse.ArgumentTypeError("replica counts must be ≥ 1")
    return counts


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
    parser.add_argument("--replicas", type=_replica_list, default=[1, 2, 4],
                        help="router replica counts to compare, comma-separated "
                             "(default 1,2,4; '' for none)")
    parser.add_argument("--replica-clients", type=int, default=128,
                        help="closed-loop clients of the replica phases (default 128)")
    parser.add_argument("--replica-pipelines", type=int, default=8,
                        help="drivers of the replica phases (default 8)")
    parser.add_argument("--replica-step", type=float, default=0.002,
                        help="their seconds per token (default 0.002)")
    parser.add_argument("--replica-cap", type=int, default=64,
                        help="concurrency cap per pipeline across the replicas; each of N "
                             "gets ceil(cap/N) (default 64)")
    parser.add_argument("--load-procs", type=int, default=4,
                        help="load generator processes of the replica phases (default 4)")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the resume path (default on)")
    parser.add_argument("--resume-requests", type=int, default=128,
                        help="requests of each resume-path variant (default 128)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--load-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.full:
        args.duration = 60.0
    return args


def cli() -> int:
    args = parse_args()
    if args.load_worker:
        return asyncio.run(load_worker())
    began = time.perf_counter()
    report = asyncio.run(main(args))
    report["run_seconds"] = round(time.perf_counter() - began, 1)
    print_table(report)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "router.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} "
          f"in {report['run_seconds']} s")
    replicas = report.get("replicas")
    rows = [*report["phases"]] if isinstance(report["phases"], list) else []
    if isinstance(replicas, dict):
        rows += [replicas["direct"], *replicas["rows"]]
    resume = report.get("resume")
    if isinstance(resume, dict):
        rows += [resume["uninterrupted"], resume["resumed"]]
    return 1 if any(row["errors"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(cli())
