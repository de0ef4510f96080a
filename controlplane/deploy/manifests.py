"""The Kubernetes objects that run tasklane in a cluster, as plain dicts (`tasklane k8s
manifests` prints them as YAML for `kubectl apply -f -`).

What is made, all in one namespace (default tasklane-system) unless said:

- the control plane: a Deployment of >= 2 `tasklane up` replicas (they share etcd and elect
  the scaler's leader there, so any number is safe), spread over nodes, non-root with a
  read-only root filesystem; its Service (xDS 18000, HTTP 8080, webhook 9443) and a
  PodDisruptionBudget that keeps all but one replica up through node drains;
- its ServiceAccount and, in the *workload* namespace only, a Role that allows exactly what
  the Kubernetes actuator calls: `patch` on `deployments/scale`, `get` on `deployments` (it
  reads readyReplicas and the pods' selector), and `list` on `pods` and on the Metrics API's
  `pods.metrics.k8s.io` (the reactive signals: CPU, memory, the app's gauge). A Role, not a
  ClusterRole: the actuator scales Deployments of one namespace (`tasklane up --namespace`),
  and a ClusterRole would let it scale every Deployment in the cluster. Leader election
  needs no RBAC: it uses etcd, not Leases;
- Secrets: the TLS directory (`tasklane up --tls-dir`: ca.crt, server.crt/key, client.crt/key;
  never ca.key, which only issuing needs) and the API token, mounted as `<state-dir>/api-token`
  so that every replica accepts the same token; in the workload namespace, the sidecars' TLS
  (ca.crt, client.crt/key) that injected pods mount for mTLS to xDS (other namespaces need a
  copy of it: a Secret is only mounted from the pod's own namespace);
- the MutatingWebhookConfiguration of the sidecar injector (`POST /inject` on port 9443),
  with the CA in its caBundle. failurePolicy Ignore: a mesh must never stop pods from being
  created, even while every replica is down; such pods start without a sidecar;
- unless an external etcd is given: a 3-member etcd StatefulSet (headless Service for the
  peers, a client Service, PVCs, a PodDisruptionBudget that keeps quorum, and a NetworkPolicy
  that lets only the control plane and the members reach it, since this etcd has no auth).

`tasklane up --etcd` takes one HOST:PORT: the bundled etcd is reached through its client
Service, which spreads connections over the ready members.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from controlplane import pki
from controlplane.api.token import TOKEN_FILE
from controlplane.errors import TasklaneError
from controlplane.inject.patch import WEBHOOK_PATH
from controlplane.inject.pod import DEFAULT_IMAGE, DEFAULT_TLS_SECRET
from controlplane.model.rules import DNS_LABEL

Manifest = dict[str, Any]

NAME = "tasklane"
NAMESPACE = "tasklane-system"
WORKLOAD_NAMESPACE = "default"
DEFAULT_REPLICAS = 2
# The same etcd release docker-compose.yml runs (a test checks they agree).
ETCD_IMAGE = "gcr.io/etcd-development/etcd:v3.5.17"
ETCD_NAME = f"{NAME}-etcd"
ETCD_MEMBERS = 3
ETCD_CLIENT_PORT, ETCD_PEER_PORT = 2379, 2380
PORTS = {"xds": 18000, "http": 8080, "webhook": 9443}
INJECT_LABEL = "tasklane.io/inject"  # on a namespace: `enabled` opts its pods in
WEBHOOK_TIMEOUT_S = 5
TLS_SECRET, TOKEN_SECRET = f"{NAME}-tls", f"{NAME}-api-token"
# In the workload namespace: what injected sidecars mount for mTLS to xDS (no server key);
# the name `tasklane inject` and the webhook default to.
SIDECAR_TLS_SECRET = DEFAULT_TLS_SECRET
SIDECAR_TLS_FILES = (pki.CA_CERT, pki.CLIENT_CERT, pki.CLIENT_KEY)
TLS_DIR, STATE_DIR = "/etc/tasklane/tls", "/var/lib/tasklane"
TLS_FILES = (pki.CA_CERT, pki.SERVER_CERT, pki.SERVER_KEY, pki.CLIENT_CERT, pki.CLIENT_KEY)
UID = 10001  # the image's user; files of mounted Secrets are readable by its group (fsGroup)
SECRET_MODE = 0o440  # owner root, group fsGroup; nobody else
SCALER_ROLE = f"{NAME}-scaler"
# What KubernetesActuator calls, and so all its Role grants (tests/unit/test_manifests.py
# checks this against the calls the actuator really makes).
SCALER_RULES = (
    {"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["patch"]},
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"]},
    # The reactive signals: a group's pods (IPs, requests) and their PodMetrics.
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    {"apiGroups": ["metrics.k8s.io"], "resources": ["pods"], "verbs": ["list"]},
)
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


class ManifestError(TasklaneError):
    """An option the manifests cannot be made from; the message names the option."""


@dataclass(frozen=True)
class Options:
    """What `tasklane k8s manifests` was asked for."""

    namespace: str = NAMESPACE
    workload_namespace: str = WORKLOAD_NAMESPACE  # where the scaler's Deployments are
    image: str = DEFAULT_IMAGE
    replicas: int = DEFAULT_REPLICAS
    etcd: str | None = None  # an external etcd's HOST:PORT; None runs the StatefulSet

    def check(self) -> None:
        """ManifestError (one line, naming the option) for anything Kubernetes would refuse
        or that would make a fragile install."""
        for option, value in (
            ("--namespace", self.namespace),
            ("--workload-namespace", self.workload_namespace),
        ):
            if not DNS_LABEL.fullmatch(value):
                raise ManifestError(
                    f"{option} {value!r}: not a namespace name (lower-case letters, digits and "
                    "'-', starting and ending with a letter or digit, at most 63 characters)"
                )
        if self.replicas < DEFAULT_REPLICAS:
            raise ManifestError(
                f"--replicas {self.replicas}: at least {DEFAULT_REPLICAS}; with one replica "
                "every restart or node drain leaves sidecars without xDS and lets new pods "
                "start without a sidecar (the webhook fails open)"
            )
        if not self.image or any(c.isspace() for c in self.image):
            raise ManifestError(f"--image {self.image!r}: not an image reference")
        if self.etcd is not None:
            check_endpoint(self.etcd)

    @property
    def etcd_endpoint(self) -> str:
        """The one HOST:PORT `tasklane up --etcd` gets."""
        if self.etcd is not None:
            return self.etcd
        return f"{ETCD_NAME}-client.{self.namespace}.svc:{ETCD_CLIENT_PORT}"


def check_endpoint(endpoint: str) -> None:
    """ManifestError unless `endpoint` is one HOST:PORT (a DNS name or an IP address)."""
    if "," in endpoint:
        raise ManifestError(
            f"--etcd {endpoint!r}: one HOST:PORT only (`tasklane up --etcd` takes one "
            "endpoint); give a Service or load balancer in front of the members"
        )
    if "://" in endpoint:
        raise ManifestError(f"--etcd {endpoint!r}: HOST:PORT, without a scheme")
    host, _, port = endpoint.rpartition(":")
    if not (port.isdigit() and 0 < int(port) < 65536):
        raise ManifestError(f"--etcd {endpoint!r}: expected HOST:PORT with a port 1-65535")
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        address = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        if len(host) > 253 or not _SUBDOMAIN.fullmatch(host):
            raise ManifestError(f"--etcd {endpoint!r}: {host!r} is not a host name") from None
        return
    if address.version == 6 and not bracketed:
        raise ManifestError(f"--etcd {endpoint!r}: write an IPv6 address as [ADDRESS]:PORT")


def service_hosts(namespace: str) -> tuple[str, ...]:
    """The names the control plane's Service is reached by: its server certificate's SANs.
    The API server calls the webhook at `tasklane.<ns>.svc`."""
    return (
        NAME,
        f"{NAME}.{namespace}",
        f"{NAME}.{namespace}.svc",
        f"{NAME}.{namespace}.svc.cluster.local",
    )


def new_tls_files(namespace: str) -> dict[str, bytes]:
    """A new CA, a server certificate for the Service's names and a client certificate, as
    the TLS directory's files (no ca.key: nothing in the cluster issues certificates)."""
    ca = pki.new_ca()
    server = pki.issue(ca, "tasklane control plane", hosts=service_hosts(namespace), server=True)
    client = pki.issue(ca, "tasklane sidecar", server=False)
    return {
        pki.CA_CERT: ca.cert,
        pki.SERVER_CERT: server.cert,
        pki.SERVER_KEY: server.key,
        pki.CLIENT_CERT: client.cert,
        pki.CLIENT_KEY: client.key,
    }


