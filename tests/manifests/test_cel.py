"""The CEL subset interpreter the CRD tests rely on, and, where the cel-python package is
installed, a cross-check of every CRD rule on every sample against that implementation."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from . import test_crd
from .cel import CelError, evaluate
from .crd_schema import apply_defaults, merge_patch, openapi_schema


@pytest.mark.parametrize(("source", "expected"), [
    ("1 + 2 * 3 == 7 && !(2 > 3)", True),
    ("true || self.missing", True),  # short-circuit, as CEL's commutative || allows
    ("self.n >= 2 ? 'SPOT' : 'ON_DEMAND'", "SPOT"),
    ("[has(self.a), has(self.b), has(self.n)].filter(s, s).size()", 2),
    ("self.pools.map(p, p.max).sum()", 7),
    ("self.pools.all(p, self.pools.exists_one(q, q.name == p.name))", True),
    ("self.pools.exists(p, p.name == 'b' && p.max > 4)", False),
    ("'k' in self.labels && self.labels['k'] == 'v'", True),
    ("!self.path.split('/').exists(p, p == '..')", False),
    ("size(self.path) == 8 && self.path.startsWith('a/')", True),
    ("-self.n + 7 / 2", 1),
])
def test_expressions(source: str, expected: Any) -> None:
    value = {"a": 1, "n": 2, "labels": {"k": "v"}, "path": "a/../etc",
             "pools": [{"name": "a", "max": 3}, {"name": "b", "max": 4}]}
    assert evaluate(source, self=value) == expected


@pytest.mark.parametrize(("source", "message"), [
    ("self.missing == 1", "no such key"),
    ("self.x.matches('a+')", "outside the supported CEL subset"),
    ("has(self)", "field selection"),
    ("1 + ", "unexpected"),
    ("self.x && true", "expected a bool"),
])
def test_errors(source: str, message: str) -> None:
    with pytest.raises(CelError, match=message):
        evaluate(source, self={"x": "a"})


def _rule_inputs(schema: dict[str, Any], value: Any) -> list[tuple[str, Any]]:
    """(rule, self) for every rule on every present node, as the apiserver would evaluate."""
    out = [(entry["rule"], value) for entry in schema.get("x-kubernetes-validations", [])]
    if isinstance(value, dict):
        for name, child in schema.get("properties", {}).items():
            if name in value:
                out += _rule_inputs(child, value[name])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            out += _rule_inputs(schema["items"], item)
    return out


def test_agrees_with_cel_python_on_every_sample() -> None:
    celpy = pytest.importorskip("celpy", reason="cel-python not installed (optional check)")
    from celpy import celtypes

    environment = celpy.Environment()
    # Kubernetes' list and string libraries, which cel-python lacks.
    functions = {
        "sum": lambda items: sum(items[1:], items[0]) if items else celtypes.IntType(0),
        "split": lambda text, sep: celtypes.ListType(
            [celtypes.StringType(part) for part in str(text).split(str(sep))]),
    }
    samples = [merge_patch(test_crd._base(), patch) for patch, _ in test_crd.BAD.values()]
    samples += [merge_patch(test_crd._base(), patch) for patch in test_crd.GOOD.values()]
    samples += [test_crd._load(path) for path in test_crd.EXAMPLES] + [test_crd.MINIMAL]
    checked = 0
    for sample in samples:
        defaulted = apply_defaults(openapi_schema(), copy.deepcopy(sample))
        for rule, value in _rule_inputs(openapi_schema(), defaulted):
            try:
                ours = evaluate(rule, self=value)
            except CelError:
                continue  # only on samples the schema already rejects
            program = environment.program(environment.compile(rule), functions=functions)
            theirs = program.evaluate({"self": celpy.json_to_cel(value)})
            assert ours == bool(theirs), (rule, value)
            checked += 1
    assert checked > 100
