"""`spotserve demo` and `spotserve up --local` as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("torch")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_demo_answers_with_smollm2_and_writes_report_and_timeline(
        tmp_path: Path, smollm2: tuple[Path, Path]) -> None:
    """`spotserve demo` on its defaults serves SmolLM2 (the fixture has it in the cache):
    real answers, printed from before and after the preemptions, none failed, each the
    model's greedy answer and the no-preemption reference's."""
    out = tmp_path / "demo"  # given relative to the working folder, as a user would
    done = subprocess.run(
        [sys.executable, "-m", "spotserve.cli", "demo", "--out", "demo", "--compression",
         "2.5", "--grace", "6", "--quiet"],
        cwd=tmp_path, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "failed 0" in done.stdout and "greedy token by token" in done.stdout
    answers = done.stdout.partition("=== a few answers ===")[2]
    assert "Q: What is the capital of France?\nA: The capital of France is Paris." in answers
    assert "before any preemption; the same as with no preemption" in answers
    assert "after the last migration; the same as with no preemption" in answers
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["failed"] == 0 and report["summary"]["served"] > 20
    assert report["summary"]["identical_to_reference"]
    assert (out / "timeline.png").read_bytes()[:4] == b"\x89PNG"


def _up(out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "spotserve.cli", "up", "--local", "--out", str(out),
         "--model", "tiny", "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _interrupt(process: subprocess.Popen[str]) -> int:
    """Ctrl-C; its exit status, which must come within a few seconds."""
    process.send_signal(signal.SIGINT)
    return process.wait(timeout=15)


def _serves(process: subprocess.Popen[str]) -> None:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 120)
    assert ready, "not serving after 120 s"
    line = process.stdout.readline()
    assert line.startswith("serving"), line + (process.stderr.read() if process.stderr
                                               else "")
    url = line.split(" on ")[1].split()[0]
    assert "as model 'tiny-llama'" in line
    body = json.dumps({"model": "tiny-llama", "prompt": "w5 w6 w7", "max_tokens": 6,
                       "temperature": 0}).encode()
    request = urllib.request.Request(f"{url}/completions", body,
                                     {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        answer = json.loads(reply.read())
    assert answer["usage"]["completion_tokens"] == 6
    # chat, the first thing most clients try, through the openai client (issue 15, item 3)
    import openai
    client = openai.OpenAI(base_url=url, api_key="unused", timeout=60, max_retries=0)
    chat = client.chat.completions.create(
        model="tiny-llama", max_tokens=8, temperature=0,
        messages=[{"role": "system", "content": "w9 w10"},
                  {"role": "user", "content": "hello w7"}])
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage is not None and 0 < chat.usage.completion_tokens <= 8
    assert "w2" not in (chat.choices[0].message.content or "").split()  # EOS is special


def test_up_local_serves_until_interrupted_and_again_in_the_same_folder(
        tmp_path: Path) -> None:
    """A newcomer's path (issue 15, item 1): `up --local`, Ctrl-C, `up --local` again in
    the same folder serves again (the first run's controller state does not hold it up),
    and Ctrl-C stops it within seconds, also while it is still starting."""
    for attempt in ("first", "second", "interrupted while starting"):
        process = _up(tmp_path)
        try:
            if attempt == "interrupted while starting":
                time.sleep(3)
                assert _interrupt(process) == 0
                continue
            _serves(process)
            assert _interrupt(process) == 0, attempt
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    time.sleep(0.5)
