"""Child-process helpers shared by the runtimes (etcd, Envoy, apps).

The local runtime starts real servers as children. If tasklane is killed hard (SIGKILL, OOM,
a crashed test worker) nothing runs our cleanup code, and orphaned etcd/Envoy processes would
keep their ports and break the next start. So each child asks the kernel to kill it when its
parent goes away, and every child is stopped the same polite-then-firm way.

The kernel request (PR_SET_PDEATHSIG) is made by util-linux `setpriv` in front of the command,
not by a Python `preexec_fn`: preexec_fn forces a plain fork() whose at-fork handlers restart
grpcio's pollers in the child, which then abort on the fds subprocess closes (seen here: 24 of
200 children of a process with live gRPC channels died with SIGABRT before exec). Without
preexec_fn, subprocess uses vfork and no Python or gRPC code runs in the child.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess

_SETPRIV = shutil.which("setpriv")


def dying_with_parent(command: list[str]) -> list[str]:
    """The command, prefixed so the kernel SIGKILLs it when its parent dies (Linux).

    Caveat of PR_SET_PDEATHSIG: "parent" is the *thread* that forked, so start long-lived
    children from a thread that lives as long as they should (e.g. the main thread). Where
    setpriv is missing the command runs unchanged, and stop_process() is the only cleanup.
    """
    if _SETPRIV is None:
        return list(command)
    return [_SETPRIV, "--pdeathsig", "KILL", "--", *command]


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM, wait up to `timeout`, then SIGKILL and reap. Safe on an already-dead process."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
        return
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait()
