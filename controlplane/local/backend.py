"""LocalBackend: the controller's actuator over `spotserve worker` processes on this
machine, plus the emulated cloud that boots, warns and kills them.

An instance is one worker process per emulated GPU, all bound to the instance's own
loopback address 127.0.0.N (OS-chosen ports). The cloud side (`add_instance`, `notice`,
`kill`) puts the controller's events on `events`; what is said to workers and the router
is the shared `WorkerFleet`'s. A worker the health monitor finds wedged (or exited) is
killed and started again on the same instance.

Everything is idempotent, as the contract asks: releasing or killing an instance already
gone does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spotserve.catalog import Catalog
from spotserve.lifetime import DIE_WITH_PARENT_ENV
from spotserve.model_spec import ModelSpec

from ..controller.actuator import ActuatorError
from ..controller.events import (
    Event,
    InstanceBooting,
    InstanceLost,
    InstanceReady,
    LoadChanged,
    NoticeReceived,
)
from ..controller.fleet import FleetOptions, WorkerFleet
from ..controller.wire import GrpcWire
from ..planner.cluster import GpuId

log = logging.getLogger("spotserve.local")
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class BackendOptions:
    model_dir: Path
    workdir: Path
    router_addresses: tuple[str, ...]  # every router replica's Control address
    token: str
    boot_delay: float = 0.0          # extra seconds before a requested instance is up
    max_batch: int = 8               # per pipeline, at least the plan's batch
    on_demand_limit: int = 0         # instances `request_capacity` may grant
    worker_args: tuple[str, ...] = (
        "--kv-blocks", "256", "--block-size", "8", "--max-batched-tokens", "256",
        "--max-model-len", "512", "--threads", "1", "--join-timeout", "20",
        "--grace", "4", "--log-level", "INFO")
    configure_timeout: float = 120.0
    health_deadline: float = 6.0     # a worker silent this long is killed and restarted
    device: str = "cpu"


@dataclass
class WorkerProcess:
    gpu: GpuId
    process: asyncio.subprocess.Process
    address: str

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0]


@dataclass
class LocalInstance:
    name: str
    instance_type: str
    capacity: str
    host: str
    state: str = "booting"           # booting | ready | notice | gone
    workers: list[WorkerProcess] = field(default_factory=list)
    deadline: float | None = None    # under notice: when it goes (Unix seconds)
    devices: list[str] = field(default_factory=list)   # each worker's --device


class LocalGpus:
    """Local mode with `--device cuda`: each emulated GPU gets a real one of its own
    (`cuda:<i>`), held while its instance lives; NCCL refuses two ranks on one GPU, and two
    workers would split its memory. With `cpu` (or an explicit `cuda:N`) every worker gets
    that device."""

    def __init__(self, device: str, count: int | None = None) -> None:
        self.device = device
        self.free = list(range(visible_gpus() if count is None else count)) \
            if device == "cuda" else []
        self.held: dict[str, list[int]] = {}

    def take(self, instance: str, gpus: int) -> list[str]:
        if self.device != "cuda":
            return [self.device] * gpus
        if len(self.free) < gpus:
            raise RuntimeError(f"{instance} needs {gpus} GPU(s) and {len(self.free)} of this "
                               f"machine's are free: local mode runs one worker per GPU")
        taken, self.free = self.free[:gpus], self.free[gpus:]
        self.held[instance] = taken
        return [f"cuda:{i}" for i in taken]

    def give_back(self, instance: str) -> None:
        self.free = sorted(self.free + self.held.pop(instance, []))


def visible_gpus() -> int:
    """How many CUDA GPUs a worker started from here can see: $CUDA_VISIBLE_DEVICES when
    set, else `nvidia-smi -L`'s count (0 without one)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


