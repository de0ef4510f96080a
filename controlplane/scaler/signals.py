"""Reactive signals of one instance besides in-flight requests: its process's CPU and memory
(from /proc, for instances the local actuator runs) and the app's own saturation gauge read
from its Prometheus endpoint (e.g. a thread pool's busy ratio).

Each reader answers None when it cannot tell (process gone, endpoint down, no such gauge):
a signal that is not known must not drive a scale-down.
"""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from controlplane.model.group import GroupKey
from controlplane.model.instance import Instance
from controlplane.model.rules import Requests

GAUGE_TIMEOUT_S = 2.0
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def read_gauge(url: str, name: str, timeout: float = GAUGE_TIMEOUT_S) -> float | None:
    """The mean of the samples of gauge `name` at a Prometheus text endpoint, or None."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 direct
    try:
        with opener.open(url, timeout=timeout) as response:
            text = response.read().decode("utf-8", "replace")
        values = [
            sample.value
            for family in text_string_to_metric_families(text)
            if family.name == name
            for sample in family.samples
            if sample.name == name
        ]
    except (OSError, ValueError):
        return None
    return sum(values) / len(values) if values else None


def saturation(
    instances: Iterable[Instance], groups: set[GroupKey], gauges: Mapping[str, str]
) -> dict[GroupKey, float]:
    """Mean of each service's saturation gauge (`gauges`: service -> gauge name, from
    `spec.saturationGauge`) over the readable instances of each of `groups`: those on this
    host whose app port is known, as `inflight` reads only local sidecars."""
    readings: dict[GroupKey, list[float]] = {}
    for instance in instances:
        key = (instance.service, instance.group)
        name = gauges.get(instance.service)
        if key not in groups or name is None or not instance.app_port:
            continue
        if instance.host in ("127.0.0.1", "localhost"):
            value = read_gauge(f"http://{instance.host}:{instance.app_port}/metrics", name)
            if value is not None:
                readings.setdefault(key, []).append(value)
    return {key: sum(values) / len(values) for key, values in readings.items()}


def usage(
    instances: Iterable[Instance],
    groups: set[GroupKey],
    requests: Mapping[str, Requests],
    sampler: ProcessSampler,
) -> dict[GroupKey, tuple[float, float]]:
    """Mean (CPU, memory) of each of `groups`' instances on this host as a share of their
    Service's `spec.requests`, from their app processes (the registered pid). A group
    appears once one of its instances has been sampled twice (CPU is a rate)."""
    readings: dict[GroupKey, list[tuple[float, float]]] = {}
    sampled: set[int] = set()
    for instance in instances:
        key = (instance.service, instance.group)
        request = requests.get(instance.service)
        if key not in groups or request is None or instance.pid <= 0:
            continue
        if instance.host in ("127.0.0.1", "localhost"):
            sampled.add(instance.pid)
            cpu, resident = sampler.sample(instance.pid)
            if cpu is not None and resident is not None:
                readings.setdefault(key, []).append((cpu / request.cpu, resident / request.memory))
    sampler.forget_all_but(sampled)
    return {
        key: (
            sum(cpu for cpu, _ in values) / len(values),
            sum(memory for _, memory in values) / len(values),
        )
        for key, values in readings.items()
    }


@dataclass(frozen=True)
class _Mark:
    ticks: int
    at: float


class ProcessSampler:
    """CPU (cores busy since the previous sample) and resident memory of processes by pid."""

    def __init__(self) -> None:
        self._marks: dict[int, _Mark] = {}

    def forget_all_but(self, pids: set[int]) -> None:
        """Drop the marks of processes no longer asked about (instances gone)."""
        self._marks = {pid: mark for pid, mark in self._marks.items() if pid in pids}

    def sample(self, pid: int) -> tuple[float | None, int | None]:
        """(CPU in cores since this pid's previous sample, None on the first; RSS in bytes),
        both None when the process is gone."""
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/statm", encoding="ascii") as statm:
                resident = int(statm.read().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            self._marks.pop(pid, None)
            return None, None
        ticks = int(fields[11]) + int(fields[12])  # utime + stime (fields 14, 15 of stat)
        now = time.monotonic()
        previous = self._marks.get(pid)
        self._marks[pid] = _Mark(ticks, now)
        if previous is None or now <= previous.at:
            return None, resident
        return (ticks - previous.ticks) / _TICKS / (now - previous.at), resident
