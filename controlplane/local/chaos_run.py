"""The chaos campaign on this machine: local mode played by a seeded `ChaosPlan`.

`ChaosRun` is a `LocalRun` whose cloud is the plan's faults. A fault's target is a role
resolved when it fires, from what the controller runs at that moment: an instance hosting
a pipeline's driver, one hosting a follower, any live one, or (for a fault armed on a
phase) one involved in the migration under way, struck the moment the controller enters
that phase. Before a removal would leave fewer instances than a pipeline needs, a
replacement is booted alongside (requests wait in the router meanwhile, as they would in
a real outage), so every run keeps a pipeline's worth of capacity in the end.

`run_campaign` plays seeds one after another, with a process keeping a core busy, and
returns each run's `Outcome` (see `chaos.verdict`); every run is bounded in time, and one
that does not end in time counts its unfinished requests as hung.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

from spotserve.v1 import common_pb2

from ..planner.cluster import GpuId
from .chaos import (
    ADD,
    DEADLINE,
    KILL,
    NOTICE,
    RESTART,
    ROUTER,
    STOP,
    ChaosPlan,
    Fault,
    Outcome,
    RequestTrace,
    Struck,
    generate,
    verdict,
)
from .cloud import Script
from .runner import LocalRun, RunOptions, RunResult
from .tiny_model import build_tiny_llama

MIN_ALIVE = 2       # instances one pipeline of the tiny model needs (P=2 or M=2)
MAX_ALIVE = 6       # instances the machine runs at once
SLACK_S = 300.0     # a run's bound: its trace plus this


class ChaosRun(LocalRun):
    def __init__(self, options: RunOptions, plan: ChaosPlan) -> None:
        super().__init__(replace(options, script=Script((), plan.duration,
                                                        f"chaos seed {plan.seed}")))
        self.plan = plan
        self.rng = random.Random(plan.seed + 1)
        self.struck: list[Struck] = []
        self._spares = 0

    async def _script(self) -> None:
        for name in self.plan.initial:
            self._boot(name)
        for fault in self.plan.faults:
            await self._sleep_until(fault.at)
            if fault.phase:
                self._tasks.append(asyncio.create_task(self._armed(fault)))
            else:
                await self._strike(fault, fault.target)

    def _boot(self, name: str) -> None:
        assert self.backend is not None
        self._tasks.append(asyncio.create_task(
            self.backend.add_instance(name, self.options.instance_type)))

    async def _armed(self, fault: Fault) -> None:
        """Wait for the controller to enter `fault.phase`, then strike what it involves."""
        give_up = self.now() + fault.window
        entered = asyncio.Event()   # set the moment the phase begins, however short it is

        def listen(phase: str) -> None:
            if phase == fault.phase:
                entered.set()
        listening = None
        while self.now() < give_up:
            controller = self.controller   # a restarted controller is a new object
            if controller is not None and controller is not listening:
                controller.phase_listeners.append(listen)
                listening = controller
                if controller.phase == fault.phase:
                    entered.set()
            if entered.is_set():
                await self._strike(fault, "involved")
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(entered.wait(), 0.05)
        self.struck.append(Struck(self.now(), fault.label))  # the phase never came

    async def _strike(self, fault: Fault, role: str) -> None:
        assert self.backend is not None
        if fault.kind == ADD:
            if len(self._alive()) < MAX_ALIVE:
                self._boot(fault.target)
                self.struck.append(Struck(self.now(), fault.label, fault.target))
            return
        if fault.kind == RESTART:
            self.struck.append(Struck(self.now(), fault.label, "controller"))
            await self.restart_controller()
            return
        if fault.kind == ROUTER:
            if len(self.routers) < 2:   # its only router: that loses streams by design
                self.struck.append(Struck(self.now(), fault.label))
                return
            self.struck.append(Struck(self.now(), fault.label, await self.kill_router()))
            return
        target = await self._await_role(role, fault)
        if target is None:
            self.struck.append(Struck(self.now(), fault.label))
            return
        self.struck.append(Struck(self.now(), fault.label, target))
        if fault.kind == STOP:
            self.backend.pause_worker(GpuId(target, 0))
            return
        self._keep_capacity(target)
        if fault.kind == KILL:
            await self.backend.kill(target)
        elif fault.kind == NOTICE:
            self.say(f"[{self.now():6.1f}s] notice for {target} ({fault.grace:g} s)")
            await self.backend.notice(target, fault.grace)
            self._tasks.append(asyncio.create_task(self._kill_later(target, fault.grace)))

    async def _kill_later(self, name: str, delay: float) -> None:
        assert self.backend is not None
        await asyncio.sleep(delay)
        if name in self._alive():
            self.struck.append(Struck(self.now(), DEADLINE, name))
            await self.backend.kill(name)

    def _alive(self, noticed_ok: bool = True) -> list[str]:
        assert self.backend is not None
        states = ("ready", "notice") if noticed_ok else ("ready",)
        return sorted(n for n, i in self.backend.instances.items() if i.state in states)

    async def _await_role(self, role: str, fault: Fault) -> str | None:
        """`_select`, waiting (up to the fault's window) while no live instance plays a
        driver or follower role yet: a fault aimed at a pipeline member must hit one,
        however slowly the first instances boot."""
        give_up = self.now() + fault.window
        while role in ("driver", "follower") and not self._role_candidates(role) \
                and self.now() < give_up:
            await asyncio.sleep(0.05)
        return self._select(role, noticed_ok=fault.kind != NOTICE)

    def _role_candidates(self, role: str, noticed_ok: bool = True) -> set[str]:
        """The live instances that play `role` now."""
        controller = self.controller
        placement = controller.placement if controller else None
        candidates: set[str] = set()
        if placement is not None and role in ("driver", "follower"):
            drivers = {g.instance for p, g in placement.assignment
                       if p.stage == 0 and p.tp_rank == 0}
            candidates = drivers if role == "driver" else placement.instances() - drivers
        elif role == "involved" and controller is not None:
            plan = controller.last_plan
            candidates = set(placement.instances() if placement else ())
            if plan is not None and plan.mapping is not None:
                candidates |= plan.mapping.placement.instances()
        return candidates & set(self._alive(noticed_ok))

    def _select(self, role: str, noticed_ok: bool) -> str | None:
        """An instance for `role`, chosen (seeded) among those alive now (any live one
        when none plays the role)."""
        pool = sorted(self._role_candidates(role, noticed_ok)) or self._alive(noticed_ok)
        return self.rng.choice(pool) if pool else None

    def _keep_capacity(self, target: str) -> None:
        """Boot a spare alongside a removal that would leave less than a pipeline."""
        usable = [n for n in self._alive(noticed_ok=False) if n != target]
        if len(usable) < MIN_ALIVE and len(self._alive()) < MAX_ALIVE:
            self._spares += 1
            self._boot(f"s{self._spares}")


def outcome_of(run: ChaosRun, result: RunResult | None, hung: int, seconds: float,
               error: str = "") -> Outcome:
    reference = result.reference if result else {}
    greedy = result.greedy if result else {}
    _dump(run, reference, greedy)
    done = common_pb2.FINISH_REASON_LENGTH
    traces = [RequestTrace(r.request_id, r.sent,
                           bool(r.done) and not r.error and r.finish == done,
                           tuple(r.token_times), tuple(r.interruptions),
                           # unchecked (the run never got that far): not counted wrong
                           greedy.get(r.request_id, not greedy),
                           reference.get(r.request_id) == r.tokens)
              for r in run.records]
    members: dict[str, list[str]] = {}
    for index in range(run.options.routers):   # a client's break names its replica
        name = run.router_name(index)
        members[name] = [name]
    for entry in run.journal.read():
        members.update(entry.get("members") or {})
    out = verdict(run.plan.seed, run.struck, traces, members, hung)
    out.seconds, out.error = round(seconds, 1), error
    out.failed -= min(out.failed, hung)  # a hung request is counted once, as hung
    return out


def _dump(run: ChaosRun, reference: dict[str, list[int]], greedy: dict[str, bool]) -> None:
    """Every request of the run, the faults as they struck: `requests.jsonl`, `faults.json`
    in the run's folder, to look into what went wrong."""
    folder = run.options.workdir
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "requests.jsonl").open("w") as out:
        for r in run.records:
            out.write(json.dumps({
                "id": r.request_id, "sent": round(r.sent, 3), "done": round(r.done, 3),
                "error": r.error, "finish": r.finish, "prompt": r.prompt, "tokens": r.tokens,
                "greedy": greedy.get(r.request_id), "reference": reference.get(r.request_id),
                "resumes": r.resumes,
                "interruptions": [(round(t, 3), p) for t, p in r.interruptions]}) + "\n")
    (folder / "faults.json").write_text(json.dumps([vars(s) for s in run.struck], indent=1))


