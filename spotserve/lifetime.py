"""Child processes that must not outlive their parent (local mode's worker processes).

The parent puts its pid in `DIE_WITH_PARENT_ENV`; the child, first thing at start-up, asks
the kernel to SIGKILL it when the parent goes (Linux `PR_SET_PDEATHSIG`), then exits at
once if the parent is already gone. Doing this in the child instead of a `preexec_fn`
keeps Python code out of the window between fork and exec, which is unsafe in a parent
with threads (gRPC's, say).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

DIE_WITH_PARENT_ENV = "SPOTSERVE_DIE_WITH_PARENT"
PR_SET_PDEATHSIG = 1


def die_with_parent_if_asked() -> None:
    """Honour `DIE_WITH_PARENT_ENV` (a no-op without it, or off Linux)."""
    wanted = os.environ.get(DIE_WITH_PARENT_ENV, "")
    if not wanted.isdigit() or sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(wanted):  # the parent died before the request took effect
        os._exit(1)
