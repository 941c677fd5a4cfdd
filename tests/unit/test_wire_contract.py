"""The wire contract: generated code is fresh and the services carry what later code needs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_not_stale() -> None:
    pytest.importorskip("grpc_tools")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_services_and_methods() -> None:
    from spotserve.v1 import control_pb2, inference_pb2, worker_pb2

    def methods(module: object, service: str) -> set[str]:
        desc = module.DESCRIPTOR.services_by_name[service]  # type: ignore[attr-defined]
        return {m.name for m in desc.methods}

    assert methods(inference_pb2, "Inference") == {"Generate", "Resume", "Cancel", "Health",
                                                   "ListModels"}
    assert methods(worker_pb2, "Worker") == {"Configure", "Submit", "Cancel", "Drain",
                                             "PullTensors", "OpenBulkPull", "Status",
                                             "Lookup", "Attach"}
    assert methods(control_pb2, "Control") == {"UpdateTopology", "Stats"}
    inference = inference_pb2.DESCRIPTOR.services_by_name["Inference"].methods_by_name
    worker = worker_pb2.DESCRIPTOR.services_by_name["Worker"].methods_by_name
    assert all(m.server_streaming for m in (inference["Generate"], inference["Resume"],
                                            worker["PullTensors"], worker["Attach"]))


def test_messages_round_trip() -> None:
    from spotserve.v1 import common_pb2, inference_pb2, worker_pb2

    req = inference_pb2.GenerateRequest(
        text="hi", sampling=common_pb2.SamplingParams(max_tokens=8, temperature=0.0, seed=7))
    back = inference_pb2.GenerateRequest.FromString(req.SerializeToString())
    assert back.WhichOneof("prompt") == "text"
    assert back.sampling.HasField("temperature") and back.sampling.temperature == 0.0
    assert not back.sampling.HasField("top_p")
    drain = worker_pb2.DrainRequest(epoch=3, steps=0)
    assert worker_pb2.DrainRequest.FromString(drain.SerializeToString()).WhichOneof(
        "limit") == "steps"


def test_slice_messages_mirror_the_layout_types() -> None:
    from spotserve.layout import TensorSlice
    from spotserve.v1 import common_pb2

    fields = {f.name for f in common_pb2.TensorSlice.DESCRIPTOR.fields}
    assert fields == set(TensorSlice.__dataclass_fields__)
