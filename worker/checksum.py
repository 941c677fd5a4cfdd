"""CRC-32 (zlib's polynomial) of the bytes workers send each other.

zlib-ng computes it with carry-less multiplication at about 50 GB/s on one x86 core; the
standard library's zlib manages about 4 GB/s, which on both ends of a transfer costs more
CPU than moving the bytes does. Both give the same values, so peers may mix them.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["IMPLEMENTATION", "crc32"]


class _Crc32(Protocol):
    def __call__(self, data: Any, value: int = 0, /) -> int: ...


crc32: _Crc32
try:
    from zlib_ng.zlib_ng import crc32
    IMPLEMENTATION = "zlib-ng"
except ImportError:  # pragma: no cover - zlib-ng comes with the worker extra
    from zlib import crc32
    IMPLEMENTATION = "zlib"
