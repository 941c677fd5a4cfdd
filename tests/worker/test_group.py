"""`spotserve worker --gpus N`: the worker processes of one instance under one parent (the
worker pod's command on Kubernetes): each GPU's worker on its own port, one that dies is
started again while the others keep serving, SIGTERM stops them all."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from spotserve.auth import call_metadata
from spotserve.cli import main
from spotserve.v1 import worker_pb2, worker_pb2_grpc
from spotserve.worker import group
from spotserve.worker.cli import add_arguments, device_of

from ..ports import free_port_range

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "group-token"


def parse(*argv: str) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser, parser.parse_args(list(argv))


def test_each_worker_gets_its_gpus_ports_and_every_other_flag() -> None:
    parser, args = parse("--gpus=3", "--listen=0.0.0.0:50051", "--advertise=10.0.0.5:50051",
                         "--model=/models", "--grace=7", "--metrics=0.0.0.0:9000",
                         "--max-model-len=480", "--dtype=float32", "--cuda-graphs")
    third = group.worker_argv(parser, args, 2)
    _, child = parse(*third)
    assert child.gpus == 1  # a worker of the group serves one GPU
    assert (child.listen, child.advertise, child.metrics) == (
        "0.0.0.0:50053", "10.0.0.5:50053", "0.0.0.0:9002")
    assert (child.model, child.grace, child.max_model_len, child.dtype) == (
        "/models", 7.0, 480, "float32")
    assert child.cuda_graphs   # a switch passes as a switch
    assert child.kv_blocks is None and child.bulk_port == 0  # defaults stay defaults


def test_cuda_means_the_gpu_of_the_workers_local_rank() -> None:
    assert device_of("cuda", True, "3") == "cuda:3"
    assert device_of(None, True, "1") == "cuda:1"
    assert device_of(None, False, "1") == "cpu"
    assert device_of("cuda:0", True, "2") == "cuda:0"  # an explicit index wins
    assert device_of("cuda", True, None) == "cuda"


@pytest.mark.parametrize(("argv", "message"), [
    (["--gpus", "2", "--listen", "127.0.0.1:0"], "needs a fixed port"),
    (["--gpus", "17", "--listen", "127.0.0.1:5000"], "give 1 to 16"),
])
def test_bad_group_flags_are_one_clear_line(argv: list[str], message: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def answers(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            worker_pb2_grpc.WorkerStub(channel).Status(
                worker_pb2.StatusRequest(), metadata=call_metadata(TOKEN), timeout=2)
            return True
        except grpc.RpcError:
            return False


def children(pid: int) -> dict[int, str]:
    """pid → command line of `pid`'s child processes."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            out[int(entry)] = cmdline.decode()
    return out


def until(what: str, check: object, timeout: float = 60.0) -> None:
    give_up = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.timeout(120)
def test_a_dead_worker_is_started_again_and_sigterm_stops_the_group(tmp_path: Path) -> None:
    base = free_port_range(["127.0.0.1"], 2)
    first, second = f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"
    env = {**os.environ, "SPOTSERVE_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    with (tmp_path / "group.log").open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "spotserve.cli", "worker", "--gpus", "2", "--listen",
             first, "--device", "cpu", "--grace", "2"], cwd=ROOT, env=env,
            stdout=subprocess.DEVNULL, stderr=log)
    try:
        until("both workers answering", lambda: answers(first) and answers(second))
        workers = children(process.pid)
        assert len(workers) == 2
        victim = next(pid for pid, cmd in workers.items() if second in cmd)
        keeper = next(pid for pid in workers if pid != victim)
        os.kill(victim, signal.SIGKILL)  # an OOM kill of GPU 1's worker
        until("GPU 1's worker started again", lambda: victim not in children(process.pid)
              and len(children(process.pid)) == 2 and answers(second))
        assert keeper in children(process.pid), "GPU 0's worker kept serving throughout"
        assert answers(first)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert not answers(first) and not answers(second)
    finally:
        if process.poll() is None:
            process.kill()
    text = (tmp_path / "group.log").read_text()
    assert "worker exited: starting it again" in text and "stopping every worker" in text


@pytest.mark.parametrize(("bf16", "requested", "served"), [
    (False, "", "float16"),          # a T4 or V100, the checkpoint's bf16: fp16
    (True, "", "bfloat16"),          # an A100 or newer: the checkpoint's
    (False, "bfloat16", "bfloat16"),  # asked for by name: what was asked
])
def test_a_bf16_checkpoint_is_served_in_fp16_where_the_gpu_lacks_bf16(
        tmp_path: Path, bf16: bool, requested: str, served: str) -> None:
    from spotserve.operator.local.tiny_model import build_tiny_llama
    from spotserve.worker.server import WorkerOptions, WorkerServicer
    build_tiny_llama(tmp_path / "m", torch_dtype="bfloat16")
    servicer = WorkerServicer(WorkerOptions(checkpoint=tmp_path / "m", bf16=bf16))
    spec, _ = servicer._spec_for(worker_pb2.ModelRef(dtype=requested))
    assert spec.dtype == served
