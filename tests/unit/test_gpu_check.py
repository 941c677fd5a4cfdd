"""The prepared GPU check (bench/gpu/check.sh) passes its CPU dry run: the same script a
person runs on a GPU machine, with small shapes and the GPU tests skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_gpu_check_passes_its_cpu_dry_run(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu" / "check.sh"), "--dry-run"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=580)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu-check.json").read_text())
    assert summary["dry_run"] is True
    assert {p["part"]: p["status"] for p in summary["parts"]} == {
        "gpu-tests": "passed", "engine": "passed", "launches": "passed", "promise": "passed"}
    rows = json.loads((tmp_path / "engine.json").read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["ours_tok_s"] > 0 and r["hf_tok_s"] > 0 and r["graphs_tok_s"] > 0
               for r in rows)
    counts = json.loads((tmp_path / "launches.json").read_text())
    assert all(r["ops"] > 0 and r["host_tensors"] == 1 for r in counts)
    promise = json.loads((tmp_path / "promise.json").read_text())
    assert promise["bfloat16"]["vs_fp32"]["max"] < 1.0
