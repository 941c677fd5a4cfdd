"""The chaos campaign's faults and its verdict (pure: no processes here).

`generate(seed)` draws one run's faults from a seeded generator: instances joining;
termination notices with random grace; kills without notice of any instance (the one
hosting a pipeline's driver, a follower, any); kills and notices armed to strike when the
controller enters a given migration phase (preloading, draining, configuring); cascades of
removals 1–5 s apart; a worker stopped (SIGSTOP) past the failure-detection bound; a
controller restart. Targets are roles resolved when the fault fires (`chaos_run`), never
names chosen for convenience.

`verdict(...)` turns a run into its outcome: requests failed, hung and wrong (a token that is
not the model's greedy choice for exactly the tokens before it; see
`spotserve.worker.greedy_check` for why that, and not one reference run, is the oracle),
how many differ from the no-preemption reference at fp32 near-ties, and per fault kind
the recovery time from the fault to the next token of every request it interrupted.

With two or more router replicas (`generate(..., routers=2)`), a SIGKILL of the replica
streaming the most requests is among the faults too; its clients resume on another
replica (`spotserve.client.ResumingClient`) and it comes back as its Deployment would.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

ADD, NOTICE, KILL, STOP, RESTART = "add", "notice", "kill", "stop", "restart"
ROUTER = "router"   # SIGKILL a router replica (the busiest)
DEADLINE = "notice-deadline"  # the kill at the end of a notice's grace, as struck
SELECTORS = ("any", "driver", "follower")
PHASES = ("preloading", "draining", "configuring")
KINDS = ("join", "notice", "kill", "cascade", "kill-in-phase", "notice-in-phase", "stop",
         "restart")
WEIGHTS = (3, 3, 3, 1, 3, 2, 1, 1)


@dataclass(frozen=True)
class Fault:
    """One thing the emulated cloud (or the operator of the machine) does.

    `kind`: add | notice | kill | stop | restart | router. `target` is an instance name for `add`,
    else a role resolved when the fault fires: any, driver, follower (of the committed
    placement) or involved (in the migration under way). A driver or follower fault
    fired before any placement has that role (instances still booting) waits for one, up
    to `window` seconds. With `phase`, the fault waits (up to `window` seconds) for the
    controller to enter that phase, then strikes."""

    at: float
    kind: str
    target: str = ""
    grace: float = 0.0
    phase: str = ""
    window: float = 15.0

    @property
    def label(self) -> str:
        """The fault's kind as reported: kill, notice, kill@draining, stop, restart..."""
        base = "join" if self.kind == ADD else self.kind
        return f"{base}@{self.phase}" if self.phase else base


@dataclass(frozen=True)
class ChaosPlan:
    seed: int
    initial: tuple[str, ...]
    faults: tuple[Fault, ...]
    duration: float


def generate(seed: int, duration: float = 40.0, max_instances: int = 6,
             routers: int = 1) -> ChaosPlan:
    """One run's faults, from `seed` alone (and, with `routers` >= 2, router kills among
    them; with one router a seed draws what it always drew)."""
    rng = random.Random(seed)
    kinds, weights = (KINDS, WEIGHTS) if routers < 2 else ((*KINDS, ROUTER), (*WEIGHTS, 2))
    initial = tuple(f"n{i + 1}" for i in range(rng.randint(3, 4)))
    count, names = len(initial), len(initial)
    faults: list[Fault] = []

    def join(at: float) -> None:
        nonlocal count, names
        if count < max_instances:
            names += 1
            count += 1
            faults.append(Fault(round(at, 2), ADD, f"n{names}"))

    def removal(at: float, kind: str, phase: str = "") -> None:
        nonlocal count
        target = "involved" if phase else rng.choice(SELECTORS)
        grace = round(rng.uniform(1.0, 8.0), 2) if kind == NOTICE else 0.0
        faults.append(Fault(round(at, 2), kind, target, grace, phase))
        count -= 1
        if count < 3 or rng.random() < 0.6:  # capacity comes back, sooner or later
            join(at + rng.uniform(1.0, 6.0))

    t = rng.uniform(6.0, 9.0)  # the first configuration serves by then
    while t < duration - 8.0:
        kind = rng.choices(kinds, weights)[0]
        if kind == "join":
            join(t)
        elif kind in ("notice", "kill"):
            removal(t, kind)
        elif kind == "cascade":
            for k in range(rng.randint(2, 3)):
                removal(t + k * rng.uniform(1.0, 5.0), rng.choice((NOTICE, KILL)))
        elif kind in ("kill-in-phase", "notice-in-phase"):
            phase = rng.choice(PHASES)
            # something must start a migration that goes through `phase`
            removal(t, KILL if kind == "kill-in-phase" else NOTICE, phase)
            if phase == "preloading" or rng.random() < 0.5:
                join(t + 0.1)
            else:
                removal(t + 0.1, NOTICE)
        elif kind == "stop":
            faults.append(Fault(round(t, 2), STOP, rng.choice(SELECTORS)))
        elif kind == ROUTER:
            faults.append(Fault(round(t, 2), ROUTER))
        else:
            faults.append(Fault(round(t, 2), RESTART))
        t += rng.uniform(3.0, 8.0)
    faults = sorted((f for f in faults if f.at < duration - 1.0), key=lambda f: f.at)
    return ChaosPlan(seed, initial, tuple(faults), duration)


