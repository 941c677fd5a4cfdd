"""Fixtures of the router tests: a tiny byte-level BPE model directory, test-double
pipeline drivers and an in-process router, all on loopback with OS-chosen ports."""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from spotserve.operator.router.app import RouterApp
from spotserve.operator.router.dispatch import Pipeline
from spotserve.operator.router.tokenizer import ModelTokenizer

from .fake_worker import FakeWorker, start_fake_worker

SPECIAL = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CORPUS = ["the quick brown fox jumps over the lazy dog", "spot instances are cheap",
          "preemption is invisible to clients", "café naïve déjà vu — 日本語 ✓ 🙂",
          "def main(): return 42", "router dispatch commit log resume"] * 4
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
MAX_CONTEXT = 256
TOKEN = "s3cret"


def build_model_dir(path: Path) -> Path:
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
    (path / "config.json").write_text(json.dumps({"max_position_embeddings": MAX_CONTEXT}))
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("model") / "tiny-model")


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> ModelTokenizer:
    return ModelTokenizer.from_dir(model_dir)


StartWorker = Callable[..., Awaitable[tuple[FakeWorker, grpc.aio.Server, str]]]


@pytest_asyncio.fixture
async def start_worker(tokenizer: ModelTokenizer) -> AsyncIterator[StartWorker]:
    servers: list[grpc.aio.Server] = []

    async def start(host: str = "127.0.0.2", **kwargs: object
                    ) -> tuple[FakeWorker, grpc.aio.Server, str]:
        options = {"step_seconds": 0.002, "token": TOKEN, **kwargs}
        worker = FakeWorker(vocab_size=tokenizer.vocab_size, **options)  # type: ignore[arg-type]
        server, address = await start_fake_worker(host, worker)
        servers.append(server)
        return worker, server, address

    yield start
    for server in servers:
        await server.stop(0)


def router_args(model_dir: Path, **overrides: object) -> argparse.Namespace:
    values: dict[str, object] = {
        "model": model_dir, "served_model_name": "tiny", "max_context": None,
        "grpc": "127.0.0.1:0", "http": "127.0.0.1:0", "max_queue": 64, "max_concurrency": 8,
        "queue_timeout": 5.0, "request_timeout": 30.0, "resume_timeout": 5.0,
        "hint_wait": 2.0}
    values.update(overrides)
    return argparse.Namespace(**values)


StartRouter = Callable[..., Awaitable[RouterApp]]


@pytest_asyncio.fixture
async def start_router(model_dir: Path) -> AsyncIterator[StartRouter]:
    apps: list[RouterApp] = []

    async def start(pipelines: list[Pipeline], *, api_keys: list[str] | None = None,
                    **overrides: object) -> RouterApp:
        app = RouterApp.from_args(router_args(model_dir, **overrides), pipelines=[],
                                  token=TOKEN, api_keys=api_keys or [])
        await app.start()
        await app.router.update_topology(1, pipelines, [])
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.stop(grace=0)
