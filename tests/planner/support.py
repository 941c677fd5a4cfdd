"""Builders shared by the planner tests: a tiny model, small pools, uniform placements."""

from __future__ import annotations

from spotserve.catalog import Catalog, GPUSpec, InstanceType
from spotserve.layout import ParallelConfig
from spotserve.model_spec import ModelSpec
from spotserve.operator.planner import Instance, map_devices

CATALOG = Catalog.load()
T4X4 = CATALOG.instance("g4dn.12xlarge")


def tiny_model(layers: int = 4) -> ModelSpec:
    return ModelSpec(name="tiny", family="llama", hidden_size=32, intermediate_size=48,
                     num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=8,
                     vocab_size=40, max_position=64, dtype="float32")


def small_type(name: str, gpus: int, memory_gib: float = 16.0, tflops: float = 10.0,
               price: float = 1.0) -> InstanceType:
    gpu = GPUSpec(f"{name}-gpu", memory_gib, tflops, tflops, 300.0)
    return InstanceType(name, gpu, gpus, 25.0, 10.0, price)


def pool(itype: InstanceType, count: int, prefix: str = "n",
         states: dict[int, str] | None = None) -> list[Instance]:
    states = states or {}
    return [Instance(f"{prefix}{i}", itype, state=states.get(i, "running"))
            for i in range(count)]


def place(model: ModelSpec, config: ParallelConfig, instances: list[Instance]):  # type: ignore[no-untyped-def]
    """A cold placement of `config` (what a previous plan would have produced)."""
    return map_devices(model, config, instances).placement
