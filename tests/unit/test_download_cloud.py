"""`spotserve download` from s3:// and gs:// through the Python SDKs, against real local servers.

S3 is moto's server (`ThreadedMotoServer`) on 127.0.0.1, reached by boto3 through
`AWS_ENDPOINT_URL`, as an S3-compatible store would be; GCS is `gcp-storage-emulator` on
127.0.0.1, reached by google-cloud-storage through `STORAGE_EMULATOR_HOST`. Both are
in-process threads, so a `python -m spotserve.cli` child reaches them too. Only the checks
that need an object the servers cannot hold (a key escaping the folder, a failure half way)
put a wrapping store in at the `spotserve.download.STORES` seam.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from spotserve import download
from spotserve.cli import main
from spotserve.download import MARKER
from spotserve.errors import SpotserveError
from spotserve.operator.local.tiny_model import build_tiny_llama
from tests.served_files import tar_of

ROOT = Path(__file__).resolve().parents[2]
AWS_VARIABLES = ("AWS_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_SESSION_TOKEN",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "AWS_ENDPOINT_URL_S3",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN")


def _model(tmp_path: Path) -> dict[str, bytes]:
    """The tiny Llama's files plus a nested one, by path relative to the model folder."""
    folder = build_tiny_llama(tmp_path / "source")
    files = {p.relative_to(folder).as_posix(): p.read_bytes()
             for p in folder.rglob("*") if p.is_file()}
    files["extra/nested/notes.txt"] = b"a nested file\n"
    return files


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in folder.rglob("*") if p.is_file() and p.name != MARKER}


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spotserve.cli", "download", *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)


# --- S3 ----------------------------------------------------------------------------------

@dataclass
class S3Bucket:
    client: Any
    name: str

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=data)


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    """A boto3 client on a fresh bucket; the environment holds only test keys and endpoint."""
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role lookup
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    import boto3

    bucket = S3Bucket(boto3.client("s3"), f"models-{uuid.uuid4().hex[:8]}")
    bucket.client.create_bucket(Bucket=bucket.name)
    return bucket


