"""A loopback world of worker processes (torch.distributed, gloo on 127.0.0.1) that runs a
script of configuration epochs, for the multi-process engine tests.

Each `Phase` is one epoch: the processes regroup into its configuration (pipeline 0 only),
load their slices from the checkpoint, and the driver submits requests at given steps,
optionally drains after k more steps and publishes the unfinished requests (each rank's
share of their KV caches, and with the "driver" handover also each whole cache on the
driver, the fallback the worker keeps for a leaving rank); the next phase may resume them:
its ranks receive the pieces the handover gives them (`kv_reshard_plan`'s rank-to-rank
moves, or their ranges cut from the driver's whole copy) and the driver adopts them, or
re-prefills without KV. Every process has a deadline, so a hang fails the test instead of
blocking it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from spotserve.layout import ParallelConfig, Position
from spotserve.worker.engine.engine import EngineConfig
from spotserve.worker.engine.scheduler import SchedulerConfig
from spotserve.worker.engine.sequence import SamplingParams

Arrival = tuple[int, str, list[int], SamplingParams]   # (step, request id, prompt, params)

ENGINE = EngineConfig(num_blocks=64, block_size=4,
                      scheduler=SchedulerConfig(max_num_seqs=8, max_batched_tokens=24))


@dataclass(frozen=True)
class Phase:
    config: ParallelConfig
    arrivals: tuple[Arrival, ...] = ()
    resume: bool = False          # continue the previous phase's exported requests
    drain_at: int | None = None   # at this step, allow `drain_steps` more, then export
    drain_steps: int = 0
    export_kv: bool = True        # False: the next phase re-prefills
    handover: str = "driver"      # "driver": whole caches on the driver; "ranks": shares
    ranks: dict[Position, int] | None = None   # default: positions in order → 0..n-1
    engine: EngineConfig = field(default=ENGINE)

    def rank_map(self) -> dict[Position, int]:
        if self.ranks is not None:
            return self.ranks
        return {p: i for i, p in enumerate(self.config.positions())}


def run_world(world: int, folder: Path, phases: list[Phase], timeout: float = 120.0
              ) -> list[dict[str, list[int]]]:
    """Run the phases on `world` processes; each phase's outputs (request → tokens so far)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_main, args=(r, world, port, str(folder), phases, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, value = queue.get(timeout=timeout)
            results[rank] = value
    except Exception as exc:
        raise AssertionError(f"world timed out or crashed; got ranks {sorted(results)}") from exc
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    errors = [v for v in results.values() if isinstance(v, str)]
    assert not errors, "\n".join(errors)
    return results[0]  # type: ignore[no-any-return]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _main(rank: int, world: int, port: int, folder: str, phases: list[Phase],
          queue: Any) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=60))
        queue.put((rank, _run_phases(folder, phases)))
    except Exception:
        queue.put((rank, f"rank {rank}:\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_phases(folder: str, phases: list[Phase]) -> list[dict[str, list[int]]]:
    import torch.distributed as dist

    from spotserve.model_spec import ModelSpec
    from spotserve.worker.engine.builder import open_epoch
    spec = ModelSpec.from_hf_config(Path(folder))
    states: list[Any] = []
    held: dict[Position, dict[str, Any]] = {}     # old position → its KV pieces by request
    previous: Phase | None = None
    outputs: list[dict[str, list[int]]] = []
    for number, phase in enumerate(phases):
        epoch = open_epoch(folder, number, phase.config, phase.rank_map(), phase.engine)
        carry: Any = None
        published: tuple[Any, dict[str, Any]] = (None, {})
        if epoch.runner is not None:
            position = epoch.groups.position
            if phase.resume and held and previous is not None:
                _stage_pieces(spec, previous, phase.config, position, held, epoch.runner)
            if epoch.engine is not None:   # every pipeline's driver plays the same script
                resumed = states if phase.resume and position.pipeline == 0 else []
                carry = (position.pipeline, _drive(epoch.engine, phase, resumed))
            else:
                epoch.runner.serve_forever()
            published = (position, epoch.runner.shares.held())
        epoch.close()
        carries: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(carries, carry)
        by_pipeline = dict(c for c in carries if c is not None)
        states, produced = by_pipeline[0]
        for d, (_, other) in by_pipeline.items():
            assert other == produced, f"pipeline {d} produced other tokens than pipeline 0"
        outputs.append(produced)
        everything: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everything, published)
        held = {pos: pieces for pos, pieces in everything if pos is not None and pieces}
        previous = phase
    return outputs


def _stage_pieces(spec: Any, old: Phase, new: ParallelConfig, me: Position,
                  held: dict[Position, dict[str, Any]], runner: Any) -> None:
    """Play the transfer service: put in this rank's shares the KV pieces it receives."""
    from spotserve.layout import kv_reshard_plan
    if old.handover == "driver":   # each rank cuts its ranges from the driver's whole copy
        layers = (runner.cache.layer_range.start, runner.cache.layer_range.stop)
        for request_id, pieces in held[Position(0, 0, 0)].items():
            whole = max(pieces, key=lambda p: (p.layers[1] - p.layers[0]) *
                        (p.heads[1] - p.heads[0]))
            runner.shares.put(request_id, whole.cut(layers, runner.cache.head_range))
        return
    for move in kv_reshard_plan(spec, old.config, 0, new, 0):
        if move.dst != me:
            continue
        for request_id, (piece,) in held[move.sources[0]].items():
            cut = piece.cut((move.layer, move.layer + 1), (move.head_start, move.head_stop))
            runner.shares.put(request_id, cut)


def run_local(folder: Path, phases: list[Phase]) -> list[dict[str, list[int]]]:
    """The same script in this process on one GPU's worth of model (P = M = 1), one
    worker's KV shares kept from epoch to epoch."""
    from spotserve.model_spec import ModelSpec
    from spotserve.worker.engine.builder import build_runner
    from spotserve.worker.engine.engine import Engine
    from spotserve.worker.engine.kv_shares import KVShares
    from spotserve.worker.model.parallel import EpochGroups
    layers = ModelSpec.from_hf_config(folder).num_layers
    states: list[Any] = []
    outputs = []
    shares = KVShares()
    for phase in phases:
        groups = EpochGroups.single(ParallelConfig.uniform(layers, 1, 1, 1))
        engine = Engine(build_runner(folder, groups, phase.engine, shares=shares),
                        phase.engine)
        states, produced = _drive(engine, phase, states if phase.resume else [])
        outputs.append(produced)
    return outputs


def merged(outputs: list[dict[str, list[int]]]) -> dict[str, list[int]]:
    """Each request's tokens over all phases (a later phase extends an earlier one)."""
    out: dict[str, list[int]] = {}
    for produced in outputs:
        for rid, tokens in produced.items():
            before = out.get(rid, [])
            assert tokens[:len(before)] == before, f"{rid}: resumed run rewrote its tokens"
            out[rid] = tokens if len(tokens) >= len(before) else before
    return out


def _drive(engine: Any, phase: Phase, states: list[Any]) -> tuple[list[Any], dict]:
    produced: dict[str, list[int]] = {s.request_id: list(s.output_token_ids) for s in states}
    for state in states:
        if state.num_computed:
            assert engine.adopt(state), f"{state.request_id}: a rank lacks its KV share"
        else:
            engine.resume(state)
    pending = sorted(phase.arrivals, key=lambda a: a[0])
    for step in range(1000):
        while pending and pending[0][0] <= step:
            _, rid, prompt, params = pending.pop(0)
            engine.submit(rid, prompt, params)
            produced[rid] = []
        if phase.drain_at is not None and step == phase.drain_at:
            engine.drain(phase.drain_steps)
        if engine.steps_left == 0 or not (engine.has_unfinished or pending):
            break
        for event in engine.step():
            assert event.index == len(produced[event.request_id])
            produced[event.request_id].append(event.token_id)
    exported = []
    if phase.drain_at is not None:
        exported = engine.publish(gather=phase.handover == "driver")
        if not phase.export_kv:
            for state in exported:
                state.num_computed = 0
    engine.shutdown()
    return exported, produced
