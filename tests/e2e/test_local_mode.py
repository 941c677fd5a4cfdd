"""End to end in local mode: real worker processes, router and controller, failures played
by hand-written chaos plans. An event's target is a role resolved when it strikes (the
instance hosting the driver, a follower, any, or one involved in the migration under way),
never a name picked because it is convenient; the kill test runs for both roles.

(a) a notice on the follower's instance, its grace too short to finish the requests in
    place: 0 failed, outputs right, the paused requests move with their KV;
(b) a kill without notice, of the driver's instance and of a follower's: the pipeline is
    abandoned (never drained), its requests re-prefill, 0 failed;
(c) a second notice during a migration: 0 failed, outputs right;
(d) instances joining: scale-out without draining the running pipeline, the joining GPUs
    preloaded;
(e) the controller restarted in the middle of a migration: it resumes from its state
    file and completes, 0 failed;
(f) two router replicas, the busiest SIGKILLed twice mid-run (and restarted, as its
    Deployment would): its clients resume on the other replica, 0 lost tokens, every
    output right.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from spotserve.operator.local.chaos import (
    ADD,
    KILL,
    NOTICE,
    RESTART,
    ROUTER,
    ChaosPlan,
    Fault,
)
from spotserve.operator.local.chaos_run import ChaosRun
from spotserve.operator.local.cloud import Script
from spotserve.operator.local.runner import RunOptions, RunResult
from spotserve.operator.local.tiny_model import build_tiny_llama

from .support import entries

pytest.importorskip("torch")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
RATE, MAX_TOKENS = 4.0, 128


def play(tmp: Path, initial: int, faults: list[Fault], end: float, rate: float = RATE,
         max_tokens: int = MAX_TOKENS, routers: int = 1) -> RunResult:
    model = build_tiny_llama(tmp / "model")
    plan = ChaosPlan(0, tuple(f"n{i + 1}" for i in range(initial)), tuple(faults), end)
    options = RunOptions(model_dir=model, workdir=tmp / "run", script=Script((), end, ""),
                         rate=rate, max_tokens=max_tokens, progress_every=1e9,
                         routers=routers)
    return asyncio.run(asyncio.wait_for(ChaosRun(options, plan).run(), 240))


def _ok(result: RunResult) -> None:
    assert not result.failed, [(r.request_id, r.error, r.finish) for r in result.failed][:5]
    assert len(result.greedy) == len(result.records) > 20
    assert not result.mismatched, result.mismatched[:5]


@pytest.fixture(scope="module")
def notice_then_joins(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    """D=1, P=2 on two of three instances; the follower's instance gets a notice, so the
    pipeline moves to the standby and takes its KV along; then three more instances join
    (scale-out to D=2).

    The grace (3 s) is too short to finish requests of 256 tokens in place: the
    just-in-time arrangement decodes at most (grace - the planner's 2 s migration
    overhead) / step more steps, under 256 for any step slower than 4 ms, so whatever the
    machine's speed the requests started last are paused and move with their KV. (With
    a long grace every request may rightly finish in place, and nothing moves.)"""
    return play(tmp_path_factory.mktemp("notice"), 3,
                [Fault(10.0, NOTICE, "follower", grace=3.0), Fault(18.0, ADD, "n4"),
                 Fault(18.0, ADD, "n5"), Fault(18.0, ADD, "n6")], end=34.0, rate=2.5,
                max_tokens=256)


def test_a_notice_resumes_by_kv_with_correct_outputs(notice_then_joins: RunResult) -> None:
    _ok(notice_then_joins)
    drained = [e for e in entries(notice_then_joins, "drained") if e["requests"]]
    assert drained, ("the notice must pause running requests",
                     entries(notice_then_joins, "drained"))
    assert notice_then_joins.resumed["kv"] >= 1
    # a request still queued at the drain (no token yet, no KV) starts over; one that had
    # tokens, and so a KV cache, must not lose it
    lost = [(r.request_id, how) for r in notice_then_joins.records for how in r.resumes
            if how.startswith("reprefill@") and not how.endswith(" after 0")]
    assert not lost, lost
    assert notice_then_joins.moved["pulled"] > 0  # weights and KV moved between workers


def test_d_joins_scale_out_without_interrupting(notice_then_joins: RunResult) -> None:
    scale_out = next(c for c in notice_then_joins.configs if c["config"].startswith("D=2"))
    before = [c for c in notice_then_joins.configs if c["epoch"] < scale_out["epoch"]][-1]
    assert set(before["pipelines"]) < set(scale_out["pipelines"])
    between = [e for e in notice_then_joins.journal
               if before["epoch"] < e["epoch"] <= scale_out["epoch"]]
    assert not [e for e in between if e["kind"] in ("drained", "abandoned")]
    # concurrent initialization: the joining GPUs gathered their weights while the running
    # pipeline kept serving, and the configure that followed found them in memory
    preloaded = [e for e in between if e["kind"] == "preloaded"]
    assert preloaded and preloaded[-1]["epoch"] == scale_out["epoch"]
    assert int(preloaded[-1]["bytes"]) > 0  # type: ignore[call-overload]


@pytest.mark.parametrize("role", ["driver", "follower"])
def test_b_a_kill_without_notice_abandons_the_pipeline_and_reprefills(
        tmp_path: Path, role: str) -> None:
    result = play(tmp_path, 3, [Fault(10.0, KILL, role)], end=22.0)
    _ok(result)
    abandoned = entries(result, "abandoned")
    assert abandoned, "a pipeline that lost a member is abandoned"
    assert not [e for e in entries(result, "drained") if e["pipeline"] in
                abandoned[0]["pipelines"]], "…and never drained"  # type: ignore[operator]
    assert result.resumed["reprefill"] >= 1
    assert [e["kind"] for e in result.timeline if e["kind"] == "killed"] == ["killed"]


def test_c_second_notice_during_a_migration(tmp_path: Path) -> None:
    # a 3 s grace and 256-token requests: the first migration must drain (with 6 s the
    # just-in-time arrangement can finish everything in place, and no draining comes)
    result = play(tmp_path, 5, [Fault(10.0, NOTICE, "any", grace=3.0),
                                Fault(10.0, NOTICE, phase="draining", grace=6.0)], end=24.0,
                  max_tokens=256)
    _ok(result)
    notices = [e for e in result.journal if e.get("event") == "NoticeReceived"]
    assert len(notices) == 2


def test_e_controller_restart_in_the_middle_of_a_migration(tmp_path: Path) -> None:
    result = play(tmp_path, 3, [Fault(10.0, ADD, "n4"), Fault(10.0, ADD, "n5"),
                                Fault(10.0, RESTART, phase="preloading", window=20.0)],
                  end=28.0)
    _ok(result)
    assert len(entries(result, "resumed")) == 1
    restarted = next(e for e in result.journal if e["kind"] == "resumed")
    later = result.journal[result.journal.index(restarted):]
    assert any(e["kind"] == "serving" for e in later), "the new controller must migrate"


def test_f_a_router_replica_killed_mid_run_loses_no_token(tmp_path: Path) -> None:
    result = play(tmp_path, 2, [Fault(9.0, ROUTER), Fault(16.0, ROUTER)], end=24.0,
                  routers=2)
    _ok(result)
    cut = [r for r in result.records if r.client_breaks]
    assert cut, "the kills should have cut streams"
    # Exactly the requested tokens, each once: no gap (finish LENGTH, greedy-correct) and
    # no duplicate (a token sent twice would make the output longer).
    assert all(len(r.tokens) == MAX_TOKENS for r in result.records)
    assert {name for r in cut for _, name in r.client_breaks} <= {"router", "router1"}
