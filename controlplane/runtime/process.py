"""Child-process helpers shared by the runtimes (etcd, Envoy, apps).

The local runtime starts real servers as children. If tasklane is killed hard (SIGKILL, OOM,
a crashed test worker) nothing runs our cleanup code, and orphaned etcd/Envoy processes would
keep their ports and break the next start. So each child asks the kernel to kill it when its
parent goes away, and every child is stopped the same polite-then-firm way.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys

_PR_SET_PDEATHSIG = 1

# Resolved in the parent at import time: dlopen() in a freshly forked child of a threaded
# process can deadlock, and preexec_fn runs in exactly that child.
_prctl = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError, AttributeError):
        _prctl = ctypes.CDLL(None, use_errno=True).prctl

# The pid of the process that is about to fork, recorded by an at-fork hook, so the child can
# tell whether its parent already died before prctl() took effect.
_forking_pid = os.getpid()


def _remember_forking_pid() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


os.register_at_fork(before=_remember_forking_pid)


def child_dies_with_parent() -> None:
    """preexec_fn: have the kernel SIGKILL this child when its parent dies (Linux only).

    Without it a hard-killed tasklane leaves etcd and Envoy running and holding their ports.
    Caveat of PR_SET_PDEATHSIG: "parent" is the *thread* that forked, so start long-lived
    children from a thread that lives as long as they should (e.g. the main thread).
    No-op where prctl is unavailable.
    """
    if _prctl is None:
        return
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != _forking_pid:  # the parent died before prctl() was in place
        os.kill(os.getpid(), signal.SIGKILL)


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
