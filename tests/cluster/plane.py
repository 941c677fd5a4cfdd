"""A real Kubernetes control plane on loopback for tests (the envtest pattern): an
embedded etcd, kube-apiserver (RBAC, a service-account token issuer, a static admin
token), kube-controller-manager and kube-scheduler, built from the `k8s.io/kubernetes` Go
module by `testcluster/build.sh` and cached under `build/kube-<release>/`.

No kubelet and no container runtime: pods bound to nodes are run by a node agent of ours.
Every process binds to 127.0.0.1 on ports picked free, logs to the plane's folder, and is
stopped (SIGTERM, then SIGKILL) when the plane stops.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "testcluster" / "build.sh"
SERVICE_RANGE = "10.96.0.0/16"


class PlaneError(RuntimeError):
    """The control plane could not be built or started (says which part, and its log)."""


def build() -> Path:
    """The folder of the built binaries (building them the first time: minutes)."""
    done = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True)
    if done.returncode != 0:
        raise PlaneError(f"building the test cluster failed:\n{done.stderr[-4000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def _free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports (held together while picked, so none repeats)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


@dataclass
class ControlPlane:
    """`start()` brings etcd and the API server up (then the scheduler and the
    controller-manager), `stop()` ends them all. `admin_token` authenticates as
    system:masters; `kubeconfig` is a file kubectl, helm and kopf read."""

    workdir: Path
    bin: Path = field(default_factory=build)
    admin_token: str = field(default_factory=lambda: secrets.token_hex(16))
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.bin = self.bin.resolve()
        (self.etcd_port, self._peer_port, self.api_port, self._scheduler_port,
         self._manager_port) = _free_ports(5)
        self.server = f"https://127.0.0.1:{self.api_port}"
        self.kubeconfig = self.workdir / "kubeconfig"

    # ---- lifecycle --------------------------------------------------------------------
    def start(self, scheduler: bool = True, controller_manager: bool = True) -> ControlPlane:
        try:
            self._etcd()
            self._apiserver()
            self._write_kubeconfig()
            if scheduler:
                self._spawn("kube-scheduler", ["--kubeconfig", str(self.kubeconfig),
                                               "--leader-elect=false",
                                               "--bind-address=127.0.0.1",
                                               f"--secure-port={self._scheduler_port}"])
            if controller_manager:
                self._controller_manager()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for name, process in reversed(list(self.processes.items())):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
            self.processes.pop(name)

    # ---- the parts --------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("wb")
        process = subprocess.Popen([str(self.bin / name), *args], stdout=log,
                                   stderr=subprocess.STDOUT, cwd=self.workdir,
                                   start_new_session=True)
        self.processes[name] = process
        return process

    def _etcd(self) -> None:
        self._spawn("etcd", ["--data-dir", str(self.workdir / "etcd"),
                             "--listen-client-url", f"http://127.0.0.1:{self.etcd_port}",
                             "--listen-peer-url", f"http://127.0.0.1:{self._peer_port}"])
        self._wait("etcd", lambda: "etcd ready" in self.log("etcd"), 60)

    def _apiserver(self) -> None:
        pki = self.workdir / "pki"
        pki.mkdir(exist_ok=True)
        key, pub = pki / "sa.key", pki / "sa.pub"
        if not key.exists():
            subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True,
                           capture_output=True)
            subprocess.run(["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub)],
                           check=True, capture_output=True)
        (pki / "tokens.csv").write_text(f'{self.admin_token},admin,admin,"system:masters"\n')
        self._spawn("kube-apiserver", [
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            "--endpoint-reconciler-type=none",  # loopback: no kubernetes Service endpoints
            f"--secure-port={self.api_port}", f"--cert-dir={pki}",
            "--authorization-mode=Node,RBAC", f"--token-auth-file={pki / 'tokens.csv'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pub}", f"--service-account-signing-key-file={key}",
            f"--service-cluster-ip-range={SERVICE_RANGE}", "--allow-privileged=true",
            "--enable-admission-plugins=NodeRestriction", "--v=1"])
        self._wait("kube-apiserver", self._ready, 120)

    def _controller_manager(self) -> None:
        pki = self.workdir / "pki"
        self._spawn("kube-controller-manager", [
            "--kubeconfig", str(self.kubeconfig), "--leader-elect=false",
            "--bind-address=127.0.0.1", f"--secure-port={self._manager_port}",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'apiserver.crt'}", "--use-service-account-credentials",
            f"--service-cluster-ip-range={SERVICE_RANGE}",
            "--node-monitor-grace-period=40s"])
        # working once it made the default namespace's service account (pods need it)
        self._wait("kube-controller-manager", lambda: self.request(
            "GET", "/api/v1/namespaces/default/serviceaccounts/default")[0] == 200, 120)

    def _write_kubeconfig(self) -> None:
        self.kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {
                "server": self.server, "insecure-skip-tls-verify": True}}],
            "users": [{"name": "admin", "user": {"token": self.admin_token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin"}}],
        }, indent=1))

    # ---- talking to it ----------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, token: str | None = None,
                content_type: str = "application/json") -> tuple[int, Any]:
        """One API call as admin (or as `token`): the status and the decoded JSON."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method, headers={
            "Authorization": f"Bearer {token or self.admin_token}",
            "Content-Type": content_type, "Accept": "application/json"})
        context = ssl._create_unverified_context()  # the API server's self-signed cert
        try:
            with urllib.request.urlopen(req, context=context, timeout=30) as reply:
                return reply.status, _decode(reply.read())
        except urllib.error.HTTPError as exc:
            return exc.code, _decode(exc.read())

    def _ready(self) -> bool:
        with contextlib.suppress(OSError, ValueError):
            status, _ = self.request("GET", "/readyz")
            return status == 200
        return False

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _wait(self, name: str, ready: Any, timeout: float) -> None:
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            if self.processes[name].poll() is not None:
                raise PlaneError(f"{name} exited ({self.processes[name].returncode}):\n"
                                 + self.log(name)[-3000:])
            if ready():
                return
            time.sleep(0.2)
        raise PlaneError(f"{name} not ready in {timeout:.0f} s:\n" + self.log(name)[-3000:])


def _decode(raw: bytes) -> Any:
    """JSON as JSON; anything else (/readyz says "ok") as its text."""
    try:
        return json.loads(raw or b"null")
    except ValueError:
        return raw.decode(errors="replace")


def env_for(plane: ControlPlane) -> dict[str, str]:
    """The environment a client (kubectl, helm, the operator) uses to reach the plane."""
    return {**os.environ, "KUBECONFIG": str(plane.kubeconfig)}
