"""Shared fixtures of the worker tests: a tiny random Llama checkpoint (HF safetensors,
sharded, so the real loader runs) and its reference completions from one in-process
engine holding the whole model (no interruption, P = M = 1)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.engine.tiny_models import save_tiny

PROMPTS = {
    "r1": [5, 17, 99, 3, 42, 8, 61],
    "r2": [9, 4, 77],
    "r3": [100, 20, 30, 40, 50, 60, 70, 80, 90, 99, 98, 97],
}
MAX_TOKENS = 24


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama", seed=11)


@pytest.fixture(scope="session")
def reference(checkpoint: Path) -> Callable[[list[int], int], list[int]]:
    """Greedy tokens of an uninterrupted run of one prompt."""
    import torch

    from spotserve.worker.engine.builder import local_engine
    from spotserve.worker.engine.sequence import SamplingParams
    torch.set_num_threads(1)
    engine = local_engine(checkpoint)
    cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def complete(prompt: list[int], max_tokens: int) -> list[int]:
        key = (tuple(prompt), max_tokens)
        if key not in cache:
            engine.submit("ref", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
            cache[key] = [e.token_id for e in engine.run()]
        return cache[key]

    return complete
