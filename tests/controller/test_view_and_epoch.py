"""Controller core: the instance view's transitions and a plan turned into worker assignments."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from spotserve.catalog import Catalog
from spotserve.layout import position_slices
from spotserve.operator.controller.epoch import KEPT, PEER, assignments, pipeline_ids
from spotserve.operator.controller.events import (
    InstanceBooting,
    InstanceLost,
    InstanceReady,
    LoadChanged,
    NoticeReceived,
)
from spotserve.operator.controller.view import BOOTING, GONE, NOTICE, READY, ClusterView
from spotserve.operator.planner import load_request, plan

ROOT = Path(__file__).resolve().parents[2]


def test_instance_lifecycle_and_replays() -> None:
    view = ClusterView()
    view = view.apply(InstanceBooting("a", "g4dn.12xlarge"), now=1)
    assert view.instances["a"].state == BOOTING
    view = view.apply(InstanceReady("a", "g4dn.12xlarge"), now=5)
    ready = view.apply(InstanceReady("a", "g4dn.12xlarge"), now=9)
    assert ready == view and view.instances["a"].since == 5  # a replay changes nothing
    view = view.apply(NoticeReceived("a", deadline=100), now=10)
    view = view.apply(NoticeReceived("a", deadline=130), now=11)  # later duplicate
    assert (view.instances["a"].state, view.instances["a"].deadline) == (NOTICE, 100)
    assert view.apply(InstanceReady("a", "g4dn.12xlarge"), now=12) == view  # no resurrection
    view = view.apply(InstanceLost("a"), now=100)
    assert view.instances["a"].state == GONE
    assert view.apply(NoticeReceived("ghost", 5), now=1) == view.apply(InstanceLost("x"), now=1)
    assert view.apply(LoadChanged(2.5), now=0).rate == 2.5
    assert ClusterView.from_dict(view.to_dict()) == view


def test_planner_instances_states() -> None:
    view = ClusterView()
    for name in "abcd":
        view = view.apply(InstanceReady(name, "g4dn.12xlarge"), now=0)
    view = view.apply(NoticeReceived("b", 30), now=0).apply(InstanceLost("c"), now=0)
    view = view.apply(InstanceLost("d"), now=0)
    got = {i.name: i.state for i in view.planner_instances(Catalog.load(), used={"a", "b", "c"})}
    assert got == {"a": "running", "b": "doomed", "c": "lost"}  # d held nothing
    assert view.earliest_deadline() == 30
    joining = view.apply(InstanceReady("e", "g4dn.12xlarge"), now=0)
    assert {i.name: i.state for i in joining.planner_instances(Catalog.load())}["e"] == "joining"
    assert joining.instances["e"].state == READY


@pytest.mark.parametrize("example", ["preemption.yaml", "scale-in.yaml", "cold-start.yaml"])
def test_pieces_tile_every_needed_slice_and_kept_pieces_are_really_held(example: str) -> None:
    request = load_request(ROOT / "examples" / "plan" / example)
    result = plan(request)
    assert result.mapping is not None and result.migration is not None
    new = result.mapping.placement
    old = request.current.placement if request.current else None
    work = assignments(request.model, 1, new, result.migration.transfers, old)
    assert set(work) == {g for _, g in new.assignment}
    for gpu, job in work.items():
        needed = position_slices(request.model, new.config, job.position)
        for want in needed:
            parts = sorted((p.piece.start, p.piece.stop) for p in job.pieces
                           if p.piece.tensor == want.tensor)
            if want.dim is None:
                assert len(parts) == 1
                continue
            assert parts[0][0] == want.start and parts[-1][1] == want.stop
            assert all(a[1] == b[0] for a, b in itertools.pairwise(parts))
        kept = [p for p in job.pieces if p.kind == KEPT]
        if old is None:
            assert not kept and all(p.kind == "checkpoint" for p in job.pieces)
            continue
        held_at = old.by_gpu.get(gpu)
        held = {s.tensor: s for s in (position_slices(request.model, old.config, held_at)
                                      if held_at else ())}
        for p in kept:
            h = held.get(p.piece.tensor)
            assert h is not None, f"{gpu} keeps {p.piece.tensor} it never held"
            assert h.dim is None or h.start <= p.piece.start <= p.piece.stop <= h.stop
        for p in job.pieces:
            if p.kind == PEER:
                assert p.peers and p.peers[0] != gpu


def test_unchanged_pipelines_keep_their_ids_and_are_not_touched() -> None:
    request = load_request(ROOT / "examples" / "plan" / "preemption.yaml")
    result = plan(request)
    assert result.mapping is not None and result.migration is not None and request.current
    old = request.current.placement
    new = result.mapping.placement
    old_ids = ["p-a", "p-b", "p-c"]
    ids = pipeline_ids(2, old_ids, old, new)
    work = assignments(request.model, 2, new, result.migration.transfers, old, old_ids)
    for job in work.values():
        if job.unchanged:
            assert job.pipeline_id in old_ids
            assert all(p.kind == KEPT for p in job.pieces)
    # the doomed node-1 pipeline is replaced by a new one on the joining node-3
    assert "p-b" not in ids and any(i.startswith("e2p") for i in ids)
    assert sum(job.unchanged for job in work.values()) == 8  # node-0 and node-2 untouched


def test_the_journal_is_bounded_in_memory_and_on_disk(tmp_path: Path) -> None:
    from spotserve.operator.controller.journal import Journal
    journal = Journal(tmp_path, max_entries=5, max_bytes=2000)
    for i in range(100):
        journal.record("event", i, detail="x" * 40)
    assert [e["epoch"] for e in journal.entries] == [95, 96, 97, 98, 99]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["events.jsonl", "events.jsonl.1"]
    assert all(p.stat().st_size <= 2000 + 200 for p in tmp_path.iterdir())
    read = journal.read()
    assert read[-1]["epoch"] == 99 and [e["epoch"] for e in read] == sorted(
        e["epoch"] for e in read)
