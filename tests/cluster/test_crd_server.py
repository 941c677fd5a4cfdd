"""The LLMService CRD against a real kube-apiserver: the examples are accepted, every bad
sample of `tests/manifests/test_crd.py` is rejected by the server itself naming its field
(server-side schema and CEL, not our emulation of them), every good sample is accepted,
and the server's defaults are the ones the operator assumes."""

from __future__ import annotations

import time
from typing import Any

import pytest
import yaml

from ..manifests.crd_schema import CRD_PATH, merge_patch, validate
from ..manifests.test_crd import BAD, EXAMPLES, GOOD, MINIMAL, _base
from .plane import ControlPlane

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]
LLMS = "/apis/spotserve.dev/v1alpha1/namespaces/{ns}/llmservices"


@pytest.fixture(scope="module")
def crd(api_server: ControlPlane) -> ControlPlane:
    status, body = api_server.request(
        "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
        yaml.safe_load(CRD_PATH.read_text()))
    assert status == 201, body
    name = body["metadata"]["name"]
    for _ in range(300):
        _, got = api_server.request(
            "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
        if any(c["type"] == "Established" and c["status"] == "True"
               for c in (got.get("status") or {}).get("conditions") or ()):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the CRD never became Established: {got.get('status')}")
    for ns in ("llm", "ml"):
        api_server.request("POST", "/api/v1/namespaces", {"metadata": {"name": ns}})
    return api_server


def _create(plane: ControlPlane, obj: dict[str, Any]) -> tuple[int, Any]:
    ns = obj["metadata"].get("namespace", "default")
    # as kubectl sends it: unknown fields are errors, not silently pruned
    return plane.request("POST", LLMS.format(ns=ns) + "?dryRun=All&fieldValidation=Strict", obj)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_server_accepts_every_example(crd: ControlPlane, path: Any) -> None:
    status, body = _create(crd, yaml.safe_load(path.read_text()))
    assert status == 201, body.get("message")


@pytest.mark.parametrize("name", sorted(GOOD))
def test_the_server_accepts_every_good_sample(crd: ControlPlane, name: str) -> None:
    status, body = _create(crd, merge_patch(_base(), GOOD[name]))
    assert status == 201, body.get("message")


@pytest.mark.parametrize("name", sorted(BAD))
def test_the_server_rejects_every_bad_sample_naming_its_field(crd: ControlPlane,
                                                              name: str) -> None:
    patch, field = BAD[name]
    status, body = _create(crd, merge_patch(_base(), patch))
    assert status in (400, 422), (name, status, body.get("message"))  # 400: unknown field
    assert field in body["message"], (name, body["message"])


def test_the_server_defaults_what_the_operator_assumes(crd: ControlPlane) -> None:
    status, body = _create(crd, MINIMAL)
    assert status == 201, body.get("message")
    ours, problems = validate(MINIMAL)
    assert not problems
    assert body["spec"] == ours["spec"]
