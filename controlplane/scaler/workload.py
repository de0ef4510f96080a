"""The simulator's input: rules plus how their runs and start-ups really behave.

One YAML document, a `Workload`, that embeds the same rule documents `tasklane apply` takes
(so a workload is checked exactly like a rule file) and adds what rules cannot know:

    apiVersion: tasklane.io/v1
    kind: Workload
    metadata: {name: week}
    spec:
      start: 2026-03-29T00:00:00Z  # measured days start here (an ISO time with offset)
      warmup: 24h                  # simulated before `start`, not measured: history builds up
      seed: 1
      parkedCost: 0.25             # a parked instance's cost per hour, in replica-hours
      defaults:                    # for every task and group unless overridden
        startup: {median: 40s, p95: 70s}   # start-to-ready of one instance
        skip: 0.02                 # share of fires with no run
        extraRunsPerDay: 0.1       # manual runs at random times
        overrun: {probability: 0.03, factor: 2}
        startDelay: 5s             # a run starts up to this long after its fire
      groups:
        fund-facade/task: {startup: {median: 30s, p95: 50s}}
      tasks:
        nightly-fund-yield: {duration: {median: 5h, p95: 6h}, skip: 0}
      rules: [ ...Service, TaskChain and ScheduledTask documents... ]

A task without `duration` runs a median of 80 % of its `expectedDuration` with p95 at it.

`parkedCost` prices a parked (keep-alive) instance against a running one. A parked instance
is stopped (SIGSTOP): it holds its memory but uses no CPU, so it costs memory's share of an
instance's price. 0.25 is that share for an instance of 1 vCPU and 3 GiB at cloud list prices
where a GiB-hour costs about a ninth of a vCPU-hour. On Kubernetes a paused pod keeps its
whole CPU request reserved unless the request is lowered while it is parked: set 1 there.
Every error is one line naming the file and the field, like a rule file's.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import yaml

from controlplane.errors import RuleError
from controlplane.model.cron import parse_duration
from controlplane.model.group import GroupKey
from controlplane.model.load import Parsed
from controlplane.model.rules import API_VERSION, RuleSet, from_document
from controlplane.model.text import describe, quote
from controlplane.model.validate import apply
from controlplane.scaler.profile import managed_groups

KIND = "Workload"
_Z95 = 1.6448536269514722  # standard normal quantile of 0.95
_DEFAULT_WARMUP_S = 86400.0
_DEFAULT_MEDIAN_SHARE = 0.8
_DEFAULT_PARKED_COST = 0.25
_BEHAVIOUR = ("duration", "skip", "extraRunsPerDay", "overrun", "startDelay")


@dataclass(frozen=True)
class Spread:
    """A log-normal duration given by its median and p95 in seconds: start-ups and runs
    are skewed to the right (never below zero, occasionally much longer)."""

    median: float
    p95: float

    @property
    def sigma(self) -> float:
        return math.log(self.p95 / self.median) / _Z95

    def sample(self, rng: random.Random) -> float:
        return rng.lognormvariate(math.log(self.median), self.sigma)


@dataclass(frozen=True)
class TaskBehaviour:
    """How the runs of one ScheduledTask really go."""

    duration: Spread
    skip: float
    extra_runs_per_day: float
    overrun_probability: float
    overrun_factor: float
    start_delay_s: float


@dataclass(frozen=True)
class Workload:
    """Rules, run behaviour per task and start-up time per managed group."""

    name: str
    rules: RuleSet
    start: float  # epoch s, UTC
    warmup_s: float
    seed: int
    tasks: Mapping[str, TaskBehaviour]
    startup: Mapping[GroupKey, Spread]
    parked_cost: float = _DEFAULT_PARKED_COST  # replica-hours per hour parked


def load_workload(path: Path) -> Workload:
    """Read and check a workload file; RuleError names the file and the field."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise RuleError(f"{path}: no such file or directory") from None
    except OSError as error:
        raise RuleError(f"{path}: cannot read: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise RuleError(f"{path}: not UTF-8 text (byte {error.start})") from None
    return parse_workload(text, str(path))


def parse_workload(text: str, filename: str) -> Workload:
    """A workload from YAML text; `filename` is used in messages."""
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = " ".join(str(getattr(error, "problem", None) or error).split())
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RuleError(f"{filename}: YAML syntax error{where}: {problem}") from None
    if len(documents) != 1:
        raise RuleError(f"{filename}: expected one Workload document, got {len(documents)}")
    return _Reader(filename).workload(documents[0])


@dataclass(frozen=True)
class _Embedded(Parsed):
    """A rule document inside spec.rules, named by its index in messages."""

    @property
    def where(self) -> str:
        return f"{self.file}: spec.rules[{self.document - 1}] ({self.kind} {self.name})"


class _Reader:
    def __init__(self, filename: str) -> None:
        self.filename = filename

    def fail(self, path: str, problem: str) -> NoReturn:
        raise RuleError(
            f"{self.filename}: {path}: {problem}" if path else f"{self.filename}: {problem}"
        )

    def fields(self, value: object, path: str, allowed: tuple[str, ...]) -> dict[Any, Any]:
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping, got {describe(value)}")
        for key in value:
            if key not in allowed:
                shown = key if isinstance(key, str) else describe(key)
                self.fail(
                    f"{path}.{shown}" if path else str(shown),
                    f"unknown field (expected one of: {', '.join(allowed)})",
                )
        return value

    def workload(self, doc: object) -> Workload:
        top = self.fields(doc, "", ("apiVersion", "kind", "metadata", "spec"))
        if top.get("apiVersion") != API_VERSION:
            self.fail(
                "apiVersion", f"expected {API_VERSION!r}, got {describe(top.get('apiVersion'))}"
            )
        if top.get("kind") != KIND:
            self.fail("kind", f"expected {KIND!r}, got {describe(top.get('kind'))}")
        metadata = self.fields(top.get("metadata"), "metadata", ("name",))
        name = metadata.get("name")
        if not isinstance(name, str) or not name:
            self.fail("metadata.name", f"expected a non-empty string, got {describe(name)}")
        spec = self.fields(
            top.get("spec"),
            "spec",
            ("start", "warmup", "seed", "parkedCost", "defaults", "groups", "tasks", "rules"),
        )
        rules = self.rules(spec.get("rules"))
        defaults = self.fields(
            spec.get("defaults", {}),
            "spec.defaults",
            ("startup", *_BEHAVIOUR[1:]),
        )
        seed = spec.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            self.fail("spec.seed", f"expected an integer, got {describe(seed)}")
        return Workload(
            name=name,
            rules=rules,
            start=self.start(spec),
            warmup_s=self.duration(spec, "spec", "warmup", _DEFAULT_WARMUP_S),
            seed=seed,
            tasks=self.tasks(spec.get("tasks", {}), defaults, rules),
            startup=self.groups(spec.get("groups", {}), defaults, rules),
            parked_cost=self.number(spec, "spec", "parkedCost", _DEFAULT_PARKED_COST, 0, 1),
        )

    def rules(self, value: object) -> RuleSet:
        if not isinstance(value, list) or not value:
            self.fail("spec.rules", f"expected a list of rule documents, got {describe(value)}")
        parsed = [
            _Embedded(
                from_document(doc, f"{self.filename}: spec.rules[{index}]"),
                self.filename,
                index + 1,
            )
            for index, doc in enumerate(value)
        ]
        rules = apply(RuleSet.empty(), parsed)
        if not rules.tasks:
            self.fail("spec.rules", "no ScheduledTask: nothing to simulate")
        return rules

    def start(self, spec: dict[Any, Any]) -> float:
        value = spec.get("start")
        if value is None:
            self.fail("spec.start", "missing required field")
        moment = value if isinstance(value, datetime) else None
        if isinstance(value, str):
            try:
                moment = datetime.fromisoformat(value)
            except ValueError:
                self.fail("spec.start", f"{quote(value)} is not an ISO 8601 time")
        if moment is None:
            self.fail("spec.start", f"expected an ISO 8601 time, got {describe(value)}")
        if moment.tzinfo is None:
            self.fail("spec.start", "needs a UTC offset, e.g. 2026-03-29T00:00:00Z")
        return moment.timestamp()

    def duration(self, fields: dict[Any, Any], path: str, key: str, default: float) -> float:
        if key not in fields:
            return default
        value = fields[key]
        if not isinstance(value, str):
            self.fail(
                f"{path}.{key}", f"expected a duration like 90s or 1h30m, got {describe(value)}"
            )
        try:
            return float(parse_duration(value))
        except RuleError as error:
            self.fail(f"{path}.{key}", str(error))

    def number(
        self, fields: dict[Any, Any], path: str, key: str, default: float, low: float, high: float
    ) -> float:
        value = fields.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            self.fail(f"{path}.{key}", f"expected a number, got {describe(value)}")
        if not low <= value <= high:
            self.fail(f"{path}.{key}", f"must be between {low:g} and {high:g}, got {value:g}")
        return float(value)

    def spread(self, value: object, path: str) -> Spread:
        fields = self.fields(value, path, ("median", "p95"))
        for key in ("median", "p95"):
            if key not in fields:
                self.fail(f"{path}.{key}", "missing required field")
        median = self.duration(fields, path, "median", 0.0)
        p95 = self.duration(fields, path, "p95", 0.0)
        if median <= 0:
            self.fail(f"{path}.median", "must be longer than 0")
        if p95 < median:
            self.fail(
                f"{path}.p95", f"{fields['p95']} is shorter than the median {fields['median']}"
            )
        return Spread(median, max(p95, median * (1 + 1e-9)))

    def known(self, value: object, path: str, names: tuple[str, ...], what: str) -> dict[Any, Any]:
        """A mapping keyed by names that must exist in the rules."""
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping, got {describe(value)}")
        for key in value:
            if key not in names:
                shown = key if isinstance(key, str) else describe(key)
                self.fail(f"{path}.{shown}", f"not {what}")
        return value

    def tasks(
        self, value: object, defaults: dict[Any, Any], rules: RuleSet
    ) -> dict[str, TaskBehaviour]:
        given = self.known(value, "spec.tasks", tuple(rules.tasks), "a ScheduledTask of spec.rules")
        result: dict[str, TaskBehaviour] = {}
        for name, task in sorted(rules.tasks.items()):
            path = f"spec.tasks.{name}"
            own = self.fields(given.get(name, {}), path, _BEHAVIOUR)
            fields = {**defaults, **own}
            fields.pop("startup", None)

            def at(key: str, own: dict[Any, Any] = own, path: str = path) -> str:
                return path if key in own else "spec.defaults"

            expected = float(task.expected_duration_s)
            duration = (
                self.spread(own["duration"], f"{path}.duration")
                if "duration" in own
                else Spread(expected * _DEFAULT_MEDIAN_SHARE, expected)
            )
            overrun_path = f"{at('overrun')}.overrun"
            overrun = self.fields(
                fields.get("overrun", {}), overrun_path, ("probability", "factor")
            )
            result[name] = TaskBehaviour(
                duration=duration,
                skip=self.number(fields, at("skip"), "skip", 0.0, 0, 1),
                extra_runs_per_day=self.number(
                    fields, at("extraRunsPerDay"), "extraRunsPerDay", 0.0, 0, 1440
                ),
                overrun_probability=self.number(overrun, overrun_path, "probability", 0.0, 0, 1),
                overrun_factor=self.number(overrun, overrun_path, "factor", 2.0, 1, 100),
                start_delay_s=self.duration(fields, at("startDelay"), "startDelay", 0.0),
            )
        return result

    def groups(
        self, value: object, defaults: dict[Any, Any], rules: RuleSet
    ) -> dict[GroupKey, Spread]:
        managed = managed_groups(rules)
        names = tuple(f"{service}/{group}" for service, group in managed)
        given = self.known(
            value, "spec.groups", names, "a task group (service/group) of a ScheduledTask's chain"
        )
        default = (
            self.spread(defaults["startup"], "spec.defaults.startup")
            if "startup" in defaults
            else None
        )
        result: dict[GroupKey, Spread] = {}
        for key, name in zip(managed, names, strict=True):
            path = f"spec.groups.{name}"
            fields = self.fields(given.get(name, {}), path, ("startup",))
            if "startup" in fields:
                result[key] = self.spread(fields["startup"], f"{path}.startup")
            elif default is not None:
                result[key] = default
            else:
                self.fail(f"{path}.startup", "missing, and spec.defaults.startup is not set")
        return result
