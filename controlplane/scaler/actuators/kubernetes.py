"""The Kubernetes actuator: one Deployment per (service, group), scaled through its `scale`
subresource with the official `kubernetes` client.

The scale subresource is what `kubectl scale` and the HPA use: it touches `spec.replicas` and
nothing else, needs only `deployments/scale` rights, and does not conflict with whoever owns
the rest of the Deployment (GitOps, Helm). The patch is an RFC 7386 JSON merge patch
(`application/merge-patch+json`, as `kubectl scale` sends): explicit, because the client's
own choice for a dict body (strategic merge, swapped in for JSON Patch by its REST layer)
depends on the client version, and strategic merge is refused on custom resources.

Start durations: the API has no per-pod "started -> ready" for a Deployment, so they are
measured here, from the PATCH that raised a group's replicas to the first observe() that sees
that many ready replicas; their resolution is the caller's observe() period.

Reactive signals (`readings()`): the ready pods of the Deployments observe() last read, found
by each Deployment's own `spec.selector`, with their PodMetrics from the Metrics API, the
gauge from each pod's /metrics and the requests in flight from its sidecar's ready port
(`podsignals`: read from the pod IP, no API call). One list of pods and one of PodMetrics per
call, whatever the number of groups (by what all their selectors share, else the whole
namespace), each Deployment's selector matched here: a call per group, each with its own
timeout, would stretch the scaler's tick with the number of groups. An API that fails there
(no metrics-server: 404; RBAC: 403) leaves those signals unknown, with one warning until it
answers again, and scaling goes on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from controlplane.model.group import GroupKey
from controlplane.model.rules import Service
from controlplane.scaler.actuators import ActuatorError, GroupReplicas, check_replicas
from controlplane.scaler.podsignals import pod_readings, pods_of, shared_selector, usage_wanted
from controlplane.scaler.signals import Readings

log = logging.getLogger("tasklane.actuator.kubernetes")

FIELD_MANAGER = "tasklane"  # who set spec.replicas, as the API server records it
MERGE_PATCH = "application/merge-patch+json"
API_TIMEOUT = 10.0  # seconds, per request
DURATIONS_KEPT = 20
METRICS_API = ("metrics.k8s.io", "v1beta1")  # PodMetrics, served by metrics-server


@dataclass(frozen=True)
class _Pending:
    """A scale-up waiting to be seen ready."""

    target: int
    at: float  # monotonic


class KubernetesActuator:
    """Scales Deployment `name_template.format(service=..., group=...)` in `namespace`.

    `api_client` defaults to the in-cluster service account when running in a pod, else the
    current kubeconfig context. `groups` names the (service, group) pairs observe() reads;
    without it, the pairs scaled through this actuator so far.
    """

    name = "kubernetes"
    parks = False

    def __init__(
        self,
        namespace: str,
        api_client: client.ApiClient | None = None,
        name_template: str = "{service}-{group}",
        groups: Callable[[], Iterable[GroupKey]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.namespace = namespace
        self.name_template = name_template
        api_client = api_client or _default_client()
        self._apps = client.AppsV1Api(api_client)
        self._core = client.CoreV1Api(api_client)
        self._custom = client.CustomObjectsApi(api_client)
        self._groups = groups
        self._clock = clock
        self._lock = threading.Lock()
        self._requested: dict[GroupKey, int] = {}  # the last replicas patched, per group
        self._pending: dict[GroupKey, _Pending] = {}
        self._durations: dict[GroupKey, deque[float]] = {}
        # each Deployment's, as observe() last read
        self._selectors: dict[GroupKey, client.V1LabelSelector] = {}
        self._failing: dict[str, str] = {}  # a failing read's error by call: logged once

    def deployment(self, service: str, group: str) -> str:
        """The Deployment that holds one group's pods."""
        return self.name_template.format(service=service, group=group)

    def scale(self, service: str, group: str, replicas: int, reason: str) -> None:
        """PATCH the scale subresource; ActuatorError (one line) when the API refuses."""
        check_replicas(replicas)
        name = self.deployment(service, group)
        try:
            scale = self._apps.patch_namespaced_deployment_scale(
                name,
                self.namespace,
                {"spec": {"replicas": replicas}},
                field_manager=FIELD_MANAGER,
                _content_type=MERGE_PATCH,
                _request_timeout=API_TIMEOUT,
            )
        except _FAILURES as exc:
            raise _failure(f"scale deployment {self.namespace}/{name} to {replicas}", exc) from None
        current = (scale.status.replicas if scale.status is not None else None) or 0
        with self._lock:
            if self._requested.get((service, group)) != replicas:  # not every repetition
                log.info("%s/%s -> %d replicas: %s", self.namespace, name, replicas, reason)
            self._requested[service, group] = replicas
            pending = self._pending.get((service, group))
            if replicas > current and (pending is None or pending.target < replicas):
                self._pending[service, group] = _Pending(replicas, self._clock())
            elif pending is not None and replicas < pending.target:
                del self._pending[service, group]  # scaled down before it was ever ready

    def observe(self) -> dict[GroupKey, GroupReplicas]:
        """Ready = the Deployment's readyReplicas; starting = the rest of spec.replicas.
        Groups whose Deployment does not exist are left out."""
        if self._groups is not None:
            keys = set(self._groups())
        else:
            with self._lock:
                keys = set(self._requested)
        seen: dict[GroupKey, GroupReplicas] = {}
        for service, group in sorted(keys):
            name = self.deployment(service, group)
            try:
                deployment = self._apps.read_namespaced_deployment(
                    name, self.namespace, _request_timeout=API_TIMEOUT
                )
            except _FAILURES as exc:
                error = _failure(f"read deployment {self.namespace}/{name}", exc)
                if getattr(exc, "status", None) != 404:
                    raise error from None
                log.warning("%s", error)
                continue
            wanted = (deployment.spec.replicas if deployment.spec is not None else None) or 0
            ready = (deployment.status.ready_replicas if deployment.status else None) or 0
            seen[service, group] = GroupReplicas(ready=ready, starting=max(0, wanted - ready))
            self._note_ready((service, group), ready)
            selector = deployment.spec.selector if deployment.spec else None
            with self._lock:
                if selector is None:
                    self._selectors.pop((service, group), None)
                else:
                    self._selectors[service, group] = selector
        return seen

    def readings(self, groups: set[GroupKey], services: Mapping[str, Service]) -> Readings:
        """Requests in flight, CPU, memory and saturation of the ready pods of `groups` (see
        the module docstring); a group whose Deployment observe() has not read has none."""
        with self._lock:
            selectors = {
                key: self._selectors[key]
                for key in groups
                if key in self._selectors and key[0] in services
            }
        if not selectors:
            return []
        shared = shared_selector(selectors.values()) or None
        try:
            pods = self._core.list_namespaced_pod(
                self.namespace, label_selector=shared, _request_timeout=API_TIMEOUT
            ).items
        except _FAILURES as exc:
            self._warn("pods", _failure(f"list pods in {self.namespace}", exc))
            return []
        self._recovered("pods")
        picked = pods_of(selectors, pods)
        found = [(key, services[key[0]], picked[key]) for key in sorted(selectors)]
        metrics: Mapping[str, Any] = {}
        if any(usage_wanted(service, group_pods) for _, service, group_pods in found):
            try:
                metrics = self._custom.list_namespaced_custom_object(
                    *METRICS_API,
                    self.namespace,
                    "pods",
                    label_selector=shared,
                    _request_timeout=API_TIMEOUT,
                )
            except _FAILURES as exc:
                what = f"read the Metrics API's pods in {self.namespace}"
                self._warn("metrics", _failure(what, exc))
            else:
                self._recovered("metrics")
        return pod_readings(
            (key, service, group_pods, metrics) for key, service, group_pods in found
        )

    def _warn(self, call: str, error: ActuatorError) -> None:
        """Once per failure: again only after `call` answered in between, or failed otherwise."""
        with self._lock:
            if self._failing.get(call) == str(error):
                return
            self._failing[call] = str(error)
        log.warning("%s: those signals are not known", error)

    def _recovered(self, call: str) -> None:
        with self._lock:
            self._failing.pop(call, None)

    def _note_ready(self, key: GroupKey, ready: int) -> None:
        with self._lock:
            pending = self._pending.get(key)
            if pending is not None and ready >= pending.target:
                del self._pending[key]
                durations = self._durations.setdefault(key, deque(maxlen=DURATIONS_KEPT))
                durations.append(self._clock() - pending.at)

    def start_durations(self) -> dict[GroupKey, list[float]]:
        with self._lock:
            return {key: list(durations) for key, durations in self._durations.items()}

    def keep(self, pools: Mapping[GroupKey, int]) -> None:
        """The scale subresource cannot park a pod: groups simply go down."""

    def close(self) -> None:
        """Deployments stay as they are: Kubernetes, not this process, runs their pods."""
        self._apps.api_client.close()


_FAILURES = (ApiException, urllib3.exceptions.HTTPError, OSError)


def _failure(what: str, exc: Exception) -> ActuatorError:
    """One line: the API server's own reason (its Status message) when it answered."""
    if not isinstance(exc, ApiException):
        return ActuatorError(f"cannot {what}: {exc}")
    message: Any = None
    with contextlib.suppress(ValueError, KeyError, TypeError):
        message = json.loads(exc.body or "")["message"]
    text = " ".join(str(message or exc.reason or "").split())
    return ActuatorError(f"cannot {what}: {exc.status} {text}")


def _default_client() -> client.ApiClient:
    configuration = client.Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)
        else:
            config.load_kube_config(client_configuration=configuration)
    except (config.ConfigException, OSError) as exc:
        raise ActuatorError(f"no Kubernetes API to talk to: {exc}") from None
    return client.ApiClient(configuration)
