"""The paper's baselines as the SpotServe artifact ran them: old engines serve through the
grace period while a whole batch fits, unfinished work restarts from scratch at the cut,
and weights come back from every instance's own disk at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from spotserve.catalog import Catalog
from spotserve.operator.sim.engine import ClusterSpec, Pipeline, Simulation
from spotserve.operator.sim.runner import run
from spotserve.operator.sim.workload import Arrival
from spotserve.traces import Trace, TraceEvent

from .support import every, paper_setup, trace

T4X4 = Catalog.load().instance("g4dn.12xlarge")
PREFILL_S, STEP_S = 1.0, 0.1
WHOLE_S = PREFILL_S + 128 * STEP_S     # a whole batch of 128-token requests: 13.8 s
CUT_S = 99.5                           # termination at 100, the artifact's 0.5 s before
STANDBY_S = 10.0                       # the replacement pipeline's start-up


class Baseline:
    """A one-pipeline baseline on n0; at the notice it serves until the cut, then a
    replacement on n1 starts STANDBY_S later."""

    name = "baseline"

    def __init__(self) -> None:
        self.first: Pipeline | None = None

    def start(self, sim: Simulation) -> None:
        sim.keep_committed_on_loss = False
        self.first = self._pipeline(sim, "n0", 0.0)

    def _pipeline(self, sim: Simulation, node: str, available_s: float) -> Pipeline:
        p = Pipeline(sim.new_uid(), frozenset({node}), 4,
                     lambda b: (PREFILL_S, STEP_S, 0.0), available_s)
        sim.add_pipeline(p)
        return p

    def on_notice(self, sim: Simulation, nodes: tuple[str, ...]) -> None:
        assert self.first is not None
        sim.serve_until(self.first, CUT_S, WHOLE_S)
        sim.at(CUT_S, lambda: self._pipeline(sim, "n1", sim.now + STANDBY_S))

    def on_ready(self, sim: Simulation, nodes: tuple[str, ...]) -> None:
        pass

    def on_removed(self, sim: Simulation, nodes: tuple[str, ...]) -> None:
        pass

    def on_rate(self, sim: Simulation) -> None:
        pass


def simulate(*arrivals: Arrival) -> Simulation:
    events = (TraceEvent(0.0, "add", ("n0", "n1")), TraceEvent(100.0, "remove", ("n0",)))
    sim = Simulation(Trace(events, 300.0, "test"), arrivals,
                     ClusterSpec(lambda _: T4X4, grace_s=30.0), Baseline(), rate=0.1)
    sim.run()
    return sim


def test_after_a_notice_the_old_engine_takes_batches_while_a_whole_one_fits() -> None:
    # notice at 70; the old engine takes work until 99.5 - 13.8 = 85.7
    sim = simulate(Arrival(0, 75.0, 512, 128), Arrival(1, 90.0, 512, 128))
    served, late = sim.requests
    assert served.finish_s == pytest.approx(75.0 + WHOLE_S)   # on the old engine
    assert served.restarts == 0
    # too late for a whole batch there: it waits for the replacement, untouched
    assert late.restarts == 0
    assert late.finish_s == pytest.approx(CUT_S + STANDBY_S + WHOLE_S)


def test_a_batch_still_running_at_the_cut_restarts_from_scratch() -> None:
    # 400 tokens from 65 would end at 106, after the cut at 99.5: all of it is lost
    sim = simulate(Arrival(0, 65.0, 512, 400))
    (long,) = sim.requests
    assert long.restarts == 1
    assert long.finish_s == pytest.approx(CUT_S + STANDBY_S + PREFILL_S + 400 * STEP_S)


def test_reparallelize_restarts_at_the_cut_not_at_the_notice(reference_dir: Path) -> None:
    removal = TraceEvent(300.0, "remove", ("node-2",))
    setup = paper_setup(reference_dir, "20b", trace(6, 600, removal), every(3.0, 600), 0.35)
    entry = run(setup, "reparallelize")
    restarts = [t["t"] for t in entry["timeline"] if t["event"] == "restart"]
    assert restarts == [0.0, pytest.approx(299.5)]   # the start, then the cut
    assert entry["reloads"] == 1 and entry["completed"] == entry["requests"]


def test_reload_time_follows_the_local_disk_and_the_engine_start(reference_dir: Path) -> None:
    """Slower disks or a slower engine start cost the baselines and not spotserve (no
    slice it needs is lost here, so it reads nothing from disk)."""
    # a loss, then a join that gives rerouting a whole group to form a pipeline on
    events = trace(6, 600, TraceEvent(300.0, "remove", ("node-2",)),
                   TraceEvent(400.0, "add", ("node-6",)))
    base = paper_setup(reference_dir, "20b", events, every(3.0, 600), 0.35)
    slow = paper_setup(reference_dir, "20b", events, every(3.0, 600), 0.35,
                       disk_gb_per_s=0.25, engine_start_s=30.0)
    for approach in ("reparallelize", "reroute"):
        fast_p99 = run(base, approach)["latency"]["p99_s"]
        assert run(slow, approach)["latency"]["p99_s"] > fast_p99 + 30.0, approach
    assert run(slow, "spotserve")["latency"] == run(base, "spotserve")["latency"]


def test_a_node_killed_without_notice_gets_none(reference_dir: Path) -> None:
    """`no_notice_nodes`: the trace's removal of that node comes with no notice, so
    spotserve cannot move its requests' KV first; they re-prefill elsewhere."""
    removal = TraceEvent(300.0, "remove", ("node-2",))
    arrivals = every(3.0, 600)
    noticed = run(paper_setup(reference_dir, "20b", trace(6, 600, removal), arrivals, 0.35),
                  "spotserve")
    sudden = run(paper_setup(reference_dir, "20b", trace(6, 600, removal), arrivals, 0.35,
                             no_notice_nodes=frozenset({"node-2"})), "spotserve")
    before = [t["t"] for t in noticed["timeline"] if t["event"] == "switch" and t["t"] > 0]
    assert before and before[0] < 300.0           # planned within the grace period
    after = [t["t"] for t in sudden["timeline"] if t["event"] == "switch" and t["t"] > 0]
    assert after and after[0] >= 300.0            # nothing to act on before the loss
    assert sudden["reprefills"] > noticed["reprefills"]
    assert sudden["completed"] == sudden["requests"]


