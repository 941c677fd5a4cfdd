"""Every subcommand run with hostile arguments (issue 15, item 5): a clear error, never a
Python traceback, and exit 2 (or a quiet 0 when a pipe reader stops early)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ZERO_HEADS = ('{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, '
              '"intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 0, '
              '"vocab_size": 100}')


@pytest.fixture(scope="module")
def busy() -> Iterator[str]:
    """A loopback port something else listens on."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield f"127.0.0.1:{held.getsockname()[1]}"


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spotserve.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def cases(tmp: Path, busy: str) -> list[tuple[list[str], str]]:
    (tmp / "file").write_text("not a folder")
    (tmp / "zero").mkdir(exist_ok=True)
    (tmp / "zero" / "config.json").write_text(ZERO_HEADS)
    (tmp / "trace.csv").write_text("0,add,n1\n5,explode,n1\n")
    return [
        (["model-info", str(tmp / "zero")], "num_attention_heads must be a positive"),
        (["model-info", "no-such-model"], "no-such-model"),
        (["download", "--url", "https://127.0.0.1:1/m.tar", "--to", str(tmp / "file")],
         "is a file"),
        (["download", "--url", "https://127.0.0.1:1/m.tar", "--to", "/proc/none/m"],
         "cannot create"),
        (["download", "--url", "https://127.0.0.1:1/m.tar", "--to", str(tmp / "new")],
         "cannot download"),
        (["plan", str(tmp / "missing.json")], "missing.json"),
        (["plan", str(tmp / "file")], "file"),
        (["simulate", "--model", "6.7b", "--trace", str(tmp / "trace.csv"), "--rate", "1"],
         "trace.csv"),
        (["simulate", "--model", "6.7b", "--trace", str(tmp / "trace.csv"), "--rate", "-3"],
         "rate"),
        (["router", "--model", str(tmp / "zero"), "--http", "127.0.0.1:0", "--grpc",
          "127.0.0.1:0"], "tokenizer.json"),
        (["worker", "--listen", busy], "cannot listen"),
        (["profile", "--model", str(tmp / "missing")], "missing"),
        (["chaos", "--seeds", "0"], "--seeds"),
    ]


def test_no_subcommand_prints_a_traceback(tmp_path: Path, busy: str) -> None:
    failures = []
    for args, words in cases(tmp_path, busy):
        done = run(args, tmp_path)
        lines = done.stderr.strip().splitlines()
        if done.returncode != 2 or "Traceback" in done.stderr or \
                not any(words in line for line in lines):
            failures.append(f"{' '.join(args)} → {done.returncode}: {done.stderr[-600:]}")
    assert not failures, "\n\n".join(failures)
    assert not (tmp_path / "new").exists(), "a failed download leaves no empty folder"


def test_a_router_on_a_port_in_use_says_so_in_one_line(tmp_path: Path, busy: str) -> None:
    from spotserve.operator.local.tiny_model import build_tiny_llama

    model = build_tiny_llama(tmp_path / "tiny")
    done = run(["router", "--model", str(model), "--http", busy, "--grpc", "127.0.0.1:0",
                "--log-level", "error"], tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        line for line in done.stderr.strip().splitlines() if "cannot listen" in line]


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path: Path) -> None:
    """`spotserve model-info X | head -3`; here the reader (`true`) is gone before the
    first line is written, every time."""
    done = subprocess.run(f"{sys.executable} -m spotserve.cli model-info opt-6.7b | true",
                          shell=True, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.stderr == "", done.stderr
