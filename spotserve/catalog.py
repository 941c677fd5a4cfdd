"""GPU types and cloud instance types: memory, peak FLOP/s, bandwidths, on-demand price.

The built-in table lives in `spotserve/data/catalog.yaml`; `Catalog.load(path)` layers a
user file on top (same format, same-named entries replace built-ins).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from spotserve.errors import SpotserveError

GIB = 1024**3


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_gib: float
    fp16_tflops: float
    fp32_tflops: float
    hbm_gbps: float

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    def peak_flops(self, dtype: str) -> float:
        """Dense peak FLOP/s for matrix math in `dtype` (bf16 counts as fp16)."""
        return (self.fp32_tflops if dtype == "float32" else self.fp16_tflops) * 1e12

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_gbps * 1e9


@dataclass(frozen=True)
class InstanceType:
    name: str
    gpu: GPUSpec
    gpus: int
    nic_gbps: float
    intra_node_gbps: float
    price: float  # on-demand USD per hour

    @property
    def nic_bytes_per_s(self) -> float:
        return self.nic_gbps * 1e9 / 8

    @property
    def intra_node_bytes_per_s(self) -> float:
        return self.intra_node_gbps * 1e9


@dataclass(frozen=True)
class Catalog:
    gpus: Mapping[str, GPUSpec]
    instances: Mapping[str, InstanceType]

    @classmethod
    def load(cls, path: str | Path | None = None) -> Catalog:
        data = _builtin()
        if path is not None:
            extra = _read_yaml(Path(path))
            for section in ("gpus", "instances"):
                data[section] = {**data.get(section, {}), **(extra.get(section) or {})}
        return _parse(data, str(path or "built-in catalog"))

    def gpu(self, name: str) -> GPUSpec:
        spec = self.gpus.get(name) or _case_insensitive(self.gpus, name)
        if spec is None:
            raise SpotserveError(f"unknown GPU type {name!r}; known: {', '.join(self.gpus)}")
        return spec

    def instance(self, name: str) -> InstanceType:
        spec = self.instances.get(name)
        if spec is None:
            raise SpotserveError(f"unknown instance type {name!r}; known: "
                                 f"{', '.join(self.instances)}")
        return spec

    def instances_with(self, gpu: str, gpus: int | None = None) -> list[InstanceType]:
        """Instance types carrying `gpu` (and exactly `gpus` of them, when given)."""
        name = self.gpu(gpu).name
        return [i for i in self.instances.values()
                if i.gpu.name == name and (gpus is None or i.gpus == gpus)]


def _case_insensitive(table: Mapping[str, GPUSpec], name: str) -> GPUSpec | None:
    lowered = {k.lower(): v for k, v in table.items()}
    return lowered.get(name.lower())


def _builtin() -> dict[str, Any]:
    text = resources.files("spotserve").joinpath("data/catalog.yaml").read_text()
    data: dict[str, Any] = yaml.safe_load(text)
    return data


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpotserveError(f"{path}: no such catalog file") from None
    except yaml.YAMLError as exc:
        raise SpotserveError(f"{path}: malformed YAML: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise SpotserveError(f"{path}: expected a mapping with 'gpus' and/or 'instances'")
    return data


def _number(where: str, entry: Mapping[str, Any], key: str) -> float:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise SpotserveError(f"{where}: {key} must be a positive number (got {value!r})")
    return float(value)


def _parse(data: Mapping[str, Any], source: str) -> Catalog:
    gpus: dict[str, GPUSpec] = {}
    for name, entry in (data.get("gpus") or {}).items():
        where = f"{source}: gpus.{name}"
        gpus[name] = GPUSpec(name, *(_number(where, entry, k) for k in
                                     ("memory_gib", "fp16_tflops", "fp32_tflops", "hbm_gbps")))
    instances: dict[str, InstanceType] = {}
    for name, entry in (data.get("instances") or {}).items():
        where = f"{source}: instances.{name}"
        if entry.get("gpu") not in gpus:
            raise SpotserveError(f"{where}: unknown gpu {entry.get('gpu')!r}")
        instances[name] = InstanceType(
            name, gpus[entry["gpu"]], int(_number(where, entry, "gpus")),
            _number(where, entry, "nic_gbps"), _number(where, entry, "intra_node_gbps"),
            _number(where, entry, "price"))
    return Catalog(gpus, instances)
