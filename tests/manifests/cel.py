"""A small evaluator for the subset of CEL the LLMService CRD's x-kubernetes-validations use.

No real kube-apiserver runs in CI, so the tests evaluate the CRD's own rule strings with
this interpreter: the rules in the CRD stay the one source of truth. It covers literals,
lists, member and index access, `has()`, the comprehension macros (all, exists, exists_one,
map, filter), `size`, `sum`, `split`, `startsWith`, `endsWith`, `contains`, the arithmetic,
comparison, `in`, logical and conditional operators. A rule that uses anything else fails to
parse with `CelError`, and a test makes sure every CRD rule parses, so the subset cannot
silently fall behind the CRD.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

Env = dict[str, Any]
Node = Callable[[Env], Any]

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>\d+\.\d+|\d+)
  | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>&&|\|\||==|!=|<=|>=|[-+*/%!<>?:.,()\[\]])
""", re.VERBOSE)

_MACROS = {"all", "exists", "exists_one", "map", "filter"}


class CelError(Exception):
    """A rule outside the supported subset, or an evaluation error (no such key, bad type)."""


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str


def _tokens(source: str) -> list[_Token]:
    out, pos = [], 0
    while pos < len(source):
        match = _TOKEN.match(source, pos)
        if match is None:
            raise CelError(f"unexpected character {source[pos]!r} at {pos} in {source!r}")
        pos = match.end()
        if match.lastgroup != "space":
            out.append(_Token(match.lastgroup or "", match.group()))
    out.append(_Token("end", ""))
    return out


def compile_rule(source: str) -> Node:
    """Parse `source` into a callable taking the variables (e.g. {"self": value})."""
    parser = _Parser(_tokens(source), source)
    node = parser.expression()
    parser.expect("end")
    return node


def evaluate(source: str, **variables: Any) -> Any:
    return compile_rule(source)(dict(variables))


class _Parser:
    def __init__(self, tokens: list[_Token], source: str) -> None:
        self.tokens, self.pos, self.source = tokens, 0, source

    def peek(self) -> _Token:
        return self.tokens[self.pos]

    def take(self, text: str) -> bool:
        if self.peek().text == text and self.peek().kind in ("op", "name"):
            self.pos += 1
            return True
        return False

    def expect(self, text_or_kind: str) -> _Token:
        token = self.peek()
        if token.text != text_or_kind and token.kind != text_or_kind:
            raise CelError(f"expected {text_or_kind!r}, got {token.text!r} in {self.source!r}")
        self.pos += 1
        return token

    def expression(self) -> Node:
        condition = self.binary(0)
        if not self.take("?"):
            return condition
        then = self.expression()
        self.expect(":")
        otherwise = self.expression()
        return lambda env: then(env) if _bool(condition(env)) else otherwise(env)

    _LEVELS: tuple[tuple[str, ...], ...] = (
        ("||",), ("&&",), ("==", "!=", "<", "<=", ">", ">=", "in"), ("+", "-"), ("*", "/", "%"))

    def binary(self, level: int) -> Node:
        if level == len(self._LEVELS):
            return self.unary()
        left = self.binary(level + 1)
        while self.peek().text in self._LEVELS[level] and self.peek().kind in ("op", "name"):
            op = self.tokens[self.pos].text
            self.pos += 1
            left = _binary(op, left, self.binary(level + 1))
        return left

    def unary(self) -> Node:
        if self.take("!"):
            inner = self.unary()
            return lambda env: not _bool(inner(env))
        if self.take("-"):
            inner = self.unary()
            return lambda env: -inner(env)
        return self.member()

    def member(self) -> Node:
        node = self.primary()
        while True:
            if self.take("."):
                name = self.expect("name").text
                node = self.call(node, name) if self.peek().text == "(" else _select(node, name)
            elif self.take("["):
                index = self.expression()
                self.expect("]")
                node = _index(node, index)
            else:
                return node

    def call(self, target: Node, name: str) -> Node:
        self.expect("(")
        if name in _MACROS:
            variable = self.expect("name").text
            self.expect(",")
            body = self.expression()
            self.expect(")")
            return _macro(name, target, variable, body)
        args = self.arguments()
        return _method(name, target, args)

    def arguments(self) -> list[Node]:
        args: list[Node] = []
        while not self.take(")"):
            if args:
                self.expect(",")
            args.append(self.expression())
        return args

    def primary(self) -> Node:
        token = self.peek()
        self.pos += 1
        if token.kind == "number":
            value: Any = float(token.text) if "." in token.text else int(token.text)
            return lambda env: value
        if token.kind == "string":
            text = token.text[1:-1].encode().decode("unicode_escape")
            return lambda env: text
        if token.text == "(":
            inner = self.expression()
            self.expect(")")
            return inner
        if token.text == "[":
            items = self.arguments_until("]")
            return lambda env: [item(env) for item in items]
        if token.kind == "name":
            return self.name(token.text)
        raise CelError(f"unexpected {token.text!r} in {self.source!r}")

    def arguments_until(self, close: str) -> list[Node]:
        items: list[Node] = []
        while not self.take(close):
            if items:
                self.expect(",")
            items.append(self.expression())
        return items

    def name(self, name: str) -> Node:
        constants = {"true": True, "false": False, "null": None}
        if name in constants:
            return lambda env: constants[name]
        if name == "has":
            self.expect("(")
            target = self.member()
            self.expect(")")
            return _has(target)
        if name == "size" and self.take("("):
            (arg,) = self.arguments()
            return lambda env: len(arg(env))
        return lambda env: _lookup(env, name)


