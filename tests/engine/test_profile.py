"""`spotserve profile` writes a profile the planner's cost model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spotserve.cli import main
from tests.engine.tiny_models import save_tiny


def test_profile_writes_a_planner_profile(tmp_path: Path) -> None:
    folder = save_tiny(tmp_path / "m", "llama")
    out = tmp_path / "profile.json"
    code = main(["profile", "--model", str(folder), "--tp", "1,2,3", "--batch", "1,2",
                 "--seq-in", "8", "--repeats", "1", "--device", "cpu", "--out", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert set(data) >= {"tp-1", "tp-2", "embed", "pp_init_comm", "pp_incr_comm", "layer_num"}
    assert "tp-3" not in data and data["max_tp"] == 2
    assert all(v["init"] > 0 and v["incr"] > 0 for v in data["tp-2"].values())
    planner = pytest.importorskip("spotserve.operator.planner.profile_table")
    table = planner.ProfileTable.load(out)
    assert table.tp_degrees == (1, 2) and table.layer_num == 4


def test_profile_rejects_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--model", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["profile", "--model", "x", "--tp", "0"])
