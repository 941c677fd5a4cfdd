"""`spotserve plan`: examples, the paper's shorthand, JSON output, errors, determinism."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from spotserve.cli import main

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples" / "plan").glob("*.yaml"))


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main(["plan", *argv, "--json"]) == 0
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    return out


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_plans(example: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(example)]) == 0
    summary = capsys.readouterr().out
    assert "latency" in summary and "migration" in summary
    plan = run_json(capsys, str(example))
    assert set(plan["config"]) >= {"D", "P", "M", "B"}
    assert plan["meets_rate"]
    for key in ("pipelines", "mapping", "transfers", "migration_seconds", "arrangement"):
        assert key in plan
    assert sum(p["weight"] for p in plan["pipelines"]) == pytest.approx(1.0, abs=1e-4)
    gpus = [g for p in plan["pipelines"] for s in p["stages"] for g in s["gpus"]]
    assert len(gpus) == len(set(gpus)) == len(plan["mapping"]["positions"])


def test_paper_shorthand(reference_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile = reference_dir / "profiles" / "megatron_h6144_profile.json"
    plan = run_json(capsys, "--model", "20b", "--gpu", "T4", "--instances", "8",
                    "--gpus-per-instance", "4", "--rate", "0.4", "--profile", str(profile),
                    "--min-gpus-per-replica", "12", "--max-batch", "4")
    assert plan["config"] == {"D": 2, "P": 2, "M": 8, "B": 4, "M1": 4, "M2": 1,
                              "uniform": True}
    assert plan["cost_model"] == "profile" and plan["meets_rate"]
    short = run_json(capsys, "--model", "20b", "--gpu", "T4", "--instances", "4",
                     "--gpus-per-instance", "4", "--rate", "0.4", "--profile", str(profile),
                     "--min-gpus-per-replica", "12")
    assert not short["meets_rate"]
    assert short["extra"] == {"instances": 2, "type": "g4dn.12xlarge", "capacity": "on-demand"}


@pytest.mark.parametrize("stem", ["preemption", "heterogeneous"])
def test_output_is_deterministic(stem: str, capsys: pytest.CaptureFixture[str]) -> None:
    example = next(p for p in EXAMPLES if p.stem == stem)
    assert run_json(capsys, str(example)) == run_json(capsys, str(example))


def test_preemption_keeps_kv_and_decodes_just_in_time(capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    plan = run_json(capsys, str(next(p for p in EXAMPLES if p.stem == "preemption")))
    assert "node-1" not in json.dumps(plan["pipelines"])
    assert {"new_pipeline": 1, "old_pipeline": 1} in plan["mapping"]["inherits"] or any(
        i["old_pipeline"] == 1 for i in plan["mapping"]["inherits"])
    urgent = [t for t in plan["transfers"] if t["urgent"]]
    assert urgent and all(t["src"].startswith("node-1/") for t in urgent)
    assert plan["transfers"][:len(urgent)] == urgent
    (arr,) = plan["arrangement"]
    assert arr["pipeline"] == 1
    assert arr["steps"] * 0.045 + plan["migration_seconds"] <= 30


def test_lost_instances_requeue_their_requests(capsys: pytest.CaptureFixture[str]) -> None:
    plan = run_json(capsys, str(next(p for p in EXAMPLES if p.stem == "scale-in")))
    assert plan["requeued_pipelines"] == [1]
    assert all(t["src"] is None or not t["src"].startswith("node-3/")
               for t in plan["transfers"])


def test_a_plan_fed_back_as_current_moves_nothing(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    example = next(p for p in EXAMPLES if p.stem == "cold-start")
    first = run_json(capsys, str(example))
    data = yaml.safe_load(example.read_text())
    data["current"] = {"batch": first["config"]["B"], "pipelines": first["pipelines"]}
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(data))
    second = run_json(capsys, str(again))
    assert second["pipelines"] == first["pipelines"]
    assert second["transfers"] == [] and second["migration_seconds"] == 0
    assert second["mapping"]["reused_weight_bytes"] > 0


def test_nothing_fits_exits_1_and_says_what_would(reference_dir: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    profile = reference_dir / "profiles" / "megatron_h7168_profile.json"
    argv = ["plan", "--model", "30b", "--gpu", "T4", "--instances", "3", "--gpus-per-instance",
            "4", "--rate", "0.2", "--profile", str(profile), "--min-gpus-per-replica", "16"]
    assert main(argv) == 1
    assert "1 more on-demand g4dn.12xlarge instance(s)" in capsys.readouterr().out


def test_tp_can_be_kept_inside_instances(reference_dir: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    profile = reference_dir / "profiles" / "megatron_h6144_profile.json"
    plan = run_json(capsys, "--model", "20b", "--gpu", "T4", "--instances", "8",
                    "--gpus-per-instance", "4", "--rate", "0.4", "--profile", str(profile),
                    "--min-gpus-per-replica", "12", "--tp-within-instance")
    assert plan["config"]["M"] <= 4 and plan["meets_rate"]
    for pipe in plan["pipelines"]:
        for stage in pipe["stages"]:
            assert len({g.split("/")[0] for g in stage["gpus"]}) == 1


def test_a_profile_only_costs_its_own_gpu(reference_dir: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    profile = reference_dir / "profiles" / "megatron_6.7B_profile.json"
    argv = ["plan", "--model", "6.7b", "--gpu", "A10G", "--instances", "3",
            "--gpus-per-instance", "4", "--profile", str(profile)]
    assert main(argv) == 2
    assert "cannot cost A10G" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--model", "nope", "--gpu", "T4", "--instances", "2", "--gpus-per-instance", "4"],
     "unknown model"),
    (["--model", "6.7b", "--gpu", "T4"], "--instances"),
    (["--model", "6.7b", "--gpu", "T4", "--instances", "2", "--gpus-per-instance", "3"],
     "no catalog instance type"),
    (["missing.yaml"], "no such plan input"),
])
def test_bad_input_is_one_line_and_exit_2(argv: list[str], message: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("doc,message", [
    ("model: 6.7b\ncluster: {instances: [{type: nope}]}", "unknown instance type"),
    ("model: 6.7b\nbogus: 1\ncluster: {instances: []}", "unknown key"),
    ("model: 6.7b\ncluster: {instances: [{type: g4dn.12xlarge, state: gone}]}", "state"),
    ("model: 6.7b\nrate: -1\ncluster: {instances: [{type: g4dn.12xlarge}]}", "rate"),
    ("model: 6.7b\ncluster: {instances: [{type: g4dn.12xlarge, name: a}]}\n"
     "current: {pipelines: [{stages: [{layers: [0, 32], gpus: [b/0]}]}]}", "no listed instance"),
    ("model: 6.7b\ncluster: {instances: [{type: g4dn.12xlarge, name: a}]}\n"
     "current: {pipelines: [{stages: [{layers: [0, 30], gpus: [a/0]}]}]}", "covers 30 of 32"),
    ("[1, 2", "malformed"),
    ("model: 6.7b\ncluster: {instances: [{type: g4dn.12xlarge, name: a}]}\n"
     "current: {pipelines: [{stages: [{layers: [0, 32], gpus: [a/0]}], "
     "progress: {cached_tokens: lots}}]}", "malformed entry"),
    ("model: 6.7b\ncluster: {instances: [{type: g4dn.12xlarge, spot_price: cheap}]}",
     "spot_price"),
])
def test_bad_plan_files_are_one_line_and_exit_2(doc: str, message: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(doc)
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
