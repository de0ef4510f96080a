"""Runs of scheduled tasks: what the scaler learns durations from and what keeps a chain up.

A run is open from `started_at` until `finished_at`; the scaler never scales a chain down
while one of its task's runs is open, whatever the predicted end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


def format_time(at: float) -> str:
    """UTC ISO 8601 to the second, as messages and tables show times."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


@dataclass(frozen=True)
class Run:
    """One run of a ScheduledTask; times are UTC epoch seconds."""

    task: str
    id: str
    started_at: float
    finished_at: float | None = None
    outcome: str = ""  # "succeeded", "failed", ... as reported; free text

    @property
    def open(self) -> bool:
        return self.finished_at is None

    @property
    def duration(self) -> float | None:
        """Seconds from start to finish, or None while the run is open."""
        return None if self.finished_at is None else self.finished_at - self.started_at
