"""Trace, query and rate files: both availability formats, and one clear error per bad file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spotserve.errors import SpotserveError
from spotserve.operator.sim.workload import generated
from spotserve.traces import load_queries, load_rates, load_trace


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_csv_events_at_one_time_merge(tmp_path: Path) -> None:
    trace = load_trace(write(tmp_path, "t.csv", "0,add,a\n0,add,b\n60000,remove,a\n"
                                                "60000,add,c\n"))
    assert [(e.time_s, e.kind, e.nodes) for e in trace.events] == [
        (0.0, "add", ("a", "b")), (60.0, "remove", ("a",)), (60.0, "add", ("c",))]
    assert trace.end_s == 60.0 and trace.max_instances == 2


def test_json_lines_rates_and_done(tmp_path: Path) -> None:
    trace = load_trace(write(tmp_path, "t.txt", (
        '[0, "add", {"nodes": ["n0", "n1"]}]\n'
        '[1000, "other", {"nodes": [], "required_tpt": 0.8}]\n'
        '[2000, "remove", {"nodes": ["n1"], "required_tpt": 0.6}]\n'
        '[5000, "DONE", {"nodes": []}]\n'
        '[9000, "add", {"nodes": ["ignored"]}]\n')))
    assert [(e.kind, e.rate) for e in trace.events] == [("add", None), ("rate", 0.8),
                                                        ("remove", 0.6)]
    assert trace.end_s == 5.0 and trace.nodes() == ("n0", "n1")


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("0,add\n", "t:1: expected 'time_ms,add|remove,NODE'"),
    ("x,add,a\n", "t:1: time 'x' is not a number"),
    ("0,boot,a\n", "event must be add or remove"),
    ("10,add,a\n5,add,b\n", "t:2: time goes backwards"),
    ('[0, "add", {"nodes": ["a"]}\n', "t:1: malformed JSON"),
    ('[0, "jump", {"nodes": []}]\n', "kind must be"),
    ('[-5, "add", {"nodes": ["a"]}]\n', "non-negative"),
    ('[0, "add", {"nodes": "a"}]\n', "nodes must be a list"),
])
def test_bad_traces_say_where(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SpotserveError, match=message.replace("|", r"\|")):
        load_trace(write(tmp_path, "t", text))


def test_missing_files_are_user_errors(tmp_path: Path) -> None:
    for load in (load_trace, load_queries, load_rates):
        with pytest.raises(SpotserveError, match="no such"):
            load(tmp_path / "absent")


def test_queries_and_rates(tmp_path: Path) -> None:
    queries = load_queries(write(tmp_path, "q.txt", "1,2.5,512,0\n0,1.0,256,9\n"))
    assert [(q.id, q.arrival_s, q.input_tokens) for q in queries] == [(0, 1.0, 256),
                                                                       (1, 2.5, 512)]
    with pytest.raises(SpotserveError, match=r"q\.txt:1"):
        load_queries(write(tmp_path, "q.txt", "a,b,c\n"))
    assert load_rates(write(tmp_path, "r.csv", "0.5,0.7\n0.6")) == (0.5, 0.7, 0.6)
    with pytest.raises(SpotserveError, match="numbers"):
        load_rates(write(tmp_path, "r.csv", "0.5,fast"))


def test_reference_traces_all_parse(reference_dir: Path) -> None:
    g4dn = load_trace(reference_dir / "traces" / "g4dn.csv")
    assert g4dn.max_instances == 24 and g4dn.end_s == pytest.approx(38760)
    for path in sorted((reference_dir / "traces").glob("trace_*.txt")):
        assert load_trace(path).events[0].kind == "add", path
    assert len(load_queries(reference_dir / "queries" / "query_tpt0.35_cv6.txt")) == 1024
    assert len(load_rates(reference_dir / "queries" / "arrival-rates.csv")) == 19


def test_generated_arrivals_are_seeded_and_have_the_rate_and_cv() -> None:
    a = generated((2.0,), 60, 3000, 1.0, 7, 512, 128)
    assert a == generated((2.0,), 60, 3000, 1.0, 7, 512, 128)
    assert a != generated((2.0,), 60, 3000, 1.0, 8, 512, 128)
    assert len(a) / 3000 == pytest.approx(2.0, rel=0.05)
    bursty = generated((2.0,), 60, 20000, 3.0, 1, 512, 128)
    gaps = np.diff([x.time_s for x in bursty])
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.2)


def test_per_minute_rates_change_the_rate() -> None:
    arrivals = generated((1.0, 0.0, 3.0), 60, 180, 1.0, 3, 512, 128)
    minutes = np.bincount([int(x.time_s // 60) for x in arrivals], minlength=3)
    assert minutes[1] == 0 and minutes[2] > 2 * minutes[0] > 0
