"""The test cluster's pod network: a private network namespace for the test process.

The API server refuses loopback addresses in EndpointSlices (127.0.0.0/8 "may not be in
the loopback range"), so Services could not find pods on 127.0.N.M. Instead the test
process moves into a network namespace of its own (`unshare`, as root or in a user
namespace) whose only interface is its own `lo`, holding 127.0.0.0/8 and the pod network
10.240.0.0/12 (nodes 10.243.x.y, pods 10.244.x.y). The control plane, the node agent's
pods and the tests' clients all run in it: every address is real and routable, and
nothing in it is reachable from outside the machine's test process tree (there is no
other interface).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

POD_NETWORK = "10.240.0.0/12"
CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000  # <sched.h>
_state: dict[str, str | None] = {}


def enter() -> str | None:
    """Move this process (its main thread, and every thread and child started from it
    afterwards) into a private network namespace; None when done, else why not."""
    if "reason" in _state:
        return _state["reason"]
    _state["reason"] = reason = _enter()
    return reason


def _enter() -> str | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        unshare = libc.unshare
    except (OSError, AttributeError):
        return "needs Linux's unshare(2)"
    ip = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip")
                                     if os.path.exists(p)), None)
    if ip is None:
        return "needs the `ip` command (Debian: iproute2)"
    uid, gid = os.geteuid(), os.getegid()
    try:
        if unshare(CLONE_NEWNET if uid == 0 else CLONE_NEWUSER | CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        if uid != 0:
            with open("/proc/self/setgroups", "w") as f:
                f.write("deny")
            with open("/proc/self/uid_map", "w") as f:
                f.write(f"0 {uid} 1")
            with open("/proc/self/gid_map", "w") as f:
                f.write(f"0 {gid} 1")
    except OSError as exc:
        return f"cannot make a network namespace ({exc}); run as root or allow user namespaces"
    for args in (["link", "set", "lo", "up"], ["addr", "add", POD_NETWORK, "dev", "lo"]):
        done = subprocess.run([ip, *args], capture_output=True, text=True)
        if done.returncode != 0:
            return f"ip {' '.join(args)}: {done.stderr.strip()}"
    return None


def node_ip(index: int) -> str:
    return f"10.243.{index // 250}.{index % 250 + 1}"


def pod_ip(node_index: int, pod_index: int) -> str:
    return f"10.244.{node_index % 256}.{pod_index}"
