"""What the e2e tests read of a local-mode run."""

from __future__ import annotations

from spotserve.operator.local.runner import RunResult


def entries(result: RunResult, kind: str) -> list[dict[str, object]]:
    """The controller's journal entries of one kind, in order."""
    return [e for e in result.journal if e["kind"] == kind]
