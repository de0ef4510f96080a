"""The reactive signals of pods, from what the Kubernetes API serves about them: the
Kubernetes actuator lists the pods of all its groups and their PodMetrics at once and turns
them into per-instance `signals.Reading`s here, so both sources meet in `signals.group_means`.

- Which pods: those the Deployment's `spec.selector` picks (matched here, as the API server
  matches it, on one list that `shared_selector` asks for), ready ones only (Running, Ready,
  not terminating): a starting pod's CPU is its start, not its load.
- CPU and memory: from the Metrics API (`metrics.k8s.io/v1beta1` PodMetrics: what `kubectl
  top pod` and the HPA read, served by metrics-server from the kubelets' resource metrics;
  memory is the working set), summed over the app containers (`spec.containers`: the injected
  sidecar is an init container, and the local path measures the app process alone too),
  as a share of the Service's `spec.requests` when it declares them (one meaning on every
  actuator), else of those containers' summed `resources.requests` (the HPA's utilization),
  and not known when a container has no request of that resource.
- The saturation gauge: `http://<pod IP>:<port><path>` from the pod's `prometheus.io/port`
  and `prometheus.io/path` annotations (the usual scrape convention; path /metrics by
  default), else its container port named `metrics`. Not the app port: an injected pod's
  redirect hands that to the sidecar, whose task group refuses undyed requests (403).
- Requests in flight: from the injected sidecar's ready port (its container port named
  `tasklane-ready`) on the pod IP, which passes on the one admin URL that shows them
  (`inflight`); a pod without that port (not injected) has none.

Every pod's gauge and requests in flight are read in one `signals.read_gauges`, at once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

from kubernetes.client import V1LabelSelector, V1Pod
from kubernetes.utils import parse_quantity

from controlplane.model.group import GroupKey
from controlplane.model.rules import Service
from controlplane.scaler.inflight import active_requests_url
from controlplane.scaler.signals import Reading, Readings, read_gauges
from controlplane.xds.names import ACTIVE_REQUESTS_METRIC, READY_PORT_NAME

PROMETHEUS_PORT = "prometheus.io/port"
PROMETHEUS_PATH = "prometheus.io/path"
METRICS_PORT = "metrics"  # the container port read when the annotation is absent
RESOURCES = ("cpu", "memory")


def selects(selector: V1LabelSelector | None, labels: Mapping[str, str] | None) -> bool:
    """Whether a Deployment's `spec.selector` picks a pod with `labels`, as the API server
    decides it: matchLabels and matchExpressions ANDed; NotIn and DoesNotExist also pick a
    pod without the key; an empty selector picks all, a null one none."""
    if selector is None:
        return False
    labels = labels or {}
    if any(labels.get(key) != value for key, value in (selector.match_labels or {}).items()):
        return False
    for expression in selector.match_expressions or []:
        present = expression.key in labels
        if expression.operator == "In":
            chosen = present and labels[expression.key] in (expression.values or [])
        elif expression.operator == "NotIn":
            chosen = not present or labels[expression.key] not in (expression.values or [])
        elif expression.operator == "Exists":
            chosen = present
        elif expression.operator == "DoesNotExist":
            chosen = not present
        else:  # an operator the API server would have refused: pick nothing rather than all
            chosen = False
        if not chosen:
            return False
    return True


def pods_of(
    selectors: Mapping[GroupKey, V1LabelSelector], pods: Iterable[V1Pod]
) -> dict[GroupKey, list[V1Pod]]:
    """Each group's pods out of one list, by its selector: only the pods carrying the rarest
    of its matchLabels pairs are tried (an index; 200 groups times thousands of pods is too
    many `selects` for a tick), every pod when it has none."""
    pods = list(pods)
    index: dict[tuple[str, str], list[V1Pod]] = defaultdict(list)
    for pod in pods:
        for item in (pod.metadata.labels or {}).items():
            index[item].append(pod)
    found = {}
    for key, selector in selectors.items():
        pinned = (selector.match_labels or {}).items()
        tried = min((index.get(item, []) for item in pinned), key=len) if pinned else pods
        found[key] = [pod for pod in tried if selects(selector, pod.metadata.labels)]
    return found


def _allowed(selector: V1LabelSelector) -> dict[str, frozenset[str] | None]:
    """The label keys a selector requires, each with the values it allows (None: any)."""
    allowed: dict[str, frozenset[str] | None] = {
        key: frozenset([value]) for key, value in (selector.match_labels or {}).items()
    }
    for expression in selector.match_expressions or []:
        if expression.operator == "In":
            values = frozenset(expression.values or [])
            known = allowed.get(expression.key)
            allowed[expression.key] = values if known is None else known & values
        elif expression.operator == "Exists":
            allowed.setdefault(expression.key, None)
    return allowed


def shared_selector(selectors: Iterable[V1LabelSelector]) -> str:
    """What every one of `selectors` requires, as one `labelSelector` query parameter ("":
    nothing shared, the whole namespace): a key all require, with the union of the values
    they allow (`key=value`, `key in (a,b)`), or `key` when one allows any value. Each
    selector picks a subset of what this lists, so one list serves all their groups."""
    shared: dict[str, frozenset[str] | None] | None = None
    for selector in selectors:
        allowed = _allowed(selector)
        if shared is None:
            shared = allowed
            continue
        shared = {
            key: None if values is None or allowed[key] is None else values | allowed[key]
            for key, values in shared.items()
            if key in allowed
        }
    terms = []
    for key, values in sorted((shared or {}).items()):
        if not values:  # any value; or none at all, when every selector contradicts itself
            terms.append(key)
        elif len(values) == 1:
            terms.append(f"{key}={next(iter(values))}")
        else:
            terms.append(f"{key} in ({','.join(sorted(values))})")
    return ",".join(terms)


def is_ready(pod: V1Pod) -> bool:
    """Running, its Ready condition true, and not on its way out."""
    status = pod.status
    return (
        pod.metadata is not None
        and pod.metadata.deletion_timestamp is None
        and status is not None
        and status.phase == "Running"
        and any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])
    )


def usage_wanted(service: Service, pods: Iterable[V1Pod]) -> bool:
    """Whether CPU or memory can be a share of anything: the Service declares requests, or
    the app containers of a ready pod request some (else the Metrics API is not asked)."""
    return service.requests is not None or any(
        container.resources is not None and container.resources.requests
        for pod in pods
        if is_ready(pod)
        for container in pod.spec.containers
    )


def metrics_url(pod: V1Pod) -> str | None:
    """Where the pod's app serves Prometheus text, or None when the pod does not say."""
    annotations = pod.metadata.annotations or {}
    port: Any = annotations.get(PROMETHEUS_PORT)
    if port is None:
        port = next(
            (
                declared.container_port
                for container in pod.spec.containers
                for declared in container.ports or []
                if declared.name == METRICS_PORT
            ),
            None,
        )
    ip = pod.status.pod_ip
    if not ip or port is None or not str(port).isdigit():
        return None
    path = annotations.get(PROMETHEUS_PATH) or "/metrics"
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}/{path.lstrip('/')}"


