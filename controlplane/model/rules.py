"""The rule kinds of tasklane, the immutable set of them, and their Kubernetes-style documents.

`from_document` is the one door from user-written or stored documents into the dataclasses,
so every per-document check lives here and every failure is a one-line `RuleError` naming
the field as the user wrote it (`spec.hops[1].rateLimit.requestsPerSecond`). Checks that need
other rules (references, dye conflicts) live in `validate`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, NoReturn, TypeAlias
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from controlplane.errors import RuleError
from controlplane.model.cron import format_duration, parse_cron, parse_duration
from controlplane.model.dye import (
    DEFAULT_BAGGAGE_KEY,
    DEFAULT_DYE_HEADER,
    MESH_HEADER_PREFIX,
    PREFIX_MARK,
    Dye,
    value_problem,
)
from controlplane.model.group import DEFAULT_GROUP
from controlplane.model.instance import proxy_env
from controlplane.model.text import describe, did_you_mean, quote

API_VERSION = "tasklane.io/v1"
KINDS = ("Service", "TaskChain", "ScheduledTask")
# What a user may type for a kind, lower-cased (like `kubectl get svc`).
KIND_ALIASES = {
    "service": "Service",
    "services": "Service",
    "svc": "Service",
    "taskchain": "TaskChain",
    "taskchains": "TaskChain",
    "chain": "TaskChain",
    "chains": "TaskChain",
    "scheduledtask": "ScheduledTask",
    "scheduledtasks": "ScheduledTask",
    "task": "ScheduledTask",
    "tasks": "ScheduledTask",
}
PROTOCOLS = ("http", "grpc")
FALLBACKS = ("strict", "loose")
DEFAULT_TIMEZONE = "UTC"
# Limits that keep values inside what Envoy's token bucket (uint32 tokens) can express.
MAX_REQUESTS_PER_SECOND = 1_000_000_000
MAX_BURST = 2**32 - 1

# Names of services, groups, chains and tasks (DNS labels), and how errors describe them.
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
NAME_RULE = (
    "lower-case letters, digits and '-', starting and ending with a letter or digit, "
    "at most 63 characters"
)
_HEADER_TOKEN = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_QUANTITY = re.compile(r"(\d+)(Ki|Mi|Gi)?")
_BINARY = {None: 1, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
# Set by `tasklane run` for every instance; a Service's own value would be silently replaced.
_RUN_ENV_RESERVED = frozenset({"PORT", *proxy_env("").keys()})
_RUN_ENV_RESERVED_PREFIX = "TASKLANE_"
# Retries: what Envoy may retry on (its `retry_on` names), how often, and a status code range.
# A number in `retryOn` is a status code (Envoy's `retriable-status-codes`).
RETRY_ON = (
    "connect-failure",
    "refused-stream",
    "reset",
    "reset-before-request",
    "gateway-error",
    "5xx",
    "retriable-4xx",
    # gRPC status names, for grpc services (the grpc-status of the answer)
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
)
# Safe for any request: the request never reached the app, or the connection broke under it.
DEFAULT_RETRY_ON = ("connect-failure", "refused-stream", "reset")
MAX_RETRY_ATTEMPTS = 10
MAX_PER_TRY_TIMEOUT_MS = 3_600_000
_MILLIS = re.compile(r"(\d+(?:\.\d+)?)(ms|s)")


@dataclass(frozen=True)
class Group:
    """A named subset of a service's instances and the replica range the scaler may use."""

    name: str
    min_replicas: int
    max_replicas: int


@dataclass(frozen=True)
class RunSpec:
    """How the local runtime starts an instance (`tasklane run ... -- command`), so a scaler
    can add instances of a group without a human typing the command. The app learns its group
    from $TASKLANE_GROUP and its port from $PORT."""

    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()  # (name, value), sorted by name


@dataclass(frozen=True)
class Retries:
    """How a caller's sidecar retries a request that failed on one instance: up to `attempts`
    more tries, each on another instance when there is one, for the listed conditions."""

    attempts: int  # retries after the first try; 0 turns retries off
    retry_on: tuple[str, ...]  # names from RETRY_ON, as written
    status_codes: tuple[int, ...] = ()  # answers retried by their status code
    per_try_timeout_ms: int | None = None  # None: only the route's own timeout


