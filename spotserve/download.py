"""`spotserve download`: fetch a model into a folder (the init step of worker pods).

Sources:

- a Hugging Face Hub repository (`--hf REPO [--revision REV]`, needs the `huggingface_hub`
  package; `HF_TOKEN` is read from the environment);
- an http(s) archive (`.tar`, `.tar.gz`, `.tgz`, `.zip`);
- an `s3://BUCKET/PREFIX` or `gs://BUCKET/PREFIX`: every object under the prefix, at its
  path relative to the prefix ("folder" placeholder keys are skipped), fetched in parallel
  through the Python SDKs, no command line tools: `boto3` for S3 (`pip install
  'spotserve[s3]'`), `google-cloud-storage` for GCS (`'spotserve[gcs]'`); both are in the
  worker and operator extras, so in both images. A URL naming one archive object
  (`s3://b/m.tar.gz`) is fetched and unpacked like an https archive.

Credentials come from each SDK's default chain, so the pod's identity works as is. S3:
`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, IRSA (`AWS_ROLE_ARN` +
`AWS_WEB_IDENTITY_TOKEN_FILE`), EKS Pod Identity, `AWS_PROFILE`, the instance role;
`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` point it at an S3-compatible store (MinIO,
Ceph, R2). GCS: Application Default Credentials (`GOOGLE_APPLICATION_CREDENTIALS`, GKE
Workload Identity, the node's service account); `STORAGE_EMULATOR_HOST` points it at an
emulator.

With `--metadata-only` (the router's init step: it needs the tokenizer, the chat template
and the config, never the weights) only those files are fetched: Hub files and bucket
objects by name; an archive is fetched whole and its weights dropped.

The folder must end up holding a `config.json` the model spec can read. Files are written
under a temporary name and renamed when complete, and the marker that makes a second run
with the same source a no-op is written last, so an interrupted download is simply done
again.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from spotserve.errors import SpotserveError
from spotserve.model_spec import ModelSpec

HELP = "Download a model (Hugging Face repo, https archive, s3:// or gs:// prefix) into a folder."
MARKER = ".spotserve-download.json"
METADATA_PATTERNS = ["*.json", "tokenizer*", "*.model", "*.txt", "*.jinja"]
HF_PATTERNS = [*METADATA_PATTERNS, "*.safetensors"]
ARCHIVES = (".tar", ".tar.gz", ".tgz", ".zip")
WORKERS = 8  # objects fetched at once from a bucket
EPILOG = """\
s3:// uses boto3 (pip install 'spotserve[s3]'): credentials from AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY, IRSA (AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE), EKS Pod Identity,
AWS_PROFILE or the instance role; AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL for an
S3-compatible store. gs:// uses google-cloud-storage (pip install 'spotserve[gcs]'):
Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, GKE Workload Identity);
STORAGE_EMULATOR_HOST for an emulator. Every object under the prefix is fetched, keeping
its relative path; no aws or gcloud command is needed."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", metavar="REPO", help="Hugging Face Hub repository id")
    source.add_argument("--url", help="http(s) archive URL, an s3://BUCKET/PREFIX or "
                                      "gs://BUCKET/PREFIX (every object under it), or an "
                                      "archive object in a bucket")
    parser.add_argument("--revision", default="main", help="Hub revision (default: main)")
    parser.add_argument("--to", required=True, metavar="DIR", help="destination folder")
    parser.add_argument("--metadata-only", action="store_true",
                        help="fetch the config, tokenizer and chat template files only, no "
                        "weights (what the router reads)")


def run(args: argparse.Namespace) -> int:
    dest = Path(args.to)
    source = f"hf:{args.hf}@{args.revision}" if args.hf else str(args.url)
    if args.metadata_only:
        source += " (metadata)"
    if _already(dest, source):
        print(f"{dest}: already holds {source}", file=sys.stderr)
        return 0
    if dest.exists() and not dest.is_dir():
        raise SpotserveError(f"--to {dest}: is a file, not a folder")
    created = not dest.exists()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpotserveError(f"--to {dest}: cannot create it ({exc.strerror})") from None
    # a marker left by another source must not vouch for a folder this run may leave half done
    (dest / MARKER).unlink(missing_ok=True)
    patterns = METADATA_PATTERNS if args.metadata_only else HF_PATTERNS
    try:
        if args.hf:
            _from_hub(args.hf, args.revision, dest, patterns)
        else:
            _from_url(str(args.url), dest, args.metadata_only)
    except BaseException:
        if created and not any(dest.iterdir()):
            dest.rmdir()   # a failed download leaves no empty folder behind
        raise
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


