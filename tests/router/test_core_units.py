"""Unit tests of the router's pure logic: commit log, dispatch, topology, load signal."""

from __future__ import annotations

import pytest

from spotserve.operator.router.commit_log import CommitLog, GapError
from spotserve.operator.router.dispatch import Pipeline, PipelineState, choose_pipeline
from spotserve.operator.router.errors import RouterError
from spotserve.operator.router.load_signal import ArrivalRate, LatencyWindow
from spotserve.operator.router.topology import ResumeHint, Topology, check_pipelines

SERVING, DRAINING, GONE = PipelineState.SERVING, PipelineState.DRAINING, PipelineState.GONE


def test_commit_log_appends_in_order_and_drops_repeats() -> None:
    log = CommitLog("r", (1, 2), max_tokens=5)
    assert log.accept(0, [10, 11]) == [10, 11]
    assert log.accept(1, [11, 12]) == [12]          # a resumed pipeline repeating token 1
    assert log.accept(0, [10]) == []                # entirely old
    assert log.tokens == [10, 11, 12] and log.mismatches == 0


def test_commit_log_refuses_a_gap_and_stops_at_max_tokens() -> None:
    log = CommitLog("r", (1,), max_tokens=3)
    log.accept(0, [5])
    with pytest.raises(GapError, match="position 2"):
        log.accept(2, [7])
    assert log.accept(1, [6, 7, 8, 9]) == [6, 7]
    assert log.complete and log.committed == 3


def test_commit_log_keeps_what_the_client_saw_when_a_repeat_differs() -> None:
    log = CommitLog("r", (1,), max_tokens=4)
    log.accept(0, [5, 6])
    assert log.accept(1, [99, 7]) == [7]
    assert log.tokens == [5, 6, 7] and log.mismatches == 1


def test_commit_log_records_resumes() -> None:
    log = CommitLog("r", (1,), max_tokens=4)
    log.accept(0, [5])
    log.record_resume("kv", "p2")
    assert log.resumes[0].committed == 1 and log.resumes[0].mode == "kv"


def _pipes(*specs: tuple[str, float, PipelineState, int]) -> list[Pipeline]:
    return [Pipeline(pid, f"h:{i}", cap, state, conc) for i, (pid, cap, state, conc)
            in enumerate(specs)]


def test_dispatch_weights_by_capacity() -> None:
    pipes = _pipes(("a", 1.0, SERVING, 0), ("b", 3.0, SERVING, 0))
    running: dict[str, int] = {}
    for _ in range(8):
        chosen = choose_pipeline(pipes, running, default_cap=100)
        assert chosen is not None
        running[chosen.id] = running.get(chosen.id, 0) + 1
    assert running == {"a": 2, "b": 6}


def test_dispatch_skips_full_draining_gone_and_unavailable() -> None:
    pipes = _pipes(("a", 1.0, SERVING, 1), ("b", 1.0, DRAINING, 0), ("c", 1.0, GONE, 0),
                   ("d", 1.0, SERVING, 0))
    assert choose_pipeline(pipes, {"a": 1}, default_cap=4).id == "d"  # type: ignore[union-attr]
    assert choose_pipeline(pipes, {"a": 1, "d": 4}, default_cap=4) is None
    assert choose_pipeline(pipes, {}, default_cap=4, unavailable={"a", "d"}) is None
    assert choose_pipeline(pipes, {}, default_cap=4, only="b") is None
    assert choose_pipeline(pipes, {}, default_cap=4, only="a").id == "a"  # type: ignore[union-attr]


def test_dispatch_treats_zero_capacity_as_one() -> None:
    pipes = _pipes(("a", 0.0, SERVING, 0))
    assert choose_pipeline(pipes, {}, default_cap=1) is not None


def test_topology_reports_pipelines_whose_requests_must_move() -> None:
    topo = Topology()
    assert topo.apply(1, _pipes(("a", 1, SERVING, 0), ("b", 1, SERVING, 0),
                                ("c", 1, SERVING, 0)), []) == set()
    moved = topo.apply(2, [Pipeline("a", "h:0", state=DRAINING),
                           Pipeline("b", "elsewhere:1"), Pipeline("z", "h:9", state=GONE)],
                       [ResumeHint("r1", "b", "kv")])
    assert moved == {"b", "c", "z"}  # b moved address, c vanished, z gone; a only drains
    assert topo.hints["r1"].pipeline_id == "b"
    assert topo.usable("a", "h:0") and not topo.usable("b", "h:1")


def test_topology_ignores_a_stale_epoch() -> None:
    topo = Topology()
    topo.apply(5, _pipes(("a", 1, SERVING, 0)), [])
    assert topo.apply(4, [], []) is None
    assert set(topo.pipelines) == {"a"} and topo.epoch == 5


@pytest.mark.parametrize(("pipelines", "field"), [
    ([Pipeline("", "h:1")], "pipelines[0].id"),
    ([Pipeline("a", "h:1"), Pipeline("a", "h:2")], "pipelines[1].id"),
    ([Pipeline("a", "")], "pipelines[0].driver_address"),
    ([Pipeline("a", "h:1", capacity=float("nan"))], "pipelines[0].capacity"),
    ([Pipeline("a", "h:1", capacity=-1.0)], "pipelines[0].capacity"),
])
def test_topology_validation_names_the_field(pipelines: list[Pipeline], field: str) -> None:
    with pytest.raises(RouterError) as info:
        check_pipelines(pipelines)
    assert info.value.message.startswith(field)


def test_arrival_rate_tracks_a_steady_rate() -> None:
    rate = ArrivalRate(tau_seconds=10.0, window_seconds=20.0, start=0.0)
    for i in range(1, 601):  # 5 requests per second for 120 s
        rate.record(i * 0.2)
    assert rate.ewma(120.0) == pytest.approx(5.0, rel=0.05)
    assert rate.windowed(120.0) == pytest.approx(5.0, rel=0.05)
    assert rate.ewma(150.0) < 0.3 and rate.windowed(150.0) == 0.0


def test_arrival_rate_window_uses_the_uptime_when_shorter() -> None:
    rate = ArrivalRate(window_seconds=60.0, start=0.0)
    for t in (1.0, 2.0, 3.0, 4.0):
        rate.record(t)
    assert rate.windowed(4.0) == pytest.approx(1.0)


def test_latency_window_percentiles() -> None:
    window = LatencyWindow(size=100)
    assert window.percentile(50) == 0.0
    for value in range(1, 201):
        window.add(float(value))
    assert len(window) == 100
    assert window.percentile(50) == 150.0 and window.percentile(99) == 199.0


def test_topology_hints_accumulate_until_used() -> None:
    topo = Topology()
    topo.apply(1, [], [ResumeHint("r1", "a", "kv"), ResumeHint("r2", "a", "kv")])
    topo.apply(2, [], [ResumeHint("r2", "b", "reprefill")])
    assert topo.hints["r1"].pipeline_id == "a" and topo.hints["r2"].mode == "reprefill"
