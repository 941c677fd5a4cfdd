"""The engine against the planner: steady state, one preemption, determinism."""

from __future__ import annotations

import json
from dataclasses import replace
from math import gcd
from pathlib import Path
from typing import Any

import pytest

from spotserve.catalog import Catalog
from spotserve.layout import split_layers
from spotserve.models import resolve_model
from spotserve.operator.planner import (
    ProfileCostModel,
    ProfileTable,
    StageHardware,
    Workload,
    pipeline_times,
    plan,
)
from spotserve.operator.planner.homogeneous import SearchLimits, search
from spotserve.operator.sim import policies
from spotserve.operator.sim.engine import ClusterSpec, Simulation
from spotserve.operator.sim.runner import run
from spotserve.operator.sim.workload import Arrival, generated
from spotserve.traces import TraceEvent

from .support import every, paper_setup, trace

T4X4 = Catalog.load().instance("g4dn.12xlarge")


def stage_hardware(pipeline: int, tensor: int) -> list[StageHardware]:
    """OPT-6.7B split evenly over `pipeline` stages of `tensor` T4s inside g4dn.12xlarge."""
    bounds = split_layers(resolve_model("6.7b").num_layers, pipeline)
    return [StageHardware(T4X4.gpu, tensor, b - a, T4X4.intra_node_bytes_per_s,
                          T4X4.nic_bytes_per_s, last=k == pipeline - 1)
            for k, (a, b) in enumerate(bounds)]


def latency_s(reference: Path, batch: int, pipeline: int = 1, tensor: int = 4) -> float:
    """The planner's request latency for OPT-6.7B at (P, M) and `batch` requests."""
    table = ProfileTable.load(reference / "profiles" / "megatron_6.7B_profile.json")
    stages = stage_hardware(pipeline, tensor)
    times = pipeline_times(ProfileCostModel(table), stages, batch, 1, 1, Workload(512, 128))
    return times.latency_ms / 1000


def latencies(entry: dict[str, Any]) -> list[float]:
    return [s[1] for s in entry["series"]]


def test_no_events_gives_the_analytical_steady_state_latency(reference_dir: Path) -> None:
    # one instance: D=1 P=1 M=4; requests never overlap, so each runs alone (B=1)
    setup = paper_setup(reference_dir, "6.7b", trace(1, 600), every(20.0, 600), 0.05)
    entry = run(setup, "spotserve")
    assert entry["completed"] == entry["requests"] == 30
    assert latencies(entry) == pytest.approx([latency_s(reference_dir, 1)] * 30, rel=1e-3)
    assert entry["replans"] == 1 and entry["migrations"] == 0


def test_waiting_requests_batch_up_to_b(reference_dir: Path) -> None:
    # at α = 2 req/s one instance runs its highest-throughput shape, B = 4
    table = ProfileTable.load(reference_dir / "profiles" / "megatron_6.7B_profile.json")
    limits = SearchLimits(max_batch=4, min_gpus_per_replica=4, max_tp=table.max_tp,
                          pipeline_divides=table.padded_layer_num)
    best = search(resolve_model("6.7b"), ProfileCostModel(table), T4X4, [1.9046],
                  Workload(512, 128), 2.0, limits).best
    assert best is not None and best.shape.batch == 4
    shape = best.shape
    stages = stage_hardware(shape.pipeline, shape.tensor)

    def seconds(b: int) -> float:
        times = pipeline_times(ProfileCostModel(table), stages, b, gcd(shape.prefill_micro, b),
                               gcd(shape.decode_micro, b), Workload(512, 128))
        return times.latency_ms / 1000

    arrivals = (Arrival(0, 1.0, 512, 128),
                *(Arrival(k, 1.5, 512, 128) for k in range(1, 6)))
    entry = run(paper_setup(reference_dir, "6.7b", trace(1, 100), arrivals, 2.0), "spotserve")
    first = seconds(1)
    assert latencies(entry) == pytest.approx(
        [first] + [first - 0.5 + seconds(4)] * 4 + [first - 0.5 + seconds(4) + seconds(1)],
        rel=1e-3)


