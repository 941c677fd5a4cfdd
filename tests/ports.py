"""Free loopback ports for tests that need fixed ones."""

from __future__ import annotations

import socket
from collections.abc import Sequence


def free_port_range(hosts: Sequence[str], count: int = 1, tries: int = 100) -> int:
    """A port P such that P .. P + count - 1 are free on every one of `hosts`."""
    for _ in range(tries):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            base = int(s.getsockname()[1])
        if base + count > 65535:
            continue
        try:
            for host in hosts:
                for port in range(base, base + count):
                    with socket.socket() as s:
                        s.bind((host, port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {count} free consecutive ports on {', '.join(hosts)}")
