"""Real processes on loopback: `spotserve router` and two test-double drivers; one driver
is SIGKILLed mid-stream and every in-flight request still completes, identical to an
uninterrupted run, through both the OpenAI client and gRPC."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest
import pytest_asyncio

from spotserve.tokenizer import ModelTokenizer

from .conftest import TOKEN
from .helpers import expected

pytestmark = pytest.mark.asyncio
ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [f"spot instances are cheap {i}" for i in range(6)]
TOKENS = 80


Process = tuple[asyncio.subprocess.Process, str]   # the process, and what it listens on


async def _spawn(*args: str, ready: str) -> Process:
    env = {**os.environ, "SPOTSERVE_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, *args, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
    assert ready in line, line
    return process, line.split(ready)[-1].strip()   # the address, or the router's ports


@pytest_asyncio.fixture
async def processes(model_dir: Path, tokenizer: ModelTokenizer
                    ) -> AsyncIterator[list[tuple[asyncio.subprocess.Process, str]]]:
    started: list[tuple[asyncio.subprocess.Process, str]] = []
    try:
        for host in ("127.0.0.2", "127.0.0.3"):
            started.append(await _spawn(
                "-m", "tests.router.fake_worker", "--host", host, "--step", "0.01",
                "--vocab-size", str(tokenizer.vocab_size), "--token", TOKEN,
                ready="fake worker listening"))
        started.append(await _spawn(
            "-m", "spotserve.cli", "router", "--model", str(model_dir),
            "--served-model-name", "tiny", "--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0",
            "--pipeline", f"p0={started[0][1]}", "--pipeline", f"p1={started[1][1]}",
            "--resume-timeout", "10", "--log-level", "WARNING", ready="router listening"))
        yield started
    finally:
        for process, _ in started:
            if process.returncode is None:
                process.kill()
            await process.wait()


async def test_sigkilled_driver_is_invisible_to_clients(
        processes: list[tuple[asyncio.subprocess.Process, str]],
        tokenizer: ModelTokenizer) -> None:
    (victim, _), _, (router, ports) = processes
    http = ports.split("http=")[1].split()[0]
    client = openai.AsyncOpenAI(base_url=f"http://{http}/v1", api_key="x", max_retries=0)
    progress: dict[str, int] = {}

    async def complete(prompt: str) -> str:
        stream = await client.completions.create(model="tiny", prompt=prompt,
                                                 max_tokens=TOKENS, stream=True)
        text = ""
        async for event in stream:
            text += event.choices[0].text
            progress[prompt] = progress.get(prompt, 0) + 1
        return text

    tasks = [asyncio.create_task(complete(p)) for p in PROMPTS]
    while len(progress) < len(PROMPTS) or min(progress.values()) < 5:
        if any(task.done() for task in tasks):
            break       # one failed before the kill: gather reports it
        await asyncio.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    texts = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    await client.close()
    for prompt, text in zip(PROMPTS, texts, strict=True):
        assert text == expected(tokenizer, prompt, TOKENS)[1], prompt
    async with aiohttp.ClientSession() as session, \
            session.get(f"http://{http}/metrics") as response:
        metrics = await response.text()
    resumed = [line for line in metrics.splitlines()
               if line.startswith('spotserve_requests_resumed_total{mode="reprefill"}')]
    assert resumed and float(resumed[0].split()[-1]) >= 1  # the kill did interrupt some
    router.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(router.wait(), 15) == 0