def test_queueing_adds_the_wait(reference_dir: Path) -> None:
    one = latency_s(reference_dir, 1)
    arrivals = (Arrival(0, 1.0, 512, 128), Arrival(1, 1.5, 512, 128))
    entry = run(paper_setup(reference_dir, "6.7b", trace(1, 100), arrivals, 0.05), "spotserve")
    assert latencies(entry) == pytest.approx([one, 2 * one - 0.5], rel=1e-3)


def test_costs_are_instance_hours_times_price(reference_dir: Path) -> None:
    setup = paper_setup(reference_dir, "6.7b", trace(2, 3600), every(60.0, 3600), 0.05)
    spot = run(setup, "spotserve")
    assert spot["cost_usd"] == pytest.approx(2 * 1.9046)
    # the same two instance-hours bought on demand: the equal-instance-hours comparison
    assert spot["instance_hours"] == pytest.approx(2.0)
    assert spot["ondemand_equivalent_usd"] == pytest.approx(2 * 3.912)
    fleet = run(setup, "ondemand")
    assert fleet["cost_usd"] == pytest.approx(3.912)  # one on-demand instance reaches 0.05


def recorded_plans(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    seen: list[Any] = []
    real = plan

    def spy(request: Any) -> Any:
        result = real(request)
        seen.append((request, result))
        return result

    monkeypatch.setattr(policies, "plan", spy)
    return seen


def test_single_preemption_replans_at_the_notice_and_migrates_in_time(
        reference_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plans = recorded_plans(monkeypatch)
    removal = TraceEvent(300.0, "remove", ("node-2",))
    arrivals = generated((0.35,), 60, 600, 1.0, 1, 512, 128)
    setup = paper_setup(reference_dir, "20b", trace(6, 600, removal), arrivals, 0.35)
    entry = run(setup, "spotserve")
    (_, first), (request, second) = plans
    assert first.config.describe() == "D=2 P=3 M=4 B=4"
    assert {i.name for i in request.instances if i.state == "doomed"} == {"node-2"}
    assert request.grace_seconds == pytest.approx(30.0)
    assert second.config.describe() == "D=1 P=2 M=8 B=4"
    assert "node-2" not in second.mapping.placement.instances()
    switch = [t for t in entry["timeline"] if t["event"] == "switch"][-1]
    stop = max((a.stop_after_s for a in second.arrangement), default=0.0)
    assert switch["t"] == pytest.approx(270.0 + stop, abs=1e-3)
    assert entry["migrations"] == 1
    assert entry["migration_s"] == pytest.approx(second.migration.seconds, abs=1e-3)
    assert entry["bytes_moved"] == second.migration.total_bytes
    assert switch["t"] + second.migration.seconds <= 300.0
    assert entry["completed"] == entry["requests"] and entry["restarts"] == 0


def test_without_notice_requests_resume_from_committed_tokens(reference_dir: Path) -> None:
    removal = TraceEvent(300.0, "remove", ("node-2",))
    arrivals = generated((0.35,), 60, 600, 1.0, 1, 512, 128)
    setup = paper_setup(reference_dir, "20b", trace(6, 600, removal), arrivals, 0.35,
                        grace_s=0.0)
    spot = run(setup, "spotserve")
    assert spot["completed"] == spot["requests"]
    assert spot["restarts"] == 0 and spot["reprefills"] > 0
    rebuilt = run(setup, "reparallelize")
    assert rebuilt["restarts"] > 0 and rebuilt["reloads"] == 1
    assert rebuilt["latency"]["p99_s"] > spot["latency"]["p99_s"]


def test_reroute_keeps_the_shape_and_closes_broken_pipelines(reference_dir: Path) -> None:
    removal = TraceEvent(300.0, "remove", ("node-0",))
    arrivals = generated((1.0,), 60, 600, 1.0, 2, 512, 128)
    setup = paper_setup(reference_dir, "6.7b", trace(4, 600, removal), arrivals, 1.0)
    entry = run(setup, "reroute")
    configs = [t["config"] for t in entry["timeline"] if t["event"] == "reroute"]
    assert configs[0].startswith("D=4") and configs[-1].startswith("D=3")
    assert entry["reloads"] == 0  # survivors keep serving; nothing new to load


def test_ablations_run_cumulatively(reference_dir: Path) -> None:
    removal = TraceEvent(300.0, "remove", ("node-2",))
    arrivals = generated((0.35,), 60, 600, 1.0, 1, 512, 128)
    setup = paper_setup(reference_dir, "20b", trace(6, 600, removal), arrivals, 0.35)
    for name in ("no-controller", "no-migration-planner", "no-arranger", "no-device-mapper"):
        entry = run(setup, name)
        assert entry["completed"] == entry["requests"], name


def strip(entry: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in entry.items() if k != "wall_s"}, sort_keys=True)


def test_identical_seeds_give_identical_reports(reference_dir: Path) -> None:
    events = (TraceEvent(200.0, "remove", ("node-1",)), TraceEvent(400.0, "add", ("node-9",)))
    reports = []
    for seed in (5, 5, 6):
        arrivals = generated((0.35,), 60, 600, 2.0, seed, 512, 128)
        setup = paper_setup(reference_dir, "20b", trace(6, 600, *events), arrivals, 0.35)
        reports.append([strip(run(setup, name)) for name in ("spotserve", "reroute")])
    assert reports[0] == reports[1] != reports[2]


def test_no_capacity_leaves_requests_waiting_then_failed(reference_dir: Path) -> None:
    arrivals = every(30.0, 300)
    setup = paper_setup(reference_dir, "20b", trace(2, 300), arrivals, 0.1)
    entry = run(setup, "spotserve")  # 20B needs 3 instances
    assert entry["completed"] == 0 and entry["failed"] == len(arrivals)


def test_an_empty_engine_is_done() -> None:
    sim = Simulation(trace(0, 10), (), ClusterSpec(lambda _: T4X4), _Idle(), 0.0)
    sim.run()
    assert sim.all_done() and sim.cost_usd == 0.0


class _Idle:
    name = "idle"

    def start(self, sim: Simulation) -> None: ...
    def on_notice(self, sim: Simulation, nodes: tuple[str, ...]) -> None: ...
    def on_ready(self, sim: Simulation, nodes: tuple[str, ...]) -> None: ...
    def on_removed(self, sim: Simulation, nodes: tuple[str, ...]) -> None: ...
    def on_rate(self, sim: Simulation) -> None: ...


def test_a_rate_change_in_the_trace_replans(reference_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    plans = recorded_plans(monkeypatch)
    setup = paper_setup(reference_dir, "6.7b", trace(4, 600, TraceEvent(300.0, "rate", (), 3.0)),
                        every(5.0, 600), 0.2)
    entry = run(setup, "spotserve")
    assert [request.rate for request, _ in plans] == [0.2, 3.0]
    assert entry["replans"] == 2 and entry["completed"] == entry["requests"]


def test_mixed_instance_types_plan_heterogeneously() -> None:
    from spotserve.operator.sim.runner import Setup

    the_trace = trace(2, 300, TraceEvent(150.0, "remove", ("node-1",)))
    setup = Setup(model="llama-3.1-8b", trace=the_trace, arrivals=every(10.0, 300), rate=0.1,
                  instance_type="g5.12xlarge", node_types={"node-1": "g6e.xlarge"})
    entry = run(setup, "spotserve")
    assert [t["event"] for t in entry["timeline"]].count("switch") >= 1
    assert entry["replans"] >= 2  # the start and the notice for node-1
    assert entry["completed"] == entry["requests"] and entry["restarts"] == 0


def test_instances_are_paid_until_they_go_even_after_the_last_request(
        reference_dir: Path) -> None:
    late = TraceEvent(1800.0, "remove", ("node-1",))
    setup = paper_setup(reference_dir, "6.7b", trace(2, 3600, late), every(60.0, 120), 0.05)
    entry = run(setup, "reroute")
    assert entry["completed"] == 2
    assert entry["cost_usd"] == pytest.approx(1.5 * 1.9046)


def test_continuous_batching_admits_requests_between_steps(reference_dir: Path) -> None:
    arrivals = (Arrival(0, 1.0, 512, 128), Arrival(1, 3.0, 512, 128))
    static = paper_setup(reference_dir, "6.7b", trace(1, 100), arrivals, 2.0)
    continuous = replace(static, batching="continuous")
    lone = latency_s(reference_dir, 1)
    first_static, second_static = latencies(run(static, "spotserve"))
    assert first_static == pytest.approx(lone, rel=1e-3)
    assert second_static == pytest.approx(lone + (lone - 2.0), rel=1e-3)  # waits its turn
    first, second = latencies(run(continuous, "spotserve"))
    assert second < second_static - 1.0  # joined the running batch
    assert first > first_static  # and stalled it for its prefill, then shared the steps


def test_continuous_batching_at_low_load_is_the_steady_state(reference_dir: Path) -> None:
    setup = paper_setup(reference_dir, "6.7b", trace(1, 600), every(20.0, 600), 0.05,
                        batching="continuous")
    entry = run(setup, "spotserve")
    assert latencies(entry) == pytest.approx([latency_s(reference_dir, 1)] * 30, rel=1e-3)


def test_continuous_batching_survives_a_preemption(reference_dir: Path) -> None:
    removal = TraceEvent(300.0, "remove", ("node-2",))
    arrivals = generated((0.5,), 60, 600, 1.0, 1, 512, 128)
    for grace in (30.0, 0.0):
        setup = paper_setup(reference_dir, "20b", trace(6, 600, removal), arrivals, 0.35,
                            batching="continuous", grace_s=grace)
        for name in ("spotserve", "reparallelize", "reroute"):
            entry = run(setup, name)
            assert entry["completed"] == entry["requests"], (grace, name)


@pytest.mark.parametrize("node", ["node-0", "node-1", "node-2", "node-3"])
def test_a_shrink_hands_the_going_pipelines_requests_over_with_their_kv(
        reference_dir: Path, node: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node gets its notice and no replacement comes: the service shrinks onto the three
    left. Whichever node goes, and whenever (a sweep of times), no request that had KV
    re-prefills: the new pipelines adopt every going pipeline's requests with their KV,
    as the controller does. Only requests caught before their prefill ended start it
    again."""
    lost_kv: list[int] = []
    requeue = Simulation.requeue

    def counting(self: Simulation, requests: list[Any], keep_committed: bool) -> None:
        lost_kv.extend(r.arrival.id for r in requests if r.kv_pipeline is not None)
        requeue(self, requests, keep_committed)

    monkeypatch.setattr(Simulation, "requeue", counting)
    # long answers: the going pipeline cannot finish them in its 30 s of grace
    arrivals = generated((1.0,), 60, 600, 1.0, 2, 512, 1024)
    for at in (300.0, 311.0, 323.0, 337.0):
        removal = TraceEvent(at, "remove", (node,))
        setup = paper_setup(reference_dir, "6.7b", trace(4, 600, removal), arrivals, 1.0)
        entry = run(setup, "spotserve")
        configs = [t["config"] for t in entry["timeline"] if t["event"] == "switch"]
        assert configs[0].startswith("D=4") and configs[-1].startswith("D=3"), configs
        assert entry["restarts"] == 0
        assert not lost_kv, (at, lost_kv)