@dataclass(frozen=True)
class Service:
    """An application; its `default` group serves online traffic, the others task traffic."""

    kind: ClassVar[str] = "Service"
    name: str
    protocol: str
    groups: tuple[Group, ...]
    run: RunSpec | None = None  # None: instances are started by hand or by Kubernetes
    # Every request to this service (online, and dyed ones whose hop sets none); None: no retry.
    retries: Retries | None = None
    # Services this one's app calls (Istio's Sidecar egress hosts): its sidecars get their
    # config from the start instead of learning it on the first call (model/scope.py).
    calls: tuple[str, ...] = ()
    # A gauge the app exports at /metrics (Prometheus text), e.g. its thread pool's busy
    # ratio: the scaler's reactive half scales task groups on it. None: not read.
    saturation_gauge: str | None = None
    # What one instance is given (Kubernetes' resources.requests): the scaler's reactive half
    # reads CPU and memory use as a share of them. None: those signals are not read.
    requests: Requests | None = None

    def group(self, name: str) -> Group | None:
        """The group called `name`, or None: hops name groups that may not exist."""
        return next((group for group in self.groups if group.name == name), None)


@dataclass(frozen=True)
class Requests:
    """One instance's CPU (cores) and memory (bytes) request."""

    cpu: float
    memory: int


@dataclass(frozen=True)
class RateLimit:
    """A token bucket for the dyed requests entering one hop."""

    requests_per_second: float
    burst: int


@dataclass(frozen=True)
class Hop:
    """Where a chain's dyed requests to `service` go: `weight`% to `group`, the rest default.

    A queue hop (`queue` set) is reached through a message queue the service consumes, not over
    HTTP: its dyed messages all go to `group` (see `model/queues.py`)."""

    service: str
    group: str
    weight: int
    rate_limit: RateLimit | None
    retries: Retries | None = None  # None: the service's own (if any) apply
    queue: str | None = None


@dataclass(frozen=True)
class TaskChain:
    """The hops that requests carrying one of `dye`'s values must stay inside."""

    kind: ClassVar[str] = "TaskChain"
    name: str
    dye: Dye
    fallback: str
    hops: tuple[Hop, ...]

    def hop_for(self, service: str) -> Hop | None:
        """The chain's hop on `service` (at most one exists), or None."""
        return next((hop for hop in self.hops if hop.service == service), None)


@dataclass(frozen=True)
class ScheduledTask:
    """A cron-driven job on one chain; the scaler sizes the chain's groups for its runs."""

    kind: ClassVar[str] = "ScheduledTask"
    name: str
    chain: str
    schedule: str
    timezone: str
    expected_duration_s: int
    replicas: tuple[tuple[str, int], ...]  # (hop service, replicas), sorted by service


Rule: TypeAlias = Service | TaskChain | ScheduledTask


@dataclass(frozen=True)
class RuleSet:
    """All rules at one moment; every change returns a new set so readers never see a half."""

    services: Mapping[str, Service]
    chains: Mapping[str, TaskChain]
    tasks: Mapping[str, ScheduledTask]

    def __post_init__(self) -> None:
        for field in ("services", "chains", "tasks"):
            object.__setattr__(self, field, MappingProxyType(dict(getattr(self, field))))

    @classmethod
    def empty(cls) -> RuleSet:
        """The set before any rule is applied."""
        return cls({}, {}, {})

    def with_rules(self, rules: Iterable[Rule]) -> RuleSet:
        """A copy with `rules` added, replacing any rule of the same kind and name."""
        maps = {kind: dict(rules_of_kind) for kind, rules_of_kind in self._maps().items()}
        for rule in rules:
            maps[rule.kind][rule.name] = rule
        return RuleSet(*(maps[kind] for kind in KINDS))

    def without(self, kind: str, name: str) -> RuleSet:
        """A copy without the rule `kind`/`name` (the same content if there is none)."""
        _check_kind(kind)
        maps = {each: dict(rules_of_kind) for each, rules_of_kind in self._maps().items()}
        maps[kind].pop(name, None)
        return RuleSet(*(maps[each] for each in KINDS))

    def get(self, kind: str, name: str) -> Rule | None:
        """The rule `kind`/`name`, or None; RuleError for a kind that does not exist."""
        _check_kind(kind)
        return self._maps()[kind].get(name)

    def all(self) -> tuple[Rule, ...]:
        """Every rule, in KINDS order then by name, so listings and checks are stable."""
        return tuple(
            rules_of_kind[name]
            for rules_of_kind in self._maps().values()
            for name in sorted(rules_of_kind)
        )

    def _maps(self) -> dict[str, Mapping[str, Rule]]:
        return {"Service": self.services, "TaskChain": self.chains, "ScheduledTask": self.tasks}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise RuleError(f"unknown kind {quote(str(kind))}{_kinds_hint(kind)}")