def _lookup(env: Env, name: str) -> Any:
    if name not in env:
        raise CelError(f"undeclared reference to {name!r}")
    return env[name]


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise CelError(f"no matching overload: expected a bool, got {value!r}")
    return value


class _Select:
    """A field selection, kept apart so that has() can test presence instead of reading."""

    def __init__(self, target: Node, field: str) -> None:
        self.target, self.field = target, field

    def __call__(self, env: Env) -> Any:
        container = self.target(env)
        if not isinstance(container, Mapping) or self.field not in container:
            raise CelError(f"no such key: {self.field}")
        return container[self.field]


def _select(target: Node, field: str) -> Node:
    return _Select(target, field)


def _has(target: Node) -> Node:
    if not isinstance(target, _Select):
        raise CelError("has() needs a field selection, e.g. has(self.field)")

    def run(env: Env) -> bool:
        container = target.target(env)
        return isinstance(container, Mapping) and target.field in container

    return run


def _index(target: Node, index: Node) -> Node:
    def run(env: Env) -> Any:
        container, key = target(env), index(env)
        try:
            return container[key]
        except (KeyError, IndexError, TypeError) as exc:
            raise CelError(f"no such key: {key!r}") from exc

    return run


def _binary(op: str, left: Node, right: Node) -> Node:
    if op == "&&":
        return lambda env: _bool(left(env)) and _bool(right(env))
    if op == "||":
        return lambda env: _bool(left(env)) or _bool(right(env))
    operations: dict[str, Callable[[Any, Any], Any]] = {
        "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
        "<": lambda a, b: a < b, "<=": lambda a, b: a <= b,
        ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
        "in": lambda a, b: a in b, "+": lambda a, b: a + b, "-": lambda a, b: a - b,
        "*": lambda a, b: a * b, "%": lambda a, b: a % b,
        "/": lambda a, b: a // b if isinstance(a, int) and isinstance(b, int) else a / b,
    }
    operation = operations[op]

    def run(env: Env) -> Any:
        try:
            return operation(left(env), right(env))
        except TypeError as exc:
            raise CelError(f"no matching overload for {op!r}: {exc}") from exc

    return run


def _items(value: Any) -> Iterator[Any]:
    if isinstance(value, (list, Mapping)):
        return iter(value)  # a map iterates over its keys, as in CEL
    raise CelError(f"cannot iterate over {value!r}")


def _macro(name: str, target: Node, variable: str, body: Node) -> Node:
    def results(env: Env) -> Iterator[tuple[Any, Any]]:
        for item in _items(target(env)):
            yield item, body({**env, variable: item})

    def run(env: Env) -> Any:
        if name == "all":
            return all(_bool(value) for _, value in results(env))
        if name == "exists":
            return any(_bool(value) for _, value in results(env))
        if name == "exists_one":
            return sum(_bool(value) for _, value in results(env)) == 1
        if name == "map":
            return [value for _, value in results(env)]
        return [item for item, value in results(env) if _bool(value)]

    return run


_METHODS: dict[str, Callable[..., Any]] = {
    "size": len,
    "sum": lambda values: sum(values),
    "split": lambda text, sep: text.split(sep),
    "startsWith": lambda text, prefix: text.startswith(prefix),
    "endsWith": lambda text, suffix: text.endswith(suffix),
    "contains": lambda text, part: part in text,
}


def _method(name: str, target: Node, args: list[Node]) -> Node:
    if name not in _METHODS:
        raise CelError(f"function {name!r} is outside the supported CEL subset")
    method = _METHODS[name]

    def run(env: Env) -> Any:
        try:
            return method(target(env), *(arg(env) for arg in args))
        except TypeError as exc:
            raise CelError(f"no matching overload for {name}(): {exc}") from exc

    return run
