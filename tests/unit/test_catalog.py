"""GPU and instance catalog: built-ins, YAML overrides, bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from spotserve.catalog import Catalog
from spotserve.errors import SpotserveError
from spotserve.memory import min_gpus
from spotserve.models import builtin_models


def test_builtin_catalog_has_the_common_spot_gpus() -> None:
    catalog = Catalog.load()
    for gpu in ("T4", "A10G", "L4", "L40S", "A100-40GB", "A100-80GB", "H100", "H200"):
        assert catalog.gpu(gpu).memory_bytes > 0
    paper = catalog.instance("g4dn.12xlarge")
    assert (paper.gpu.name, paper.gpus, paper.price) == ("T4", 4, 3.912)
    assert paper.nic_bytes_per_s == 50e9 / 8
    assert catalog.gpu("t4") is catalog.gpu("T4")
    assert {i.name for i in catalog.instances_with("L4", 4)} == {"g6.12xlarge"}


def test_yaml_override_replaces_and_extends(tmp_path: Path) -> None:
    path = tmp_path / "cat.yaml"
    path.write_text("gpus:\n  MI300X: {memory_gib: 192, fp16_tflops: 1307, fp32_tflops: 163,"
                    " hbm_gbps: 5300}\ninstances:\n  g4dn.12xlarge: {gpu: T4, gpus: 4,"
                    " nic_gbps: 50, intra_node_gbps: 12, price: 3.0}\n"
                    "  mi.8x: {gpu: MI300X, gpus: 8, nic_gbps: 400, intra_node_gbps: 900,"
                    " price: 40}\n")
    catalog = Catalog.load(path)
    assert catalog.instance("g4dn.12xlarge").price == 3.0
    assert catalog.instance("mi.8x").gpu.memory_gib == 192
    assert catalog.gpu("H100").memory_gib == 80  # built-ins kept


@pytest.mark.parametrize(("text", "message"), [
    ("gpus: [1, 2", "malformed YAML"),
    ("- a list", "expected a mapping"),
    ("instances:\n  x: {gpu: Z80, gpus: 1, nic_gbps: 1, intra_node_gbps: 1, price: 1}",
     "unknown gpu 'Z80'"),
    ("gpus:\n  X: {memory_gib: -1, fp16_tflops: 1, fp32_tflops: 1, hbm_gbps: 1}",
     "memory_gib must be a positive number"),
])
def test_bad_catalog_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "cat.yaml"
    path.write_text(text)
    with pytest.raises(SpotserveError, match=message):
        Catalog.load(path)


def test_unknown_names_list_the_known_ones() -> None:
    with pytest.raises(SpotserveError, match="known: T4"):
        Catalog.load().gpu("V100")
    with pytest.raises(SpotserveError, match="no such catalog file"):
        Catalog.load("/nonexistent/catalog.yaml")


def test_paper_minimum_gpus_on_t4() -> None:
    """The paper runs fp32 OPT-6.7B on at least 4 T4s and GPT-20B on at least 12."""
    t4 = Catalog.load().gpu("T4")
    models = builtin_models()
    assert min_gpus(models["opt-6.7b"], t4) <= 4
    assert 6 <= min_gpus(models["gpt-20b"], t4) <= 12
