"""A thin asynchronous Kubernetes REST client: create-or-patch, merge patch, delete, list.

Only the verbs the chart's RBAC grants (no update, no get on Secrets). Label selectors
are also applied on our side, so an API that ignores them (an emulator) gives the same
answer.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..controller.actuator import ActuatorError

CORE = {"Pod": "pods", "Service": "services", "Secret": "secrets", "Event": "events"}
APPS = {"Deployment": "deployments"}
GROUPED = {"PodDisruptionBudget": "/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets",
           "HorizontalPodAutoscaler":
               "/apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers",
           "EndpointSlice": "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"}


@dataclass(frozen=True)
class Connection:
    server: str
    token: str | None = None
    ca_file: str | None = None
    insecure: bool = False
    cert_file: str | None = None
    key_file: str | None = None


def collection(kind: str, namespace: str, api_version: str = "v1") -> str:
    if kind in CORE:
        return f"/api/v1/namespaces/{namespace}/{CORE[kind]}"
    if kind in APPS:
        return f"/apis/apps/v1/namespaces/{namespace}/{APPS[kind]}"
    if kind in GROUPED:
        return GROUPED[kind].format(ns=namespace)
    group_version, _, _ = api_version.partition("#")
    return f"/apis/{group_version}/namespaces/{namespace}/{kind}"


def matches(obj: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    have = (obj.get("metadata") or {}).get("labels") or {}
    return all(have.get(k) == v for k, v in labels.items())


class KubeApi:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._session: aiohttp.ClientSession | None = None

    def _ssl(self) -> ssl.SSLContext | bool:
        if self.connection.insecure:
            return False
        context = ssl.create_default_context(cafile=self.connection.ca_file)
        if self.connection.cert_file:
            context.load_cert_chain(self.connection.cert_file, self.connection.key_file)
        return context

    async def _request(self, method: str, path: str, body: Any = None,
                       content_type: str = "application/json",
                       params: Mapping[str, str] | None = None) -> tuple[int, Any]:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        if self.connection.token:
            headers["Authorization"] = f"Bearer {self.connection.token}"
        url = self.connection.server.rstrip("/") + path
        try:
            async with self._session.request(
                    method, url, data=None if body is None else json.dumps(body),
                    headers=headers, params=params, ssl=self._ssl()) as response:
                text = await response.text()
                return response.status, json.loads(text) if text else None
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise ActuatorError(f"{method} {path}: {exc}") from exc

    async def _checked(self, method: str, path: str, body: Any = None,
                       content_type: str = "application/json",
                       ok: tuple[int, ...] = (200, 201, 202)) -> Any:
        code, data = await self._request(method, path, body, content_type)
        if code not in ok:
            message = data.get("message") if isinstance(data, Mapping) else data
            raise ActuatorError(f"{method} {path}: HTTP {code}: {message}")
        return data

    async def apply(self, obj: Mapping[str, Any]) -> Any:
        """Create `obj`, or merge-patch it when it exists (idempotent, no update verb)."""
        meta = obj["metadata"]
        path = collection(str(obj["kind"]), str(meta["namespace"]))
        code, data = await self._request("POST", path, obj)
        if code == 409:
            return await self.patch(f"{path}/{meta['name']}", dict(obj))
        if code not in (200, 201, 202):
            raise ActuatorError(f"create {obj['kind']} {meta['name']}: HTTP {code}: {data}")
        return data

    async def create(self, obj: Mapping[str, Any]) -> bool:
        """Create `obj`; False when it already exists."""
        meta = obj["metadata"]
        code, data = await self._request(
            "POST", collection(str(obj["kind"]), str(meta["namespace"])), obj)
        if code == 409:
            return False
        if code not in (200, 201, 202):
            raise ActuatorError(f"create {obj['kind']} {meta['name']}: HTTP {code}: {data}")
        return True

    async def patch(self, path: str, body: Mapping[str, Any]) -> Any:
        return await self._checked("PATCH", path, body, "application/merge-patch+json")

    async def delete(self, path: str, resource_version: str | None = None) -> bool:
        """Delete the object at `path` (gone already counts as deleted). With
        `resource_version`, only while the object is still at that version: False when it
        changed since it was read (someone else acted on it meanwhile)."""
        body = None if resource_version is None else {
            "kind": "DeleteOptions", "apiVersion": "v1",
            "preconditions": {"resourceVersion": resource_version}}
        code, data = await self._request("DELETE", path, body)
        if code == 409:
            return False
        if code not in (200, 202, 404):
            message = data.get("message") if isinstance(data, Mapping) else data
            raise ActuatorError(f"DELETE {path}: HTTP {code}: {message}")
        return True

    async def list(self, path: str, labels: Mapping[str, str] | None = None
                   ) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in (labels or {}).items())
        code, data = await self._request("GET", path, params={"labelSelector": selector}
                                         if selector else None)
        if code != 200 or not isinstance(data, Mapping):
            raise ActuatorError(f"list {path}: HTTP {code}")
        return [o for o in data.get("items") or () if matches(o, labels or {})]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
