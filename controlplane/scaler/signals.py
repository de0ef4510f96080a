"""Reactive signals of one instance: its requests in flight (read by `inflight`), its CPU and
memory use and the app's own saturation gauge read from its Prometheus endpoint (e.g. a
thread pool's busy ratio). Two sources read them: `inflight` and `LocalSignals` here, for
instances on the control plane's host (their sidecar's admin, /proc), and the Kubernetes
actuator's `readings()` for its pods (`podsignals`: their sidecar's ready port, the Metrics
API). All give per-instance `Reading`s; `group_means` alone turns them into a group's.

Each reader answers None when it cannot tell (process gone, endpoint down, no such gauge):
a signal that is not known must not drive a scale-down.
"""

from __future__ import annotations

import math
import os
import time
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

from prometheus_client.parser import text_string_to_metric_families

from controlplane.model.group import GroupKey
from controlplane.model.instance import Instance
from controlplane.model.rules import Service

GAUGE_TIMEOUT_S = 2.0
GAUGE_READERS = 8  # endpoints read at once
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def read_gauge(url: str, name: str, timeout: float = GAUGE_TIMEOUT_S) -> float | None:
    """The mean of the samples of gauge `name` at a Prometheus text endpoint, or None.
    NaN and infinite samples (an idle pool's 0/0 busy ratio) say nothing: left out."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 direct
    try:
        with opener.open(url, timeout=timeout) as response:
            text = response.read().decode("utf-8", "replace")
        values = [
            sample.value
            for family in text_string_to_metric_families(text)
            if family.name == name
            for sample in family.samples
            if sample.name == name and math.isfinite(sample.value)
        ]
    except (OSError, ValueError):
        return None
    return sum(values) / len(values) if values else None


def read_gauges(targets: Sequence[tuple[str, str]]) -> list[float | None]:
    """read_gauge of each (url, gauge name), a few at a time: endpoints that hang cost a
    period about GAUGE_TIMEOUT_S, not GAUGE_TIMEOUT_S each."""
    if len(targets) < 2:
        return [read_gauge(url, name) for url, name in targets]
    with ThreadPoolExecutor(min(len(targets), GAUGE_READERS)) as pool:
        return list(pool.map(lambda target: read_gauge(*target), targets))


@dataclass(frozen=True)
class Reading:
    """One instance's reactive signals: requests in flight on its sidecar's inbound
    listener, CPU and memory use as a share of its request, and the app's saturation gauge;
    None where not known. The fields are the policy Observation's of the same names."""

    in_flight: float | None = None
    cpu: float | None = None
    memory: float | None = None
    saturation: float | None = None


SIGNALS = tuple(field.name for field in fields(Reading))
Readings = list[tuple[GroupKey, Reading]]  # one per instance, several per group


def group_means(readings: Iterable[tuple[GroupKey, Reading]]) -> dict[GroupKey, Reading]:
    """Each signal's mean over the instances of a group that know it, None where none does:
    the one place where the readings of every source (this host, the pods) meet."""
    known: dict[GroupKey, dict[str, list[float]]] = {}
    for key, reading in readings:
        signals = known.setdefault(key, {})
        for signal in SIGNALS:
            value = getattr(reading, signal)
            if value is not None:
                signals.setdefault(signal, []).append(value)
    return {
        key: Reading(**{signal: sum(values) / len(values) for signal, values in signals.items()})
        for key, signals in known.items()
    }


class LocalSignals:
    """The instances on the control plane's host (the local actuator's, or started by hand):
    CPU and memory of their app process (the registered pid) from /proc, against their
    Service's `spec.requests`; the saturation gauge (`spec.saturationGauge`) at their app
    port's /metrics. As `inflight`, it sees only instances registered on 127.0.0.1."""

    def __init__(self) -> None:
        self._sampler = ProcessSampler()  # CPU is a rate: the previous tick's sample per pid

    def read(
        self, instances: Iterable[Instance], groups: set[GroupKey], services: Mapping[str, Service]
    ) -> Readings:
        """A reading per local instance of `groups` whose Service declares a signal; CPU
        from an instance's second sample on."""
        local = [
            (instance, services[instance.service])
            for instance in instances
            if (instance.service, instance.group) in groups
            and instance.host in ("127.0.0.1", "localhost")
            and instance.service in services
        ]
        pids = {i.pid for i, service in local if service.requests is not None and i.pid > 0}
        usage = {pid: self._sampler.sample(pid) for pid in pids}
        self._sampler.forget_all_but(set(usage))
        gauged = [(i, s.saturation_gauge) for i, s in local if s.saturation_gauge and i.app_port]
        values = read_gauges([(f"http://{i.host}:{i.app_port}/metrics", g) for i, g in gauged])
        saturation = {i.key: value for (i, _), value in zip(gauged, values, strict=True)}
        readings: Readings = []
        for instance, service in local:
            cpu, resident = usage.get(instance.pid, (None, None))
            request = service.requests
            reading = Reading(
                cpu=None if cpu is None or request is None else cpu / request.cpu,
                memory=None if resident is None or request is None else resident / request.memory,
                saturation=saturation.get(instance.key),
            )
            if reading != Reading():
                readings.append(((instance.service, instance.group), reading))
        return readings


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
