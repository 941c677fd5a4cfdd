"""Device mapper: Kuhn–Munkres placement equals the brute-force optimum; its policies."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from spotserve.layout import ParallelConfig, shared_kv_bytes, shared_weight_bytes
from spotserve.model_spec import ModelSpec
from spotserve.operator.planner import (
    CurrentState,
    Instance,
    PipelineProgress,
    map_devices,
    migration_plan,
)
from spotserve.operator.planner.device_mapper import instance_kinds, pack_slots

from .support import place, pool, small_type, tiny_model


def pair_reuse(model: ModelSpec, current: CurrentState, new: ParallelConfig,
               inherits: set[tuple[int, int]], readable: set[str], gpu, pos) -> int:  # type: ignore[no-untyped-def]
    old = current.placement
    before = old.by_gpu.get(gpu)
    if before is None or pos is None or gpu.instance not in readable:
        return 0
    total = shared_weight_bytes(model, old.config, before, new, pos)
    if (pos.pipeline, before.pipeline) in inherits:
        tokens = current.progress_of(before.pipeline).cached_tokens
        total += shared_kv_bytes(model, old.config, before, new, pos, tokens)
    return total


def brute_force(model: ModelSpec, current: CurrentState, new: ParallelConfig,
                instances: list[Instance], inherits: set[tuple[int, int]]) -> int:
    """Best total over every instance → slot assignment and every GPU order inside."""
    hosts = [i for i in instances if i.usable]
    readable = {i.name for i in instances if i.state != "lost"}
    slots = pack_slots(new, instance_kinds(hosts))
    best_pair: dict[tuple[int, int], int] = {}
    for h, host in enumerate(hosts):
        for s, slot in enumerate(slots):
            cols = list(slot.positions) + [None] * (len(host.gpus) - len(slot.positions))
            best_pair[(h, s)] = max(
                sum(pair_reuse(model, current, new, inherits, readable, g, p)
                    for g, p in zip(order, cols, strict=True))
                for order in itertools.permutations(host.gpus))
    return max(sum(best_pair[(h, s)] for s, h in enumerate(choice))
               for choice in itertools.permutations(range(len(hosts)), len(slots)))


@st.composite
def scenarios(draw: st.DrawFn):  # type: ignore[no-untyped-def]
    gpus = draw(st.sampled_from([1, 2, 3]))
    itype = small_type("box", gpus)
    model = tiny_model(draw(st.integers(2, 4)))
    degrees = [m for m in (1, 2) if gpus % m == 0 and model.supports_tp(m)]

    def uniform(max_instances: int) -> ParallelConfig:
        m = draw(st.sampled_from(degrees))
        p = draw(st.integers(1, min(2, model.num_layers)))
        per_instance = gpus // m
        d = draw(st.integers(1, max(1, max_instances * per_instance // p)))
        return ParallelConfig.uniform(model.num_layers, d, p, m, batch=2)

    old = uniform(3)
    need = -(-old.num_gpus // gpus) + 1
    instances = pool(itype, need)
    placement = place(model, old, instances)
    progress = tuple(PipelineProgress(d, draw(st.integers(0, 50)), 5) for d in range(old.data))
    states = {i: draw(st.sampled_from(["running", "running", "doomed", "lost"]))
              for i in range(len(instances))}
    joined = draw(st.integers(0, 1))
    now = [Instance(i.name, itype, state=states[n]) for n, i in enumerate(instances)]
    now += [Instance(f"j{k}", itype, state="joining") for k in range(joined)]
    usable = sum(1 for i in now if i.usable)
    new = uniform(max(1, usable))
    return model, CurrentState(placement, progress), new, now


@settings(max_examples=40, deadline=None)
@given(scenarios())
def test_kuhn_munkres_matches_brute_force(scenario) -> None:  # type: ignore[no-untyped-def]
    model, current, new, instances = scenario
    hosts = [i for i in instances if i.usable]
    if not hosts or len(pack_slots(new, instance_kinds(hosts))) > len(hosts) or len(hosts) > 4:
        return
    result = map_devices(model, new, instances, current)
    expected = brute_force(model, current, new, instances, set(result.inherits))
    assert result.reused_bytes == expected
    for pos, gpu in result.placement.assignment:
        assert gpu.instance in {h.name for h in hosts}
        assert pos in new.positions()


def test_tp_group_stays_inside_one_instance() -> None:
    model = tiny_model(4)
    itype = small_type("box", 4)
    config = ParallelConfig.uniform(4, 3, 2, 2, 2)
    placement = map_devices(model, config, pool(itype, 3)).placement
    for d in range(3):
        for s in range(2):
            homes = {g.instance for p, g in placement.assignment
                     if (p.pipeline, p.stage) == (d, s)}
            assert len(homes) == 1


def test_scale_out_leaves_running_pipelines_alone() -> None:
    model = tiny_model(4)
    itype = small_type("box", 2)
    old = ParallelConfig.uniform(4, 2, 1, 2, 2)
    placement = place(model, old, pool(itype, 2))
    current = CurrentState(placement, (PipelineProgress(0, 30, 4), PipelineProgress(1, 20, 4)))
    grown = ParallelConfig.uniform(4, 4, 1, 2, 2)
    result = map_devices(model, grown, pool(itype, 4), current)
    assert result.fast_path
    for pos, gpu in placement.assignment:
        assert result.placement.by_position[pos] == gpu
    assert result.inherits == ((0, 0), (1, 1))


def test_shrinking_keeps_the_furthest_pipelines_in_place_and_moves_the_rest() -> None:
    model = tiny_model(4)
    itype = small_type("box", 2)
    old = ParallelConfig.uniform(4, 3, 1, 2, 2)
    placement = place(model, old, pool(itype, 3))
    progress = (PipelineProgress(0, 10, 4), PipelineProgress(1, 90, 4),
                PipelineProgress(2, 40, 4))
    current = CurrentState(placement, progress)
    result = map_devices(model, ParallelConfig.uniform(4, 2, 1, 2, 2), pool(itype, 3),
                         current)
    heir = {o: n for n, o in result.inherits}
    assert sorted(heir) == [0, 1, 2]  # nobody re-prefills
    kept = {result.placement.by_position[p].instance for p in result.placement.config.positions()}
    assert kept == {placement.by_position[p].instance for p in old.positions()
                    if p.pipeline in (1, 2)}
    # the two furthest stay where their KV is; the third joins the lighter of them
    assert heir[1] != heir[2] and heir[0] == heir[2]
    assert result.reused_kv_bytes > 0


def two_pipelines(tokens: tuple[int, int], count: int, states: dict[int, str]
                  ) -> tuple[ModelSpec, CurrentState, list[Instance]]:
    """Two (P=1, M=2) pipelines on two-GPU boxes holding `tokens` cached tokens, and
    `count` boxes now in `states`."""
    model, itype = tiny_model(4), small_type("box", 2)
    placement = place(model, ParallelConfig.uniform(4, 2, 1, 2, 2), pool(itype, 2))
    current = CurrentState(placement, tuple(PipelineProgress(d, t, 4)
                                            for d, t in enumerate(tokens)))
    return model, current, pool(itype, count, states=states)


def test_an_adopted_pipelines_kv_moves_to_its_new_home() -> None:
    model, current, now = two_pipelines((30, 20), 2, {1: "doomed"})
    result = map_devices(model, ParallelConfig.uniform(4, 1, 1, 2, 2), now, current)
    assert result.inherits == ((0, 0), (0, 1))
    plan = migration_plan(model, current, result.placement, result.inherits, now)
    moved = [t for t in plan.transfers if t.kv_pipeline == 1]
    assert moved and all(t.src.instance == "n1" and t.urgent for t in moved)
    assert {t.dst for t in moved} == {g for _, g in result.placement.assignment}
    assert not any(t.kv_pipeline == 0 for t in plan.transfers)  # pipeline 0's stays put


def test_lost_instances_lend_nothing() -> None:
    model, current, now = two_pipelines((10, 10), 3, {0: "lost"})
    result = map_devices(model, ParallelConfig.uniform(4, 2, 1, 2, 2), now, current)
    assert "n0" not in result.placement.instances()
    assert result.inherits == ((1, 1),)


@settings(max_examples=15, deadline=None)
@given(scenarios())
def test_mapping_and_migration_are_deterministic(scenario) -> None:  # type: ignore[no-untyped-def]
    from spotserve.operator.planner import migration_plan

    model, current, new, instances = scenario
    hosts = [i for i in instances if i.usable]
    if not hosts or len(pack_slots(new, instance_kinds(hosts))) > len(hosts):
        return
    first = map_devices(model, new, instances, current)
    again = map_devices(model, new, list(instances), current)
    assert first == again
    plans = [migration_plan(model, current, m.placement, m.inherits, instances)
             for m in (first, again)]
    assert plans[0] == plans[1]
