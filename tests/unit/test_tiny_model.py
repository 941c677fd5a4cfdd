"""The built-in tiny model a newcomer meets first (`spotserve up --local`, the demo): it
has a chat template, and its BOS and EOS are special tokens, left out of decoded text."""

from __future__ import annotations

import pytest

from spotserve.operator.local.tiny_model import build_tiny_llama, word
from spotserve.tokenizer import ChatMessage, ModelTokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> ModelTokenizer:
    return ModelTokenizer.from_dir(build_tiny_llama(tmp_path_factory.mktemp("tiny") / "m"))


def test_chat_renders_each_turn_with_its_role_and_opens_the_reply(
        tokenizer: ModelTokenizer) -> None:
    assert tokenizer.has_chat_template
    ids = tokenizer.encode_chat([ChatMessage("system", "w9 w10"),
                                 ChatMessage("user", "w7 w8"),
                                 ChatMessage("assistant", "w11"),
                                 ChatMessage("user", "hello")])
    assert ids == [1, 3, 9, 10, 4, 7, 8, 5, 11, 4, 0, 5]  # bos, turns, the reply's marker


def test_eos_and_bos_stay_out_of_the_text(tokenizer: ModelTokenizer) -> None:
    assert tokenizer.decode([9, 2, 1, 10]) == f"{word(9)} {word(10)}"
    assert tokenizer.encode(f"{word(1)} {word(2)} {word(3)}") == [1, 2, 3]
    assert tokenizer.encode(f"{word(10)} {word(21)} {word(120)}") == [10, 21, 120]
    assert tokenizer.vocab_size == 160   # the special tokens are the model's own ids
