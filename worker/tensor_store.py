"""The bytes a worker can serve to its peers: held weight tensors, sliced on request.

Tensors are kept as raw bytes with their dtype name and logical shape, so bf16 and any
other dtype travel the same way and this module needs no torch. A slice along the last
dimension is strided and is copied; any other slice is a view.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spotserve.model_spec import DTYPE_BYTES
from spotserve.v1 import common_pb2
from spotserve.worker.transfer import Blob


class SliceError(ValueError):
    """A requested slice this worker does not hold (unknown tensor or out of range)."""


@dataclass(frozen=True)
class HeldTensor:
    """A tensor (or the slice of it this worker holds) as raw bytes.

    `offset` is where the held rows/columns start along `dim` in the full tensor."""

    dtype: str
    shape: tuple[int, ...]
    raw: np.ndarray  # uint8, shape (*shape[:-1], shape[-1] * itemsize)
    dim: int = -1
    offset: int = 0

    @classmethod
    def from_bytes(cls, dtype: str, shape: tuple[int, ...], data: bytes | memoryview | np.ndarray,
                   dim: int = -1, offset: int = 0) -> HeldTensor:
        item = DTYPE_BYTES[dtype]
        flat = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
        raw = flat.reshape(*shape[:-1], shape[-1] * item)
        return cls(dtype, tuple(shape), raw, dim, offset)

    def select(self, want: common_pb2.TensorSlice) -> Blob:
        if want.dim < 0:
            if self.dim >= 0:
                raise SliceError(f"{want.tensor}: only a slice along dim {self.dim} is held")
            return Blob(self.dtype, self.shape, self.raw.data.cast("B"))
        if want.dim >= len(self.shape):
            raise SliceError(f"{want.tensor}: dim {want.dim} out of range for shape {self.shape}")
        held_dim = want.dim if self.dim < 0 else self.dim
        if held_dim != want.dim:
            raise SliceError(f"{want.tensor}: held along dim {self.dim}, asked along {want.dim}")
        lo, hi = want.start - self.offset, want.stop - self.offset
        if not 0 <= lo < hi <= self.shape[want.dim]:
            held = (self.offset, self.offset + self.shape[want.dim])
            raise SliceError(f"{want.tensor}: [{want.start}, {want.stop}) along dim {want.dim} is "
                             f"outside the held [{held[0]}, {held[1]})")
        item = DTYPE_BYTES[self.dtype] if want.dim == len(self.shape) - 1 else 1
        index = [slice(None)] * len(self.shape)
        index[want.dim] = slice(lo * item, hi * item)
        part = np.ascontiguousarray(self.raw[tuple(index)])
        shape = tuple(hi - lo if i == want.dim else n for i, n in enumerate(self.shape))
        return Blob(self.dtype, shape, part.data.cast("B"))


class TensorStore:
    """Name → held tensor. The worker registers what it loads; peers pull from it."""

    def __init__(self) -> None:
        self._tensors: dict[str, HeldTensor] = {}

    def put(self, name: str, tensor: HeldTensor) -> None:
        self._tensors[name] = tensor

    def drop(self, name: str) -> None:
        self._tensors.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def select(self, want: common_pb2.TensorSlice) -> Blob:
        held = self._tensors.get(want.tensor)
        if held is None:
            raise SliceError(f"tensor {want.tensor!r} is not held by this worker")
        return held.select(want)
