"""`spotserve download`: fetch a model into a folder (the init step of worker pods).

Sources: a Hugging Face Hub repository (`--hf REPO [--revision REV]`, needs the
`huggingface_hub` package; `HF_TOKEN` is read from the environment), an https archive
(`.tar`, `.tar.gz`, `.tgz`, `.zip`), or an `s3://` / `gs://` prefix (through the `aws` or
`gcloud` command line, which the image must carry). The folder must end up holding a
`config.json` the model spec can read. A second run with the same source does nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from spotserve.errors import SpotserveError
from spotserve.model_spec import ModelSpec

HELP = "Download a model (Hugging Face repo, https archive, s3:// or gs://) into a folder."
MARKER = ".spotserve-download.json"
HF_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", metavar="REPO", help="Hugging Face Hub repository id")
    source.add_argument("--url", help="https archive URL, or an s3:// or gs:// prefix")
    parser.add_argument("--revision", default="main", help="Hub revision (default: main)")
    parser.add_argument("--to", required=True, metavar="DIR", help="destination folder")


def run(args: argparse.Namespace) -> int:
    dest = Path(args.to)
    source = f"hf:{args.hf}@{args.revision}" if args.hf else str(args.url)
    if _already(dest, source):
        print(f"{dest}: already holds {source}", file=sys.stderr)
        return 0
    dest.mkdir(parents=True, exist_ok=True)
    if args.hf:
        _from_hub(args.hf, args.revision, dest)
    else:
        _from_url(str(args.url), dest)
    spec = ModelSpec.from_hf_config(dest)
    (dest / MARKER).write_text(json.dumps({"source": source}))
    print(f"{dest}: {spec.name} ({spec.family}, {spec.num_parameters / 1e9:.2f} B parameters) "
          f"from {source}", file=sys.stderr)
    return 0


def _already(dest: Path, source: str) -> bool:
    try:
        return bool(json.loads((dest / MARKER).read_text()).get("source") == source
                    and (dest / "config.json").is_file())
    except (OSError, ValueError):
        return False


def _from_hub(repo: str, revision: str, dest: Path) -> None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SpotserveError("--hf needs the huggingface_hub package in this image "
                             "(pip install huggingface_hub)") from None
    try:
        snapshot_download(repo_id=repo, revision=revision, local_dir=str(dest),
                          allow_patterns=HF_PATTERNS)
    except Exception as exc:  # the hub raises many kinds; each is a user-facing failure
        raise SpotserveError(f"cannot download {repo}@{revision}: {exc}".splitlines()[0]) \
            from None


def _from_url(url: str, dest: Path) -> None:
    scheme = url.split("://", 1)[0]
    if scheme in ("s3", "gs"):
        tool = ["aws", "s3", "sync", url, str(dest)] if scheme == "s3" else \
            ["gcloud", "storage", "rsync", "--recursive", url, str(dest)]
        if shutil.which(tool[0]) is None:
            raise SpotserveError(f"{scheme}:// URLs need the {tool[0]} command in this image")
        if subprocess.call(tool) != 0:
            raise SpotserveError(f"{' '.join(tool[:3])} failed for {url}")
        return
    if scheme not in ("https", "http"):
        raise SpotserveError(f"unsupported URL {url!r}: use https, s3 or gs")
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "archive"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, archive.open("wb") as out:
                shutil.copyfileobj(response, out, 1 << 20)
        except OSError as exc:
            raise SpotserveError(f"cannot download {url}: {exc}") from None
        _extract(archive, dest, url)


def _extract(archive: Path, dest: Path, url: str) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if not _inside(dest, name):
                    raise SpotserveError(f"{url}: archive member {name!r} escapes the folder")
            zf.extractall(dest)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            try:
                tf.extractall(dest, filter="data")
            except tarfile.FilterError as exc:
                raise SpotserveError(f"{url}: unsafe archive member: {exc}") from None
    else:
        raise SpotserveError(f"{url}: not a tar or zip archive")
    _flatten(dest)


def _inside(dest: Path, name: str) -> bool:
    return (dest / name).resolve().is_relative_to(dest.resolve())


def _flatten(dest: Path) -> None:
    """Archives often wrap the model in one folder: lift its contents up."""
    entries = [p for p in dest.iterdir() if p.name != MARKER]
    if len(entries) == 1 and entries[0].is_dir() and not (dest / "config.json").exists():
        inner = entries[0]
        for item in inner.iterdir():
            item.rename(dest / item.name)
        inner.rmdir()
