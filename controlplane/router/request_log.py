"""The router's request log: one JSON line per finished request (`--request-log FILE`).

What a user of a service on spot capacity wants to see per request: how it ended, how
many tokens, how long it took, and every interruption on the way (when its stream broke,
on which pipeline, how it resumed and after how many committed tokens). Times are Unix
seconds. Lines are appended and flushed one by one, so a reader may follow the file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TextIO

from .commit_log import CommitLog


class RequestLog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._out: TextIO = path.open("a", buffering=1)
        # the commit log stamps interruptions with time.monotonic(): map them to Unix time
        self._offset = time.time() - time.monotonic()

    def write(self, log: CommitLog, finish: str, arrived: float) -> None:
        now = time.monotonic()
        self._out.write(json.dumps({
            "id": log.request_id, "finish": finish, "prompt_tokens": len(log.prompt_token_ids),
            "completion_tokens": log.committed,
            "arrived": round(arrived + self._offset, 3), "ended": round(now + self._offset, 3),
            "resumes": [{"mode": r.mode, "on": r.pipeline_id, "committed": r.committed,
                         "interrupted_on": r.interrupted_on,
                         "interrupted_at": round(r.interrupted_at + self._offset, 3)}
                        for r in log.resumes]}) + "\n")

    def close(self) -> None:
        self._out.close()
