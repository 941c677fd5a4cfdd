"""`spotserve router`: bad arguments are one line on stderr and exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from spotserve.errors import SpotserveError
from spotserve.operator.router.cli import parse_pipeline


def _router(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spotserve.cli", "router", *args],
                          capture_output=True, text=True, timeout=60)


def test_parse_pipeline() -> None:
    assert parse_pipeline("p0=127.0.0.2:5000") == ("p0", "127.0.0.2:5000", 1.0)
    assert parse_pipeline("p1=h:1@2.5") == ("p1", "h:1", 2.5)
    for bad in ("p0", "=h:1", "p0=nohost", "p0=h:1@fast"):
        with pytest.raises(SpotserveError, match="--pipeline"):
            parse_pipeline(bad)


def test_missing_model_dir_is_one_line_exit_2(tmp_path: Path) -> None:
    out = _router("--model", str(tmp_path / "nope"))
    assert out.returncode == 2 and "no such directory" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_model_dir_without_tokenizer_is_one_line_exit_2(tmp_path: Path) -> None:
    out = _router("--model", str(tmp_path), "--pipeline", "p0=127.0.0.1:1")
    assert out.returncode == 2 and "tokenizer.json" in out.stderr
    assert "Traceback" not in out.stderr
