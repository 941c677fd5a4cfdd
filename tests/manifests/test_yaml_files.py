"""Every YAML file of ours parses with duplicate keys rejected, as kubectl's parser does
(PyYAML alone would keep the last value silently)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from .crd_schema import ROOT

FILES = sorted([*ROOT.glob("crds/*.yaml"), *ROOT.glob("examples/*.yaml"),
                *ROOT.glob("examples/helm/*.yaml"), ROOT / "charts/spotserve/values.yaml",
                ROOT / "charts/spotserve/Chart.yaml"])


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        duplicates = {key for key in keys if keys.count(key) > 1}
        if duplicates:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate keys {sorted(duplicates)}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                              _StrictLoader.construct_mapping)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_duplicate_keys(path: Path) -> None:
    assert list(yaml.load_all(path.read_text(), Loader=_StrictLoader))


def test_strict_loader_rejects_duplicates() -> None:
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate keys"):
        yaml.load("a: 1\nb: 2\na: 3\n", Loader=_StrictLoader)