def _upload_s3(s3: S3Bucket, prefix: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        s3.put(f"{prefix}/{name}", data)


def test_s3_prefix_round_trip_then_a_second_run_is_a_no_op(
        s3: S3Bucket, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = _model(tmp_path)
    _upload_s3(s3, "llama/tiny", files)
    bucket = s3.name
    # a "folder" placeholder, and a sibling whose name starts like the prefix: neither comes
    s3.put("llama/tiny/extra/", b"")
    s3.put("llama/tiny-other/config.json", b"{}")
    url, dest = f"s3://{bucket}/llama/tiny", tmp_path / "model"

    assert main(["download", "--url", url, "--to", str(dest)]) == 0
    assert _tree(dest) == files
    assert not list(dest.rglob("*.part"))
    err = capsys.readouterr().err
    assert f"{url}: {len(files)} files" in err and "model.safetensors (" in err
    assert f"[{len(files)}/{len(files)}]" in err and "from " + url in err

    # a second run must not fetch again
    s3.client.delete_object(Bucket=bucket, Key="llama/tiny/config.json")
    assert main(["download", "--url", url, "--to", str(dest)]) == 0
    assert "already holds" in capsys.readouterr().err
    assert _tree(dest) == files


def test_s3_metadata_only_fetches_no_weights(s3: S3Bucket, tmp_path: Path) -> None:
    files = _model(tmp_path)
    _upload_s3(s3, "llama/tiny", files)
    dest = tmp_path / "router"
    assert main(["download", "--url", f"s3://{s3.name}/llama/tiny", "--to", str(dest),
                 "--metadata-only"]) == 0
    got = _tree(dest)
    assert "config.json" in got and got
    assert not [name for name in got if name.endswith(".safetensors")]
    assert set(got) == {n for n in files if not n.endswith(".safetensors")}


def test_s3_trailing_slash_and_an_archive_object(s3: S3Bucket, tmp_path: Path) -> None:
    files = _model(tmp_path)
    _upload_s3(s3, "llama/tiny", files)
    dest = tmp_path / "slash"
    assert main(["download", "--url", f"s3://{s3.name}/llama/tiny/", "--to",
                 str(dest)]) == 0
    assert _tree(dest) == files

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(f"tiny/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    s3.put("archives/tiny.tar.gz", buf.getvalue())
    dest = tmp_path / "archive"
    assert main(["download", "--url", f"s3://{s3.name}/archives/tiny.tar.gz", "--to",
                 str(dest)]) == 0
    assert _tree(dest) == files


def test_s3_config_alone_from_a_prefix_or_an_archive(s3: S3Bucket, tmp_path: Path) -> None:
    """What the operator reads before any pod starts: config.json only (the weights'
    objects are never fetched), from a prefix or from a tar archive object."""
    files = _model(tmp_path)
    config = json.loads(files["config.json"])
    _upload_s3(s3, "llama/tiny", files)
    assert download.read_config(f"s3://{s3.name}/llama/tiny/") == config
    members = {"tiny/config.json": files["config.json"], "tiny/model.safetensors": b"w" * 4096}
    s3.put("archives/tiny.tar", tar_of(members, mode="w"))
    assert download.read_config(f"s3://{s3.name}/archives/tiny.tar") == config
    with pytest.raises(SpotserveError, match=r"no config\.json at the top of this prefix"):
        download.read_config(f"s3://{s3.name}/nothing/here")
    # one folder further down is not the model the workers' download would fetch
    s3.put("nested/inner/config.json", files["config.json"])
    with pytest.raises(SpotserveError, match=r"the model in a folder below it"):
        download.read_config(f"s3://{s3.name}/nested")
    with pytest.raises(SpotserveError, match="no bucket"):
        download.read_config(f"s3://missing-{uuid.uuid4().hex[:6]}/llama")


def test_s3_irsa_web_identity_is_used_without_keys(
        s3: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What EKS injects for IRSA: a role and a projected token; boto3 trades it with STS
    (moto's, through AWS_ENDPOINT_URL) for keys on its own."""
    files = _model(tmp_path)
    _upload_s3(s3, "m", files)
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6bjpkZWZhdWx0In0.c2ln")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/spotserve-models")
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token))
    assert download.S3Store(s3.name, "s3://x").method == "IRSA web identity (AWS_ROLE_ARN)"
    dest = tmp_path / "m"
    assert main(["download", "--url", f"s3://{s3.name}/m", "--to", str(dest)]) == 0
    assert _tree(dest) == files


def test_s3_empty_prefix_is_a_clear_error_from_the_command(s3: S3Bucket, tmp_path: Path) -> None:
    s3.put("other/config.json", b"{}")
    url = f"s3://{s3.name}/nothing/here"
    out = _cli("--url", url, "--to", str(tmp_path / "m"), env=dict(os.environ))
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert f"{url}: no objects under this prefix" in out.stderr
    assert not (tmp_path / "m" / MARKER).exists()


def test_s3_missing_bucket_credentials_and_endpoint_are_clear_errors(
        s3: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    dest = str(tmp_path / "m")
    assert main(["download", "--url", "s3://no-such-bucket/m", "--to", dest]) == 2
    assert "no bucket 'no-such-bucket'" in capsys.readouterr().err

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert main(["download", "--url", f"s3://{s3.name}/m", "--to", dest]) == 2
    err = capsys.readouterr().err
    assert "no AWS credentials for s3://" in err
    assert "IRSA (AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE" in err
    assert "serviceAccountName" in err and "Pod Identity" in err

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    assert main(["download", "--url", f"s3://{s3.name}/m", "--to", dest]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the S3 endpoint http://127.0.0.1:9" in err
    assert "AWS_ENDPOINT_URL_S3" in err


class _Failing:
    """A store that fails on the n-th object it fetches (a preempted download)."""

    def __init__(self, inner: download.Store, fail_at: int) -> None:
        self.inner, self.fail_at, self.count = inner, fail_at, 0

    def list(self, prefix: str) -> Iterator[download.StoredObject]:
        return self.inner.list(prefix)

    def fetch(self, obj: download.StoredObject, path: Path) -> None:
        self.count += 1
        if self.count == self.fail_at:
            path.write_bytes(b"half")  # a partial file under the temporary name
            raise OSError("connection reset by peer")
        self.inner.fetch(obj, path)

    def error(self, exc: Exception) -> download.SpotserveError | None:
        return self.inner.error(exc)


def test_s3_interrupted_download_leaves_nothing_a_second_run_takes_as_done(
        s3: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    files = _model(tmp_path)
    _upload_s3(s3, "a", files)
    _upload_s3(s3, "b", files)
    bucket, dest = s3.name, tmp_path / "m"
    url_a, url_b = f"s3://{bucket}/a", f"s3://{bucket}/b"
    assert main(["download", "--url", url_a, "--to", str(dest)]) == 0

    # another source into the same folder fails half way: the old marker must go
    monkeypatch.setattr(download, "WORKERS", 1)
    monkeypatch.setitem(download.STORES, "s3",
                        lambda b, u: _Failing(download.S3Store(b, u), fail_at=2))
    assert main(["download", "--url", url_b, "--to", str(dest)]) == 2
    assert "connection reset by peer" in capsys.readouterr().err
    assert not (dest / MARKER).exists()
    assert not list(dest.rglob("*.part"))  # no half file, under any name

    monkeypatch.delitem(download.STORES, "s3")
    assert main(["download", "--url", url_a, "--to", str(dest)]) == 0
    assert "already holds" not in capsys.readouterr().err
    assert _tree(dest) == files


def test_object_keys_cannot_escape_the_folder(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    class Evil:
        def list(self, prefix: str) -> Iterator[download.StoredObject]:
            yield download.StoredObject(prefix + "config.json", 2)
            yield download.StoredObject(prefix + "../../evil.txt", 2)

        def fetch(self, obj: download.StoredObject, path: Path) -> None:
            path.write_bytes(b"{}")

        def error(self, exc: Exception) -> None:
            return None

    monkeypatch.setitem(download.STORES, "s3", lambda b, u: Evil())
    assert main(["download", "--url", "s3://b/m", "--to", str(tmp_path / "d" / "m")]) == 2
    assert "escapes the folder" in capsys.readouterr().err
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "d" / "evil.txt").exists()


@pytest.mark.parametrize(("url", "module", "extra"), [
    ("s3://b/m", "boto3", "s3"), ("gs://b/m", "google.cloud.storage", "gcs")])
def test_a_missing_sdk_names_the_extra(url: str, module: str, extra: str, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    assert main(["download", "--url", url, "--to", str(tmp_path)]) == 2
    assert f"pip install 'spotserve[{extra}]'" in capsys.readouterr().err


# --- GCS ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gcs_emulator() -> Iterator[str]:
    from gcp_storage_emulator.server import create_server

    server = create_server("127.0.0.1", 0, in_memory=True)
    server.start()
    yield f"http://127.0.0.1:{server._api._httpd.server_address[1]}"
    server.stop()


@pytest.fixture
def gcs(gcs_emulator: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A fresh bucket on the emulator; STORAGE_EMULATOR_HOST points the library at it."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    from google.cloud import storage

    return storage.Client().create_bucket(f"models-{uuid.uuid4().hex[:8]}")


def test_gcs_prefix_round_trip_then_a_second_run_is_a_no_op(
        gcs: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = _model(tmp_path)
    for name, data in files.items():
        gcs.blob(f"llama/tiny/{name}").upload_from_string(data)
    gcs.blob("llama/tiny/extra/").upload_from_string(b"")
    gcs.blob("llama/tiny-other/config.json").upload_from_string(b"{}")
    url, dest = f"gs://{gcs.name}/llama/tiny", tmp_path / "model"

    assert main(["download", "--url", url, "--to", str(dest)]) == 0
    assert _tree(dest) == files
    assert f"{url}: {len(files)} files" in capsys.readouterr().err

    gcs.blob("llama/tiny/config.json").delete()
    assert main(["download", "--url", url, "--to", str(dest)]) == 0
    assert "already holds" in capsys.readouterr().err


def test_gcs_empty_prefix_and_missing_bucket_are_clear_errors(
        gcs: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url, dest = f"gs://{gcs.name}/nothing", str(tmp_path / "m")
    assert main(["download", "--url", url, "--to", dest]) == 2
    assert f"{url}: no objects under this prefix" in capsys.readouterr().err
    assert main(["download", "--url", "gs://no-such-bucket/m", "--to", dest]) == 2
    assert "no bucket 'no-such-bucket'" in capsys.readouterr().err
    assert not (tmp_path / "m" / MARKER).exists()


def test_gcs_missing_credentials_are_a_clear_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS",
                        "GOOGLE_CLOUD_PROJECT")}
    # no gcloud login, and no metadata server (GKE's would give Workload Identity)
    env.update(CLOUDSDK_CONFIG=str(tmp_path / "gcloud"), NO_GCE_CHECK="true",
               GCE_METADATA_HOST="127.0.0.1:9", GCE_METADATA_IP="127.0.0.1:9")
    out = _cli("--url", "gs://b/m", "--to", str(tmp_path / "m"), env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "no Google Cloud credentials for gs://b/m" in out.stderr
    assert "Workload Identity" in out.stderr and "serviceAccountName" in out.stderr


def test_gcs_config_alone_from_a_prefix(gcs: Any, tmp_path: Path) -> None:
    files = _model(tmp_path)
    for name, data in files.items():
        gcs.blob(f"llama/tiny/{name}").upload_from_string(data)
    assert download.read_config(f"gs://{gcs.name}/llama/tiny") == json.loads(files["config.json"])