def test_a_profile_prices_the_gpu_of_the_catalog_it_runs_on(reference_dir: Path) -> None:
    """A profile measured on another device (here local mode's emulated CPU GPUs) prices
    that device, not the paper's T4."""
    from spotserve.operator.local.runner import CATALOG

    setup = paper_setup(reference_dir, "6.7b", trace(2, 60), every(3.0, 60), 0.2,
                        instance_type="cpu-1x")
    assert setup.scenario(Catalog.load(CATALOG)).cost.gpu_name == "CPU"  # type: ignore[attr-defined]
    paper = paper_setup(reference_dir, "6.7b", trace(2, 60), every(3.0, 60), 0.2)
    assert paper.scenario().cost.gpu_name == "T4"  # type: ignore[attr-defined]


def test_local_mode_plans_with_a_measured_profile_when_given(tmp_path: Path) -> None:
    """The cross-check's other half: local mode's controller prices its emulated GPUs with
    the profile it is given (the roofline model otherwise)."""
    import json

    from spotserve.model_spec import ModelSpec
    from spotserve.operator.local.cloud import DEFAULT_TRACE, script
    from spotserve.operator.local.runner import RunOptions, settings_for
    from spotserve.operator.local.tiny_model import build_tiny_llama

    model = build_tiny_llama(tmp_path / "tiny")
    spec = ModelSpec.from_hf_config(model)
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"layer_num": spec.num_layers, "tp-1": {
        "bsz-1": {"init": 2.0, "incr": 0.5}, "bsz-2": {"init": 3.0, "incr": 0.6}}}))
    options = RunOptions(model_dir=model, workdir=tmp_path, script=script(DEFAULT_TRACE))
    assert settings_for(spec, options).cost.name == "roofline"
    measured = settings_for(spec, RunOptions(model_dir=model, workdir=tmp_path,
                                             script=script(DEFAULT_TRACE), profile=profile))
    assert measured.cost.name == "profile"
    assert measured.cost.gpu_name == "CPU"  # type: ignore[attr-defined]
