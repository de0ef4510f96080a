"""`tasklane k8s manifests`: every object valid for Kubernetes (strict schemas, offline), the
webhook's caBundle really the CA of the served certificate, RBAC no wider than what the
actuator calls, and the command's exit codes and one-line errors as a real subprocess."""

from __future__ import annotations

import base64
import copy
import inspect
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from kubernetes import client

from controlplane import pki
from controlplane.cli import build_parser
from controlplane.cli.inject import sidecar_options
from controlplane.deploy import manifests as k8s
from controlplane.model.rules import Group, Requests, Service
from controlplane.scaler.actuators import kubernetes as actuator_module
from controlplane.scaler.actuators.kubernetes import KubernetesActuator

TASKLANE = Path(sys.executable).with_name("tasklane")
EXTERNAL_ETCD = "etcd.example.internal:2379"
# The oldest Kubernetes the sidecar injector supports (native sidecars), and the newest the
# installed kubernetes-validate knows.
VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
# (the actuator's API object, its method[, a custom object's group and plural]) -> the
# (API group, resource, verb) a cluster authorizes the call as.
RBAC_OF_CALL = {
    ("_apps", "patch_namespaced_deployment_scale"): ("apps", "deployments/scale", "patch"),
    ("_apps", "read_namespaced_deployment"): ("apps", "deployments", "get"),
    ("_core", "list_namespaced_pod"): ("", "pods", "list"),
    ("_custom", "list_namespaced_custom_object", "metrics.k8s.io", "pods"): (
        "metrics.k8s.io",
        "pods",
        "list",
    ),
}


def build(**options: object) -> list[dict]:
    opts = k8s.Options(**options)  # type: ignore[arg-type]
    opts.check()
    return k8s.manifests(opts, k8s.new_tls_files(opts.namespace), "test-token")


@pytest.fixture(scope="module")
def bundled() -> list[dict]:
    """The default install: etcd StatefulSet included."""
    return build()


@pytest.fixture(scope="module")
def external() -> list[dict]:
    return build(etcd=EXTERNAL_ETCD, namespace="mesh", workload_namespace="batch", replicas=3)


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in of_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def secret_file(docs: list[dict], secret: str, key: str) -> bytes:
    return base64.b64decode(one(docs, "Secret", secret)["data"][key])


