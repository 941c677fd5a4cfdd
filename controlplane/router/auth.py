"""Bearer tokens: the shared internal token (Control, and calls to workers) and the
optional API keys of the public side."""

from __future__ import annotations

import hmac
from collections.abc import Iterable


class BearerCheck:
    """Accept `Bearer <key>` for any of the keys; accept everything when there are none."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def allows(self, authorization: str | None) -> bool:
        if not self._keys:
            return True
        if not authorization or not authorization.startswith("Bearer "):
            return False
        given = authorization[len("Bearer "):].strip().encode()
        return any(hmac.compare_digest(given, key) for key in self._keys)
