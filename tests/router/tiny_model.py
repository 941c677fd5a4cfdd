"""A tiny model directory for the router's tests and benchmark: a byte-level BPE
tokenizer (~320 tokens, multi-byte characters split over tokens), a chat template, and a
context length. No weights: the test-double drivers need none."""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CORPUS = ["the quick brown fox jumps over the lazy dog", "spot instances are cheap",
          "preemption is invisible to clients", "café naïve déjà vu — 日本語 ✓ 🙂",
          "def main(): return 42", "router dispatch commit log resume"] * 4
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_model_dir(path: Path, max_context: int = 256) -> Path:
    """tokenizer.json (byte-level BPE, ~300 tokens), tokenizer_config.json, config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHAT_TEMPLATE, "bos_token": "<s>", "eos_token": "</s>"}))
    (path / "config.json").write_text(json.dumps({"max_position_embeddings": max_context}))
    return path