# ------------------------------------------------------------------------------------ schemas


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("variant", ["bundled", "external"])
def test_every_manifest_is_valid_for_kubernetes_strict(
    variant: str, version: str, request: pytest.FixtureRequest
) -> None:
    """Strict: an unknown or misspelt field anywhere is an error, not silently dropped.
    A kind without a schema raises SchemaNotFoundError, so nothing goes unchecked."""
    docs = request.getfixturevalue(variant)
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_is_not_vacuous(bundled: list[dict]) -> None:
    deployment = copy.deepcopy(one(bundled, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, VERSIONS[0], strict=True)


def test_the_printed_yaml_is_the_objects(bundled: list[dict]) -> None:
    """What kubectl reads back is what was built: no anchors, no lost types."""
    text = k8s.to_yaml(bundled)
    assert "&id" not in text and "*id" not in text
    assert list(yaml.safe_load_all(text)) == bundled


def test_kinds_and_order(bundled: list[dict], external: list[dict]) -> None:
    kinds = [doc["kind"] for doc in bundled]
    assert kinds[0] == "Namespace"  # kubectl apply creates it before anything in it
    assert sorted(set(kinds)) == sorted(
        {
            "Namespace", "ServiceAccount", "Secret", "Role", "RoleBinding", "NetworkPolicy",
            "Service", "StatefulSet", "PodDisruptionBudget", "Deployment",
            "MutatingWebhookConfiguration",
        }
    )  # fmt: skip
    assert not of_kind(external, "StatefulSet") and not of_kind(external, "NetworkPolicy")
    assert [s["metadata"]["name"] for s in of_kind(external, "Service")] == [k8s.NAME]


def test_namespaces(external: list[dict]) -> None:
    """Everything in --namespace, except the scaler's Role and the sidecars' TLS: in the
    workload namespace."""
    for doc in external:
        namespace = doc["metadata"].get("namespace")
        if doc["kind"] in ("Role", "RoleBinding") or doc["metadata"]["name"] == (
            k8s.SIDECAR_TLS_SECRET
        ):
            assert namespace == "batch"
        elif doc["kind"] in ("Namespace", "MutatingWebhookConfiguration"):
            assert namespace is None
        else:
            assert namespace == "mesh", doc["kind"]


# -------------------------------------------------------------------------------- certificates


@pytest.mark.parametrize("namespace", [k8s.NAMESPACE, "mesh"])
def test_ca_bundle_signed_the_served_certificate_for_the_service_names(namespace: str) -> None:
    docs = build(namespace=namespace)
    webhook = one(docs, "MutatingWebhookConfiguration")["webhooks"][0]
    ca_bundle = base64.b64decode(webhook["clientConfig"]["caBundle"])
    assert ca_bundle == secret_file(docs, k8s.TLS_SECRET, pki.CA_CERT)
    ca = x509.load_pem_x509_certificate(ca_bundle)
    server = x509.load_pem_x509_certificate(secret_file(docs, k8s.TLS_SECRET, pki.SERVER_CERT))
    server.verify_directly_issued_by(ca)  # raises when another key signed it
    key = serialization.load_pem_private_key(
        secret_file(docs, k8s.TLS_SECRET, pki.SERVER_KEY), password=None
    )
    assert key.public_key() == server.public_key()
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) >= {
        "tasklane",
        f"tasklane.{namespace}",
        f"tasklane.{namespace}.svc",  # what the API server calls
        f"tasklane.{namespace}.svc.cluster.local",
    }
    client_cert = x509.load_pem_x509_certificate(secret_file(docs, k8s.TLS_SECRET, pki.CLIENT_CERT))
    client_cert.verify_directly_issued_by(ca)
    assert "ca.key" not in one(docs, "Secret", k8s.TLS_SECRET)["data"]
    service = webhook["clientConfig"]["service"]
    assert (service["name"], service["namespace"]) == ("tasklane", namespace)


def test_every_build_makes_a_new_ca() -> None:
    """(The token: see test_command_prints_the_manifests.)"""
    first, second = build(), build()
    ca = (k8s.TLS_SECRET, pki.CA_CERT)
    assert secret_file(first, *ca) != secret_file(second, *ca)


def test_tls_files_from_another_ca_or_for_other_names_are_refused() -> None:
    files = k8s.new_tls_files("mesh")
    k8s.check_tls_files(files, "mesh", "dir")
    with pytest.raises(k8s.ManifestError, match=r"does not name tasklane\.other\.svc"):
        k8s.check_tls_files(files, "other", "dir")
    foreign = {**files, pki.CA_CERT: k8s.new_tls_files("mesh")[pki.CA_CERT]}
    with pytest.raises(k8s.ManifestError, match="not issued by its ca.crt"):
        k8s.check_tls_files(foreign, "mesh", "dir")


# ------------------------------------------------------------------------------------- RBAC


