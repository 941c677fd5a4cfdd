"""The `spotserve` command: help, model-info, and one-line errors with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def spotserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spotserve.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_help_lists_subcommands() -> None:
    out = spotserve("--help")
    assert out.returncode == 0
    assert "model-info" in out.stdout and "spot" in out.stdout


def test_model_info_prints_spec_and_min_gpus() -> None:
    out = spotserve("model-info", "llama-3.1-8b")
    assert out.returncode == 0, out.stderr
    assert "8.03 B" in out.stdout and "KV per token" in out.stdout and "H100" in out.stdout
    data = json.loads(spotserve("model-info", "30b", "--json").stdout)
    assert data["name"] == "opt-30b" and data["min_gpus"]["T4"] >= 8


@pytest.mark.parametrize(("setup", "message"), [
    (None, "no such file"),
    ("{oops", "malformed JSON"),
    ('{"architectures": ["BertModel"]}', "unsupported architecture"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, setup: str | None,
                                           message: str) -> None:
    path = tmp_path / "config.json"
    if setup is not None:
        path.write_text(setup)
    out = spotserve("model-info", str(path))
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_unknown_flag_exits_2() -> None:
    out = spotserve("model-info", "--frobnicate")
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_a_missing_extra_is_named_not_a_traceback() -> None:
    code = ("import sys, spotserve.cli as c\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'torch':\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "sys.exit(c.main(['profile', '--model', '/nonexistent']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr
    assert "spotserve[worker]" in out.stderr and "Traceback" not in out.stderr


def test_every_option_of_every_command_explains_itself() -> None:
    """`spotserve COMMAND --help` says what each option does (issue 15, item 10)."""
    import argparse

    from spotserve.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    silent = [f"{name} {'/'.join(action.option_strings) or action.dest}"
              for name, child in sub.choices.items() for action in child._actions
              if not isinstance(action, argparse._HelpAction) and not action.help]
    assert not silent, silent


def test_log_levels_take_either_case_and_refuse_others() -> None:
    from spotserve.cli import build_parser

    args = build_parser("router").parse_args(["router", "--model", "m", "--log-level",
                                               "warning"])
    assert args.log_level == "WARNING"   # the chart's values are lower case
    with pytest.raises(SystemExit):
        build_parser("router").parse_args(["router", "--model", "m", "--log-level", "loud"])


def test_up_passes_its_queue_and_concurrency_to_its_router(tmp_path: Path) -> None:
    from spotserve.cli import build_parser
    from spotserve.operator.local.router_process import router_args

    up = build_parser("up").parse_args(["up", "--local"])
    assert (up.max_queue, up.max_concurrency) == (512, 8)  # local mode's defaults
    argv = router_args(tmp_path, "127.0.0.1:0", "127.0.0.1:0", tmp_path / "log",
                       max_queue=40, max_concurrency=3)
    router = build_parser("router").parse_args(argv)
    assert (router.max_queue, router.max_concurrency) == (40, 3)