def _kinds_hint(kind: object) -> str:
    """' (did you mean TaskChain?)', or the list of kinds when none is close."""
    return did_you_mean(kind, KINDS) or f" (expected one of: {', '.join(KINDS)})"


# --- documents --------------------------------------------------------------------------


def to_document(rule: Rule) -> dict[str, Any]:
    """The canonical document of a rule, every default written out (stored in etcd, shown
    by `tasklane get -o yaml`); `from_document` reads it back to an equal rule."""
    return {
        "apiVersion": API_VERSION,
        "kind": rule.kind,
        "metadata": {"name": rule.name},
        "spec": _spec_document(rule),
    }


def _spec_document(rule: Rule) -> dict[str, Any]:
    if isinstance(rule, Service):
        document: dict[str, Any] = {
            "protocol": rule.protocol,
            "groups": [
                {"name": g.name, "minReplicas": g.min_replicas, "maxReplicas": g.max_replicas}
                for g in rule.groups
            ],
        }
        if rule.run is not None:
            document["run"] = {"command": list(rule.run.command), "env": dict(rule.run.env)}
        if rule.retries is not None:
            document["retries"] = _retries_document(rule.retries)
        if rule.calls:
            document["calls"] = list(rule.calls)
        if rule.saturation_gauge is not None:
            document["saturationGauge"] = rule.saturation_gauge
        if rule.requests is not None:
            document["requests"] = {"cpu": rule.requests.cpu, "memory": rule.requests.memory}
        return document
    if isinstance(rule, TaskChain):
        return {
            "dye": {
                "header": rule.dye.header,
                "baggageKey": rule.dye.baggage_key,
                "values": [*rule.dye.exact, *(prefix + "*" for prefix in rule.dye.prefixes)],
            },
            "fallback": rule.fallback,
            "hops": [_hop_document(hop) for hop in rule.hops],
        }
    return {
        "chain": rule.chain,
        "schedule": rule.schedule,
        "timezone": rule.timezone,
        "expectedDuration": format_duration(rule.expected_duration_s),
        "replicas": dict(rule.replicas),
    }


def _hop_document(hop: Hop) -> dict[str, Any]:
    document: dict[str, Any] = {"service": hop.service, "group": hop.group, "weight": hop.weight}
    if hop.rate_limit is not None:
        rate = hop.rate_limit.requests_per_second
        document["rateLimit"] = {
            "requestsPerSecond": int(rate) if rate.is_integer() else rate,
            "burst": hop.rate_limit.burst,
        }
    if hop.retries is not None:
        document["retries"] = _retries_document(hop.retries)
    if hop.queue is not None:
        document["queue"] = hop.queue
    return document


def _retries_document(retries: Retries) -> dict[str, Any]:
    document: dict[str, Any] = {
        "attempts": retries.attempts,
        "retryOn": [*retries.retry_on, *retries.status_codes],
    }
    if retries.per_try_timeout_ms is not None:
        document["perTryTimeout"] = format_millis(retries.per_try_timeout_ms)
    return document


def format_millis(millis: int) -> str:
    """1000 -> "1s", 1500 -> "1500ms": the text `parse_millis` reads back to the same value."""
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