def is_metadata(name: str) -> bool:
    """A file the router needs (config, tokenizer, chat template), by its name."""
    return any(fnmatch.fnmatch(Path(name).name, p) for p in METADATA_PATTERNS)


def _from_hub(repo: str, revision: str, dest: Path, patterns: list[str]) -> None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SpotserveError("--hf needs the huggingface_hub package in this image "
                             "(pip install huggingface_hub)") from None
    try:
        snapshot_download(repo_id=repo, revision=revision, local_dir=str(dest),
                          allow_patterns=patterns)
    except Exception as exc:  # the hub raises many kinds; each is a user-facing failure
        raise SpotserveError(f"cannot download {repo}@{revision}: {exc}".splitlines()[0]) \
            from None


def _from_url(url: str, dest: Path, metadata_only: bool = False) -> None:
    scheme = url.split("://", 1)[0]
    if scheme in ("s3", "gs"):
        _from_bucket(url, dest, metadata_only)
        return
    if scheme not in ("https", "http"):
        raise SpotserveError(f"unsupported URL {url!r}: use https, s3 or gs")
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "archive"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, archive.open("wb") as out:
                length = response.headers.get("Content-Length")
                progress = Progress(url, int(length) if length and length.isdigit() else None)
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    progress.add(len(chunk))
                progress.close()
        except OSError as exc:
            raise SpotserveError(f"cannot download {url}: {exc}") from None
        _extract(archive, dest, url, metadata_only)


# --- config.json alone, before any download ------------------------------------------

CONFIG_SCAN_BYTES = 64 << 20   # of an archive read to find config.json before giving up


