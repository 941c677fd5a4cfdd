"""The chaos campaign's generator and verdict (pure): the same seed gives the same faults,
every kind of fault turns up across seeds, targets are roles resolved at run time, and an
interruption's recovery is charged to the fault that caused it."""

from __future__ import annotations

import itertools
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from spotserve.operator.local.chaos import (
    ADD,
    KILL,
    NOTICE,
    RESTART,
    STOP,
    RequestTrace,
    Struck,
    generate,
    percentile,
    recovery_table,
    verdict,
)


def test_a_seed_is_a_run() -> None:
    assert generate(7) == generate(7)
    assert generate(7) != generate(8)


@given(st.integers(min_value=0, max_value=10_000))
@settings(max_examples=200, deadline=None)
def test_plans_stay_within_the_run_and_the_machine(seed: int) -> None:
    plan = generate(seed, duration=40.0, max_instances=6)
    assert 3 <= len(plan.initial) <= 4
    assert all(0 < f.at < plan.duration for f in plan.faults)
    assert [f.at for f in plan.faults] == sorted(f.at for f in plan.faults)
    alive = len(plan.initial)
    for fault in plan.faults:
        alive += (fault.kind == ADD) - (fault.kind in (KILL, NOTICE))
        assert alive <= 6
        if fault.kind == ADD:
            assert fault.target.startswith("n")  # a fresh instance name
        elif fault.kind in (NOTICE, KILL, STOP):
            assert fault.target in ("any", "driver", "follower", "involved")  # a role
        if fault.kind == NOTICE:
            assert 1.0 <= fault.grace <= 8.0
        if fault.phase:
            assert fault.target == "involved"


def test_every_kind_of_fault_turns_up_over_a_campaign() -> None:
    seen = {f.label for seed in range(50) for f in generate(seed).faults}
    for label in ("join", "notice", "kill", "stop", "restart", "kill@preloading",
                  "kill@draining", "kill@configuring", "notice@draining"):
        assert label in seen, label
    roles = {f.target for seed in range(50) for f in generate(seed).faults
             if f.kind in (KILL, NOTICE)}
    assert roles == {"any", "driver", "follower", "involved"}
    assert any(f.kind == RESTART for seed in range(50) for f in generate(seed).faults)


def test_cascades_strike_one_to_five_seconds_apart() -> None:
    gaps = []
    for seed in range(200):
        removals = [f.at for f in generate(seed).faults if f.kind in (KILL, NOTICE)
                    and not f.phase]
        gaps += [b - a for a, b in itertools.pairwise(removals)]
    assert any(1.0 <= g <= 5.0 for g in gaps)


def _trace(rid: str, interruptions: list[tuple[float, str]], tokens: list[float],
           ok: bool = True, greedy: bool = True, sent: float = 0.0) -> RequestTrace:
    return RequestTrace(rid, sent, ok, tuple(tokens), tuple(interruptions), greedy, True)


def test_recovery_is_charged_to_the_fault_that_struck_the_pipeline() -> None:
    struck = [Struck(10.0, "kill", "n1"), Struck(11.0, "join", "n5"),
              Struck(12.0, "stop", "n3"), Struck(13.0, "kill")]  # the last found no target
    members = {"p0": ["n1", "n2"], "p1": ["n3", "n4"], "p2": ["n5", "n6"]}
    traces = [
        _trace("a", [(10.1, "p0")], [9.0, 10.5, 10.6]),    # its pipeline lost n1
        _trace("b", [(15.0, "p1")], [14.0, 16.0]),         # n3 stopped under it
        _trace("c", [(11.5, "p2")], [11.0, 12.5]),         # drained by a re-plan: no hit
        _trace("d", [], [1.0, 2.0]),
    ]
    out = verdict(1, struck, traces, members)
    assert out.faults == {"kill": 1, "join": 1, "stop": 1}
    assert math.isclose(out.recovery["kill"][0], 0.5)
    assert math.isclose(out.recovery["stop"][0], 4.0)
    assert math.isclose(out.recovery["join"][0], 1.5)  # the latest fault of any kind
    assert out.clean


def test_a_request_sent_after_the_fault_counts_from_its_arrival() -> None:
    out = verdict(1, [Struck(10.0, "notice", "n1")],
                  [_trace("a", [(18.0, "p0")], [18.5, 19.0], sent=17.0)], {"p0": ["n1"]})
    assert math.isclose(out.recovery["notice"][0], 1.5)


def test_failed_hung_and_wrong_requests_make_a_run_unclean() -> None:
    traces = [_trace("ok", [], [1.0]), _trace("failed", [], [], ok=False),
              _trace("wrong", [], [1.0], greedy=False)]
    out = verdict(3, [], traces, {}, hung=0)
    assert (out.failed, out.mismatched, out.clean) == (1, 1, False)
    assert out.not_clean == ["failed", "wrong"]


def test_the_campaign_table_pools_runs_per_fault_kind() -> None:
    a = verdict(1, [Struck(1.0, "kill", "n1")], [_trace("a", [(1.1, "p")], [2.0])],
                {"p": ["n1"]})
    b = verdict(2, [Struck(1.0, "kill", "n1"), Struck(2.0, "restart", "controller")],
                [_trace("b", [(1.2, "p")], [4.0])], {"p": ["n1"]})
    table = recovery_table([a, b])
    assert table["kill"]["faults"] == 2 and table["kill"]["interrupted"] == 2
    assert math.isclose(table["kill"]["p50_s"], 1.0)
    assert math.isclose(table["kill"]["max_s"], 3.0)
    assert table["restart"]["interrupted"] == 0 and math.isnan(table["restart"]["p99_s"])
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