def test_rbac_grants_only_what_the_actuator_calls(bundled: list[dict]) -> None:
    """Run the actuator against recording API objects: the Role must allow exactly the calls
    it makes, and the module must call nothing else (a static scan catches untested paths)."""
    actuator = KubernetesActuator("default", api_client=client.ApiClient())
    apps = mock.create_autospec(client.AppsV1Api, instance=True)
    apps.patch_namespaced_deployment_scale.return_value = SimpleNamespace(
        status=SimpleNamespace(replicas=0)
    )
    apps.read_namespaced_deployment.return_value = client.V1Deployment(
        spec=client.V1DeploymentSpec(
            replicas=2,
            selector=client.V1LabelSelector(match_labels={"app": "nav-pricing-task"}),
            template=client.V1PodTemplateSpec(),
        ),
        status=client.V1DeploymentStatus(ready_replicas=1),
    )
    core = mock.create_autospec(client.CoreV1Api, instance=True)
    pod = client.V1Pod(metadata=client.V1ObjectMeta(labels={"app": "nav-pricing-task"}))
    core.list_namespaced_pod.return_value = client.V1PodList(items=[pod])
    custom = mock.create_autospec(client.CustomObjectsApi, instance=True)
    custom.list_namespaced_custom_object.return_value = {"items": []}
    actuator._apps, actuator._core, actuator._custom = apps, core, custom
    actuator.scale("nav-pricing", "task", 2, "test")
    actuator.observe()
    groups = (Group("default", 1, 2), Group("task", 0, 2))
    service = Service("nav-pricing", "http", groups, requests=Requests(0.5, 2**29))
    actuator.readings({("nav-pricing", "task")}, {"nav-pricing": service})
    called = {
        (api, name, args[0], args[3]) if api == "_custom" else (api, name)
        for api, recorder in (("_apps", apps), ("_core", core), ("_custom", custom))
        for name, args, _ in recorder.method_calls
    }
    source = inspect.getsource(actuator_module)
    scanned = set(re.findall(r"self\.(_apps|_core|_custom)\.(\w+)\(", source))
    assert {call[:2] for call in called} == scanned, "the actuator calls more than this runs"
    assert called <= set(RBAC_OF_CALL), f"map {called - set(RBAC_OF_CALL)} to RBAC here"
    needed = {RBAC_OF_CALL[call] for call in called}

    role = one(bundled, "Role")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted == needed
    assert not any("resourceNames" in rule or "*" in str(rule) for rule in role["rules"])
    assert not of_kind(bundled, "ClusterRole") and not of_kind(bundled, "ClusterRoleBinding")
    binding = one(bundled, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "tasklane", "namespace": k8s.NAMESPACE}
    ]
    pod = one(bundled, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == binding["subjects"][0]["name"]


# ----------------------------------------------------------------------- webhook and workloads


def test_webhook_fails_open_and_skips_the_control_planes_namespace(bundled: list[dict]) -> None:
    config = one(bundled, "MutatingWebhookConfiguration")
    (webhook,) = config["webhooks"]
    assert webhook["clientConfig"]["service"]["path"] == "/inject"
    assert webhook["clientConfig"]["service"]["port"] == 9443
    assert webhook["rules"] == [
        {
            "operations": ["CREATE"],
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    selector = webhook["namespaceSelector"]
    assert selector["matchLabels"] == {"tasklane.io/inject": "enabled"}
    assert {
        "key": "kubernetes.io/metadata.name",
        "operator": "NotIn",
        "values": [k8s.NAMESPACE, "kube-system"],
    } in selector["matchExpressions"]
    assert webhook["failurePolicy"] == "Ignore"
    assert webhook["sideEffects"] == "None"
    assert webhook["admissionReviewVersions"] == ["v1"]
    assert webhook["timeoutSeconds"] <= 5


def test_service_ports(bundled: list[dict]) -> None:
    service = one(bundled, "Service", "tasklane")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "xds": 18000,
        "http": 8080,
        "webhook": 9443,
    }


def test_control_plane_deployment(bundled: list[dict], external: list[dict]) -> None:
    deployment = one(bundled, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert one(external, "Deployment")["spec"]["replicas"] == 3
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == k8s.DEFAULT_IMAGE
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    term = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    budget = one(bundled, "PodDisruptionBudget", "tasklane")
    assert (
        budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    )
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets[mounts[k8s.STATE_DIR]] == k8s.TOKEN_SECRET
    assert secrets[mounts[k8s.TLS_DIR]] == k8s.TLS_SECRET
    assert set(one(bundled, "Secret", k8s.TOKEN_SECRET)["data"]) == {"api-token"}


@pytest.mark.parametrize("variant", ["bundled", "external"])
def test_up_command_line_is_one_tasklane_up_accepts(
    variant: str, request: pytest.FixtureRequest
) -> None:
    docs = request.getfixturevalue(variant)
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["tasklane"]
    args = build_parser().parse_args(container["args"])
    assert (args.host, args.xds_port, args.http_port) == ("0.0.0.0", 18000, 8080)
    assert args.actuator == "kubernetes"
    assert str(args.state_dir) == k8s.STATE_DIR and str(args.tls_dir) == k8s.TLS_DIR
    assert args.accept_announce
    assert args.webhook_port == 9443
    # Injected pods reach xDS at the Service, with the client certificate of the Secret
    # emitted in the workload namespace.
    namespace = one(docs, "Namespace")["metadata"]["name"]
    assert args.sidecar_xds_address == f"tasklane.{namespace}.svc:18000"
    secret = next(d for d in docs if d["metadata"]["name"] == args.sidecar_tls_secret)
    assert secret["metadata"]["namespace"] == args.namespace
    files = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    assert set(files) == {"ca.crt", "client.crt", "client.key"}
    client = x509.load_pem_x509_certificate(files["client.crt"])
    client.verify_directly_issued_by(x509.load_pem_x509_certificate(files["ca.crt"]))
    if variant == "external":
        assert (args.etcd, args.namespace) == (EXTERNAL_ETCD, "batch")
    else:
        assert args.etcd == f"tasklane-etcd-client.{k8s.NAMESPACE}.svc:2379"
        assert args.namespace == "default"


@pytest.mark.parametrize("image", [k8s.DEFAULT_IMAGE, "registry.example.com/tasklane:0.1.0"])
def test_inject_and_the_webhook_make_sidecars_that_reach_this_control_plane(image: str) -> None:
    """The control plane runs with --tls-dir: `tasklane inject` without options, and the
    webhook it serves, make sidecars of its image that speak mTLS with the Secret it emits."""
    docs = build(image=image)
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    up = build_parser().parse_args(container["args"])
    assert up.tls_dir is not None
    secret = one(docs, "Secret", k8s.SIDECAR_TLS_SECRET)
    for options in (
        sidecar_options(build_parser().parse_args(["inject", "-f", "-", "--image", image])),
        sidecar_options(up, prefix="sidecar-"),
        # The webhook's even without --sidecar-tls-secret on its command line.
        sidecar_options(build_parser().parse_args(["up", "--tls-dir", "d"]), prefix="sidecar-"),
    ):
        assert options.tls_secret == secret["metadata"]["name"]
    assert sidecar_options(up, prefix="sidecar-").image == container["image"] == image


def test_pods_meet_the_restricted_pod_security_standard(bundled: list[dict]) -> None:
    """The namespace enforces `restricted`: pods that do not meet it would be refused."""
    namespace = one(bundled, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for workload in of_kind(bundled, "Deployment") + of_kind(bundled, "StatefulSet"):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert all(set(v) <= {"name", "secret", "emptyDir"} for v in pod.get("volumes", []))
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"] == {"drop": ["ALL"]}
            assert security["readOnlyRootFilesystem"] is True
            assert "resources" in container and "readinessProbe" in container


def test_etcd_statefulset(bundled: list[dict]) -> None:
    statefulset = one(bundled, "StatefulSet")
    spec = statefulset["spec"]
    assert spec["replicas"] == 3 and spec["podManagementPolicy"] == "Parallel"
    headless = one(bundled, "Service", spec["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    (container,) = spec["template"]["spec"]["containers"]
    (initial,) = [a for a in container["args"] if a.startswith("--initial-cluster=")]
    members = dict(member.split("=", 1) for member in initial.split("=", 1)[1].split(","))
    assert members == {
        f"tasklane-etcd-{i}": f"http://tasklane-etcd-{i}.tasklane-etcd.{k8s.NAMESPACE}.svc:2380"
        for i in range(3)
    }
    assert spec["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert one(bundled, "PodDisruptionBudget", "tasklane-etcd")["spec"]["maxUnavailable"] == 1
    client_service = one(bundled, "Service", "tasklane-etcd-client")
    labels = spec["template"]["metadata"]["labels"]
    assert client_service["spec"]["selector"] == labels == headless["spec"]["selector"]


# ----------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"namespace": "Tasklane"}, "--namespace 'Tasklane': not a namespace name"),
        ({"namespace": "a" * 64}, "not a namespace name"),
        ({"workload_namespace": "b_c"}, "--workload-namespace 'b_c'"),
        ({"replicas": 1}, "--replicas 1: at least 2"),
        ({"image": "two words"}, "not an image reference"),
        ({"etcd": "a:2379,b:2379"}, "one HOST:PORT only"),
        ({"etcd": "http://etcd:2379"}, "without a scheme"),
        ({"etcd": "etcd"}, "expected HOST:PORT"),
        ({"etcd": "etcd:99999"}, "port 1-65535"),
        ({"etcd": "Bad_Host:2379"}, "is not a host name"),
        ({"etcd": "fd00::5:2379"}, "write an IPv6 address as [ADDRESS]:PORT"),
    ],
)
def test_bad_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(k8s.ManifestError, match=re.escape(message)):
        k8s.Options(**options).check()


@pytest.mark.parametrize("endpoint", ["etcd:2379", "10.0.0.5:2379", "[fd00::5]:2379"])
def test_good_endpoints(endpoint: str) -> None:
    k8s.check_endpoint(endpoint)


# ------------------------------------------------------------------------ the real command


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TASKLANE), "k8s", "manifests", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_command_prints_the_manifests() -> None:
    done = run("--namespace", "mesh", "--replicas", "3")
    assert done.returncode == 0, done.stderr
    docs = list(yaml.safe_load_all(done.stdout))
    assert one(docs, "Deployment")["spec"]["replicas"] == 3
    assert one(docs, "Namespace")["metadata"]["name"] == "mesh"
    token = secret_file(docs, k8s.TOKEN_SECRET, "api-token").decode().strip()
    assert len(token) >= 32
    again = list(yaml.safe_load_all(run().stdout))
    assert secret_file(again, k8s.TOKEN_SECRET, "api-token").decode().strip() != token


def test_command_uses_a_given_tls_dir_and_token(tmp_path: Path) -> None:
    tls = tmp_path / "tls"
    pki.init_dir(tls, hosts=k8s.service_hosts(k8s.NAMESPACE))
    token = tmp_path / "token"
    token.write_text("kept-token\n")
    done = run("--tls-dir", str(tls), "--token-file", str(token), "--etcd", EXTERNAL_ETCD)
    assert done.returncode == 0, done.stderr
    docs = list(yaml.safe_load_all(done.stdout))
    for name in k8s.TLS_FILES:
        assert secret_file(docs, k8s.TLS_SECRET, name) == (tls / name).read_bytes()
    webhook = one(docs, "MutatingWebhookConfiguration")["webhooks"][0]
    assert base64.b64decode(webhook["clientConfig"]["caBundle"]) == (tls / "ca.crt").read_bytes()
    assert secret_file(docs, k8s.TOKEN_SECRET, "api-token") == b"kept-token\n"
    assert not of_kind(docs, "StatefulSet")


def _broken_tls_dir(tmp_path: Path) -> Path:
    tls = tmp_path / "broken"
    pki.init_dir(tls, hosts=k8s.service_hosts(k8s.NAMESPACE))
    (tls / "server.key").write_text("not a key\n")
    return tls


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--etcd", "etcd-0:2379,etcd-1:2379"], "--etcd 'etcd-0:2379,etcd-1:2379': one HOST"),
        (["--etcd", "etcd"], "--etcd 'etcd': expected HOST:PORT"),
        (["--namespace", "Not_A_Name"], "--namespace 'Not_A_Name': not a namespace name"),
        (["--replicas", "1"], "--replicas 1: at least 2"),
        (["--tls-dir", "{tmp}/missing"], "--tls-dir {tmp}/missing: ca.crt"),  # pki's words
        (["--tls-dir", "{broken}"], "--tls-dir {broken}: server.key"),
        (["--tls-dir", "{default_hosts}"], "server.crt does not name tasklane.tasklane-system"),
        (["--token-file", "{tmp}/none"], "cannot read the API token"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_on_stdout(
    args: list[str], message: str, tmp_path: Path
) -> None:
    default_hosts = tmp_path / "default-hosts"
    pki.init_dir(default_hosts)  # localhost only: the API server could not call the webhook
    paths = {"tmp": tmp_path, "broken": _broken_tls_dir(tmp_path), "default_hosts": default_hosts}
    done = run(*(arg.format(**paths) for arg in args))
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("tasklane: error: ")
    assert message.format(**paths) in lines[0]