def parse_millis(text: str) -> int:
    """Text like "250ms", "1s" or "1.5s" to whole milliseconds; RuleError otherwise (retries need
    less than the whole seconds `parse_duration` reads)."""
    match = _MILLIS.fullmatch(text)
    if match is None:
        raise RuleError(f"{quote(text)} is not a duration (expected e.g. 250ms, 1s, 1.5s)")
    number, unit = match.groups()
    if len(number) > 12:
        raise RuleError(f"{quote(text)} is too long")
    scaled = float(number) * (1000 if unit == "s" else 1)
    if scaled != int(scaled):
        raise RuleError(f"{quote(text)} is not a whole number of milliseconds")
    return int(scaled)


def from_document(doc: object, where: str) -> Rule:
    """Check one document and build its rule.

    `where` names the document's origin ("rules.yaml: document 3"); messages add the kind and
    name: "rules.yaml: document 3 (TaskChain fund-yield): spec.hops: ...".
    """
    reader = _Reader(f"{where} ({_label(doc)})")
    if not isinstance(doc, dict):
        reader.fail(
            "", f"expected a mapping with apiVersion, kind, metadata and spec, got {describe(doc)}"
        )
    top = reader.fields(doc, "", ("apiVersion", "kind", "metadata", "spec"))
    api_version = reader.required(top, "", "apiVersion")
    if api_version != API_VERSION:
        reader.fail("apiVersion", f"expected {API_VERSION!r}, got {describe(api_version)}")
    kind = reader.string(top, "", "kind")
    if kind not in KINDS:
        reader.fail("kind", f"unknown kind {quote(kind)}{_kinds_hint(kind)}")
    metadata = reader.fields(reader.required(top, "", "metadata"), "metadata", ("name",))
    name = reader.name(metadata, "metadata", "name", "name")
    spec = reader.required(top, "", "spec")
    if kind == "Service":
        return _service(reader, name, spec)
    if kind == "TaskChain":
        return _chain(reader, name, spec)
    return _task(reader, name, spec)


def _label(doc: object) -> str:
    """'TaskChain fund-yield', or as much of it as the document tells."""
    kind = doc.get("kind") if isinstance(doc, dict) else None
    metadata = doc.get("metadata") if isinstance(doc, dict) else None
    name = metadata.get("name") if isinstance(metadata, dict) else None
    shown_name = None
    if isinstance(name, str) and name:
        shown_name = name if DNS_LABEL.fullmatch(name) else quote(name)
    if isinstance(kind, str) and kind in KINDS:
        return f"{kind} {shown_name}" if shown_name else f"{kind}, name missing"
    kind_text = "kind missing" if kind is None else "unknown kind"
    return f"{kind_text}, name {shown_name}" if shown_name else kind_text


def _service(reader: _Reader, name: str, spec: object) -> Service:
    fields = reader.fields(
        spec,
        "spec",
        ("protocol", "groups", "run", "retries", "calls", "saturationGauge", "requests"),
    )
    protocol = reader.choice(fields, "spec", "protocol", PROTOCOLS, "http")
    groups: list[Group] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(reader.items(fields, "spec", "groups", [])):
        path = f"spec.groups[{index}]"
        group = reader.fields(item, path, ("name", "minReplicas", "maxReplicas"))
        group_name = reader.name(group, path, "name", "group name")
        if group_name in seen:
            reader.fail(
                f"{path}.name",
                f"duplicate group '{group_name}' (also spec.groups[{seen[group_name]}])",
            )
        seen[group_name] = index
        low = reader.integer(group, path, "minReplicas", 1 if group_name == DEFAULT_GROUP else 0)
        high = reader.integer(group, path, "maxReplicas", max(low, 1))
        if low > high:
            reader.fail(path, f"minReplicas {low} is greater than maxReplicas {high}")
        groups.append(Group(group_name, low, high))
    default = [g for g in groups if g.name == DEFAULT_GROUP] or [Group(DEFAULT_GROUP, 1, 1)]
    rest = [g for g in groups if g.name != DEFAULT_GROUP]
    run = _run(reader, fields["run"]) if "run" in fields else None
    retries = _retries(reader, fields["retries"], "spec.retries") if "retries" in fields else None
    calls: dict[str, None] = {}  # in the order written, once each
    for index, item in enumerate(reader.items(fields, "spec", "calls", [])):
        calls[reader.label(item, f"spec.calls[{index}]", "service name")] = None
    gauge = None
    if "saturationGauge" in fields:
        gauge = reader.string(fields, "spec", "saturationGauge")
        if not _METRIC_NAME.fullmatch(gauge):
            reader.fail("spec.saturationGauge", f"{quote(gauge)} is not a Prometheus metric name")
    requests = _requests(reader, fields["requests"]) if "requests" in fields else None
    return Service(
        name=name,
        protocol=protocol,
        groups=(*default, *rest),
        run=run,
        retries=retries,
        calls=tuple(calls),
        saturation_gauge=gauge,
        requests=requests,
    )


