"""Local mode on a GPU machine: each emulated GPU runs on a real GPU of its own."""

from __future__ import annotations

import pytest

from spotserve.operator.local.backend import LocalGpus, visible_gpus


def test_each_worker_gets_a_gpu_of_its_own_until_its_instance_goes() -> None:
    gpus = LocalGpus("cuda", count=4)
    assert gpus.take("a", 2) == ["cuda:0", "cuda:1"]
    assert gpus.take("b", 1) == ["cuda:2"]
    with pytest.raises(RuntimeError, match=r"needs 2 GPU\(s\) and 1 of this machine's are free"):
        gpus.take("c", 2)
    gpus.give_back("a")     # preempted: its GPUs serve the next instance
    assert gpus.take("c", 2) == ["cuda:0", "cuda:1"]
    gpus.give_back("unknown")   # an instance that never got any: nothing happens
    assert gpus.free == [3]


def test_cpu_and_an_explicit_device_are_shared() -> None:
    assert LocalGpus("cpu", count=0).take("a", 2) == ["cpu", "cpu"]
    assert LocalGpus("cuda:1", count=0).take("a", 1) == ["cuda:1"]


@pytest.mark.parametrize(("visible", "count"), [("0,1,2", 3), ("", 0), ("-1", 0), ("3", 1)])
def test_visible_gpus_follow_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch,
                                                  visible: str, count: int) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert visible_gpus() == count
