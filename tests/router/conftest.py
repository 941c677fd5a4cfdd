"""Fixtures of the router tests: a tiny byte-level BPE model directory, test-double
pipeline drivers and an in-process router, all on loopback with OS-chosen ports."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from spotserve.operator.router.app import RouterApp
from spotserve.operator.router.dispatch import Pipeline
from spotserve.tokenizer import ModelTokenizer

from .fake_worker import FakeWorker, start_fake_worker
from .tiny_model import build_model_dir

MAX_CONTEXT = 256
TOKEN = "s3cret"


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
        "hint_wait": 2.0, "shutdown_grace": 1.0}
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