def _requests(reader: _Reader, value: object) -> Requests:
    """`{cpu: 0.5, memory: 256Mi}`: cores, and bytes (a whole number with Ki, Mi or Gi)."""
    fields = reader.fields(value, "spec.requests", ("cpu", "memory"))
    cpu = reader.required(fields, "spec.requests", "cpu")
    if isinstance(cpu, bool) or not isinstance(cpu, int | float) or not 0 < cpu < math.inf:
        reader.fail("spec.requests.cpu", f"expected a number of cores > 0, got {describe(cpu)}")
    memory = reader.required(fields, "spec.requests", "memory")
    text = str(memory) if isinstance(memory, int) and not isinstance(memory, bool) else memory
    found = _QUANTITY.fullmatch(text) if isinstance(text, str) else None
    if found is None or int(found[1]) == 0:
        reader.fail(
            "spec.requests.memory",
            f"expected bytes > 0 with Ki, Mi or Gi or none (e.g. 512Mi), got {describe(memory)}",
        )
    return Requests(cpu=float(cpu), memory=int(found[1]) * _BINARY[found[2]])


def _run(reader: _Reader, value: object) -> RunSpec:
    fields = reader.fields(value, "spec.run", ("command", "env"))
    command = reader.items(fields, "spec.run", "command")
    if not command:
        reader.fail("spec.run.command", "at least the program to run is required")
    for index, item in enumerate(command):
        path = f"spec.run.command[{index}]"
        if not isinstance(item, str):
            reader.fail(path, f"expected a string, got {describe(item)}")
        if "\0" in item:
            reader.fail(path, "contains a NUL character, which a command line cannot carry")
    if not command[0]:
        reader.fail("spec.run.command[0]", "the program must not be empty")
    env = fields.get("env", {})
    if not isinstance(env, dict):
        reader.fail("spec.run.env", f"expected a mapping, got {describe(env)}")
    pairs: list[tuple[str, str]] = []
    for key, item in env.items():
        path = _join("spec.run.env", key)
        if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
            shown = quote(key) if isinstance(key, str) else describe(key)
            reader.fail(
                "spec.run.env",
                f"{shown} is not a valid variable name (letters, digits and '_', "
                "not starting with a digit)",
            )
        if key in _RUN_ENV_RESERVED or key.startswith(_RUN_ENV_RESERVED_PREFIX):
            reader.fail(path, f"{key} is set by `tasklane run` for each instance, not here")
        if not isinstance(item, str):
            reader.fail(path, f"expected a string, got {describe(item)}")
        if "\0" in item:
            reader.fail(path, "contains a NUL character, which the environment cannot carry")
        pairs.append((key, item))
    return RunSpec(command=tuple(command), env=tuple(sorted(pairs)))


