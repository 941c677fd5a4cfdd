"""`spotserve worker --gpus N`: one worker process per GPU of an instance, under one parent.

On Kubernetes an instance (a node) is one pod holding all its GPUs, as LeaderWorkerSet,
vLLM and KServe do it: the processes of one pod see every GPU, so tensor parallelism
inside the instance runs NCCL over NVLink/P2P instead of TCP between pods. GPU `i` of the
instance is served by worker `i`, listening on `--listen` port + i (and advertising
`--advertise` port + i; `--metrics` port + i; a fixed `--bulk-port` + i), on device
`cuda:i` (the `LOCAL_RANK` convention of torchrun: the worker turns `cuda` into
`cuda:$LOCAL_RANK`).

The parent stays torch-free and small:
- a worker that exits on its own is started again after a back-off (1 s doubling to 30 s,
  reset after a minute of running), while the others keep serving; the controller sees a
  fresh worker on that GPU and configures it again;
- SIGTERM or SIGINT goes to every worker (each drains within its `--grace`); the parent
  exits when all have, with the first non-zero exit code;
- the workers ask the kernel to kill them if the parent dies, however it dies.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from spotserve.errors import SpotserveError
from spotserve.lifetime import DIE_WITH_PARENT_ENV

MAX_GPUS = 16   # ports port .. port+15 belong to an instance's workers
BACKOFF_START, BACKOFF_MAX, HEALTHY_AFTER = 1.0, 30.0, 60.0
# the flags each worker gets its own value of (the rest are passed on as given)
PER_WORKER = frozenset({"gpus", "listen", "advertise", "metrics", "bulk_port"})


def _shift(address: str, by: int, flag: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise SpotserveError(f"{flag} {address!r}: give HOST:PORT")
    if int(port) == 0:
        raise SpotserveError(f"{flag} {address!r}: --gpus above 1 needs a fixed port "
                             "(worker i listens on port + i)")
    return f"{host}:{int(port) + by}"


def worker_argv(parser: argparse.ArgumentParser, args: argparse.Namespace,
                index: int) -> list[str]:
    """The `spotserve worker` arguments of the group's worker `index`: every flag the
    group was given, with the per-worker ones shifted by `index`."""
    out: list[str] = []
    for action in parser._actions:  # argparse keeps its options only here
        dest = action.dest
        if not action.option_strings or dest in PER_WORKER or dest == "help":
            continue
        value = getattr(args, dest, None)
        if value is None or value == action.default:
            continue
        if action.nargs == 0:   # a switch (store_true)
            out.append(action.option_strings[-1])
            continue
        out.append(f"{action.option_strings[-1]}={value}")
    out.append(f"--listen={_shift(args.listen, index, '--listen')}")
    if args.advertise:
        out.append(f"--advertise={_shift(args.advertise, index, '--advertise')}")
    if args.metrics:
        out.append(f"--metrics={_shift(args.metrics, index, '--metrics')}")
    if args.bulk_port:
        out.append(f"--bulk-port={args.bulk_port + index if args.bulk_port > 0 else -1}")
    return out


@dataclass
class Member:
    index: int
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = BACKOFF_START
    restart_at: float | None = None
    codes: list[int] = field(default_factory=list)


def _say(message: str, **fields: object) -> None:
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()), "level": "INFO",
             "logger": "spotserve.worker.group", "message": message, **fields}
    print(json.dumps(entry, default=str), file=sys.stderr, flush=True)


class Group:
    """The running workers of one instance."""

    def __init__(self, argvs: Sequence[list[str]]) -> None:
        self.members = [Member(i, list(a)) for i, a in enumerate(argvs)]
        self.stopping = False

    def _start(self, member: Member) -> None:
        env = {**os.environ, "LOCAL_RANK": str(member.index),
               DIE_WITH_PARENT_ENV: str(os.getpid())}
        member.process = subprocess.Popen(
            [sys.executable, "-m", "spotserve.cli", "worker", *member.argv], env=env)
        member.started, member.restart_at = time.monotonic(), None

    def _signal(self, sig: int) -> None:
        for member in self.members:
            if member.process is not None and member.process.poll() is None:
                member.process.send_signal(sig)

    def stop(self, sig: int, _frame: object = None) -> None:
        if not self.stopping:
            _say("stopping every worker", signal=signal.Signals(sig).name)
        self.stopping = True
        self._signal(signal.SIGTERM)

    def run(self, poll: float = 0.2) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.stop)
        for member in self.members:
            self._start(member)
        _say("worker group started", workers=len(self.members))
        while True:
            now = time.monotonic()
            alive = 0
            for member in self.members:
                process = member.process
                if process is not None and process.poll() is None:
                    alive += 1
                    if now - member.started > HEALTHY_AFTER:
                        member.backoff = BACKOFF_START
                    continue
                if process is not None:  # it just ended
                    member.codes.append(process.returncode)
                    member.process = None
                    if not self.stopping:
                        member.restart_at = now + member.backoff
                        _say("worker exited: starting it again", gpu=member.index,
                             code=process.returncode, after_s=member.backoff)
                        member.backoff = min(BACKOFF_MAX, member.backoff * 2)
                if not self.stopping and member.restart_at is not None and \
                        now >= member.restart_at:
                    self._start(member)
                    alive += 1
            if self.stopping and alive == 0:
                codes = [c for m in self.members for c in m.codes[-1:]]
                return next((c for c in codes if c not in (0, -signal.SIGTERM)), 0)
            time.sleep(poll)


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not 1 <= args.gpus <= MAX_GPUS:
        raise SpotserveError(f"--gpus {args.gpus}: give 1 to {MAX_GPUS}")
    argvs = [worker_argv(parser, args, i) for i in range(args.gpus)]
    return Group(argvs).run()
