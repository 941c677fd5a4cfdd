"""End to end in local mode: real worker processes, router and controller, compressed
traces. Each module-scoped run is shared by the tests that read it.

(a) preemption with notice: 0 failed, every output equals the no-preemption reference,
    interrupted requests resume from migrated KV;
(b) an instance killed without notice: 0 failed, its requests resume by re-prefill;
(c) a second notice during a migration: 0 failed, outputs identical;
(d) instances joining: scale-out without draining the running pipeline;
(e) the controller restarted mid-trace resumes from its state file: 0 failed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from spotserve.operator.local.runner import RunResult

from .support import entries, local_script, run, trace

pytest.importorskip("torch")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _ok(result: RunResult) -> None:
    assert not result.failed, [(r.request_id, r.error, r.finish) for r in result.failed][:5]
    assert len(result.reference) == len(result.records) > 20
    assert not result.mismatched, result.mismatched[:5]


@pytest.fixture(scope="module")
def preemptions(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    """n1+n2 serve (P=2); n3 joins as the standby; n2 gets a notice (at 20 s), so the
    pipeline moves to n1+n3 and takes its KV along; n4, n5, n6 join (scale-out to D=2);
    n1, which serves throughout, is killed without notice."""
    t = trace((0, "add", ("n1", "n2")), (5, "add", ("n3",)), (22, "add", ("n4", "n5", "n6")),
              (28, "remove", ("n2",)), (40, "remove", ("n1",)), end=50)
    return run(tmp_path_factory.mktemp("preemptions"), local_script(t, no_notice=["n1"]))


def test_a_notice_resumes_by_kv_with_identical_outputs(preemptions: RunResult) -> None:
    _ok(preemptions)
    drained = [e for e in entries(preemptions, "drained") if e["requests"]]
    assert drained, "the notice must interrupt running requests"
    assert preemptions.resumed["kv"] >= 1
    assert preemptions.moved["pulled"] > 0  # weights and KV moved between workers


def test_b_kill_without_notice_resumes_by_reprefill(preemptions: RunResult) -> None:
    _ok(preemptions)
    assert entries(preemptions, "abandoned"), "a pipeline that lost a member is not drained"
    assert preemptions.resumed["reprefill"] >= 1
    kills = [e for e in preemptions.timeline if e["kind"] == "killed"]
    assert [e["instance"] for e in kills] == ["n2", "n1"]


def test_d_joins_scale_out_without_interrupting(preemptions: RunResult) -> None:
    scale_out = next(c for c in preemptions.configs if c["config"].startswith("D=2"))
    before = [c for c in preemptions.configs if c["epoch"] < scale_out["epoch"]][-1]
    assert set(before["pipelines"]) < set(scale_out["pipelines"])
    between = [e for e in preemptions.journal
               if before["epoch"] < e["epoch"] <= scale_out["epoch"]]
    assert not [e for e in between if e["kind"] in ("drained", "drain-failed")]
    # concurrent initialization: the joining GPUs gathered their weights while the running
    # pipeline kept serving, and the configure that followed found them in memory
    preloaded = [e for e in between if e["kind"] == "preloaded"]
    assert preloaded and preloaded[-1]["epoch"] == scale_out["epoch"]
    assert int(preloaded[-1]["bytes"]) > 0  # type: ignore[call-overload]


def test_c_second_notice_during_a_migration(tmp_path: Path) -> None:
    t = trace((0, "add", ("n1", "n2", "n3", "n4", "n5")), (26, "remove", ("n2",)),
              (26.3, "remove", ("n4",)), end=38)
    result = run(tmp_path, local_script(t))
    _ok(result)
    notices = [e for e in result.journal if e.get("event") == "NoticeReceived"]
    assert len(notices) == 2
    assert entries(result, "aborted") or \
        abs(float(notices[1]["time"]) - float(notices[0]["time"])) < 2.0  # type: ignore[arg-type]


def test_e_controller_restart_mid_trace(tmp_path: Path) -> None:
    t = trace((0, "add", ("n1", "n2", "n3")), (8, "add", ("n4", "n5")),
              (30, "remove", ("n2",)), end=40)
    result = run(tmp_path, local_script(t), restart_at=14.0)
    _ok(result)
    assert len(entries(result, "resumed")) == 1
    restarted = next(e for e in result.journal if e["kind"] == "resumed")
    later = result.journal[result.journal.index(restarted):]
    assert any(e["kind"] == "serving" for e in later), "the new controller must migrate"
