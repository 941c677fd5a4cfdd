"""`spotserve download`: archives over https (a loopback server), the Hub (stubbed), errors."""

from __future__ import annotations

import io
import json
import sys
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from spotserve.cli import main
from spotserve.download import MARKER, Progress
from spotserve.errors import SpotserveError
from tests.served_files import serve_files, tar_of

CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "vocab_size": 100}


@pytest.fixture
def serve() -> Iterator[dict[str, bytes]]:
    files: dict[str, bytes] = {}
    server = serve_files(files)
    files["__base__"] = f"http://127.0.0.1:{server.server_port}".encode()
    yield files
    server.shutdown()


def test_https_archive_is_unpacked_flattened_and_not_fetched_twice(
        serve: dict[str, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    serve["/m.tar.gz"] = tar_of({"model/config.json": json.dumps(CONFIG).encode(),
                                   "model/model.safetensors": b"x" * 10})
    url = serve["__base__"].decode() + "/m.tar.gz"
    dest = tmp_path / "models"
    assert main(["download", "--url", url, "--to", str(dest)]) == 0
    assert (dest / "config.json").is_file() and (dest / "model.safetensors").is_file()
    assert json.loads((dest / MARKER).read_text())["source"] == url
    said = capsys.readouterr().err
    assert f"{url}: " in said and "(100%)" in said, said   # the download's progress
    del serve["/m.tar.gz"]  # a second run must not fetch again
    assert main(["download", "--url", url, "--to", str(dest)]) == 0
    assert "already holds" in capsys.readouterr().err


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_in_logs_is_a_plain_line_every_ten_seconds_and_at_the_end() -> None:
    """Issue 15, item 11: bytes, share, rate and time left, as lines a log keeps."""
    clock, out = Clock(), Stream(tty=False)
    progress = Progress("s3://b/m", 4_000_000_000, stream=out, clock=clock)
    for _ in range(30):           # 100 MB a second for 30 s
        clock.now += 1
        progress.add(100_000_000)
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and "\r" not in out.getvalue()
    assert lines[0] == "s3://b/m: 1.0 GB of 4.0 GB (25%), 100.0 MB/s, 30 s left"
    assert lines[-1].startswith("s3://b/m: 3.0 GB of 4.0 GB (75%)")


def test_progress_on_a_terminal_rewrites_one_line() -> None:
    clock, out = Clock(), Stream(tty=True)
    progress = Progress("https://x/m.tar", None, stream=out, clock=clock)
    for _ in range(16):
        clock.now += 0.0625
        progress.add(1_000_000)
    progress.close()
    text = out.getvalue()
    assert text.count("\r") == 5 and text.endswith("\n")  # at most 5 a second, the end
    assert "16.0 MB, 16.0 MB/s" in text.rsplit("\r", 1)[1]


@pytest.mark.parametrize(("members", "message"), [
    ({"weights.bin": b"1"}, "no such file"),
    ({"../evil/config.json": b"{}"}, "unsafe archive member"),
])
def test_bad_archives_exit_2(serve: dict[str, bytes], tmp_path: Path, members: dict[str, bytes],
                             message: str, capsys: pytest.CaptureFixture[str]) -> None:
    serve["/bad.tgz"] = tar_of(members)
    url = serve["__base__"].decode() + "/bad.tgz"
    assert main(["download", "--url", url, "--to", str(tmp_path / "d")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "evil").exists()


def test_bad_sources_exit_2(serve: dict[str, bytes], tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    missing = serve["__base__"].decode() + "/nothing.tgz"
    assert main(["download", "--url", missing, "--to", str(tmp_path)]) == 2
    assert "cannot download" in capsys.readouterr().err
    assert main(["download", "--url", "ftp://x/y", "--to", str(tmp_path)]) == 2
    assert "unsupported URL" in capsys.readouterr().err


@pytest.fixture
def hub_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """A stand-in `huggingface_hub` that records its calls and writes a config.json."""
    calls: list[dict[str, object]] = []

    def snapshot_download(**kwargs: object) -> str:
        calls.append(kwargs)
        (Path(str(kwargs["local_dir"])) / "config.json").write_text(json.dumps(CONFIG))
        return str(kwargs["local_dir"])

    hub = types.ModuleType("huggingface_hub")
    hub.snapshot_download = snapshot_download  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    return calls


def test_hub_download_passes_repo_revision_and_folder(
        tmp_path: Path, hub_calls: list[dict[str, object]]) -> None:
    calls = hub_calls
    dest = tmp_path / "m"
    assert main(["download", "--hf", "org/tiny", "--revision", "v1", "--to", str(dest)]) == 0
    assert calls[0]["repo_id"] == "org/tiny" and calls[0]["revision"] == "v1"
    assert calls[0]["local_dir"] == str(dest)


def test_metadata_only_keeps_the_config_and_tokenizer_and_no_weights(
        serve: dict[str, bytes], tmp_path: Path, hub_calls: list[dict[str, object]]) -> None:
    """The router's init step: what it reads (config, tokenizer, chat template), never the
    checkpoint; and a metadata-only folder never passes for a whole download."""
    serve["/m.tar.gz"] = tar_of({"model/config.json": json.dumps(CONFIG).encode(),
                                   "model/tokenizer.json": b"{}",
                                   "model/chat_template.jinja": b"{{ x }}",
                                   "model/model.safetensors": b"x" * 10})
    url = serve["__base__"].decode() + "/m.tar.gz"
    dest = tmp_path / "router"
    assert main(["download", "--url", url, "--to", str(dest), "--metadata-only"]) == 0
    assert sorted(p.name for p in dest.iterdir() if p.name != MARKER) == [
        "chat_template.jinja", "config.json", "tokenizer.json"]
    assert main(["download", "--url", url, "--to", str(dest)]) == 0  # now the weights too
    assert (dest / "model.safetensors").is_file()

    assert main(["download", "--hf", "org/tiny", "--to", str(tmp_path / "h"),
                 "--metadata-only"]) == 0
    patterns = list(hub_calls[0]["allow_patterns"])  # type: ignore[call-overload]
    assert "tokenizer*" in patterns and "*.jinja" in patterns
    assert not any("safetensors" in p or "bin" in p for p in patterns)


# --- config.json alone (what the operator reads before any pod starts) -------------------

def test_read_config_streams_an_archive_only_as_far_as_its_config(
        serve: dict[str, bytes]) -> None:
    """A 4 MB archive with config.json first is read within a 1 MB budget, gzipped or not
    and wrapped in a folder or not; with the weights first the budget runs out and the
    error says how to pack it."""
    from spotserve.download import read_config

    weights = bytes(range(256)) * (4 << 12)   # 4 MB, incompressible enough for the check
    base = serve["__base__"].decode()
    serve["/first.tar"] = tar_of(mode="w", members={"config.json": json.dumps(CONFIG).encode(),
                                      "model.safetensors": weights})
    serve["/wrapped.tar.gz"] = tar_of({"qwen/config.json": json.dumps(CONFIG).encode(),
                                         "qwen/model.safetensors": weights})
    serve["/last.tar"] = tar_of(mode="w", members={"model.safetensors": weights,
                                     "config.json": json.dumps(CONFIG).encode()})
    for mode in ("w:bz2", "w:xz"):   # sniffed from more than a few bytes
        serve[f"/{mode}.tar"] = tar_of({"config.json": json.dumps(CONFIG).encode()}, mode)
        assert read_config(f"{base}/{mode}.tar") == CONFIG
    for name in ("first.tar", "wrapped.tar.gz"):
        assert read_config(f"{base}/{name}", scan_bytes=1 << 20) == CONFIG
    with pytest.raises(SpotserveError, match=r"no config\.json in the archive's first 1\.0 MB; "
                                             r"put it first"):
        read_config(f"{base}/last.tar", scan_bytes=1 << 20)
    assert read_config(f"{base}/last.tar") == CONFIG   # the default budget reaches it


@pytest.mark.parametrize(("members", "message"), [
    ({"tokenizer.json": b"{}"}, r"holds no config\.json"),
    ({"config.json": b"not json"}, r"config\.json is not JSON"),
    ({"config.json": b"[1, 2]"}, r"not a JSON object"),
    ({"deep/er/config.json": b"{}"}, r"holds no config\.json"),   # not the model's own
])
def test_read_config_errors_say_what_is_wrong(serve: dict[str, bytes], members: dict[str, bytes],
                                              message: str) -> None:
    from spotserve.download import read_config

    serve["/model.tar.gz"] = tar_of(members)
    with pytest.raises(SpotserveError, match=message):
        read_config(serve["__base__"].decode() + "/model.tar.gz")


def test_read_config_refuses_zip_missing_and_non_archives(serve: dict[str, bytes]) -> None:
    from spotserve.download import read_config

    base = serve["__base__"].decode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("config.json", json.dumps(CONFIG))
    serve["/model.zip"] = buf.getvalue()
    serve["/page.html"] = b"<html>" + b"x" * 2000
    with pytest.raises(SpotserveError, match=r"zip archive's config\.json cannot be read"):
        read_config(f"{base}/model.zip")
    with pytest.raises(SpotserveError, match=r"cannot read .*404"):
        read_config(f"{base}/missing.tar")
    with pytest.raises(SpotserveError, match="not a readable tar archive"):
        read_config(f"{base}/page.html")
    with pytest.raises(SpotserveError, match="unsupported URL"):
        read_config("ftp://host/model.tar")
