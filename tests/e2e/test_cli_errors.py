"""`spotserve demo` and `spotserve up`: bad flags and bad trace files give one clear line
and exit 2, before any process starts. Also the cloud script derived from a trace."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from spotserve.errors import SpotserveError
from spotserve.operator.local.cloud import DEFAULT_TRACE, KILL, NOTICE, load_script, script

ROOT = Path(__file__).resolve().parents[2]


def spotserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spotserve.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("args", "words"), [
    (["demo", "--trace", "/no/such/trace.csv"], "no such trace file"),
    (["demo", "--rate", "-1"], "--rate"),
    (["demo", "--max-tokens", "0"], "--max-tokens"),
    (["demo", "--instance-type", "p9.huge"], "p9.huge"),
    (["demo", "--model", "/no/such/model"], "config.json"),
    (["up"], "--local"),
    (["up", "--local", "--instances", "0"], "--instances"),
    (["up", "--local", "--max-queue", "0"], "--max-queue"),
])
def test_bad_flags_exit_2_with_one_line(args: list[str], words: str, tmp_path: Path) -> None:
    done = spotserve(*args, "--out", str(tmp_path / "out"))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], done.stderr


def test_bad_trace_file_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "trace.csv"
    bad.write_text("0,add,node1\n100,explode,node1\n")
    done = spotserve("demo", "--trace", str(bad), "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "trace.csv:2" in done.stderr


def test_argparse_errors_exit_2() -> None:
    assert spotserve("demo", "--rate", "fast").returncode == 2


def test_script_turns_removals_into_notices_and_kills() -> None:
    cloud = script(DEFAULT_TRACE, 2.0, 5.0, ["n4"])
    notices = {e.instance: e.at for e in cloud.events if e.kind == NOTICE}
    kills = {e.instance: e.at for e in cloud.events if e.kind == KILL}
    assert set(kills) == {"n2", "n4", "n5"} and set(notices) == {"n2", "n5"}
    assert kills["n2"] - notices["n2"] == pytest.approx(5.0)
    assert cloud.end == pytest.approx(DEFAULT_TRACE.end_s / 2)
    assert [e.at for e in cloud.events] == sorted(e.at for e in cloud.events)
    assert cloud.kills(notice=False) == ["n4"]


def test_script_rejects_unknown_nodes_and_bad_compression() -> None:
    with pytest.raises(SpotserveError, match="not a node"):
        script(DEFAULT_TRACE, 1.0, 5.0, ["nope"])
    with pytest.raises(SpotserveError, match="compression"):
        load_script(None, 0.0, 5.0)


def test_spotserve_trace_segment_parses(reference_dir: Path) -> None:
    segment = reference_dir / "traces" / "trace_0304_real.txt"
    if not segment.exists():
        pytest.skip("trace_0304_real.txt not in the reference data")
    cloud = load_script(str(segment), 10.0, 3.0)
    assert any(e.kind == KILL for e in cloud.events) and cloud.end > 0


def test_up_with_a_device_its_workers_cannot_use_ends_with_their_error(
        tmp_path: Path) -> None:
    """Issue 15, item 4: `up --local --device cuda` where torch sees no GPU ends within
    seconds with a one-line reason, instead of waiting for ever: before any process
    starts when the machine shows no GPU at all (nvidia-smi, CUDA_VISIBLE_DEVICES), else
    the worker's own (a CPU-only torch)."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here: --device cuda works")
    done = spotserve("up", "--local", "--device", "cuda", "--http", "127.0.0.1:0",
                     "--grpc", "127.0.0.1:0", "--out", str(tmp_path / "out"))
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "--device cuda" in line, line
    assert "could not start" in line or "no CUDA GPU is visible here" in line, line


@pytest.mark.parametrize(("built", "count", "device", "words"), [
    (False, 0, "cuda", "CPU-only build"),
    (True, 0, "cuda", "no CUDA GPU is visible"),
    (True, 2, "cuda:3", "only 2 GPU(s)"),
])
def test_a_worker_refuses_a_device_it_cannot_use(built: bool, count: int, device: str,
                                                 words: str) -> None:
    from types import SimpleNamespace

    from spotserve.worker.cli import check_device

    torch = SimpleNamespace(
        __version__="2.13.0", backends=SimpleNamespace(cuda=SimpleNamespace(
            is_built=lambda: built)),
        cuda=SimpleNamespace(is_available=lambda: count > 0, device_count=lambda: count))
    with pytest.raises(SpotserveError, match=words.replace("(", r"\(").replace(")", r"\)")):
        check_device(device, torch)
    check_device("cpu", torch)
