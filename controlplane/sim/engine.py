"""Discrete-event simulation at request granularity: requests, pipelines, instances, money.

The engine owns the clock and the state every approach shares; a `Policy` (policies.py)
decides what happens when the cluster changes. Pipelines batch in one of two ways:

- static (SpotServe's engine and cost model, the default): an idle pipeline takes up to B
  waiting requests, prefills them (unless their KV cache is already on it) and decodes
  until the longest is done; each request finishes after its own last token;
- continuous (this project's worker engine): waiting requests join a running batch with
  room between decode steps (their prefill stalls the batch) and leave when done.

Step times come from the planner's `pipeline_times` for the batch size actually running.
Cluster events come from the trace: an instance is usable a boot delay after its `add`,
gets a notice a grace period before its `remove` (none if it is in `no_notice`), and its
GPUs (with their data) are gone at the `remove`.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from spotserve.catalog import InstanceType
from spotserve.traces import Trace

from .workload import Arrival


@dataclass
class Request:
    arrival: Arrival
    done_tokens: int = 0          # output tokens already committed (sent to the client)
    kv_pipeline: int | None = None  # runtime id of the pipeline holding its KV cache
    finish_s: float | None = None
    restarts: int = 0
    reprefills: int = 0

    @property
    def remaining(self) -> int:
        return self.arrival.output_tokens - self.done_tokens


@dataclass
class Batch:
    requests: list[Request]
    start_s: float
    prefill_end_s: float
    step_s: float
    end_s: float
    overhead_s: float = 0.0

    def decoded(self, request: Request, now: float) -> int:
        if now < self.prefill_end_s:
            return 0
        steps = math.floor((now - self.prefill_end_s) / self.step_s + 1e-9)
        return max(0, min(request.remaining, steps))


@dataclass
class Pipeline:
    """A running replica. `timing(b)` → (prefill s, decode step s, overhead s) for b requests."""

    uid: int
    instances: frozenset[str]
    batch: int
    timing: Callable[[int], tuple[float, float, float]]
    available_s: float = 0.0
    draining: bool = False
    running: Batch | None = None
    resume: list[Request] = field(default_factory=list)
    label: str = ""


class Policy(Protocol):
    name: str

    def start(self, sim: Simulation) -> None: ...
    def on_notice(self, sim: Simulation, nodes: tuple[str, ...]) -> None: ...
    def on_ready(self, sim: Simulation, nodes: tuple[str, ...]) -> None: ...
    def on_removed(self, sim: Simulation, nodes: tuple[str, ...]) -> None: ...
    def on_rate(self, sim: Simulation) -> None: ...


@dataclass(frozen=True)
class ClusterSpec:
    """How trace nodes become instances: their type, capacity and price."""

    node_type: Callable[[str], InstanceType]
    on_demand: frozenset[str] = frozenset()
    spot_prices: dict[str, float] = field(default_factory=dict)  # instance type → $/h
    grace_s: float = 30.0
    boot_s: float = 0.0
    no_notice: frozenset[str] = frozenset()   # nodes the trace kills without a notice

    def capacity(self, node: str) -> str:
        return "on-demand" if node in self.on_demand else "spot"

    def price(self, node: str) -> float:
        itype = self.node_type(node)
        if node in self.on_demand:
            return itype.price
        return self.spot_prices.get(itype.name, itype.price)


@dataclass
class Counters:
    replans: int = 0
    migrations: int = 0
    reloads: int = 0
    bytes_moved: int = 0
    migration_s: float = 0.0


class Simulation:
    def __init__(self, trace: Trace, arrivals: Iterable[Arrival], cluster: ClusterSpec,
                 policy: Policy, rate: float, drain_s: float = 3600.0,
                 continuous: bool = False) -> None:
        self.trace, self.cluster, self.policy, self.rate = trace, cluster, policy, rate
        self.continuous = continuous
        self.now = 0.0
        self.requests = [Request(a) for a in arrivals]
        self.queue: deque[Request] = deque()
        self.pipelines: dict[int, Pipeline] = {}
        self.ready: dict[str, float] = {}       # usable instance → since when
        self.held: dict[str, float] = {}        # paid-for instance → since when
        self.doomed: dict[str, float] = {}      # instance → termination time
        self.cost_usd = 0.0
        self.ondemand_usd = 0.0                 # the same instance-hours at on-demand prices
        self.instance_hours = 0.0
        self.counters = Counters()
        self.timeline: list[dict[str, Any]] = []
        self.horizon = trace.end_s + drain_s
        self._events: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0
        self._next_uid = 0
        self.keep_committed_on_loss = True  # the router resumes (SpotServe) or restarts

    # -- scheduling -------------------------------------------------------------------
    def at(self, time_s: float, fn: Callable[..., None], *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._events, (max(time_s, self.now), self._seq, fn, args))

    def new_uid(self) -> int:
        self._next_uid += 1
        return self._next_uid

    def run(self) -> None:
        self._schedule_trace()
        arrivals = iter(self.requests)
        upcoming = next(arrivals, None)
        self.policy.start(self)
        while self._events or upcoming is not None:
            if upcoming is not None and (not self._events
                                         or upcoming.arrival.time_s < self._events[0][0]):
                if upcoming.arrival.time_s > self.horizon:
                    break
                self.now = upcoming.arrival.time_s
                self.queue.append(upcoming)
                upcoming = next(arrivals, None)
                self.dispatch()
                continue
            time_s, _, fn, args = heapq.heappop(self._events)
            if time_s > self.horizon:
                break
            self.now = time_s
            fn(*args)
        self._settle_cost(self.trace.end_s)

    def all_done(self) -> bool:
        return not self.queue and all(p.running is None and not p.resume
                                      for p in self.pipelines.values())

    def _schedule_trace(self) -> None:
        grace, boot = self.cluster.grace_s, self.cluster.boot_s
        for event in self.trace.events:
            if event.kind == "add":
                self.at(event.time_s, self._acquired, event.nodes)
                self.at(event.time_s + (boot if event.time_s > 0 else 0.0), self._ready,
                        event.nodes)
            elif event.kind == "remove":
                noticed = tuple(n for n in event.nodes if n not in self.cluster.no_notice)
                if noticed:
                    self.at(max(0.0, event.time_s - grace), self._notice, noticed,
                            event.time_s)
                self.at(event.time_s, self._removed, event.nodes)
            if event.rate is not None:
                self.at(event.time_s, self._rate, event.rate)

    # -- cluster events ---------------------------------------------------------------
    def _acquired(self, nodes: tuple[str, ...]) -> None:
        for node in nodes:
            self.held.setdefault(node, self.now)

    def _ready(self, nodes: tuple[str, ...]) -> None:
        fresh = tuple(n for n in nodes if n in self.held and n not in self.ready)
        for node in fresh:
            self.ready[node] = self.now
        if fresh:
            self.policy.on_ready(self, fresh)
            self.record("ready")

    def _notice(self, nodes: tuple[str, ...], deadline: float) -> None:
        doomed = tuple(n for n in nodes if n in self.ready and n not in self.doomed)
        for node in doomed:
            self.doomed[node] = deadline
        for p in self.pipelines.values():
            if p.instances & set(doomed):
                p.draining = True
        if doomed:
            self.policy.on_notice(self, doomed)

    def _removed(self, nodes: tuple[str, ...]) -> None:
        gone = set(nodes) & set(self.held)
        for node in gone:
            self._pay(node, min(self.now, self.trace.end_s) - self.held.pop(node))
            self.ready.pop(node, None)
            self.doomed.pop(node, None)
        for p in [p for p in self.pipelines.values() if p.instances & gone]:
            self.close(p, keep_committed=self.keep_committed_on_loss)
        if gone:
            self.policy.on_removed(self, tuple(sorted(gone)))
            self.record("removed")

    def _rate(self, rate: float) -> None:
        self.rate = rate
        self.policy.on_rate(self)

    def _settle_cost(self, end: float) -> None:
        for node, since in self.held.items():
            self._pay(node, max(0.0, end - since))
        self.held = {n: end for n in self.held}

    def _pay(self, node: str, seconds: float) -> None:
        """`seconds` of `node` at its price; `ondemand_usd` prices the same instance-hours
        all on demand (the equal-instance-hours cost comparison)."""
        self.cost_usd += seconds * self.cluster.price(node) / 3600.0
        self.ondemand_usd += seconds * self.cluster.node_type(node).price / 3600.0
        self.instance_hours += seconds / 3600.0

    # -- pipelines --------------------------------------------------------------------
    def add_pipeline(self, pipeline: Pipeline) -> None:
        self.pipelines[pipeline.uid] = pipeline
        self.at(pipeline.available_s, self.dispatch)

    def serve_until(self, pipeline: Pipeline, stop_s: float, whole_s: float) -> None:
        """A baseline's pipeline after a notice, as the SpotServe artifact runs it: it keeps
        taking batches while a whole one (`whole_s`) still fits before `stop_s`, and at
        `stop_s` it stops; what it has not finished then restarts from scratch."""
        if stop_s - whole_s > self.now:
            pipeline.draining = False
            self.at(stop_s - whole_s, self._stop_taking, pipeline)
        self.at(stop_s, self._cut, pipeline)
        self.dispatch()

    @staticmethod
    def _stop_taking(pipeline: Pipeline) -> None:
        pipeline.draining = True

    def _cut(self, pipeline: Pipeline) -> None:
        if self.pipelines.get(pipeline.uid) is pipeline:
            self.close(pipeline, keep_committed=False)
            self.dispatch()

    def interrupt(self, pipeline: Pipeline, keep_kv: bool) -> list[Request]:
        """Stop the running batch now; its requests keep their committed tokens."""
        batch, pipeline.running = pipeline.running, None
        if batch is None:
            return []
        out = []
        for r in batch.requests:
            if r.finish_s is not None:
                continue
            r.done_tokens += batch.decoded(r, self.now)
            if r.remaining <= 0:
                r.finish_s = self.now
                continue
            r.kv_pipeline = pipeline.uid if keep_kv and self.now >= batch.prefill_end_s \
                else None
            out.append(r)
        return out

    def close(self, pipeline: Pipeline, keep_committed: bool) -> None:
        """Remove a pipeline; its requests go back to the front of the queue, keeping their
        committed tokens (re-prefill) or not (restart from scratch)."""
        self.pipelines.pop(pipeline.uid, None)
        self.requeue(self.interrupt(pipeline, keep_kv=False) + pipeline.resume,
                     keep_committed)
        pipeline.resume = []

    def requeue(self, requests: list[Request], keep_committed: bool) -> None:
        for r in reversed(requests):
            r.kv_pipeline = None
            if keep_committed:
                r.reprefills += 1
            else:
                r.done_tokens = 0
                r.restarts += 1
            self.queue.appendleft(r)

    def dispatch(self) -> None:
        for p in sorted(self.pipelines.values(), key=lambda p: p.uid):
            if p.draining or p.available_s > self.now:
                continue
            if p.running is not None:
                if self.continuous and self._has_room(p):
                    self._start(p, self.interrupt(p, keep_kv=True))
                continue
            self._start(p, [])

    def _has_room(self, p: Pipeline) -> bool:
        """Continuous batching admits waiting requests between decode steps."""
        batch = p.running
        return (batch is not None and len(batch.requests) < p.batch
                and bool(p.resume or self.queue) and self.now >= batch.prefill_end_s)

    def _start(self, p: Pipeline, members: list[Request]) -> None:
        """Run `members` plus waiting requests (up to B) until the batch ends (static) or
        its first request finishes (continuous)."""
        room = p.batch - len(members)
        take = members + p.resume[:room]
        p.resume = p.resume[room:]
        while len(take) < p.batch and self.queue:
            take.append(self.queue.popleft())
        if not take:
            return
        fresh = sum(r.kv_pipeline != p.uid for r in take)
        _, step_s, overhead_s = p.timing(len(take))
        prefill_end = self.now + (p.timing(fresh)[0] if fresh else 0.0)
        for r in take:
            r.kv_pipeline = p.uid
        longest = (min if self.continuous else max)(r.remaining for r in take)
        end = prefill_end + longest * step_s + (0.0 if self.continuous else overhead_s)
        batch = Batch(take, self.now, prefill_end, step_s, end, overhead_s)
        p.running = batch
        self.at(end, self._finish, p, batch)
        if self.continuous and fresh:
            self.at(prefill_end, self.dispatch)

    def _finish(self, p: Pipeline, batch: Batch) -> None:
        if p.running is not batch:
            return
        p.running = None
        steps = round((batch.end_s - batch.prefill_end_s - (
            0.0 if self.continuous else batch.overhead_s)) / batch.step_s)
        going = []
        for r in batch.requests:
            if r.remaining <= steps:
                r.finish_s = batch.prefill_end_s + r.remaining * batch.step_s \
                    + batch.overhead_s
                r.done_tokens = r.arrival.output_tokens
            else:
                r.done_tokens += steps
                going.append(r)
        if going:
            self._start(p, going)
        self.dispatch()

    # -- bookkeeping ------------------------------------------------------------------
    def usable(self) -> list[str]:
        return sorted(n for n in self.ready if n not in self.doomed)

    def record(self, event: str, config: str | None = None) -> None:
        self.timeline.append({
            "t": round(self.now, 3), "event": event, "instances": len(self.ready),
            "pipelines": len(self.pipelines),
            "config": config if config is not None else (
                self.timeline[-1]["config"] if self.timeline else "")})
