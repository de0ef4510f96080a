"""Checking from outside that processes are gone (what "nothing left running" means)."""

from __future__ import annotations

import time
from pathlib import Path


def gone(pid: int) -> bool:
    """True when pid no longer runs (a zombie waiting for a reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    """Poll until pid is gone; False if it still runs after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def alive_mentioning(marker: str) -> list[str]:
    """Command lines of live processes that mention `marker` (e.g. a run's work dir)."""
    out = []
    for pid in Path("/proc").iterdir():
        if not pid.name.isdigit():
            continue
        try:
            cmdline = (pid / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline and not gone(int(pid.name)):
            out.append(cmdline)
    return out