async def run_seed(plan: ChaosPlan, model: Path, workdir: Path,
                   say: Callable[[str], None] | None = None, rate: float = 2.0,
                   routers: int = 1) -> Outcome:
    options = RunOptions(model_dir=model, workdir=workdir, script=Script((), plan.duration, ""),
                         rate=rate, max_tokens=32, prompt_tokens=12, seed=plan.seed,
                         progress_every=10.0, say=say, routers=routers)
    run = ChaosRun(options, plan)
    start = time.monotonic()
    task = asyncio.ensure_future(run.run())
    try:
        result = await asyncio.wait_for(asyncio.shield(task), plan.duration + SLACK_S)
    except TimeoutError:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        hung = sum(not r.done for r in run.records)
        return outcome_of(run, None, max(hung, 1), time.monotonic() - start,
                          "the run did not end in time")
    except Exception as exc:  # a harness failure is a finding too: report it, go on
        return outcome_of(run, None, 0, time.monotonic() - start,
                          f"{type(exc).__name__}: {exc}")
    hung = sum(not r.done for r in run.records)
    return outcome_of(run, result, hung, time.monotonic() - start)


@contextlib.contextmanager
def busy_cores(count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`count` processes spinning on a core each, as other work on a shared machine."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(count)]
    try:
        yield spinners
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


async def run_campaign(seeds: list[int], out: Path, duration: float, rate: float,
                       say: Callable[[str], None], report: Callable[[Outcome], None],
                       routers: int = 1) -> list[Outcome]:
    model = build_tiny_llama(out / "tiny-llama")
    outcomes = []
    for seed in seeds:
        plan = generate(seed, duration, routers=routers)
        say(f"seed {seed}: {len(plan.faults)} faults over {duration:g} s, "
            f"{len(plan.initial)} instances to start")
        outcome = await run_seed(plan, model, out / f"seed-{seed}", None, rate, routers)
        report(outcome)
        outcomes.append(outcome)
    return outcomes