# ---- the verdict -------------------------------------------------------------------------
@dataclass(frozen=True)
class Struck:
    """A fault as it happened: when, on what (empty when it found no target)."""

    at: float
    label: str
    target: str = ""


@dataclass(frozen=True)
class RequestTrace:
    """One request as the client and the router saw it (seconds since the run started)."""

    request_id: str
    sent: float
    ok: bool                              # finished with its full length
    token_times: tuple[float, ...]        # arrival of each generated token
    # when its stream broke (and it resumed), and the pipeline it broke on
    interruptions: tuple[tuple[float, str], ...] = ()
    greedy: bool = True                   # every token the greedy choice (the verdict)
    same_as_reference: bool = True        # identical to the no-preemption run


@dataclass
class Outcome:
    seed: int
    requests: int = 0
    failed: int = 0
    hung: int = 0
    mismatched: int = 0
    differing: int = 0        # correct, but not what the reference run produced (ties)
    faults: dict[str, int] = field(default_factory=dict)
    recovery: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""
    not_clean: list[str] = field(default_factory=list)  # ids of failed/hung/mismatched

    @property
    def clean(self) -> bool:
        return not (self.failed or self.hung or self.mismatched or self.error)


def verdict(seed: int, struck: Sequence[Struck], traces: Sequence[RequestTrace],
            members: Mapping[str, Sequence[str]], hung: int = 0,
            attribution_s: float = 60.0) -> Outcome:
    """Count failures and wrong outputs, and time each interruption's recovery: from the
    fault that caused it (or the request's arrival, if later) to the request's next token.
    The cause is the latest fault before the interruption that struck an instance of the
    pipeline it broke on (`members`: pipeline id → instances; a join breaks nothing),
    else the latest fault of any kind (a re-plan it caused drained the pipeline), within
    `attribution_s`."""
    out = Outcome(seed, len(traces), sum(not t.ok for t in traces), hung,
                  sum(t.ok and not t.greedy for t in traces),
                  sum(t.ok and t.greedy and not t.same_as_reference for t in traces))
    out.not_clean = [t.request_id for t in traces if not (t.ok and t.greedy)]
    fired = sorted((s for s in struck if s.target), key=lambda s: s.at)
    for s in fired:
        out.faults[s.label] = out.faults.get(s.label, 0) + 1
    for trace in traces:
        for broke, pipeline in trace.interruptions:
            before = [s for s in fired if s.at <= broke and broke - s.at <= attribution_s]
            hit = [s for s in before if s.label != "join"
                   and s.target in members.get(pipeline, ())]
            causes = hit or before
            after = [t for t in trace.token_times if t > broke]
            if causes and after:
                cause = causes[-1]
                since = max(cause.at, trace.sent)
                out.recovery.setdefault(cause.label, []).append(after[0] - since)
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def recovery_table(outcomes: Sequence[Outcome]) -> dict[str, dict[str, float]]:
    """Per fault kind over a campaign: faults, interrupted requests, recovery P50/P99/max."""
    faults: dict[str, int] = {}
    times: dict[str, list[float]] = {}
    for outcome in outcomes:
        for label, n in outcome.faults.items():
            faults[label] = faults.get(label, 0) + n
        for label, values in outcome.recovery.items():
            times.setdefault(label, []).extend(values)
    return {label: {"faults": faults.get(label, 0), "interrupted": len(times.get(label, [])),
                    "p50_s": percentile(times.get(label, []), 50),
                    "p99_s": percentile(times.get(label, []), 99),
                    "max_s": max(times.get(label, []), default=math.nan)}
            for label in sorted(set(faults) | set(times))}


def totals(outcomes: Sequence[Outcome]) -> Mapping[str, int]:
    return {"runs": len(outcomes), "requests": sum(o.requests for o in outcomes),
            "failed": sum(o.failed for o in outcomes), "hung": sum(o.hung for o in outcomes),
            "mismatched": sum(o.mismatched for o in outcomes),
            "differing_from_reference": sum(o.differing for o in outcomes),
            "errors": sum(bool(o.error) for o in outcomes),
            "clean_runs": sum(o.clean for o in outcomes)}