def check_tls_files(files: Mapping[str, bytes], namespace: str, source: str) -> None:
    """ManifestError unless the server certificate was issued by (one of) ca.crt and names
    `tasklane.<ns>.svc`, the host the API server calls the webhook at: with failurePolicy
    Ignore a certificate the API server refuses would silently turn injection off."""
    server = x509.load_pem_x509_certificate(files[pki.SERVER_CERT])
    cas = x509.load_pem_x509_certificates(files[pki.CA_CERT])
    if not any(_issued_by(server, ca) for ca in cas):
        raise ManifestError(f"--tls-dir {source}: server.crt was not issued by its ca.crt")
    try:
        names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = set(names.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        dns_names = set()
    host = service_hosts(namespace)[2]
    if host not in dns_names:
        raise ManifestError(
            f"--tls-dir {source}: server.crt does not name {host}, the host the API server "
            f"calls the webhook at (issue it for {', '.join(service_hosts(namespace))})"
        )


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def manifests(options: Options, tls_files: Mapping[str, bytes], token: str) -> list[Manifest]:
    """Every object, in the order `kubectl apply` needs (the Namespace first).

    `tls_files` maps the TLS directory's file names (TLS_FILES) to their PEM contents; its
    ca.crt becomes the webhook's caBundle. `token` is the API token every replica shares.
    """
    ns = options.namespace
    docs: list[Manifest] = [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            # The control plane and etcd pass the `restricted` Pod Security Standard.
            "metadata": {
                "name": ns,
                "labels": {
                    **_labels("namespace"),
                    "pod-security.kubernetes.io/enforce": "restricted",
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": _meta(NAME, ns, "control-plane"),
        },
        _secret(TLS_SECRET, ns, {name: tls_files[name] for name in TLS_FILES}),
        _secret(TOKEN_SECRET, ns, {TOKEN_FILE: token.encode() + b"\n"}),
        _secret(
            SIDECAR_TLS_SECRET,
            options.workload_namespace,
            {name: tls_files[name] for name in SIDECAR_TLS_FILES},
        ),
        *_scaler_rbac(options),
    ]
    if options.etcd is None:
        docs += _etcd(ns)
    docs += [
        _service(NAME, ns, _labels("control-plane"), PORTS),
        _control_plane(options),
        _disruption_budget(NAME, ns, _labels("control-plane")),
        _webhook(ns, tls_files[pki.CA_CERT]),
    ]
    return docs


class _PlainDumper(yaml.SafeDumper):
    """Writes a shared dict (a selector used twice) out again instead of as an &anchor."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_yaml(docs: Iterable[Manifest]) -> str:
    """Multi-document YAML, keys in the order they were built (kind and metadata first)."""
    return yaml.dump_all(
        list(docs), Dumper=_PlainDumper, sort_keys=False, explicit_start=True, width=100
    )


# ------------------------------------------------------------------------------ building blocks


def _labels(component: str, name: str = NAME) -> dict[str, str]:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/component": component}


def _meta(name: str, namespace: str, component: str) -> Manifest:
    return _owned(name, namespace, _labels(component))


def _owned(name: str, namespace: str, selector: Mapping[str, str]) -> Manifest:
    """Metadata of an object that belongs with the pods `selector` picks."""
    labels = {**selector, "app.kubernetes.io/part-of": NAME}
    return {"name": name, "namespace": namespace, "labels": labels}


def _secret(name: str, namespace: str, files: Mapping[str, bytes]) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(name, namespace, "control-plane"),
        "type": "Opaque",
        "data": {key: base64.b64encode(value).decode() for key, value in files.items()},
    }


def _pod_security() -> Manifest:
    """Non-root; the fsGroup makes mounted Secrets and PVCs readable by the process."""
    return {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "fsGroup": UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> Manifest:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _spread(selector: Mapping[str, str]) -> Manifest:
    """Replicas on different nodes when there are enough: preferred, not required, so a
    one-node cluster (kind, minikube) still runs them all and rolling updates never wait."""
    return {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "labelSelector": {"matchLabels": dict(selector)},
                        "topologyKey": "kubernetes.io/hostname",
                    },
                }
            ]
        }
    }


def _disruption_budget(name: str, namespace: str, selector: Mapping[str, str]) -> Manifest:
    """At most one pod evicted at a time: the rest keep serving (or keep etcd's quorum)."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _owned(name, namespace, selector),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": dict(selector)}},
    }


def _service(
    name: str,
    namespace: str,
    selector: Mapping[str, str],
    ports: Mapping[str, int],
    **spec: Any,
) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _owned(name, namespace, selector),
        "spec": {
            **spec,
            "selector": dict(selector),
            "ports": [
                {"name": port_name, "port": port, "targetPort": port_name, "protocol": "TCP"}
                for port_name, port in ports.items()
            ],
        },
    }


# ------------------------------------------------------------------------------- the objects


def _scaler_rbac(options: Options) -> list[Manifest]:
    """The actuator's rights, in the workload namespace only (see the module docstring)."""
    meta = _meta(SCALER_ROLE, options.workload_namespace, "control-plane")
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta,
            "rules": [dict(rule) for rule in SCALER_RULES],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": options.namespace}],
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": SCALER_ROLE,
            },
        },
    ]


