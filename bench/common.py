"""What every benchmark prints first: the machine it ran on and how busy it was."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    """The 1, 5 and 15 minute load: figures taken on a busy machine say so."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> str:
    return (
        f"{os.cpu_count()} CPUs, {cpu_model()}, {platform.platform()}; "
        f"load average {load_average()}"
    )
