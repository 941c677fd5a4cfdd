"""Local-mode worker processes die with the process that started them, however it dies."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spotserve.lifetime import DIE_WITH_PARENT_ENV

ROOT = Path(__file__).resolve().parents[2]
CHILD = ("from spotserve.lifetime import die_with_parent_if_asked\n"
         "die_with_parent_if_asked()\n"
         "import time; time.sleep(60)\n")
# a parent that starts the child, reports its pid, then is SIGKILLed (no clean-up runs)
PARENT = ("import os, signal, subprocess, sys\n"
          "env = {**os.environ, sys.argv[2]: str(os.getpid()) if sys.argv[3] == 'yes' else ''}\n"
          "child = subprocess.Popen([sys.executable, '-c', sys.argv[1]], env=env,\n"
          "                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
          "print(child.pid, flush=True)\n"
          "import time; time.sleep(1.0)\n"
          "os.kill(os.getpid(), signal.SIGKILL)\n")


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status  # a zombie is dead, waiting for init to reap it


def _orphan(asked: bool) -> int:
    out = subprocess.run([sys.executable, "-c", PARENT, CHILD, DIE_WITH_PARENT_ENV,
                          "yes" if asked else "no"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return int(out.stdout.split()[0])


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_child_that_asks_dies_with_its_killed_parent() -> None:
    pid = _orphan(asked=True)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only")
def test_without_the_variable_the_child_lives_on() -> None:
    pid = _orphan(asked=False)
    try:
        time.sleep(0.5)
        assert _alive(pid)
    finally:
        os.kill(pid, 9)