def active_requests_at(pod: V1Pod) -> str | None:
    """Where the pod's sidecar shows its requests in flight, or None when it has no sidecar
    (no ready port) or no IP yet."""
    port = next(
        (
            declared.container_port
            for container in [*(pod.spec.init_containers or []), *pod.spec.containers]
            for declared in container.ports or []
            if declared.name == READY_PORT_NAME
        ),
        None,
    )
    ip = pod.status.pod_ip
    return active_requests_url(ip, port) if ip and port else None


def _total(quantities: Iterable[Any]) -> Decimal | None:
    """The sum of Kubernetes quantities ("250m", "128Mi", "1234567n"); None if one is
    missing or unreadable."""
    total = Decimal(0)
    for quantity in quantities:
        if quantity is None:
            return None
        try:
            total += parse_quantity(quantity)
        except ValueError:
            return None
    return total


def _share(used: Decimal | None, requested: Decimal | None) -> float | None:
    if used is None or requested is None or requested <= 0:
        return None
    return float(used / requested)


def pod_reading(
    pod: V1Pod,
    usage: Mapping[str, Any] | None,
    service: Service,
    saturation: float | None,
    in_flight: float | None = None,
) -> Reading:
    """One ready pod's reading: its app containers' use in `usage` (its PodMetrics item,
    None when metrics-server has none) against the requests, and the gauge and requests in
    flight read from it."""
    containers = pod.spec.containers
    measured = {c.get("name"): c.get("usage") or {} for c in (usage or {}).get("containers", [])}
    shares = {}
    for resource in RESOURCES:
        used = (
            _total(measured.get(c.name, {}).get(resource) for c in containers)
            if usage is not None
            else None
        )
        if service.requests is not None:
            requested = Decimal(str(getattr(service.requests, resource)))
        else:
            requested = _total(
                ((c.resources and c.resources.requests) or {}).get(resource) for c in containers
            )
        shares[resource] = _share(used, requested)
    return Reading(
        in_flight=in_flight, cpu=shares["cpu"], memory=shares["memory"], saturation=saturation
    )


def pod_readings(
    groups: Iterable[tuple[GroupKey, Service, list[V1Pod], Mapping[str, Any]]],
) -> Readings:
    """A reading per ready pod of each group (its Service, its pods, its PodMetricsList),
    every pod's gauge and requests in flight read at once; pods that tell nothing are left
    out."""
    found = []
    for key, service, pods, metrics in groups:
        items = metrics.get("items") or []
        by_name = {(item.get("metadata") or {}).get("name"): item for item in items}
        for pod in pods:
            if is_ready(pod):
                found.append((key, service, pod, by_name.get(pod.metadata.name)))
    # What to read of each pod, (url, metric): the url None where there is nothing to read.
    gauges = [(metrics_url(pod), service.saturation_gauge) for _, service, pod, _ in found]
    actives = [(active_requests_at(pod), ACTIVE_REQUESTS_METRIC) for _, _, pod, _ in found]
    targets = list(dict.fromkeys((url, name) for url, name in gauges + actives if url and name))
    values = dict(zip(targets, read_gauges(targets), strict=True))
    readings: Readings = []
    for (key, service, pod, usage), gauge, active in zip(found, gauges, actives, strict=True):
        reading = pod_reading(pod, usage, service, values.get(gauge), values.get(active))
        if reading != Reading():
            readings.append((key, reading))
    return readings
