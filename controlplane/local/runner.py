"""One local-mode run: router + controller + emulated instances + a steady request stream.

`run_local(options)` starts the real router (`spotserve router` in a process of its own,
gRPC and HTTP on 127.0.0.1), the `LocalBackend` and the `Controller` (in this process);
plays the cloud script (boots,
notices, kills); sends greedy requests at a steady rate through the router's gRPC API;
optionally restarts the controller mid-run from its state file; and, once the script has
ended, replays every prompt against the final configuration (the no-preemption
reference) and checks every output token by token (`spotserve.worker.greedy_check`:
each token the model's greedy choice for exactly the tokens before it). Every process it
starts is stopped on the way out, also on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from spotserve.catalog import Catalog
from spotserve.client import Progress, ResumingClient
from spotserve.errors import SpotserveError
from spotserve.model_spec import ModelSpec
from spotserve.tokenizer import ChatMessage, ModelTokenizer
from spotserve.v1 import common_pb2, inference_pb2

from ..controller.actuator import ActuatorError
from ..controller.controller import Controller, ControllerSettings
from ..controller.events import LoadChanged
from ..controller.journal import Journal
from ..planner.cost_model import Workload
from ..planner.homogeneous import SearchLimits
from ..planner.profile_table import ProfileTable
from ..planner.request import cost_model
from .backend import ROOT, BackendOptions, LocalBackend
from .cloud import ADD, KILL, NOTICE, RATE, Script
from .router_process import RouterProcess
from .tiny_model import VOCAB

log = logging.getLogger("spotserve.local")
CATALOG = Path(__file__).with_name("catalog.yaml")
SERVING_WITHIN = 120.0  # seconds for the first configuration to serve
ENDED = (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP)


@dataclass(frozen=True)
class RunOptions:
    model_dir: Path
    workdir: Path
    script: Script
    instance_type: str = "cpu-1x"
    grace: float = 10.0
    rate: float = 2.0                 # requests/s sent to the router
    planned_rate: float = 1.0         # the rate the controller plans for
    prompt_tokens: int = 12
    max_tokens: int = 32
    min_gpus_per_replica: int = 2
    standby: int = 1
    boot_delay: float = 0.0
    profile: Path | None = None       # a measured profile (spotserve profile); else roofline
    on_demand_limit: int = 0
    restart_at: float | None = None   # seconds into the run: restart the controller
    reference: bool = True
    routers: int = 1                  # router replicas; requests spread over them
    router_restart_after: float = 2.0  # a SIGKILLed replica is back after this (a Deployment's)
    seed: int = 0
    progress_every: float = 5.0
    say: Callable[[str], None] | None = None
    # Chat requests: each request one of these questions, as a user turn under the model's
    # chat template, answered greedily up to its end of turn (or max_tokens). Empty: random
    # token prompts of prompt_tokens, generated to max_tokens whatever they say.
    questions: tuple[str, ...] = ()
    on_done: Callable[[RequestRecord], None] | None = None   # each request, once it ended


@dataclass
class RequestRecord:
    request_id: str
    prompt: list[int]
    sent: float
    done: float = 0.0
    tokens: list[int] = field(default_factory=list)
    finish: int = 0
    error: str = ""
    token_times: list[float] = field(default_factory=list)   # when each token arrived
    # when its stream broke, and on which pipeline
    interruptions: list[tuple[float, str]] = field(default_factory=list)
    resumes: list[str] = field(default_factory=list)  # "mode@pipeline after N tokens"
    # when its client's stream broke (its router replica died) and the replica's name
    client_breaks: list[tuple[float, str]] = field(default_factory=list)
    question: str = ""     # a chat request's question, and its answer (tokens decoded)
    answer: str = ""

    def resumes_by(self, mode: str) -> int:
        return sum(r.startswith(f"{mode}@") for r in self.resumes)

    @property
    def latency(self) -> float:
        return self.done - self.sent


@dataclass
class RunResult:
    records: list[RequestRecord]
    reference: dict[str, list[int]]
    greedy: dict[str, bool]   # request → every token a greedy step (empty: not checked)
    timeline: list[dict[str, Any]]
    journal: list[dict[str, Any]]
    configs: list[dict[str, Any]]
    resumed: dict[str, int]
    moved: dict[str, int]
    controller_metrics: dict[str, float]
    wall_seconds: float
    script_source: str

    @property
    def failed(self) -> list[RequestRecord]:
        """Requests that did not end as asked: an error, or cut short (a chat request ends
        at its end of turn or at max_tokens; a token-prompt one at max_tokens)."""
        return [r for r in self.records if r.error or r.finish not in ENDED]

    @property
    def mismatched(self) -> list[str]:
        """Requests whose output is wrong: a token that is not the model's greedy choice
        for the tokens before it (or, unchecked, one that differs from the reference)."""
        if self.greedy:
            return [rid for rid, ok in self.greedy.items() if not ok]
        return self.differing

    @property
    def differing(self) -> list[str]:
        """Served requests whose output differs from the no-preemption reference run."""
        return [r.request_id for r in self.records if not r.error
                and r.request_id in self.reference and self.reference[r.request_id] != r.tokens]


def settings_for(model: ModelSpec, options: RunOptions) -> ControllerSettings:
    catalog = Catalog.load(CATALOG)
    gpu = catalog.instance(options.instance_type).gpu.name
    table = ProfileTable.load(options.profile) if options.profile else None
    return ControllerSettings(
        model=model, cost=cost_model(model, table, gpu), catalog=catalog,
        workload=Workload(options.prompt_tokens, options.max_tokens),
        limits=SearchLimits(max_batch=8, min_gpus_per_replica=options.min_gpus_per_replica),
        grace_seconds=options.grace, standby_instances=options.standby,
        replacement_capacity="spot")


class LocalRun:
    def __init__(self, options: RunOptions) -> None:
        options = replace(options, model_dir=options.model_dir.resolve(),
                          workdir=options.workdir.resolve())
        self.options = options
        self.model = ModelSpec.from_hf_config(options.model_dir)
        self.tokenizer: ModelTokenizer | None = None
        if options.questions:
            self.tokenizer = ModelTokenizer.from_dir(options.model_dir)
            if not self.tokenizer.has_chat_template:
                raise SpotserveError(f"{options.model_dir}: the model has no chat template, "
                                     f"so it cannot be sent chat requests")
        self.catalog = Catalog.load(CATALOG)
        self.catalog.instance(options.instance_type)  # fail early on a bad type
        self.token = secrets.token_hex(16)
        self.records: list[RequestRecord] = []
        self._by_id: dict[str, RequestRecord] = {}
        self.configs: list[dict[str, Any]] = []
        self.journal = Journal(options.workdir / "controller")
        self.routers: list[RouterProcess] = []     # the live replicas
        self._router_runs: list[RouterProcess] = []  # every one started, for its request log
        self._router_starts = 0
        self.backend: LocalBackend | None = None
        self.controller: Controller | None = None
        self._controller_task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._requests: list[asyncio.Task[None]] = []
        self._start, self._wall0 = time.monotonic(), time.time()
        self._rng = random.Random(options.seed)
        self._sent = 0

    def say(self, text: str) -> None:
        if self.options.say is not None:
            self.options.say(text)

    def now(self) -> float:
        return time.monotonic() - self._start

    # ---- lifecycle --------------------------------------------------------------------
    async def run(self) -> RunResult:
        try:
            await self._start_all()
            await self._play()
            reference = await self._reference() if self.options.reference else {}
            greedy = await greedy_check(self.options.model_dir, self.options.workdir,
                                        self.records) if self.options.reference else {}
            return self._result(reference, greedy)
        finally:
            await self._stop_all()

    async def _start_all(self) -> None:
        self.options.workdir.mkdir(parents=True, exist_ok=True)
        for stale in ("state.json", "events.jsonl"):
            (self.options.workdir / "controller" / stale).unlink(missing_ok=True)
        self.routers = list(await asyncio.gather(*(
            self._start_router(self.router_name(i)) for i in range(self.options.routers))))
        self.client = ResumingClient([r.grpc_address for r in self.routers], retry_for=120.0)
        self.backend = LocalBackend(self.model, self.catalog, BackendOptions(
            model_dir=self.options.model_dir, workdir=self.options.workdir / "logs",
            router_addresses=tuple(r.control_address for r in self.routers),
            token=self.token, boot_delay=self.options.boot_delay,
            on_demand_limit=self.options.on_demand_limit))
        self._start, self._wall0 = time.monotonic(), time.time()
        self._start_controller()
        await self.backend.events.put(LoadChanged(self.options.planned_rate))
        self._tasks.append(asyncio.create_task(self._forward_events()))
        self._tasks.append(asyncio.create_task(self._watch_routers()))

    async def _start_router(self, name: str, like: RouterProcess | None = None
                            ) -> RouterProcess:
        """A router replica (`like`: on the addresses of one that died, as its Service
        and the controller know them)."""
        workdir = self.options.workdir / "logs"
        if like is None:
            router = await RouterProcess.start(self.options.model_dir, workdir, self.token,
                                               name=name)
        else:
            router = await RouterProcess.start(
                self.options.model_dir, workdir, self.token, like.grpc_address,
                like.http_address, name=name, control=like.control_address)
        self._router_runs.append(router)
        return router

    async def kill_router(self) -> str:
        """SIGKILL the replica streaming the most requests (the unlucky one, not a
        convenient one), and start it again `router_restart_after` seconds later, as its
        Deployment would; the controller tells it the topology before it turns ready.
        Returns the replica's name."""
        busiest = await self._busiest_router()
        victim = self.routers[busiest]
        await victim.kill()
        name = self.router_name(busiest)
        self.say(f"[{self.now():6.1f}s] {name} SIGKILLed (its clients resume on another "
                 f"replica)")
        self._tasks.append(asyncio.create_task(self._restart_router(busiest, victim)))
        return name

    async def _busiest_router(self) -> int:
        async def running(router: RouterProcess) -> float:
            try:
                async with aiohttp.ClientSession() as session, session.get(
                        f"http://{router.http_address}/metrics",
                        timeout=aiohttp.ClientTimeout(total=2)) as response:
                    text = await response.text()
            except (aiohttp.ClientError, TimeoutError):
                return -1.0
            for line in text.splitlines():
                if line.startswith("spotserve_num_requests_running "):
                    return float(line.split()[-1])
            return 0.0

        counts = await asyncio.gather(*(running(r) for r in self.routers))
        return max(range(len(counts)), key=lambda i: counts[i])

    async def _restart_router(self, index: int, dead: RouterProcess) -> None:
        await asyncio.sleep(self.options.router_restart_after)
        self._router_starts += 1
        name = self.router_name(index)
        self.routers[index] = await self._start_router(f"{name}-{self._router_starts}",
                                                       like=dead)
        self.say(f"[{self.now():6.1f}s] {name} restarted")

    @staticmethod
    def router_name(index: int) -> str:
        return f"router{index or ''}"

    async def _watch_routers(self) -> None:
        """Every second, every replica's epoch: one that restarted is told the topology."""
        assert self.backend is not None
        while True:
            await asyncio.sleep(1.0)
            with contextlib.suppress(ActuatorError):
                await self.backend.check_routers()

    def _start_controller(self) -> None:
        assert self.backend is not None
        self.controller = Controller(settings_for(self.model, self.options), self.backend,
                                     self.journal)
        for event in self.backend.state_events():  # events the last controller missed
            self.controller.queue.put_nowait(event)
        self._controller_task = asyncio.create_task(self.controller.run())

    async def _forward_events(self) -> None:
        assert self.backend is not None
        while True:
            event = await self.backend.events.get()
            while self.controller is None:
                await asyncio.sleep(0.05)
            await self.controller.submit(event)

    async def _stop_all(self) -> None:
        for task in [*self._tasks, *self._requests, self._controller_task]:
            if task is not None:
                task.cancel()
        for task in [*self._tasks, *self._requests, self._controller_task]:
            if task is not None:
                with contextlib.suppress(BaseException):
                    await task
        if self.backend is not None:
            await self.backend.close()
        if self.routers:
            with contextlib.suppress(Exception):
                await self.client.close()
        for router in self.routers:
            await router.stop()

    async def restart_controller(self) -> None:
        """Stop the controller wherever it is (a migration half done, say) and start a new
        one from its state file."""
        if self._controller_task is not None:
            self._controller_task.cancel()
            with contextlib.suppress(BaseException):
                await self._controller_task
        self.controller = None
        self.say(f"[{self.now():6.1f}s] controller restarted (resumes from its state file)")
        self._start_controller()

    # ---- the script and the load ------------------------------------------------------
    async def _play(self) -> None:
        assert self.backend is not None
        load = asyncio.create_task(self._load())
        progress = asyncio.create_task(self._progress())
        self._tasks += [load, progress]
        await self._script()
        await self._sleep_until(self.options.script.end)
        if load.done():
            load.result()  # raises what stopped the load (nothing ever served)
        load.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await load
        await self._wait_requests()
        progress.cancel()

    async def _script(self) -> None:
        """Play the cloud script (and the controller restart, if asked for)."""
        restart = self.options.restart_at
        for event in self.options.script.events:
            if restart is not None and restart <= event.at:
                await self._sleep_until(restart)
                await self.restart_controller()
                restart = None
            await self._sleep_until(event.at)
            await self._cloud(event)
        if restart is not None:
            await self._sleep_until(restart)
            await self.restart_controller()

    async def _sleep_until(self, at: float) -> None:
        await asyncio.sleep(max(0.0, at - self.now()))

    async def _cloud(self, event: Any) -> None:
        assert self.backend is not None
        if event.kind == ADD:
            task = asyncio.create_task(self.backend.add_instance(event.instance,
                                                                 self.options.instance_type))
            self._tasks.append(task)
        elif event.kind == NOTICE:
            self.say(f"[{self.now():6.1f}s] termination notice for {event.instance} "
                     f"({self.options.grace:g}s grace)")
            await self.backend.notice(event.instance, self.options.grace)
        elif event.kind == KILL:
            self.say(f"[{self.now():6.1f}s] {event.instance} terminated")
            await self.backend.kill(event.instance)
        elif event.kind == RATE and event.rate is not None:
            await self.backend.set_rate(event.rate)

    async def _load(self) -> None:
        """A steady stream: one request every 1/rate seconds, once something serves."""
        while not (self.backend and any(p.state == "serving" for p in self.backend.routed)):
            if self.now() > SERVING_WITHIN:
                raise SpotserveError(f"no pipeline is serving after {SERVING_WITHIN:g} s; see "
                                     f"the worker logs in {self.options.workdir / 'logs'}")
            await asyncio.sleep(0.2)
        interval = 1.0 / self.options.rate
        next_at = self.now()
        while True:
            self._send()
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - self.now()))

    def _read_request_log(self) -> None:
        """How each request ended and every interruption on the way, as the router logged
        them (seconds since the run started)."""
        logged: dict[str, list[dict[str, Any]]] = {}
        for router in self._router_runs:   # a request a replica took over is in two logs
            for request_id, entry in router.requests().items():
                logged.setdefault(request_id, []).append(entry)
        for record in self.records:
            entries = logged.get(record.request_id) or []
            resumes = sorted((r for e in entries for r in e["resumes"]),
                             key=lambda r: r["interrupted_at"])
            record.interruptions = sorted(
                [(r["interrupted_at"] - self._wall0, r["interrupted_on"]) for r in resumes]
                + record.client_breaks)
            record.resumes = [f"{r['mode']}@{r['on']} after {r['committed']}" for r in resumes]

    def _prompt(self) -> tuple[list[int], str]:
        """The next request's prompt tokens, and its question for a chat request."""
        if self.tokenizer is not None:
            questions = self.options.questions
            question = questions[self._sent % len(questions)]
            return self.tokenizer.encode_chat([ChatMessage("user", question)]), question
        vocab = min(self.model.vocab_size, VOCAB)
        return [self._rng.randrange(3, vocab) for _ in range(self.options.prompt_tokens)], ""

    def _send(self) -> None:
        prompt, question = self._prompt()
        self._sent += 1
        record = RequestRecord(f"req-{self._sent:04d}", prompt, self.now(), question=question)
        self.records.append(record)
        self._by_id[record.request_id] = record
        task = asyncio.create_task(self._generate(record, record.request_id))
        self._requests.append(task)

    async def _generate(self, record: RequestRecord, request_id: str,
                        reference: bool = False) -> None:
        chat = self.tokenizer is not None
        request = inference_pb2.GenerateRequest(
            token_ids=inference_pb2.TokenIds(ids=record.prompt), request_id=request_id,
            sampling=common_pb2.SamplingParams(max_tokens=self.options.max_tokens,
                                               temperature=0.0, ignore_eos=not chat))
        progress = Progress()
        try:
            async for message in self.client.generate(request, progress, timeout=300):
                record.tokens.extend(message.token_ids)
                record.token_times.extend(self.now() for _ in message.token_ids)
                if message.finish_reason:
                    record.finish = message.finish_reason
        except grpc.aio.AioRpcError as exc:
            record.error = f"{exc.code().name}: {exc.details()}"
        names = {r.grpc_address: self.router_name(i) for i, r in enumerate(self.routers)}
        record.client_breaks = [(t - self._start, names.get(a, a)) for t, a in progress.breaks]
        record.done = self.now()
        if reference:   # its tokens are all the reference needs
            return
        if self.tokenizer is not None:
            record.answer = self.tokenizer.decode(record.tokens).strip()
        if self.options.on_done is not None:
            self.options.on_done(record)

    async def _wait_requests(self) -> None:
        pending = [t for t in self._requests if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=120)

    async def _progress(self) -> None:
        while True:
            await asyncio.sleep(self.options.progress_every)
            self.say(self.status_line())

    def status_line(self) -> str:
        done = [r for r in self.records if r.done]
        ok = [r for r in done if not r.error]
        latency = sorted(r.latency for r in ok[-50:])
        p50 = latency[len(latency) // 2] if latency else 0.0
        controller = self.controller
        plan = controller.last_plan if controller else None
        config = plan.config.describe() if plan and plan.config else "-"
        backend = self.backend
        states: dict[str, int] = {}
        for instance in (backend.instances.values() if backend else ()):
            states[instance.state] = states.get(instance.state, 0) + 1
        instances = " ".join(f"{k}={v}" for k, v in sorted(states.items()))
        return (f"[{self.now():6.1f}s] instances {instances or '-'} | {config} | "
                f"epoch {controller.epoch if controller else '-'} | requests "
                f"{len(ok)}/{len(self.records)} done, {len(done) - len(ok)} failed | "
                f"p50 {p50:.2f}s")

    # ---- the reference and the result -------------------------------------------------
    async def _reference(self) -> dict[str, list[int]]:
        """Every prompt again on the final configuration, no preemption in between."""
        self.say(f"[{self.now():6.1f}s] reference run: {len(self.records)} prompts, "
                 f"no preemption")
        out: dict[str, list[int]] = {}
        limit = asyncio.Semaphore(16)

        async def one(record: RequestRecord) -> None:
            copy = RequestRecord(record.request_id, record.prompt, 0.0)
            async with limit:
                await self._generate(copy, f"ref-{record.request_id}", reference=True)
            out[record.request_id] = copy.tokens if not copy.error else []

        await asyncio.gather(*(one(r) for r in self.records if not r.error))
        return out

    def _result(self, reference: dict[str, list[int]], greedy: dict[str, bool]) -> RunResult:
        assert self.backend is not None
        self._read_request_log()
        resumed = {mode: sum(r.resumes_by(mode) for r in self.records)
                   for mode in ("kv", "reprefill")}
        moved = self.backend.moved
        journal = self.journal.read()
        configs = [{"t": round(e["time"] - self._wall0, 3), "epoch": e["epoch"],
                    "config": e.get("config", ""), "pipelines": e.get("pipelines", [])}
                   for e in journal if e["kind"] == "serving"]
        controller_metrics = {}
        if self.controller is not None:
            get = self.controller.metrics.registry.get_sample_value
            for reason in ("notice", "join", "loss", "load"):
                controller_metrics[f"replans_{reason}"] = get("spotserve_replans_total",
                                                              {"reason": reason}) or 0.0
            controller_metrics["bytes_planned"] = get(
                "spotserve_migration_bytes_planned_total") or 0.0
        return RunResult(
            records=list(self.records), reference=reference, greedy=greedy,
            timeline=list(self.backend.timeline), journal=journal,
            configs=configs, resumed=resumed,
            moved={"kept": moved.kept, "pulled": moved.pulled,
                   "checkpoint": moved.checkpoint, "configures": moved.configures},
            controller_metrics=controller_metrics, wall_seconds=self.now(),
            script_source=self.options.script.source)


async def greedy_check(model_dir: Path, workdir: Path, records: list[RequestRecord]
                       ) -> dict[str, bool]:
    """Check every finished request token by token in a worker-side process (see
    `spotserve.worker.greedy_check`): request id → all its tokens greedy choices."""
    done = [r for r in records if r.tokens and not r.error]
    path = workdir / "greedy-check.jsonl"
    path.write_text("".join(json.dumps({"id": r.request_id, "prompt": r.prompt,
                                        "tokens": r.tokens}) + "\n" for r in done))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "spotserve.worker.greedy_check", "--model", str(model_dir),
        str(path), cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(), 300)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise SpotserveError("the greedy check of the outputs did not finish in 300 s") from None
    if process.returncode:
        raise SpotserveError(f"the greedy check of the outputs failed: "
                             f"{err.decode(errors='replace')[-500:]}")
    return {v["id"]: bool(v["ok"]) for v in map(json.loads, out.decode().splitlines())}


async def run_local(options: RunOptions) -> RunResult:
    if not (options.model_dir / "config.json").is_file():
        raise SpotserveError(f"--model {options.model_dir}: no config.json there")
    return await LocalRun(options).run()
