"""What a platform engineer types, against the real API server with a kubectl of the same
release: the CRD and every example apply, `kubectl get llms` shows the printer columns,
`kubectl scale llms/NAME` sets the desired instance count through the scale subresource,
and a misspelt field is refused with a message naming it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from ..manifests.crd_schema import CRD_PATH, ROOT
from .plane import ControlPlane, env_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def kubectl(plane: ControlPlane, *args: str, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(plane.bin / "kubectl"), *args], capture_output=True, text=True,
                          env=env_for(plane), timeout=120)
    if check:
        assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done


@pytest.fixture(scope="module")
def applied(api_server: ControlPlane) -> ControlPlane:
    kubectl(api_server, "apply", "-f", str(CRD_PATH))
    kubectl(api_server, "wait", "--for=condition=Established", "--timeout=60s",
            "crd/llmservices.spotserve.dev")
    kubectl(api_server, "create", "namespace", "llm")
    for path in EXAMPLES:
        kubectl(api_server, "apply", "-f", str(path))
    return api_server


def _crd_version() -> dict:  # type: ignore[type-arg]
    return dict(yaml.safe_load(CRD_PATH.read_text())["spec"]["versions"][0])


def test_get_llms_shows_the_printer_columns(applied: ControlPlane) -> None:
    columns = _crd_version()["additionalPrinterColumns"]
    out = kubectl(applied, "get", "llms", "-n", "llm").stdout.splitlines()
    wide = kubectl(applied, "get", "llms", "-n", "llm", "-o", "wide").stdout.splitlines()
    for column in columns:  # priority 0 by default, all of them with -o wide
        assert (column["name"].upper() in out[0]) == (column.get("priority", 0) == 0), \
            (column, out[0])
        assert column["name"].upper() in wide[0], (column, wide[0])
    names = {yaml.safe_load(p.read_text())["metadata"]["name"] for p in EXAMPLES}
    assert {line.split()[0] for line in out[1:]} == names


def test_scale_sets_the_desired_instances(applied: ControlPlane) -> None:
    name = yaml.safe_load(EXAMPLES[0].read_text())["metadata"]["name"]
    kubectl(applied, "scale", f"llms/{name}", "-n", "llm", "--replicas=3")
    path = _crd_version()["subresources"]["scale"]["specReplicasPath"]
    got = kubectl(applied, "get", f"llms/{name}", "-n", "llm",
                  f"-o=jsonpath={{{path}}}").stdout
    assert got == "3"


def test_a_misspelt_field_is_refused_naming_it(applied: ControlPlane, tmp_path: Path) -> None:
    obj = yaml.safe_load(EXAMPLES[0].read_text())
    obj["metadata"]["name"] = "misspelt"
    obj["spec"]["gpuPool"] = obj["spec"].pop("gpuPools")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(obj))
    done = kubectl(applied, "apply", "-f", str(bad), check=False)
    assert done.returncode != 0
    assert "gpuPool" in done.stderr, done.stderr
    assert kubectl(applied, "get", "llms/misspelt", "-n", "llm", check=False).returncode != 0
