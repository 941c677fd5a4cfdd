"""`spotserve simulate` end to end: reports on disk, and bad input as one line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def simulate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spotserve.cli", "simulate", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture()
def tiny_trace(tmp_path: Path) -> Path:
    path = tmp_path / "trace.txt"
    path.write_text('[0, "add", {"nodes": ["node-0", "node-1", "node-2"]}]\n'
                    '[200000, "remove", {"nodes": ["node-1"]}]\n'
                    '[400000, "DONE", {"nodes": []}]\n')
    return path


def test_writes_json_markdown_and_plots(tmp_path: Path, tiny_trace: Path,
                                        reference_dir: Path) -> None:
    out = tmp_path / "out"
    done = simulate("--model", "6.7b", "--trace", str(tiny_trace), "--rate", "1.0",
                    "--profile", str(reference_dir / "profiles" / "megatron_6.7B_profile.json"),
                    "--min-gpus-per-replica", "4", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "| spotserve |" in done.stdout and "| reroute |" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert [e["approach"] for e in report["approaches"]] == ["spotserve", "reparallelize",
                                                              "reroute", "ondemand"]
    assert (out / "report.md").read_text().startswith("| approach |")
    for name in ("latency.png", "timeline.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_json_to_stdout_with_the_roofline_model(tiny_trace: Path) -> None:
    done = simulate("--model", "6.7b", "--trace", str(tiny_trace), "--rate", "0.5",
                    "--approach", "spotserve", "--json", "--seed", "3")
    assert done.returncode == 0, done.stderr
    entry = json.loads(done.stdout)["approaches"][0]
    assert entry["approach"] == "spotserve" and entry["completed"] == entry["requests"] > 0


@pytest.mark.parametrize("args, message", [
    (["--trace", "{missing}", "--rate", "1"], "no such trace file"),
    (["--trace", "{bad}", "--rate", "1"], "bad.csv:1: event must be add or remove"),
    (["--trace", "{trace}", "--rate", "-1"], "--rate must be positive"),
    (["--trace", "{trace}", "--rate", "1", "--cv", "0"], "--cv must be positive"),
    (["--trace", "{trace}", "--rate", "1", "--disk-gb-per-s", "0"],
     "--disk-gb-per-s must be positive"),
    (["--trace", "{trace}", "--rate", "1", "--nic-gbps", "-5"], "--nic-gbps must be positive"),
    (["--trace", "{trace}", "--rate", "1", "--engine-start", "-1"],
     "--engine-start must not be negative"),
    (["--trace", "{trace}", "--queries", "{missing}"], "no such query file"),
    (["--trace", "{trace}", "--rate", "1", "--approach", "magic"], "unknown approach"),
    (["--trace", "{trace}", "--rate", "1", "--prices", "g4dn"], "--prices: expected"),
    (["--trace", "{trace}", "--rate", "1", "--profile", "{missing}"], "no such profile"),
    (["--trace", "{trace}", "--rate", "1", "--instance-type", "z9.huge"], "unknown instance"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, tiny_trace: Path, args: list[str],
                                          message: str) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("0,explode,node-0\n")
    paths = {"missing": str(tmp_path / "nope"), "bad": str(bad), "trace": str(tiny_trace)}
    done = simulate("--model", "6.7b", *[a.format(**paths) for a in args])
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert lines[0].startswith("spotserve simulate: error:")
