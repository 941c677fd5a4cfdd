"""The nodes of an LLMService's pools, as the controller's events (pure).

A node belongs to the first pool whose nodeSelector it matches; `describe` normalises it
with `nodes.describe_node` (remembering when each notice was first seen, so replays keep
their deadline; counting the GPUs the service may use there, given the pods on it: a node
whose GPUs other pods hold is left out) and `node_events` turns the picture into
`InstanceReady`/`InstanceBooting` (with the usable GPUs when fewer than the type's),
`NoticeReceived` (imminent notices only: a rebalance recommendation moves nothing) and
`InstanceLost` for nodes that vanished. Replays change nothing: the view is idempotent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from spotserve.catalog import Catalog

from ..controller.events import (
    Event,
    InstanceBooting,
    InstanceLost,
    InstanceReady,
    NoticeReceived,
)
from .nodes import NodeInfo, describe_node, remember, usable_gpus
from .spec import Pool, ServiceSpec


def pool_for(pools: Iterable[Pool], node: Mapping[str, Any]) -> Pool | None:
    labels = (node.get("metadata") or {}).get("labels") or {}
    return next((p for p in pools if p.accepts(labels)), None)


def instance_type(info: NodeInfo, pool: Pool, catalog: Catalog) -> str | None:
    if info.instance_type in catalog.instances:
        return info.instance_type
    if pool.catalog_type:
        return pool.catalog_type
    gpu = info.gpu_type or pool.gpu_type
    if gpu is None:
        return None
    kinds = catalog.instances_with(gpu, info.gpu_count or None) or catalog.instances_with(gpu)
    return kinds[0].name if kinds else None


def instance_type_of(pool: Pool, service: ServiceSpec) -> str | None:
    """The instance type a pool provides, as the catalog names it."""
    return pool.catalog_type or None


def describe(nodes: Mapping[str, Mapping[str, Any]], events: Mapping[str, list[Any]],
             disrupted: Mapping[str, list[Any]], service: ServiceSpec, now: float,
             first_seen: dict[str, dict[str, float]],
             pods: Mapping[str, list[Mapping[str, Any]]] | None = None,
             is_ours: Callable[[Mapping[str, Any]], bool] = lambda _: False
             ) -> dict[str, tuple[NodeInfo, Pool]]:
    """The GPU nodes of the service's pools with GPUs it may use, with their notices
    (sightings remembered); `pods`: the pods bound to each node (None: not known, every
    GPU counts), `is_ours` tells the service's own."""
    out = {}
    for name, node in nodes.items():
        pool = pool_for(service.pools, node)
        if pool is None:
            continue
        usable = None if pods is None else \
            usable_gpus(node, pods.get(name, ()), is_ours, service.settings.catalog)
        info = describe_node(node, now=now, catalog=service.settings.catalog,
                             first_seen=first_seen.get(name),
                             events=events.get(name, ()), disrupted_pods=disrupted.get(name, ()),
                             grace=service.grace, usable=usable)
        first_seen[name] = remember(first_seen.get(name, {}), info.notices)
        if (info.gpu_count > 0 or pool.gpus_per_instance) and usable != 0:
            out[name] = (info, pool)
    return out


def node_events(seen: Mapping[str, tuple[NodeInfo, Pool]], known: Iterable[str],
                catalog: Catalog) -> list[Event]:
    out: list[Event] = []
    for name, (info, pool) in sorted(seen.items()):
        kind = instance_type(info, pool, catalog)
        if kind is None:
            continue
        capacity = info.capacity_type if info.capacity_type in ("spot", "on-demand") \
            else pool.capacity
        zone = info.zone or ""
        notice = info.notice
        if info.ready or (notice is not None and notice.imminent):
            out.append(InstanceReady(name, kind, capacity, zone, info.usable_gpus or 0))
        else:
            out.append(InstanceBooting(name, kind, capacity, zone, info.usable_gpus or 0))
        if notice is not None and notice.imminent:
            out.append(NoticeReceived(name, notice.deadline, notice.cloud))
    out.extend(InstanceLost(name) for name in sorted(set(known) - set(seen)))
    return out