def read_config(url: str, scan_bytes: int = CONFIG_SCAN_BYTES) -> dict[str, Any]:
    """The model's config.json at `url`, fetched without its weights: from an s3:// or
    gs:// prefix, the one object; from a tar archive (https, or in a bucket), the archive
    streamed up to config.json and no further than `scan_bytes` (tar it with config.json
    first and that is a few KB). A zip keeps its index at its end, so its config is not
    read this way. Raises SpotserveError saying why not."""
    scheme = url.split("://", 1)[0]
    if scheme in ("s3", "gs"):
        data = _bucket_config(url, scan_bytes)
    elif scheme in ("https", "http"):
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                data = _archive_config(response, url, scan_bytes)
        except OSError as exc:
            raise SpotserveError(f"cannot read {url}: {exc}") from None
    else:
        raise SpotserveError(f"unsupported URL {url!r}: use https, s3 or gs")
    try:
        config = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SpotserveError(f"{url}: config.json is not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise SpotserveError(f"{url}: config.json is not a JSON object")
    return config


def _is_config(relative: str) -> bool:
    """config.json at an archive's top, or inside the one folder it wraps the model in
    (the download lifts that folder)."""
    parts = [p for p in relative.strip("/").split("/") if p not in ("", ".")]
    return parts[-1:] == ["config.json"] and len(parts) <= 2


def _bucket_config(url: str, scan_bytes: int) -> bytes:
    store, key, prefix = _bucket(url)
    with _explained(store, url):
        if key.endswith(ARCHIVES):
            archive = next((o for o in store.list(key) if o.key == key), None)
            if archive is not None:
                with store.open(archive) as stream:
                    return _archive_config(stream, url, scan_bytes)
        # the download copies the prefix as it is: the config must be at its top
        found = next((o for o in store.list(prefix + "config.json")
                      if o.key == prefix + "config.json"), None)
        if found is None:
            raise SpotserveError(f"{url}: no config.json at the top of this prefix (is the "
                                 "path misspelt, the model in a folder below it, or not "
                                 "uploaded yet?)")
        with store.open(found) as stream:
            return bytes(stream.read(scan_bytes))


class _Counted:
    """A stream that refuses to be read past `limit` bytes."""

    def __init__(self, stream: Any, limit: int) -> None:
        self.stream, self.limit, self.read_bytes = stream, limit, 0

    def read(self, size: int = -1) -> bytes:
        want = self.limit - self.read_bytes if size is None or size < 0 else size
        data = bytes(self.stream.read(min(want, self.limit - self.read_bytes + 1)))
        self.read_bytes += len(data)
        if self.read_bytes > self.limit:
            raise _TooFar
        return data


class _TooFar(Exception):
    pass


def _archive_config(stream: Any, url: str, scan_bytes: int) -> bytes:
    counted = _Counted(stream, scan_bytes)
    head = counted.read(4)
    if head.startswith(b"PK"):
        raise SpotserveError(f"{url}: a zip archive's config.json cannot be read before the "
                             "download (its index is at its end); use a tar archive with "
                             "config.json first, or serve from a bucket prefix")
    counted.stream = _Prefixed(head, stream)
    counted.read_bytes = 0
    try:
        with tarfile.open(fileobj=counted, mode="r|*") as tf:   # type: ignore[call-overload]
            for member in tf:
                if member.isfile() and _is_config(member.name):
                    config = tf.extractfile(member)
                    assert config is not None
                    return bytes(config.read())
    except _TooFar:
        raise SpotserveError(f"{url}: no config.json in the archive's first "
                             f"{_size(scan_bytes)}; put it first (name it first to tar: "
                             "tar czf model.tar.gz config.json *.safetensors tokenizer*), "
                             "or serve from a bucket prefix") from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise SpotserveError(f"{url}: not a readable tar archive ({exc})") from None
    raise SpotserveError(f"{url}: the archive holds no config.json")


class _Prefixed:
    """`head` (already read), then the rest of `stream`."""

    def __init__(self, head: bytes, stream: Any) -> None:
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        out = self.head if size < 0 else self.head[:size]
        self.head = self.head[len(out):]
        if size < 0:
            return out + bytes(self.stream.read())
        if len(out) < size:   # a full read: format sniffing needs more than the head
            out += bytes(self.stream.read(size - len(out)))
        return out


class Progress:
    """Bytes done of a download, its rate and what is left, on stderr: one line rewritten
    in place on a terminal (at most 5 times a second), else a plain line every `every`
    seconds (logs of an init container, say), and one at the end."""

    def __init__(self, label: str, total: int | None, every: float = 10.0,
                 stream: Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.total, self.every, self.clock = label, total, every, clock
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done, self.started = 0, clock()
        self._shown = self.started
        self._lock = threading.Lock()

    def add(self, nbytes: int, note: str = "") -> None:
        with self._lock:
            self.done += nbytes
            now = self.clock()
            if note and not self.tty:
                print(f"  {note}  {self.line(now)}", file=self.stream, flush=True)
                self._shown = now
            elif now - self._shown >= (0.2 if self.tty else self.every):
                self._show(now)

    def close(self) -> None:
        with self._lock:
            self._show(self.clock())
            if self.tty:
                print(file=self.stream, flush=True)

    def line(self, now: float) -> str:
        rate = self.done / max(now - self.started, 1e-9)
        text = f"{_size(self.done)}"
        if self.total:
            text += f" of {_size(self.total)} ({100 * self.done / self.total:.0f}%)"
        text += f", {_size(int(rate))}/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f", {(self.total - self.done) / rate:.0f} s left"
        return text

    def _show(self, now: float) -> None:
        self._shown = now
        if self.tty:
            print(f"\r{self.label}: {self.line(now)}\x1b[K", end="", file=self.stream,
                  flush=True)
        else:
            print(f"{self.label}: {self.line(now)}", file=self.stream, flush=True)


# --- object stores -----------------------------------------------------------------------

@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    handle: Any = None  # the SDK's object, when fetching needs it


class Store(Protocol):
    """One bucket of S3 or GCS, as `_from_bucket` needs it."""

    def list(self, prefix: str) -> Iterator[StoredObject]: ...

    def fetch(self, obj: StoredObject, path: Path) -> None: ...

    def open(self, obj: StoredObject) -> Any:
        """The object as a readable binary stream (a context manager)."""

    def error(self, exc: Exception) -> SpotserveError | None:
        """`exc` (raised by list or fetch) said in words, or None if it is not the SDK's."""


def _bucket(url: str) -> tuple[Store, str, str]:
    """The store of an s3:// or gs:// URL, its key, and the key as a folder prefix."""
    scheme, _, rest = url.partition("://")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise SpotserveError(f"{url}: no bucket name (use {scheme}://BUCKET/PREFIX)")
    prefix = key.strip("/") + "/" if key.strip("/") else ""
    return open_store(scheme, bucket, url), key, prefix


def _from_bucket(url: str, dest: Path, metadata_only: bool = False) -> None:
    store, key, prefix = _bucket(url)
    with _explained(store, url):
        files = [o for o in store.list(prefix)
                 if not o.key.endswith("/") and Path(o.key).name != MARKER]
        if not files and key.endswith(ARCHIVES):
            archive = next((o for o in store.list(key) if o.key == key), None)
            if archive is not None:
                _fetch_archive(store, archive, dest, url, metadata_only)
                return
    if metadata_only and files:
        files = [o for o in files if is_metadata(o.key)]
    if not files:
        raise SpotserveError(f"{url}: no objects under this prefix (is the bucket or path "
                             "misspelt, or the model not uploaded yet?)")
    _fetch_all(store, files, prefix, dest, url)


def _fetch_archive(store: Store, archive: StoredObject, dest: Path, url: str,
                   metadata_only: bool = False) -> None:
    print(f"{url}: fetching the archive ({_size(archive.size)})", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "archive"
        store.fetch(archive, path)
        _extract(path, dest, url, metadata_only)


def _fetch_all(store: Store, files: list[StoredObject], prefix: str, dest: Path,
               url: str) -> None:
    jobs: list[tuple[StoredObject, Path]] = []
    for obj in files:
        relative = obj.key[len(prefix):].lstrip("/")
        if not _inside(dest, relative):
            raise SpotserveError(f"{url}: object {obj.key!r} escapes the folder")
        jobs.append((obj, dest / relative))
    total = sum(o.size for o in files)
    print(f"{url}: {len(files)} files, {_size(total)}, into {dest}", file=sys.stderr)
    progress = Progress(url, total)
    with ThreadPoolExecutor(max_workers=min(WORKERS, len(jobs)),
                            thread_name_prefix="download") as pool:
        futures: dict[Future[None], tuple[StoredObject, Path]] = {
            pool.submit(_fetch_one, store, obj, target): (obj, target) for obj, target in jobs}
        done_count = 0
        pending: set[Future[None]] = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                if future.exception() is not None:
                    for other in pending:
                        other.cancel()
                    with _explained(store, url):
                        future.result()
                done_count += 1
                obj, target = futures[future]
                progress.add(obj.size, f"[{done_count}/{len(jobs)}] "
                                       f"{target.relative_to(dest)} ({_size(obj.size)})")
    progress.close()


def _fetch_one(store: Store, obj: StoredObject, target: Path) -> None:
    """Fetch under a hidden temporary name, then rename: a file present is a whole file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f".{target.name}.part")
    try:
        store.fetch(obj, part)
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)


@contextmanager
def _explained(store: Store, url: str) -> Iterator[None]:
    """The SDKs' exceptions as one-line SpotserveErrors (never a traceback)."""
    try:
        yield
    except SpotserveError:
        raise
    except Exception as exc:
        said = store.error(exc)
        if said is not None:
            raise said from None
        if isinstance(exc, OSError):
            raise SpotserveError(f"{url}: {exc}") from None
        raise


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def _from_package(exc: Exception, *packages: str) -> bool:
    """Whether `exc` is one of these packages' own (a failure to report, not a bug here)."""
    return type(exc).__module__.split(".")[0] in packages


def _missing(scheme: str, package: str, extra: str) -> SpotserveError:
    return SpotserveError(f"{scheme}:// URLs need the {package} package in this image: "
                          f"pip install 'spotserve[{extra}]'")


# Factories for the stores, by scheme; tests may put their own here.
STORES: dict[str, Callable[[str, str], Store]] = {}


def open_store(scheme: str, bucket: str, url: str) -> Store:
    builtin: dict[str, Callable[[str, str], Store]] = {"s3": S3Store, "gs": GCSStore}
    return (STORES.get(scheme) or builtin[scheme])(bucket, url)


AWS_CHAIN = ("AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (e.g. from model.credentialsSecret), "
             "IRSA (AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE, injected when the pod's "
             "serviceAccountName is annotated with eks.amazonaws.com/role-arn), EKS Pod "
             "Identity (AWS_CONTAINER_CREDENTIALS_FULL_URI, from a pod identity association "
             "of the serviceAccountName), AWS_PROFILE / ~/.aws files, and the instance role")
AWS_METHODS = {"env": "environment keys (AWS_ACCESS_KEY_ID)",
               "assume-role-with-web-identity": "IRSA web identity (AWS_ROLE_ARN)",
               "container-role": "EKS Pod Identity / container credentials",
               "iam-role": "the node's instance role (the pod has no IRSA or Pod Identity)",
               "shared-credentials-file": "~/.aws/credentials",
               "config-file": "~/.aws/config"}
AWS_REJECTED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                "TokenRefreshRequired", "InvalidIdentityToken", "ExpiredTokenException",
                "InvalidClientTokenId"}


class S3Store:
    """A bucket through boto3, with its default credential chain and endpoint settings."""

    def __init__(self, bucket: str, url: str) -> None:
        try:
            import boto3
            import boto3.s3.transfer
            import botocore.config
        except ImportError:
            raise _missing("s3", "boto3", "s3") from None
        import botocore.exceptions

        self.bucket, self.url = bucket, url
        try:
            session = boto3.session.Session()
            credentials = session.get_credentials()
            # retries and timeouts stay botocore's (AWS_MAX_ATTEMPTS, AWS_RETRY_MODE apply)
            config = botocore.config.Config(max_pool_connections=WORKERS * 4)
            self.client = session.client("s3", config=config)
        except (botocore.exceptions.BotoCoreError, ValueError) as exc:  # a bad profile, endpoint
            raise SpotserveError(f"cannot set up S3 for {url}: {exc}".splitlines()[0]) from None
        if credentials is None:
            raise SpotserveError(f"no AWS credentials for {url}: looked for {AWS_CHAIN}")
        self.method = AWS_METHODS.get(credentials.method, credentials.method)
        self.transfer = boto3.s3.transfer.TransferConfig(max_concurrency=4)

    def list(self, prefix: str) -> Iterator[StoredObject]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                        Prefix=prefix)
        for page in pages:
            for item in page.get("Contents", []):
                yield StoredObject(str(item["Key"]), int(item.get("Size", 0)))

    def fetch(self, obj: StoredObject, path: Path) -> None:
        self.client.download_file(self.bucket, obj.key, str(path), Config=self.transfer)

    def open(self, obj: StoredObject) -> Any:
        return self.client.get_object(Bucket=self.bucket, Key=obj.key)["Body"]

    def error(self, exc: Exception) -> SpotserveError | None:
        from botocore import exceptions as bx

        endpoint = self.client.meta.endpoint_url
        if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError
                      | bx.CredentialRetrievalError):
            return SpotserveError(f"no usable AWS credentials for {self.url} ({exc}): looked "
                                  f"for {AWS_CHAIN}")
        if isinstance(exc, bx.EndpointConnectionError | bx.ConnectTimeoutError
                      | bx.ReadTimeoutError | bx.ConnectionClosedError):
            hint = " (set by AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)" if (
                os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")) \
                else ""
            return SpotserveError(f"cannot reach the S3 endpoint {endpoint}{hint} for "
                                  f"{self.url}: {exc}")
        if isinstance(exc, bx.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if str(getattr(exc, "operation_name", "")).startswith("AssumeRole"):
                return SpotserveError(
                    f"{self.url}: the IAM role could not be assumed ({code}) with credentials "
                    f"from {self.method}: check the role's trust policy names the pod's "
                    f"serviceAccountName: {error.get('Message', '')}".splitlines()[0])
            if code == "NoSuchBucket":
                return SpotserveError(f"{self.url}: no bucket {self.bucket!r} at {endpoint}")
            if code in AWS_REJECTED:
                return SpotserveError(f"{self.url}: the AWS credentials were refused ({code}); "
                                      f"they came from {self.method}")
            if code in ("AccessDenied", "Forbidden", "403") or status == 403:
                return SpotserveError(
                    f"{self.url}: access denied with credentials from {self.method}; they "
                    f"need s3:ListBucket on {self.bucket} and s3:GetObject under the prefix")
            return SpotserveError(f"{self.url}: {code or status}: "
                                  f"{error.get('Message') or exc}".splitlines()[0])
        if _from_package(exc, "botocore", "boto3", "s3transfer", "urllib3"):
            return SpotserveError(f"{self.url}: {exc}".splitlines()[0])
        return None


GOOGLE_CHAIN = ("Application Default Credentials: GOOGLE_APPLICATION_CREDENTIALS (a key file, "
                "e.g. mounted from a Secret), gcloud's application-default login, and the "
                "GKE metadata server (Workload Identity: the pod's serviceAccountName bound "
                "to a Google service account with roles/storage.objectViewer)")


class GCSStore:
    """A bucket through google-cloud-storage, with Application Default Credentials."""

    def __init__(self, bucket: str, url: str) -> None:
        try:
            import google.auth.exceptions
            from google.cloud import storage
        except ImportError:
            raise _missing("gs", "google-cloud-storage", "gcs") from None
        self.bucket, self.url = bucket, url
        try:
            self.client = storage.Client()
        except google.auth.exceptions.DefaultCredentialsError:
            raise SpotserveError(f"no Google Cloud credentials for {url}: looked for "
                                 f"{GOOGLE_CHAIN}") from None

    def list(self, prefix: str) -> Iterator[StoredObject]:
        for blob in self.client.list_blobs(self.bucket, prefix=prefix):
            yield StoredObject(str(blob.name), int(blob.size or 0), blob)

    def fetch(self, obj: StoredObject, path: Path) -> None:
        obj.handle.download_to_filename(str(path))

    def open(self, obj: StoredObject) -> Any:
        return obj.handle.open("rb")

    def error(self, exc: Exception) -> SpotserveError | None:
        import google.auth.exceptions
        import requests.exceptions
        from google.api_core import exceptions as gx

        credentials = getattr(self.client, "_credentials", None)
        who = getattr(credentials, "service_account_email", None) or \
            type(credentials).__name__
        if isinstance(exc, google.auth.exceptions.DefaultCredentialsError):
            return SpotserveError(f"no Google Cloud credentials for {self.url}: looked for "
                                  f"{GOOGLE_CHAIN}")
        if isinstance(exc, google.auth.exceptions.RefreshError | gx.Unauthorized):
            return SpotserveError(f"{self.url}: the Google Cloud credentials ({who}) were "
                                  f"refused: {exc}".splitlines()[0])
        if isinstance(exc, gx.Forbidden):
            return SpotserveError(f"{self.url}: access denied for {who}; it needs "
                                  f"storage.objects.list and storage.objects.get on "
                                  f"{self.bucket} (roles/storage.objectViewer)")
        if isinstance(exc, gx.NotFound):
            return SpotserveError(f"{self.url}: no bucket {self.bucket!r} (or an object "
                                  "vanished while downloading)")
        if isinstance(exc, requests.exceptions.ConnectionError | gx.RetryError):
            host = os.environ.get("STORAGE_EMULATOR_HOST")
            where = f"the emulator at {host} (STORAGE_EMULATOR_HOST)" if host else "GCS"
            return SpotserveError(f"cannot reach {where} for {self.url}: {exc}".splitlines()[0])
        if _from_package(exc, "google", "requests", "urllib3"):
            return SpotserveError(f"{self.url}: {exc}".splitlines()[0])
        return None


# --- archives ----------------------------------------------------------------------------

def _extract(archive: Path, dest: Path, url: str, metadata_only: bool = False) -> None:
    """Unpack into a scratch folder inside `dest`, lift a wrapping folder, drop the weights
    with `metadata_only`, then move everything into `dest` (replacing what is there)."""
    scratch = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest))
    try:
        _unpack(archive, scratch, url)
        _flatten(scratch)
        if metadata_only:
            for path in [p for p in scratch.rglob("*") if p.is_file()]:
                if not is_metadata(path.name):
                    path.unlink()
        for item in scratch.iterdir():
            target = dest / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _unpack(archive: Path, dest: Path, url: str) -> None:
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