def up_args(options: Options) -> list[str]:
    """`tasklane up`'s command line in every replica."""
    return [
        "up",
        "--host", "0.0.0.0",
        "--xds-port", str(PORTS["xds"]),
        "--http-port", str(PORTS["http"]),
        "--webhook-port", str(PORTS["webhook"]),
        "--etcd", options.etcd_endpoint,
        "--state-dir", STATE_DIR,
        "--tls-dir", TLS_DIR,
        "--accept-announce",
        "--sidecar-xds-address", f"{service_hosts(options.namespace)[2]}:{PORTS['xds']}",
        "--sidecar-tls-secret", SIDECAR_TLS_SECRET,
        "--sidecar-image", options.image,  # one image: control plane, sidecar and redirect
        "--actuator", "kubernetes",
        "--namespace", options.workload_namespace,
    ]  # fmt: skip


def _control_plane(options: Options) -> Manifest:
    selector = _labels("control-plane")
    container = {
        "name": NAME,
        "image": options.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["tasklane"],
        "args": up_args(options),
        "env": [{"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}],  # read-only root fs
        "ports": [
            {"name": name, "containerPort": port, "protocol": "TCP"} for name, port in PORTS.items()
        ],
        # Ready = etcd answers (/healthz): without it no rule change or registration works.
        "readinessProbe": {
            "httpGet": {"path": "/healthz", "port": "http"},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 3,
        },
        # Alive = the HTTP loop answers (/livez), whatever etcd does: restarting
        # every replica during an etcd outage would only drop the sidecars' xDS streams.
        "livenessProbe": {
            "httpGet": {"path": "/livez", "port": "http"},
            "initialDelaySeconds": 15,
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
        "resources": {
            "requests": {"cpu": "100m", "memory": "256Mi"},
            "limits": {"memory": "1Gi"},
        },
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "tls", "mountPath": TLS_DIR, "readOnly": True},
            {"name": "api-token", "mountPath": STATE_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(NAME, options.namespace, "control-plane"),
        "spec": {
            "replicas": options.replicas,
            "selector": {"matchLabels": selector},
            # A new replica is ready before an old one goes: never fewer than `replicas`.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": {
                "metadata": {"labels": selector},
                "spec": {
                    "serviceAccountName": NAME,
                    # Service links would put TASKLANE_* variables in the environment.
                    "enableServiceLinks": False,
                    "securityContext": _pod_security(),
                    "affinity": _spread(selector),
                    "terminationGracePeriodSeconds": 30,
                    "containers": [container],
                    "volumes": [
                        {
                            "name": "tls",
                            "secret": {"secretName": TLS_SECRET, "defaultMode": SECRET_MODE},
                        },
                        {
                            "name": "api-token",
                            "secret": {"secretName": TOKEN_SECRET, "defaultMode": SECRET_MODE},
                        },
                        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                    ],
                },
            },
        },
    }


def _webhook(namespace: str, ca_cert: bytes) -> Manifest:
    """Pod CREATEs of namespaces labelled `tasklane.io/inject: enabled` go to `/inject`;
    never the control plane's own namespace (its pods would wait on themselves)."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": f"{NAME}-inject", "labels": _labels("webhook")},
        "webhooks": [
            {
                "name": "inject.tasklane.io",
                "clientConfig": {
                    "service": {
                        "name": NAME,
                        "namespace": namespace,
                        "path": WEBHOOK_PATH,
                        "port": PORTS["webhook"],
                    },
                    "caBundle": base64.b64encode(ca_cert).decode(),
                },
                "rules": [
                    {
                        "operations": ["CREATE"],
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "resources": ["pods"],
                        "scope": "Namespaced",
                    }
                ],
                "namespaceSelector": {
                    "matchLabels": {INJECT_LABEL: "enabled"},
                    "matchExpressions": [
                        {
                            "key": "kubernetes.io/metadata.name",
                            "operator": "NotIn",
                            "values": [namespace, "kube-system"],
                        }
                    ],
                },
                "matchPolicy": "Equivalent",
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                # Fail open: a mesh must not block pod creation (see the module docstring).
                "failurePolicy": "Ignore",
                # With Ignore, a slow webhook still delays every pod by up to this long.
                "timeoutSeconds": WEBHOOK_TIMEOUT_S,
                # The injector adds its sidecar whatever later webhooks change, and is not
                # asked twice: one call per pod.
                "reinvocationPolicy": "Never",
            }
        ],
    }


def _etcd(namespace: str) -> list[Manifest]:
    """A 3-member etcd: survives one member (or node) down."""
    peers_service = ETCD_NAME  # headless: stable DNS names for the members
    selector = _labels("etcd", ETCD_NAME)
    member = f"$(POD_NAME).{peers_service}.{namespace}.svc"  # the kubelet expands $(POD_NAME)
    initial_cluster = ",".join(
        f"{ETCD_NAME}-{i}=http://{ETCD_NAME}-{i}.{peers_service}.{namespace}.svc:{ETCD_PEER_PORT}"
        for i in range(ETCD_MEMBERS)
    )
    ports = {"client": ETCD_CLIENT_PORT, "peer": ETCD_PEER_PORT}
    container = {
        "name": "etcd",
        "image": ETCD_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": ["etcd"],
        "args": [
            "--name=$(POD_NAME)",
            "--data-dir=/var/lib/etcd/data",  # below the mount: its lost+found is no member
            f"--listen-client-urls=http://0.0.0.0:{ETCD_CLIENT_PORT}",
            f"--advertise-client-urls=http://{member}:{ETCD_CLIENT_PORT}",
            f"--listen-peer-urls=http://0.0.0.0:{ETCD_PEER_PORT}",
            f"--initial-advertise-peer-urls=http://{member}:{ETCD_PEER_PORT}",
            f"--initial-cluster={initial_cluster}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token={ETCD_NAME}-{namespace}",
            # Registrations and keepalives make revisions; keep one hour of history.
            "--auto-compaction-mode=periodic",
            "--auto-compaction-retention=1h",
        ],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "ports": [
            {"name": name, "containerPort": port, "protocol": "TCP"} for name, port in ports.items()
        ],
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": "client"},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
        },
        # Alive without a quorum too: restarting members would not bring it back sooner.
        "livenessProbe": {
            "tcpSocket": {"port": "client"},
            "initialDelaySeconds": 15,
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        "resources": {
            "requests": {"cpu": "100m", "memory": "256Mi"},
            "limits": {"memory": "1Gi"},
        },
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/etcd"}],
    }
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _owned(ETCD_NAME, namespace, selector),
        "spec": {
            "serviceName": peers_service,
            "replicas": ETCD_MEMBERS,
            # All members at once: the first cannot be ready before a quorum has joined.
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": selector},
                "spec": {
                    "enableServiceLinks": False,
                    "automountServiceAccountToken": False,
                    "securityContext": _pod_security(),
                    "affinity": _spread(selector),
                    "containers": [container],
                },
            },
            "volumeClaimTemplates": [
                {
                    "metadata": {"name": "data"},
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "resources": {"requests": {"storage": "2Gi"}},
                    },
                }
            ],
        },
    }
    only_from = [
        {"podSelector": {"matchLabels": _labels("control-plane")}},
        {"podSelector": {"matchLabels": selector}},
    ]
    network_policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _owned(ETCD_NAME, namespace, selector),
        "spec": {
            "podSelector": {"matchLabels": selector},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": only_from, "ports": [{"port": "client", "protocol": "TCP"}]},
                {"from": only_from[1:], "ports": [{"port": "peer", "protocol": "TCP"}]},
            ],
        },
    }
    return [
        network_policy,
        # Members must find each other before they are ready, hence publishNotReadyAddresses.
        _service(
            peers_service,
            namespace,
            selector,
            ports,
            clusterIP="None",
            publishNotReadyAddresses=True,
        ),
        # What the control plane dials: ready members only.
        _service(f"{ETCD_NAME}-client", namespace, selector, {"client": ETCD_CLIENT_PORT}),
        statefulset,
        _disruption_budget(ETCD_NAME, namespace, selector),
    ]
