"""Load one position's weight slices from a Hugging Face checkpoint folder.

The folder holds `config.json` and either `model.safetensors` or shards listed by
`model.safetensors.index.json`. Only the slices `position_slices` assigns to the position
are read, through safetensors' lazy slicing, so a GPU never materialises tensors (or
parts of tensors) it does not hold. A slice is read into host memory (pinned, for a GPU)
and copied into its parameter before the next is read: the device holds one copy of the
weights, the host one tensor at a time.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from spotserve.errors import SpotserveError
from spotserve.layout import ParallelConfig, Position, TensorSlice
from spotserve.model_spec import ModelSpec
from spotserve.worker.model.decoder import TORCH_DTYPES, StageModel
from spotserve.worker.model.parallel import TensorParallel

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name → the safetensors file holding it."""
    index = folder / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise SpotserveError(f"{index}: not a safetensors index ({exc})") from None
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / SINGLE_FILE
    if not single.exists():
        raise SpotserveError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def read_slices(folder: Path, slices: tuple[TensorSlice, ...], dtype: torch.dtype,
                device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Read each slice (and nothing more) from the checkpoint, cast to `dtype`."""
    return {name: tensor.to(device) for name, tensor in iter_slices(folder, slices, dtype)}


def iter_slices(folder: Path, slices: tuple[TensorSlice, ...], dtype: torch.dtype,
                pin: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Each slice as a host tensor of `dtype` (pinned with `pin`), one at a time."""
    files = weight_files(folder)
    by_file: dict[Path, list[TensorSlice]] = defaultdict(list)
    for piece in slices:
        if piece.tensor not in files:
            raise SpotserveError(f"{folder}: checkpoint has no tensor {piece.tensor!r}")
        by_file[files[piece.tensor]].append(piece)
    for file, pieces in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for piece in pieces:
                lazy = f.get_slice(piece.tensor)
                if piece.dim is None:
                    tensor = lazy[:]
                else:
                    index = [slice(None)] * len(lazy.get_shape())
                    index[piece.dim] = slice(piece.start, piece.stop)
                    tensor = lazy[tuple(index)]
                tensor = tensor.to(dtype)
                yield piece.tensor, tensor.pin_memory() if pin else tensor


def load_stage(folder: str | Path, config: ParallelConfig, position: Position, *,
               dtype: str | None = None, tp: TensorParallel | None = None,
               device: torch.device | str = "cpu", reuse: StageModel | None = None
               ) -> StageModel:
    """Build the stage model for `position` and fill it from the checkpoint (but for what
    it takes over from `reuse`, the previous stage of this checkpoint)."""
    folder = Path(folder)
    spec = ModelSpec.from_hf_config(folder, dtype=dtype)
    if not spec.is_llama_family:
        raise SpotserveError(f"{folder}: family {spec.family!r} cannot be served by the engine")
    config.validate(spec)
    model = StageModel(spec, config, position, tp, device, reuse)
    wanted = tuple(s for s in model.slices if s.tensor not in model.reused)
    load_into(model, iter_slices(folder, wanted, TORCH_DTYPES[spec.dtype],
                                 pin=model.device.type == "cuda"))
    return model.eval()


def load_into(model: StageModel,
              tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy named tensors into the model's parameters; every parameter it has not taken
    over from a previous stage must be given (one given for a taken-over one is ignored).
    Copied, never swapped in: fused projections' parameters are views of one buffer."""
    params = dict(model.named_parameters())
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    given: set[str] = set()
    with torch.no_grad():
        for name, tensor in items:
            if name in model.reused:
                continue
            if name not in params:
                raise SpotserveError(f"weights do not match the stage: unexpected {name!r}")
            if params[name].shape != tensor.shape:
                raise SpotserveError(f"{name}: checkpoint slice {tuple(tensor.shape)} does not "
                                     f"fit {tuple(params[name].shape)}")
            params[name].copy_(tensor, non_blocking=tensor.is_pinned())
            given.add(name)
    missing = sorted(set(params) - given - model.reused)
    if missing:
        raise SpotserveError(f"weights do not match the stage: missing {missing[:3]}")


def copy_on_device(model: StageModel, pieces: Sequence[tuple[TensorSlice, TensorSlice]],
                   held: Mapping[str, tuple[TensorSlice, torch.Tensor]]) -> int:
    """Fill each (slice, piece) of `model` from `held` (name → the slice a previous stage
    held and its tensor, on the same device): a device-to-device copy. The bytes copied."""
    params = dict(model.named_parameters())
    total = 0
    with torch.no_grad():
        for want, piece in pieces:
            old, source = held[piece.tensor]
            dest: torch.Tensor = params[want.tensor]
            if want.dim is not None:
                size = piece.stop - piece.start
                dest = dest.narrow(want.dim, piece.start - want.start, size)
                source = source.narrow(want.dim, piece.start - (old.start if old.dim is not None
                                                                 else 0), size)
            dest.copy_(source)
            total += dest.numel() * dest.element_size()
    return total
