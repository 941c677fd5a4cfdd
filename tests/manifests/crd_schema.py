"""Validate LLMService objects the way the API server would, without an API server.

The steps follow the apiserver's order for a custom resource: apply the schema's defaults,
check the OpenAPI v3 schema (unknown fields rejected, as `kubectl apply` does with its default
strict field validation), then evaluate every x-kubernetes-validations rule on each node of
the object that is present. Error strings name the field the way the apiserver does
(`spec.gpuPools[0].capacityType: ...`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .cel import CelError, compile_rule

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "llmservices.spotserve.dev.yaml"
CHART_CRD_PATH = ROOT / "charts" / "spotserve" / "crds" / "llmservices.spotserve.dev.yaml"


@dataclass(frozen=True)
class Rule:
    """One x-kubernetes-validations entry and the schema node that carries it."""

    schema_path: str
    rule: str
    message: str
    field_path: str


@dataclass(frozen=True)
class Problem:
    field: str
    message: str
    rule: Rule | None = None

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


@cache
def load_crd() -> dict[str, Any]:
    return dict(yaml.safe_load(CRD_PATH.read_text()))


def openapi_schema() -> dict[str, Any]:
    (version,) = load_crd()["spec"]["versions"]
    return dict(version["schema"]["openAPIV3Schema"])


def walk_schema(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its path; array items are written `[]`."""
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from walk_schema(child, f"{path}.{name}" if path else name)
    if isinstance(schema.get("items"), dict):
        yield from walk_schema(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk_schema(schema["additionalProperties"], f"{path}[*]")


def crd_rules() -> list[Rule]:
    return [
        Rule(path, entry["rule"], entry["message"], entry.get("fieldPath", ""))
        for path, node in walk_schema(openapi_schema())
        for entry in node.get("x-kubernetes-validations", [])
    ]


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Fill in `default`s like the apiserver: absent fields with a default get it, recursively."""
    if isinstance(value, dict):
        for name, child in schema.get("properties", {}).items():
            if name not in value and "default" in child:
                value[name] = copy.deepcopy(child["default"])
            if name in value:
                apply_defaults(child, value[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name in set(value) - set(schema.get("properties", {})):
                apply_defaults(extra, value[name])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(schema["items"], item)
    return value


def to_jsonschema(schema: dict[str, Any]) -> dict[str, Any]:
    """The CRD schema as Draft 4 JSON Schema, closed where the apiserver prunes or rejects."""
    out = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if "properties" in out:
        out["properties"] = {k: to_jsonschema(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not schema.get(
                "x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("items"), dict):
        out["items"] = to_jsonschema(out["items"])
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = to_jsonschema(out["additionalProperties"])
    return out


@cache
def _validator() -> jsonschema.Draft4Validator:
    schema = to_jsonschema(openapi_schema())
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema, format_checker=jsonschema.FormatChecker())


def _field(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def schema_problems(obj: dict[str, Any]) -> list[Problem]:
    return [Problem(_field(error.absolute_path) or "<root>", error.message)
            for error in _validator().iter_errors(obj)]


def rule_problems(schema: dict[str, Any], value: Any, field: str = "",
                  schema_path: str = "") -> list[Problem]:
    """Evaluate the rules of `schema` and its children on the parts of `value` present."""
    problems = []
    for entry in schema.get("x-kubernetes-validations", []):
        rule = Rule(schema_path, entry["rule"], entry["message"], entry.get("fieldPath", ""))
        try:
            ok = compile_rule(rule.rule)({"self": value})
        except CelError as exc:
            problems.append(Problem(field, f"rule {rule.rule!r} failed: {exc}", rule))
            continue
        if ok is not True:
            problems.append(Problem(field + rule.field_path, f"Invalid value: {rule.message}",
                                    rule))
    for child in _children(schema, value, field, schema_path):
        problems += rule_problems(*child)
    return problems


def _children(schema: dict[str, Any], value: Any, field: str,
              schema_path: str) -> Iterator[tuple[dict[str, Any], Any, str, str]]:
    """(schema, value, field, schema path) of each child of `value` that is present."""
    if isinstance(value, dict):
        for name, child in schema.get("properties", {}).items():
            if name in value:
                yield (child, value[name], f"{field}.{name}" if field else name,
                       f"{schema_path}.{name}" if schema_path else name)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            yield schema["items"], item, f"{field}[{index}]", f"{schema_path}[]"


def validate(obj: dict[str, Any]) -> tuple[dict[str, Any], list[Problem]]:
    """Default, then validate, an LLMService; returns the defaulted object and the problems."""
    defaulted = apply_defaults(openapi_schema(), copy.deepcopy(obj))
    problems = schema_problems(defaulted)
    if not problems:  # like the apiserver, rules run only on values of the declared types
        problems = rule_problems(openapi_schema(), defaulted)
    return defaulted, problems


def merge_patch(base: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, as the API server applies it: dicts merge, None deletes,
    anything else replaces."""
    if not isinstance(patch, dict) or not isinstance(base, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out