def _chain(reader: _Reader, name: str, spec: object) -> TaskChain:
    fields = reader.fields(spec, "spec", ("dye", "fallback", "hops"))
    dye = _dye(reader, reader.required(fields, "spec", "dye"))
    fallback = reader.choice(fields, "spec", "fallback", FALLBACKS, "strict")
    hop_items = reader.items(fields, "spec", "hops")
    if not hop_items:
        reader.fail("spec.hops", "at least one hop is required")
    hops: list[Hop] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(hop_items):
        path = f"spec.hops[{index}]"
        hop = reader.fields(
            item, path, ("service", "group", "weight", "rateLimit", "retries", "queue")
        )
        service = reader.name(hop, path, "service", "service name")
        if service in seen:
            reader.fail(
                f"{path}.service",
                f"service {service} is already a hop of this chain (spec.hops[{seen[service]}])",
            )
        seen[service] = index
        group = reader.name(hop, path, "group", "group name")
        weight = reader.integer(hop, path, "weight", 100, high=100)
        rate_limit = None
        if "rateLimit" in hop:
            rate_limit = _rate_limit(reader, hop["rateLimit"], f"{path}.rateLimit")
        retries = _retries(reader, hop["retries"], f"{path}.retries") if "retries" in hop else None
        queue = _queue(reader, hop, path) if "queue" in hop else None
        hops.append(
            Hop(
                service=service,
                group=group,
                weight=weight,
                rate_limit=rate_limit,
                retries=retries,
                queue=queue,
            )
        )
    return TaskChain(name=name, dye=dye, fallback=fallback, hops=tuple(hops))


def _queue(reader: _Reader, hop: dict[Any, Any], path: str) -> str:
    """The queue a hop's service consumes; its messages all go to the hop's group."""
    queue = reader.name(hop, path, "queue", "queue name")
    if hop.get("weight", 100) != 100:
        reader.fail(
            f"{path}.weight",
            "a queue hop takes all of its chain's messages; weight applies to HTTP hops only",
        )
    for field in ("rateLimit", "retries"):
        if field in hop:
            reader.fail(f"{path}.{field}", "applies to HTTP hops only, not to a queue hop")
    return queue


def _dye(reader: _Reader, value: object) -> Dye:
    fields = reader.fields(value, "spec.dye", ("header", "baggageKey", "values"))
    header = reader.string(fields, "spec.dye", "header", DEFAULT_DYE_HEADER)
    if not _HEADER_TOKEN.fullmatch(header):
        reader.fail("spec.dye.header", f"{quote(header)} is not a lower-case HTTP header name")
    if header.startswith(MESH_HEADER_PREFIX):
        reader.fail(
            "spec.dye.header",
            f"{quote(header)}: headers starting with {MESH_HEADER_PREFIX} are the mesh's own",
        )
    baggage_key = reader.string(fields, "spec.dye", "baggageKey", DEFAULT_BAGGAGE_KEY)
    if not _TOKEN.fullmatch(baggage_key):
        reader.fail(
            "spec.dye.baggageKey",
            f"{quote(baggage_key)} is not a valid baggage key (an HTTP token)",
        )
    items = reader.items(fields, "spec.dye", "values")
    if not items:
        reader.fail("spec.dye.values", "at least one value is required")
    exact: list[str] = []
    prefixes: list[str] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        path = f"spec.dye.values[{index}]"
        if not isinstance(item, str):
            reader.fail(path, f"expected a string, got {describe(item)}")
        if item in seen:
            reader.fail(path, f"duplicate value {quote(item)} (also spec.dye.values[{seen[item]}])")
        seen[item] = index
        problem = value_problem(item)
        if problem is not None:
            reader.fail(path, problem)
        body = item.removesuffix(PREFIX_MARK)
        (prefixes if item.endswith(PREFIX_MARK) else exact).append(body)
    return Dye(header=header, baggage_key=baggage_key, exact=tuple(exact), prefixes=tuple(prefixes))


def _rate_limit(reader: _Reader, value: object, path: str) -> RateLimit:
    fields = reader.fields(value, path, ("requestsPerSecond", "burst"))
    rate = reader.required(fields, path, "requestsPerSecond")
    rate_path = f"{path}.requestsPerSecond"
    if isinstance(rate, bool) or not isinstance(rate, int | float):
        reader.fail(rate_path, f"expected a number, got {describe(rate)}")
    if rate != rate or rate <= 0:  # NaN compares unequal to itself
        reader.fail(rate_path, f"must be greater than 0, got {_shown(rate)}")
    if rate > MAX_REQUESTS_PER_SECOND:
        reader.fail(rate_path, f"must be at most {MAX_REQUESTS_PER_SECOND}, got {_shown(rate)}")
    burst = reader.integer(fields, path, "burst", math.ceil(rate), low=1)
    if burst > MAX_BURST:
        reader.fail(f"{path}.burst", f"must be at most {MAX_BURST}, got {_shown(burst)}")
    return RateLimit(requests_per_second=float(rate), burst=burst)


