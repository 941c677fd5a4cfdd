"""Unit tests: incremental detokenization, stop strings, request validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from spotserve.operator.router.errors import RouterError
from spotserve.operator.router.text import IncrementalDetokenizer, StopMatcher
from spotserve.operator.router.validation import ModelLimits, validate
from spotserve.tokenizer import ChatMessage, ModelTokenizer
from spotserve.v1 import common_pb2

from .fake_worker import fake_completion

TEXTS = ["café naïve 🙂 日本語 ✓", "plain words only", "🙂🙂🙂 emoji run"]


@pytest.mark.parametrize("text", TEXTS)
def test_detokenizer_streams_whole_characters(tokenizer: ModelTokenizer, text: str) -> None:
    prompt = tokenizer.encode("prompt:")
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer.decode, prompt)
    pieces = [detok.add([token]) for token in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    if not text.isascii():  # multi-byte characters span tokens and were held back
        assert sum(1 for p in pieces if p) < len(ids)


def test_detokenizer_on_arbitrary_tokens_matches_a_full_decode(
        tokenizer: ModelTokenizer) -> None:
    prompt = tokenizer.encode("hello")
    ids = fake_completion(prompt, 60, tokenizer.vocab_size)
    detok = IncrementalDetokenizer(tokenizer.decode, prompt)
    streamed = "".join(detok.add(ids[i:i + 3]) for i in range(0, 60, 3)) + detok.flush()
    assert streamed == tokenizer.decode(ids)


def test_stop_matcher_cuts_across_chunks() -> None:
    stops = StopMatcher(["STOP", "\n\n"])
    out = [stops.feed(t) for t in ["abc S", "T", "OP tail"]]
    assert "".join(out) == "abc " and stops.stopped
    assert stops.flush() == "" and stops.feed("more") == ""


def test_stop_matcher_holds_back_less_than_the_longest_stop() -> None:
    stops = StopMatcher(["xyz"])
    assert stops.feed("hello x") == "hello"
    assert stops.feed("a") == " "
    assert stops.flush() == "xa" and not stops.stopped


def test_stop_matcher_without_stops_passes_through() -> None:
    stops = StopMatcher([])
    assert stops.feed("abc") == "abc" and stops.flush() == ""


LIMITS = ModelLimits("tiny", max_context=100, vocab_size=50)


def _sampling(**kwargs: object) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(**{"max_tokens": 10, **kwargs})  # type: ignore[arg-type]


@pytest.mark.parametrize(("model", "prompt", "sampling", "field"), [
    ("other", [1], _sampling(), "model"),
    ("", [], _sampling(), "prompt"),
    ("", [1] * 100, _sampling(), "prompt"),
    ("", [1, 50], _sampling(), "prompt"),
    ("", [1], _sampling(max_tokens=0), "max_tokens"),
    ("", [1], _sampling(max_tokens=-3), "max_tokens"),
    ("", [1] * 95, _sampling(max_tokens=6), "max_tokens"),
    ("", [1], _sampling(temperature=-0.5), "temperature"),
    ("", [1], _sampling(temperature=float("nan")), "temperature"),
    ("", [1], _sampling(top_p=0.0), "top_p"),
    ("", [1], _sampling(top_p=1.5), "top_p"),
    ("", [1], _sampling(top_k=-2), "top_k"),
    ("", [1], _sampling(stop_token_ids=[77]), "stop_token_ids"),
    ("", [1], _sampling(stop=[""]), "stop"),
    ("", [1], _sampling(stop=["x"] * 17), "stop"),
])
def test_validation_names_the_field(model: str, prompt: list[int],
                                    sampling: common_pb2.SamplingParams, field: str) -> None:
    with pytest.raises(RouterError) as info:
        validate(model, "", prompt, sampling, LIMITS)
    assert info.value.field == field and info.value.message.startswith(f"{field}: ")


def test_validation_accepts_a_good_request() -> None:
    validate("tiny", "abc", [1, 2], _sampling(temperature=0.0, top_p=1.0, top_k=0,
                                             stop=["x"]), LIMITS)
    validate("", "", [1] * 90, _sampling(max_tokens=10), LIMITS)


@pytest.mark.parametrize("where", ["chat_template.jinja", "chat_template.json",
                                   "tokenizer_config.json"])
def test_the_chat_template_is_read_wherever_the_checkpoint_keeps_it(
        tmp_path: Path, where: str) -> None:
    """transformers 4.4x+ saves the template as chat_template.jinja (and many Hub repos
    ship it so); older processors as chat_template.json; older still, inside
    tokenizer_config.json. The .jinja file wins when there are several."""
    import json

    from .tiny_model import build_model_dir
    folder = build_model_dir(tmp_path / "m")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    template = config.pop("chat_template") + "{{ '[jinja]' if from_file else '' }}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if where == "chat_template.jinja":
        (folder / where).write_text(template.replace("from_file", "true"))
    elif where == "chat_template.json":
        (folder / where).write_text(json.dumps({"chat_template": template}))
    else:
        (folder / where).write_text(json.dumps({**config, "chat_template": template}))
    tokenizer = ModelTokenizer.from_dir(folder)
    assert tokenizer.has_chat_template
    text = tokenizer.render_chat([ChatMessage("user", "hi")])
    assert "hi" in text and text.endswith("[jinja]") == (where == "chat_template.jinja")


def test_a_model_without_a_chat_template_says_so(tmp_path: Path) -> None:
    import json

    from .tiny_model import build_model_dir
    folder = build_model_dir(tmp_path / "m")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert not ModelTokenizer.from_dir(folder).has_chat_template
