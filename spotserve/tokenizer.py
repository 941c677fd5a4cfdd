"""The served model's tokenizer and chat template, read from its model directory.

`tokenizer.json` (Hugging Face `tokenizers`) gives text ↔ ids; the chat template (Jinja,
rendered the way `transformers` renders it) comes from `chat_template.jinja` where the
checkpoint has one (transformers 4.4x and later save it there), else `chat_template.json`,
else `tokenizer_config.json`, which also gives the special tokens; `config.json` gives the
context length.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spotserve.errors import SpotserveError

DEFAULT_CONTEXT = 4096


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


class ModelTokenizer:
    def __init__(self, tokenizer: Any, *, chat_template: str | None = None,
                 special_tokens: dict[str, str] | None = None,
                 max_context: int = DEFAULT_CONTEXT) -> None:
        self._tokenizer = tokenizer
        self._special = special_tokens or {}
        self.max_context = max_context
        self._template = _compile(chat_template) if chat_template else None

    @classmethod
    def from_dir(cls, model_dir: Path, *, max_context: int | None = None) -> ModelTokenizer:
        from tokenizers import Tokenizer

        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise SpotserveError(f"{path}: no such file (the router needs the model's "
                                 "tokenizer.json)")
        config = _read_json(model_dir / "tokenizer_config.json")
        model_config = _read_json(model_dir / "config.json")
        return cls(Tokenizer.from_file(str(path)), chat_template=chat_template(model_dir),
                   special_tokens={k: _token_text(config.get(k))
                                   for k in ("bos_token", "eos_token")},
                   max_context=max_context or _context_length(model_config, config))

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text for a conversation, ending with the assistant's turn."""
        if self._template is None:
            raise ValueError("the model has no chat template")
        return str(self._template.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True, **self._special))

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        # The template writes the special tokens itself, as transformers assumes.
        return self.encode(self.render_chat(messages), add_special_tokens=False)


def _compile(source: str) -> Any:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent,
                                                                  ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SpotserveError(f"{path}: malformed JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}


def chat_template(model_dir: Path) -> str | None:
    """The model's chat template, wherever its checkpoint keeps it (None: it has none)."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        template = _template_text(_read_json(model_dir / name).get("chat_template"))
        if template is not None:
            return template
    return None


def _template_text(value: Any) -> str | None:
    if isinstance(value, list):  # named templates: take the default one
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default") or next(iter(named.values()), None)
    return value if isinstance(value, str) else None


def _token_text(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


def _context_length(model_config: dict[str, Any], config: dict[str, Any]) -> int:
    for value in (model_config.get("max_position_embeddings"),
                  config.get("model_max_length")):
        if isinstance(value, int) and 0 < value < 10_000_000:
            return value
    return DEFAULT_CONTEXT
