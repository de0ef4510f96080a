"""Machine packages a test needs (Chromium, iptables): installed with apt-get when missing
and we run as root (CI does), one installer at a time; otherwise the test fails in CI and is
skipped on a developer's machine without root."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

APT_TIMEOUT = 900
LOCK_FILE = Path(tempfile.gettempdir()) / "tasklane-test-setup.lock"


def missing(reason: str) -> None:
    """Fail in CI, where the setup must work; skip on a developer's machine without root."""
    if os.environ.get("CI"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def setup_lock() -> Iterator[None]:
    """One installer at a time: xdist workers each run the session fixtures."""
    with open(LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def apt_install(package: str) -> None:
    """`apt-get install -y PACKAGE`, refreshing the package lists once if that fails."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Waits for the dpkg lock: another apt may be running.
    install = ["apt-get", "-o", f"DPkg::Lock::Timeout={APT_TIMEOUT}", "install", "-y", "-q"]
    install.append(package)
    done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT)
    if done.returncode != 0:  # an old or missing package list: refresh it once
        subprocess.run(
            ["apt-get", "update", "-q"], env=env, capture_output=True, timeout=APT_TIMEOUT
        )
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT)
    if done.returncode != 0:
        missing(f"apt-get install {package} failed:\n{done.stderr[-2000:]}")


def require_command(command: str, package: str) -> str:
    """The path of `command`, installing its Debian `package` first when it is missing."""
    with setup_lock():
        path = shutil.which(command)
        if path is None:
            if os.geteuid() != 0:
                missing(f"no {command}: run `apt-get install {package}` as root")
            apt_install(package)
            path = shutil.which(command)
            if path is None:
                missing(f"apt-get installed {package}, but no {command} command is on PATH")
    assert path is not None
    return path