def _retries(reader: _Reader, value: object, path: str) -> Retries:
    """`{attempts: 2, retryOn: [connect-failure, reset, 503], perTryTimeout: 1s}`; the one
    reader of both a Service's and a hop's retries."""
    if isinstance(value, dict) and True in value:  # YAML 1.1 reads a bare `on:` key as true
        reader.fail(f"{path}.on", "read as the boolean true by YAML; the field is retryOn")
    fields = reader.fields(value, path, ("attempts", "retryOn", "perTryTimeout"))
    attempts = reader.integer(fields, path, "attempts", high=MAX_RETRY_ATTEMPTS)
    items = reader.items(fields, path, "retryOn", list(DEFAULT_RETRY_ON))
    if not items:
        reader.fail(f"{path}.retryOn", "at least one condition is required")
    conditions: list[str] = []
    codes: list[int] = []
    seen: dict[object, int] = {}
    for index, item in enumerate(items):
        where = f"{path}.retryOn[{index}]"
        if isinstance(item, bool) or not isinstance(item, str | int):
            reader.fail(where, f"expected a condition or a status code, got {describe(item)}")
        if item in seen:
            reader.fail(where, f"duplicate {quote(str(item))} (also {path}.retryOn[{seen[item]}])")
        seen[item] = index
        if isinstance(item, int):
            if not 400 <= item <= 599:
                reader.fail(where, f"a status code to retry must be 400-599, got {_shown(item)}")
            codes.append(item)
        elif item not in RETRY_ON:
            reader.fail(
                where,
                f"{quote(item)} is not one of: {', '.join(RETRY_ON)}, or a status code"
                + did_you_mean(item, RETRY_ON),
            )
        else:
            conditions.append(item)
    per_try = None
    if "perTryTimeout" in fields:
        text = reader.string(fields, path, "perTryTimeout")
        try:
            per_try = parse_millis(text)
        except RuleError as error:
            reader.fail(f"{path}.perTryTimeout", str(error))
        if not 1 <= per_try <= MAX_PER_TRY_TIMEOUT_MS:
            reader.fail(f"{path}.perTryTimeout", f"must be between 1ms and 1h, got {quote(text)}")
    return Retries(
        attempts=attempts,
        retry_on=tuple(conditions),
        status_codes=tuple(codes),
        per_try_timeout_ms=per_try,
    )


def _task(reader: _Reader, name: str, spec: object) -> ScheduledTask:
    fields = reader.fields(
        spec, "spec", ("chain", "schedule", "timezone", "expectedDuration", "replicas")
    )
    chain = reader.name(fields, "spec", "chain", "chain name")
    schedule = reader.string(fields, "spec", "schedule")
    try:
        parse_cron(schedule)
    except RuleError as error:
        reader.fail("spec.schedule", str(error))
    timezone = reader.string(fields, "spec", "timezone", DEFAULT_TIMEZONE)
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        reader.fail("spec.timezone", f"unknown time zone {quote(timezone)}")
    duration_text = reader.string(fields, "spec", "expectedDuration")
    try:
        duration = parse_duration(duration_text)
    except RuleError as error:
        reader.fail("spec.expectedDuration", str(error))
    if duration <= 0:
        reader.fail("spec.expectedDuration", f"must be longer than 0, got {quote(duration_text)}")
    replicas = fields.get("replicas", {})
    if not isinstance(replicas, dict):
        reader.fail("spec.replicas", f"expected a mapping, got {describe(replicas)}")
    counts: list[tuple[str, int]] = []
    for service in replicas:
        if not isinstance(service, str) or not DNS_LABEL.fullmatch(service):
            shown = quote(service) if isinstance(service, str) else describe(service)
            reader.fail("spec.replicas", f"{shown} is not a valid service name ({NAME_RULE})")
        counts.append((service, reader.integer(replicas, "spec.replicas", service)))
    return ScheduledTask(
        name=name,
        chain=chain,
        schedule=schedule,
        timezone=timezone,
        expected_duration_s=duration,
        replicas=tuple(sorted(counts)),
    )