class LocalBackend(WorkerFleet):
    def __init__(self, model: ModelSpec, catalog: Catalog, options: BackendOptions) -> None:
        super().__init__(model, GrpcWire(options.token), FleetOptions(
            model_dir=str(options.model_dir), max_batch=options.max_batch,
            configure_timeout=options.configure_timeout,
            health_deadline=options.health_deadline))
        self.catalog, self.options = catalog, options
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.instances: dict[str, LocalInstance] = {}
        self.timeline: list[dict[str, Any]] = []
        self._next_host = 2
        self._granted = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._start = time.monotonic()
        self.gpus = LocalGpus(options.device)

    # ---- bookkeeping ------------------------------------------------------------------
    def note(self, kind: str, **fields: Any) -> None:
        entry = {"t": round(time.monotonic() - self._start, 3), "kind": kind, **fields}
        self.timeline.append(entry)
        log.info("%s %s", kind, fields)

    def _worker(self, gpu: GpuId) -> WorkerProcess:
        instance = self.instances.get(gpu.instance)
        if instance is None or instance.state == "gone" or gpu.index >= len(instance.workers):
            raise ActuatorError(f"GPU {gpu} is not running")
        return instance.workers[gpu.index]

    # ---- where the workers are (WorkerFleet) ------------------------------------------
    def address(self, gpu: GpuId) -> str:
        return self._worker(gpu).address

    def workers(self) -> Sequence[GpuId]:
        return [w.gpu for i in self.instances.values() if i.state in ("ready", "notice")
                for w in i.workers]

    def router_addresses(self) -> Sequence[str]:
        return self.options.router_addresses

    def rendezvous(self, driver: GpuId, epoch: int) -> str:
        # torch's store listens on every address: the port must be free on all of them
        return f"{self._worker(driver).host}:{_free_port('')}"

    async def ensure_workers(self, epoch: int, gpus: Sequence[GpuId]) -> None:
        """Every GPU's instance is up; one that is gone is said again (the controller may
        have missed it, say while it restarted) and the configuration fails."""
        gone = sorted({g.instance for g in gpus
                       if self.instances.get(g.instance, LocalInstance("", "", "", "")).state
                       in ("gone", "")})
        for name in gone:
            await self.events.put(InstanceLost(name))
        if gone:
            raise ActuatorError(f"instances {', '.join(gone)} are gone")

    def state_events(self) -> list[Event]:
        """Every instance's state now, as events (idempotent for the controller): what a
        controller started afresh must learn, as the operator relearns it from the Nodes."""
        out: list[Event] = []
        for name, i in self.instances.items():
            if i.state == "gone":
                out.append(InstanceLost(name))
                continue
            ready = i.state in ("ready", "notice")
            out.append((InstanceReady if ready else InstanceBooting)(name, i.instance_type,
                                                                    i.capacity))
            if i.state == "notice" and i.deadline is not None:
                out.append(NoticeReceived(name, i.deadline, "emulator"))
        return out

    def crashed(self, gpu: GpuId) -> bool:
        try:
            return self._worker(gpu).process.returncode is not None
        except ActuatorError:
            return False

    async def replace_worker(self, gpu: GpuId, reason: str) -> None:
        """Kill the worker (it may be stopped: SIGKILL works on those too) and start a
        fresh one on the same instance, holding nothing."""
        instance = self.instances.get(gpu.instance)
        if instance is None or instance.state == "gone" or gpu.index >= len(instance.workers):
            return
        old = instance.workers[gpu.index]
        await _stop(old, signal.SIGKILL)
        await self.wire.forget(old.address)
        self.note("worker-replaced", gpu=str(gpu), reason=reason)
        try:
            fresh = await self._spawn(gpu, instance.host, instance.devices[gpu.index])
        except (OSError, RuntimeError, TimeoutError) as exc:
            self.note("worker-restart-failed", gpu=str(gpu), error=str(exc))
            return
        if instance.state == "gone":   # killed while the worker restarted
            await _stop(fresh, signal.SIGKILL)
            return
        instance.workers[gpu.index] = fresh

    # ---- the emulated cloud -----------------------------------------------------------
    async def add_instance(self, name: str, instance_type: str, capacity: str = "spot",
                           delay: float = 0.0) -> None:
        """Boot an instance: its workers start; it is ready when every one answers."""
        if name in self.instances:
            return
        itype = self.catalog.instance(instance_type)
        host = f"127.0.0.{self._next_host}"
        self._next_host += 1
        instance = LocalInstance(name, instance_type, capacity, host)
        self.instances[name] = instance
        self.note("booting", instance=name, host=host, gpus=itype.gpus, capacity=capacity)
        await self.events.put(InstanceBooting(name, instance_type, capacity))
        await asyncio.sleep(delay)
        try:
            instance.devices = self.gpus.take(name, itype.gpus)
            workers = await asyncio.gather(*(self._spawn(GpuId(name, g), host, device)
                                             for g, device in enumerate(instance.devices)))
        except (OSError, RuntimeError, TimeoutError) as exc:
            self.note("boot-failed", instance=name, error=str(exc))
            instance.state = "gone"
            self.gpus.give_back(name)
            return
        instance.workers = list(workers)
        if instance.state == "gone":  # killed while booting
            await asyncio.gather(*(_stop(w, signal.SIGKILL) for w in instance.workers))
            self.gpus.give_back(name)
            return
        instance.state = "ready"
        self.note("ready", instance=name)
        await self.events.put(InstanceReady(name, instance_type, capacity))

    async def _spawn(self, gpu: GpuId, host: str, device: str) -> WorkerProcess:
        # the worker asks the kernel to SIGKILL it when this process dies, however it dies
        # (no preexec_fn: running Python between fork and exec in a threaded parent crashes)
        env = {**os.environ, "SPOTSERVE_TOKEN": self.options.token, "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
               DIE_WITH_PARENT_ENV: str(os.getpid())}
        self.options.workdir.mkdir(parents=True, exist_ok=True)
        log_file = self.options.workdir / f"worker-{gpu.instance}-{gpu.index}.log"
        with log_file.open("a") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "spotserve.cli", "worker", "--listen", f"{host}:0",
                "--model", str(self.options.model_dir), "--device", device,
                *self.options.worker_args, cwd=ROOT, env=env,
                stdout=asyncio.subprocess.PIPE, stderr=stderr, start_new_session=True)
        assert process.stdout is not None
        try:
            line = (await asyncio.wait_for(process.stdout.readline(), 180)).decode()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        if "worker listening" not in line:
            await process.wait()
            raise RuntimeError(f"worker {gpu} did not start ({_last_line(log_file)}); see "
                               f"{log_file}")
        return WorkerProcess(gpu, process, line.split()[-1])

    async def notice(self, name: str, grace: float) -> None:
        instance = self.instances.get(name)
        if instance is None or instance.state in ("gone", "notice"):
            return
        deadline = time.time() + grace
        instance.state = "notice" if instance.state == "ready" else instance.state
        instance.deadline = deadline
        self.note("notice", instance=name, grace=grace)
        await self.events.put(NoticeReceived(name, deadline, "emulator"))

    async def kill(self, name: str) -> None:
        """The instance vanishes: SIGKILL, no goodbye."""
        await self._gone(name, signal.SIGKILL, "killed")

    async def set_rate(self, rate: float) -> None:
        self.note("rate", rate=rate)
        await self.events.put(LoadChanged(rate))

    def pause_worker(self, gpu: GpuId) -> bool:
        """Wedge a worker (SIGSTOP), as a hung process would be; False if it is not running."""
        try:
            worker = self._worker(gpu)
        except ActuatorError:
            return False
        with contextlib.suppress(ProcessLookupError):
            worker.process.send_signal(signal.SIGSTOP)
        self.note("worker-stopped", gpu=str(gpu))
        return True

    async def close(self) -> None:
        """Stop every worker process and background task (also after a failure)."""
        await self.stop()
        for task in list(self._tasks):
            task.cancel()
        for instance in self.instances.values():
            instance.state = "gone"
            await asyncio.gather(*(_stop(w, signal.SIGKILL) for w in instance.workers))
        await self.wire.close()

    # ---- release and capacity ---------------------------------------------------------
    async def release(self, instances: Sequence[str]) -> None:
        for name in instances:
            await self._gone(name, signal.SIGTERM, "released")

    async def _gone(self, name: str, sig: signal.Signals, kind: str) -> None:
        """The instance's workers stopped with `sig`, and the controller told it is lost
        (a no-op for an instance unknown or already gone)."""
        instance = self.instances.get(name)
        if instance is None or instance.state == "gone":
            return
        instance.state = "gone"
        await asyncio.gather(*(_stop(w, sig) for w in instance.workers))
        self.gpus.give_back(name)
        for worker in instance.workers:
            self.serving.pop(worker.gpu, None)
            await self.wire.forget(worker.address)
        self.note(kind, instance=name)
        await self.events.put(InstanceLost(name))

    async def request_capacity(self, instance_type: str, count: int, capacity: str) -> None:
        """Spot capacity comes from the trace; what the controller asks for beyond it is
        granted as on-demand instances, up to `on_demand_limit`."""
        grant = max(0, min(count, self.options.on_demand_limit - self._granted))
        self.note("capacity-requested", instance_type=instance_type, count=count,
                  capacity=capacity, granted=grant)
        for _ in range(grant):
            self._granted += 1
            name = f"od{self._granted}"
            task = asyncio.create_task(self.add_instance(name, instance_type, "on-demand",
                                                         self.options.boot_delay))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


async def _stop(worker: WorkerProcess, sig: int) -> None:
    """Signal the worker and wait for it to exit (SIGKILL after 15 s). A stopped (SIGSTOP)
    worker is continued, so that SIGTERM can reach it."""
    process = worker.process
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
            if sig != signal.SIGKILL:
                process.send_signal(signal.SIGCONT)
    try:
        await asyncio.wait_for(process.wait(), 15)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


def _last_line(log_file: Path) -> str:
    """The last line a worker wrote: why it ended (its one-line error, or an exception's)."""
    try:
        lines = log_file.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "no output"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
