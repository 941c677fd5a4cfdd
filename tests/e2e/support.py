"""Local-mode runs for the e2e tests: a tiny random Llama, the real router, controller and
`spotserve worker` processes on 127.0.0.x, a compressed trace and a steady request stream.
Every run stops everything it started, also when it fails."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from spotserve.operator.local.cloud import Script, script
from spotserve.operator.local.runner import RunOptions, RunResult, run_local
from spotserve.operator.local.tiny_model import build_tiny_llama
from spotserve.traces import Trace, TraceEvent

RATE, MAX_TOKENS = 4.0, 128


def trace(*events: tuple[float, str, tuple[str, ...]], end: float) -> Trace:
    return Trace(tuple(TraceEvent(t, kind, nodes) for t, kind, nodes in events), end, "test")


def run(tmp: Path, cloud: Script, *, restart_at: float | None = None,
        grace: float = 8.0) -> RunResult:
    model = build_tiny_llama(tmp / "model")
    options = RunOptions(model_dir=model, workdir=tmp / "run", script=cloud, grace=grace,
                         rate=RATE, max_tokens=MAX_TOKENS, restart_at=restart_at,
                         progress_every=1e9)
    return asyncio.run(asyncio.wait_for(run_local(options), 240))


def local_script(t: Trace, no_notice: Sequence[str] = (), grace: float = 8.0) -> Script:
    return script(t, 1.0, grace, no_notice)


def entries(result: RunResult, kind: str) -> list[dict[str, object]]:
    return [e for e in result.journal if e["kind"] == kind]
