"""The kopf app: node indices and one controller daemon per LLMService.

Four kopf indices keep the cluster's picture: Nodes, Node Events, pods marked
`DisruptionTarget` (by node), and the GPUs pods hold (by node: what other pods take from a
shared node). Each LLMService gets a daemon running a `ServiceRunner`
(runner.py) every interval; the daemon stops with the LLMService, and owner references
garbage-collect what it created.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from ..controller.actuator import ActuatorError
from . import manifests as m
from .api import KubeApi
from .nodes import disruption_condition, gpu_holder, pod_gpus
from .runner import Runtime, ServiceRunner

__all__ = ["Runtime", "register"]
log = logging.getLogger("spotserve.operator")


def register(registry: kopf.OperatorRegistry, runtime: Runtime) -> None:
    """Put the indices and the daemon into `registry`."""

    @kopf.index("nodes", id="node_index", registry=registry)
    def node_index(name: str, body: kopf.Body, **_: Any) -> dict[str, Any]:
        return {name: dict(body)}

    @kopf.index("events", id="node_event_index", field="involvedObject.kind", value="Node",
                registry=registry)
    def node_event_index(body: kopf.Body, **_: Any) -> dict[str, Any]:
        return {str(body.get("involvedObject", {}).get("name")): dict(body)}

    @kopf.index("pods", id="disruption_index", registry=registry,
                when=lambda body, **_: disruption_condition(body) is not None)
    def disruption_index(body: kopf.Body, **_: Any) -> dict[str, Any]:
        return {str(body.get("spec", {}).get("nodeName")): dict(body)}

    @kopf.index("pods", id="gpu_pod_index", registry=registry,
                when=lambda body, **_: bool(body.get("spec", {}).get("nodeName")) and
                pod_gpus(body) > 0)
    def gpu_pod_index(body: kopf.Body, **_: Any) -> dict[str, Any]:
        return {str(body["spec"]["nodeName"]): gpu_holder(body)}

    @kopf.daemon(m.GROUP, m.VERSION, m.PLURAL, registry=registry, cancellation_timeout=5.0)
    async def serve(body: kopf.Body, stopped: kopf.DaemonStopped, **kwargs: Any) -> None:
        indices = (kwargs["node_index"], kwargs["node_event_index"], kwargs["disruption_index"],
                   kwargs["gpu_pod_index"])
        api = KubeApi(runtime.connection)
        runner = ServiceRunner(runtime, api, body)
        try:
            while not stopped:
                try:
                    await runner.tick(body, indices)
                except ActuatorError as exc:
                    log.warning("%s: %s", runner.owner.name, exc)
                await stopped.wait(runtime.interval)
        finally:
            await runner.stop()
            await api.close()
