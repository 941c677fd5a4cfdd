"""The config.json of a Hugging Face model the operator is asked to serve, fetched before
any GPU pod starts.

The planner needs the model's shape (layers, heads, sizes) and whether the engine serves
its architecture, and a repository's name alone says neither: only a built-in model's
name does. So for a `huggingFace` source whose name is not a built-in one, the operator
fetches that repository's `config.json` (a few KB) from `$HF_ENDPOINT` (default
https://huggingface.co), with `$HF_TOKEN` when the operator has one, and keeps it in
memory per (repository, revision); a failure is not kept, so the next reconcile tries
again. Gated repositories need the operator's own token (set it with the chart's
`operator.extraEnv`): the operator never reads an LLMService's `credentialsSecret`, which
is for the download step.

A `url` source's config.json is read the same way (`spotserve.download.read_config`):
from an s3:// or gs:// prefix, that one object, with the operator's own cloud credentials
(IRSA, Workload Identity); from a tar archive (https or in a bucket), the archive streamed
up to its config.json, at most 64 MB of it (tar it with config.json first).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import aiohttp

from spotserve.download import read_config
from spotserve.errors import SpotserveError

HUB = "https://huggingface.co"


class ConfigFetcher:
    def __init__(self, endpoint: str | None = None, token: str | None = None,
                 timeout: float = 20.0) -> None:
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or HUB).rstrip("/")
        self.token = token if token is not None else os.environ.get("HF_TOKEN") or None
        self.timeout = timeout
        self._cache: dict[tuple[str, ...], dict[str, Any]] = {}
        self.fetches = 0   # requests made (the cache's hits make none)

    async def _kept(self, key: tuple[str, ...],
                    fetch: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """A config fetched once: `fetch()` the first time it succeeds, then kept."""
        if key not in self._cache:
            self.fetches += 1
            self._cache[key] = await fetch()
        return self._cache[key]

    async def hugging_face(self, repo: str, revision: str = "main") -> dict[str, Any]:
        """The repository's config.json at `revision`; raises SpotserveError saying why not."""
        return await self._kept((repo, revision), lambda: self._from_hub(repo, revision))

    async def url(self, url: str) -> dict[str, Any]:
        """The config.json of the model at a `url` source; raises SpotserveError saying why
        not. Read in a thread (the cloud SDKs block), within the fetcher's timeout."""
        return await self._kept(("url", url), lambda: self._from_url(url))

    async def _from_hub(self, repo: str, revision: str) -> dict[str, Any]:
        url = f"{self.endpoint}/{repo}/resolve/{quote(revision, safe='')}/config.json"
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            timeout = aiohttp.ClientTimeout(total=self.timeout)
            async with aiohttp.ClientSession(timeout=timeout) as session, \
                    session.get(url, headers=headers) as reply:
                if reply.status in (401, 403):
                    raise SpotserveError(
                        f"{repo}: config.json is gated or private (HTTP {reply.status}); give "
                        "the operator HF_TOKEN, or name a built-in model in servedName")
                if reply.status == 404:
                    raise SpotserveError(f"{repo}@{revision}: no config.json there (HTTP 404)")
                if reply.status != 200:
                    raise SpotserveError(f"{repo}: fetching config.json answered HTTP "
                                         f"{reply.status}")
                data = await reply.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            reason = str(exc) or type(exc).__name__
            raise SpotserveError(f"{repo}: config.json could not be fetched from "
                                 f"{self.endpoint} ({reason})") from None
        if not isinstance(data, dict):
            raise SpotserveError(f"{repo}: config.json is not a JSON object")
        return data

    async def _from_url(self, url: str) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(asyncio.to_thread(read_config, url), self.timeout)
        except TimeoutError:
            raise SpotserveError(f"{url}: config.json could not be read within "
                                 f"{self.timeout:g} s") from None