_REQUIRED: Any = object()


def _shown(number: float) -> str:
    """A number for a message; str() of a huge int is slow or refused."""
    return str(number) if abs(number) < 10**18 else "a very large number"


def _join(path: str, key: object) -> str:
    shown = (
        key
        if isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,63}", key)
        else (quote(key) if isinstance(key, str) else describe(key))
    )
    return f"{path}.{shown}" if path else str(shown)


class _Reader:
    """Reads one document's fields, failing with '<prefix>: <path>: <problem>'."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def fail(self, path: str, problem: str) -> NoReturn:
        raise RuleError(
            f"{self.prefix}: {path}: {problem}" if path else f"{self.prefix}: {problem}"
        )

    def fields(self, value: object, path: str, allowed: tuple[str, ...]) -> dict[Any, Any]:
        """`value` as a mapping whose keys are all in `allowed` (typos must not pass)."""
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping, got {describe(value)}")
        for key in value:
            if key not in allowed:
                hint = did_you_mean(key, allowed) or f" (expected one of: {', '.join(allowed)})"
                self.fail(_join(path, key), f"unknown field{hint}")
        return value

    def required(self, fields: dict[Any, Any], path: str, key: str) -> object:
        if key not in fields:
            self.fail(_join(path, key), "missing required field")
        return fields[key]

    def string(self, fields: dict[Any, Any], path: str, key: str, default: str = _REQUIRED) -> str:
        value = (
            self.required(fields, path, key) if default is _REQUIRED else (fields.get(key, default))
        )
        if not isinstance(value, str):
            self.fail(_join(path, key), f"expected a string, got {describe(value)}")
        return value

    def name(self, fields: dict[Any, Any], path: str, key: str, noun: str) -> str:
        """A DNS-1123 label: names end up in Envoy resource names and etcd keys."""
        return self.label(self.string(fields, path, key), _join(path, key), noun)

    def label(self, value: object, path: str, noun: str) -> str:
        """`value` (found at `path`) as a DNS-1123 label."""
        if not isinstance(value, str):
            self.fail(path, f"expected a string, got {describe(value)}")
        if not DNS_LABEL.fullmatch(value):
            self.fail(path, f"{quote(value)} is not a valid {noun} ({NAME_RULE})")
        return value

    def choice(
        self, fields: dict[Any, Any], path: str, key: str, options: tuple[str, ...], default: str
    ) -> str:
        value = self.string(fields, path, key, default)
        if value not in options:
            self.fail(
                _join(path, key),
                f"{quote(value)} is not one of: {', '.join(options)}{did_you_mean(value, options)}",
            )
        return value

    def integer(
        self,
        fields: dict[Any, Any],
        path: str,
        key: str,
        default: int = _REQUIRED,
        low: int = 0,
        high: int | None = None,
    ) -> int:
        value = (
            self.required(fields, path, key) if default is _REQUIRED else (fields.get(key, default))
        )
        where = _join(path, key)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(where, f"expected an integer, got {describe(value)}")
        if high is not None and not low <= value <= high:
            self.fail(where, f"must be between {low} and {high}, got {_shown(value)}")
        if value < low:
            self.fail(
                where,
                f"must not be negative, got {_shown(value)}"
                if low == 0
                else f"must be at least {low}, got {_shown(value)}",
            )
        return value

    def items(
        self, fields: dict[Any, Any], path: str, key: str, default: list[Any] = _REQUIRED
    ) -> list[Any]:
        value = (
            self.required(fields, path, key) if default is _REQUIRED else (fields.get(key, default))
        )
        if not isinstance(value, list):
            self.fail(_join(path, key), f"expected a list, got {describe(value)}")
        return value
