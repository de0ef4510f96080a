"""Sidecar injection as pure functions: every workload kind, what the sidecar and the app
containers get, idempotency, opt-out, the Kubernetes schemas (kubernetes-validate, strict),
the corpus of bad manifests (tests/data/k8s/bad, first line `# expect: <message>`), the JSON
Patch the webhook sends (checked against the `jsonpatch` library) and AdmissionReview
answers."""

from __future__ import annotations

import base64
import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.errors import TasklaneError
from controlplane.inject.patch import make_patch, pointer_token
from controlplane.inject.pod import (
    ANNOTATION_INJECTED,
    DEFAULT_IMAGE,
    INBOUND_PORT,
    PROXY_UID,
    READY_PORT,
    REDIRECT_NAME,
    InjectError,
    InjectOptions,
    inject_pod,
    parse_xds_address,
    parse_xds_addresses,
)
from controlplane.inject.webhook import BadReview, review
from controlplane.inject.workloads import inject_text
from tests.support.k8s import (
    BAD,
    K8S,
    KUBERNETES,
    OPTIONS,
    WORKLOADS,
    bootstrap_of,
    env_of,
    injected_docs,
    local_app_port,
    objects,
    pod_template,
    sidecar_of,
)

PLAINTEXT = InjectOptions(tls_secret=None)


def test_every_kind_gets_a_native_sidecar_and_the_rest_passes_through() -> None:
    before, after = injected_docs()
    injected_kinds = []
    for old, new in zip(objects(before), objects(after), strict=True):
        template = pod_template(new)
        labels = (template or {}).get("metadata", {}).get("labels", {})
        annotations = (template or {}).get("metadata", {}).get("annotations", {})
        if "tasklane.io/service" not in labels or annotations.get("tasklane.io/inject") == "false":
            assert new == old, new["kind"]
            continue
        injected_kinds.append(new["kind"])
        assert annotations[ANNOTATION_INJECTED] == OPTIONS.version
        sidecar = sidecar_of(template)
        assert sidecar["restartPolicy"] == "Always"
        assert sidecar["image"] == DEFAULT_IMAGE
        assert sidecar["command"] == ["python", "-m", "controlplane.inject.start"]
        assert sidecar["securityContext"]["runAsUser"] == PROXY_UID
        for probe in ("startupProbe", "readinessProbe"):
            assert sidecar[probe]["httpGet"] == {"path": "/ready", "port": READY_PORT}
        env = {item["name"]: item["valueFrom"]["fieldRef"]["fieldPath"] for item in sidecar["env"]}
        assert env == {"POD_NAME": "metadata.name", "POD_IP": "status.podIP"}
        bootstrap = bootstrap_of(template)
        service, group = labels["tasklane.io/service"], labels["tasklane.io/group"]
        assert bootstrap["node"]["id"] == f"{service}|{group}|web-0"
        # A pod that serves announces its inbound listener and redirects its app port there
        # first; the CronJob's trigger declares no port: egress only, nothing to redirect.
        client_only = new["kind"] == "CronJob"
        listeners = [x["name"] for x in bootstrap["static_resources"]["listeners"]]
        assert listeners == (["egress", "ready"] if client_only else ["egress", "inbound", "ready"])
        announce = {} if client_only else {"tasklane.announce": f"10.1.2.3:{INBOUND_PORT}"}
        assert bootstrap["node"]["metadata"] == {
            "tasklane.service": service,
            "tasklane.group": group,
            **announce,
        }
        names = [c["name"] for c in template["spec"]["initContainers"]]
        added = ["envoy"] if client_only else [REDIRECT_NAME, "envoy"]
        assert names[: len(added)] == added
        if not client_only:  # iptables needs root and NET_ADMIN, for the moment it runs
            redirect = template["spec"]["initContainers"][0]
            assert redirect["image"] == sidecar["image"]
            assert redirect["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]
            assert redirect["command"][:3] == ["python", "-m", "controlplane.inject.redirect"]
        xds = bootstrap["static_resources"]["clusters"][0]["load_assignment"]["endpoints"]
        address = xds[0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        assert address == {"address": "tasklane.tasklane-system.svc", "port_value": 18000}
        # The app's containers and init containers are otherwise untouched.
        old_template = pod_template(old)
        old_init = old_template["spec"].get("initContainers", [])
        assert template["spec"]["initContainers"][len(added) :] == old_init
        for old_c, new_c in zip(
            old_template["spec"]["containers"], template["spec"]["containers"], strict=True
        ):
            kept = ("env", "readinessProbe")  # a probe of the app port moves: test below
            assert {k: v for k, v in new_c.items() if k not in kept} == {
                k: v for k, v in old_c.items() if k not in kept
            }
            assert new_c["env"][: len(old_c.get("env", []))] == old_c.get("env", [])
    assert sorted(injected_kinds) == sorted(
        [
            "Deployment",
            "StatefulSet",
            "DaemonSet",
            "ReplicaSet",
            "Job",
            "CronJob",
            "Pod",
            "Deployment",
        ]
    )


def test_every_output_object_is_valid_kubernetes() -> None:
    _, after = injected_docs()
    for obj in objects(after):
        assert kubernetes_validate.validate(obj, KUBERNETES, strict=True) == KUBERNETES


def test_injecting_twice_gives_the_same_bytes() -> None:
    once = inject_text(WORKLOADS.read_text(), "x", OPTIONS)
    assert inject_text(once, "x", OPTIONS) == once
    assert inject_text(once, "x", InjectOptions(image="other/envoy:1")) == once


def test_app_containers_get_the_mesh_env_but_keep_their_own() -> None:
    _, after = injected_docs()
    by_name = {obj["metadata"]["name"]: obj for obj in objects(after) if pod_template(obj)}
    env = env_of(pod_template(by_name["account-svc"])["spec"]["containers"][0])
    assert env == {
        "LOG_LEVEL": "info",
        "TASKLANE_SERVICE": "account-svc",
        "TASKLANE_GROUP": "default",
        "TASKLANE_INSTANCE": {"fieldRef": {"fieldPath": "metadata.name"}},
        "TASKLANE_EGRESS": "127.0.0.1:15001",
        "http_proxy": "http://127.0.0.1:15001",
        "HTTP_PROXY": "http://127.0.0.1:15001",
        "https_proxy": "http://127.0.0.1:15001",
        "HTTPS_PROXY": "http://127.0.0.1:15001",
        "no_proxy": "localhost,127.0.0.1",
        "NO_PROXY": "localhost,127.0.0.1",
    }
    # The user's own proxy and an equal TASKLANE_GROUP stay, once each.
    container = pod_template(by_name["fund-facade-7d9f"])["spec"]["containers"][0]
    names = [item["name"] for item in container["env"]]
    assert len(names) == len(set(names))
    assert env_of(container)["http_proxy"] == "http://corp-proxy:3128"
    # Every app container of the pod, not init containers.
    stateful = pod_template(by_name["nav-pricing"])["spec"]
    assert all(env_of(c)["TASKLANE_GROUP"] == "task" for c in stateful["containers"])
    assert "env" not in stateful["initContainers"][2]


@pytest.mark.parametrize(
    ("name", "port"),
    [("account-svc", 8080), ("nav-pricing", 50051), ("fund-facade-7d9f", 8000)],
    ids=["first-container-port", "named-port-annotation", "number-annotation"],
)
def test_app_port(name: str, port: int) -> None:
    _, after = injected_docs()
    (obj,) = [o for o in objects(after) if o["metadata"]["name"] == name and pod_template(o)]
    assert local_app_port(bootstrap_of(pod_template(obj))) == port


def test_http_probes_of_the_app_port_reach_the_app_through_the_ready_port() -> None:
    """The redirect would send them to the inbound listener, which refuses a task group's
    undyed requests: they go to the ready port, which passes exactly their paths on."""
    template = {
        "metadata": {"labels": {"tasklane.io/service": "web", "tasklane.io/group": "task"}},
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "image": "x",
                    "ports": [
                        {"name": "http", "containerPort": 8080},
                        {"name": "metrics", "containerPort": 9090},
                    ],
                    "startupProbe": {"httpGet": {"path": "/started", "port": 8080}},
                    "readinessProbe": {
                        "httpGet": {"path": "/healthz?full=1", "port": "http"},
                        "timeoutSeconds": 2,
                    },
                    "livenessProbe": {"tcpSocket": {"port": "http"}},
                },
                {
                    "name": "exporter",
                    "image": "y",
                    "readinessProbe": {"httpGet": {"path": "/", "port": 9090}},
                },
            ]
        },
    }
    pod = inject_pod(template, OPTIONS)
    app, exporter = pod["spec"]["containers"]
    assert app["startupProbe"] == {
        "httpGet": {"path": "/app-health/app/startupProbe", "port": READY_PORT}
    }
    assert app["readinessProbe"] == {
        "httpGet": {"path": "/app-health/app/readinessProbe", "port": READY_PORT},
        "timeoutSeconds": 2,
    }
    # A TCP probe would only reach Envoy: the ready port answers it from the sidecar's own
    # TCP check of the app. Other ports are not redirected.
    assert app["livenessProbe"] == {"httpGet": {"path": "/app-health/tcp", "port": READY_PORT}}
    assert exporter["readinessProbe"] == {"httpGet": {"path": "/", "port": 9090}}
    (ready,) = [
        x for x in bootstrap_of(pod)["static_resources"]["listeners"] if x["name"] == "ready"
    ]
    routes = ready["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
    passed = {
        r["match"]["path"]: r["route"]
        for r in routes["virtual_hosts"][0]["routes"]
        if "path" in r["match"] and "cluster" in r.get("route", {})
    }
    assert passed == {
        "/app-health/app/startupProbe": {"cluster": "local-app", "prefix_rewrite": "/started"},
        "/app-health/app/readinessProbe": {
            "cluster": "local-app",
            "prefix_rewrite": "/healthz?full=1",
        },
        "/ready": {"cluster": "envoy-admin", "timeout": "1s"},
        "/stats/prometheus": {"cluster": "envoy-admin", "timeout": "1s"},
    }
    (tcp_check, *_) = ready["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    assert tcp_check["typed_config"]["headers"] == [
        {"name": ":path", "string_match": {"exact": "/app-health/tcp"}}
    ]
    assert tcp_check["typed_config"]["cluster_min_healthy_percentages"] == {
        "local-app": {"value": 100}
    }
    assert (
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, **pod},
            KUBERNETES,
            strict=True,
        )
        == KUBERNETES
    )


def test_opt_out_wins_and_injected_pods_are_left_alone() -> None:
    pod = yaml.safe_load((K8S / "bad" / "reserved-port.yaml").read_text())["spec"]["template"]
    with pytest.raises(InjectError):
        inject_pod(pod, OPTIONS)
    opted_out = copy.deepcopy(pod)
    opted_out["metadata"]["annotations"] = {"tasklane.io/inject": "false"}
    assert inject_pod(opted_out, OPTIONS) is None
    # Opt-out beats even an injected pod's annotation and invalid labels.
    opted_out["metadata"]["labels"]["tasklane.io/group"] = "Not Valid"
    assert inject_pod(opted_out, OPTIONS) is None
    marked = copy.deepcopy(pod)
    marked["metadata"]["annotations"] = {ANNOTATION_INJECTED: "0.0.1"}
    assert inject_pod(marked, OPTIONS) is None
    unlabelled = copy.deepcopy(pod)
    del unlabelled["metadata"]["labels"]
    assert inject_pod(unlabelled, OPTIONS) is None


def test_bootstrap_dollars_are_escaped_for_the_kubelet() -> None:
    """A `$` of our own would be eaten by the kubelet's expansion: only POD_NAME and POD_IP
    may be expanded, every other `$` must arrive as written."""
    weird = InjectOptions(image="x", xds_host="cp$(NOT_A_VAR)$$.example", xds_port=1)
    template = {
        "metadata": {"labels": {"tasklane.io/service": "a", "tasklane.io/group": "b"}},
        "spec": {"containers": [{"name": "app", "image": "x", "ports": [{"containerPort": 80}]}]},
    }
    bootstrap = bootstrap_of(inject_pod(template, weird))
    xds = bootstrap["static_resources"]["clusters"][0]["load_assignment"]["endpoints"]
    host = xds[0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["address"]
    assert host == "cp$(NOT_A_VAR)$$.example"
    assert bootstrap["node"]["id"] == "a|b|web-0"


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_manifest_is_one_precise_line(path: Path) -> None:
    text = path.read_text()
    expected = text.splitlines()[0].removeprefix("# expect: ")
    with pytest.raises(TasklaneError) as caught:
        inject_text(text, "bad.yaml", OPTIONS)
    message = str(caught.value)
    assert message.startswith(f"bad.yaml: {expected}"), message
    assert "\n" not in message
    assert re.match(r"bad\.yaml: document \d+: ", message), message


def test_tls_secret_is_mounted_for_the_xds_client_files() -> None:
    template = {
        "metadata": {"labels": {"tasklane.io/service": "a", "tasklane.io/group": "b"}},
        "spec": {
            "containers": [{"name": "app", "image": "x", "ports": [{"containerPort": 80}]}],
            "volumes": [{"name": "data", "emptyDir": {}}],
        },
    }
    pod = inject_pod(template, InjectOptions(tls_secret="tasklane-sidecar-tls"))
    assert pod["spec"]["volumes"] == [
        {"name": "data", "emptyDir": {}},
        {"name": "tasklane-tls", "secret": {"secretName": "tasklane-sidecar-tls"}},
    ]
    assert sidecar_of(pod)["volumeMounts"] == [
        {"name": "tasklane-tls", "mountPath": "/etc/tasklane/tls", "readOnly": True}
    ]
    xds = bootstrap_of(pod)["static_resources"]["clusters"][0]
    context = xds["transport_socket"]["typed_config"]["common_tls_context"]
    assert context["tls_certificates"] == [
        {
            "certificate_chain": {"filename": "/etc/tasklane/tls/client.crt"},
            "private_key": {"filename": "/etc/tasklane/tls/client.key"},
        }
    ]
    assert context["validation_context"]["trusted_ca"] == {"filename": "/etc/tasklane/tls/ca.crt"}
    assert "volumeMounts" not in sidecar_of(inject_pod(template, PLAINTEXT))
    template["spec"]["volumes"].append({"name": "tasklane-tls", "emptyDir": {}})
    with pytest.raises(InjectError, match=r"^spec.volumes: 'tasklane-tls' is the sidecar's volume"):
        inject_pod(template, InjectOptions(tls_secret="s"))
    with pytest.raises(InjectError, match=r"^--tls-secret: 'Not_a_name' is not a Secret name"):
        InjectOptions(tls_secret="Not_a_name")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tasklane.tasklane-system.svc:18000", ("tasklane.tasklane-system.svc", 18000)),
        ("[::1]:9", ("::1", 9)),
        ("10.0.0.1:18000", ("10.0.0.1", 18000)),
    ],
)
def test_xds_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_xds_address(text) == expected


@pytest.mark.parametrize("text", ["", "host", "host:", ":18000", "host:0", "host:70000", "h:x"])
def test_bad_xds_address(text: str) -> None:
    with pytest.raises(InjectError, match="--xds-address: .* is not HOST:PORT"):
        parse_xds_address(text)


def test_xds_addresses_of_replicas_reach_the_bootstrap() -> None:
    """Replicas not behind one Service: each is an endpoint of the sidecar's `xds` cluster,
    and whichever answers must hold a certificate naming the host dialled."""
    replicas = parse_xds_addresses("cp-0.cp:18000, 10.0.0.2:18000")
    assert replicas == (("cp-0.cp", 18000), ("10.0.0.2", 18000))
    (host, port), *more = replicas
    template = {
        "metadata": {"labels": {"tasklane.io/service": "a", "tasklane.io/group": "b"}},
        "spec": {"containers": [{"name": "app", "image": "x", "ports": [{"containerPort": 80}]}]},
    }
    options = InjectOptions(xds_host=host, xds_port=port, more_xds=tuple(more), tls_secret="s")
    (xds,) = (c for c in bootstrap_of(inject_pod(template, options))["static_resources"]["clusters"]
              if c["name"] == "xds")  # fmt: skip
    assert (xds["type"], xds["lb_policy"]) == ("STRICT_DNS", "RANDOM")
    (locality,) = xds["load_assignment"]["endpoints"]
    dialled = [e["endpoint"]["address"]["socket_address"] for e in locality["lb_endpoints"]]
    assert dialled == [
        {"address": "cp-0.cp", "port_value": 18000},
        {"address": "10.0.0.2", "port_value": 18000},
    ]
    context = xds["transport_socket"]["typed_config"]["common_tls_context"]
    assert context["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "cp-0.cp"}},
        {"san_type": "IP_ADDRESS", "matcher": {"exact": "10.0.0.2"}},
    ]
    with pytest.raises(InjectError, match="^--xds-address: '' is not HOST:PORT"):
        parse_xds_addresses("cp:1,")


# --- JSON Patch ----------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(["a", "b/c", "~d", "e~1", "", "tasklane.io/x"]), inner)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(before=JSON, after=JSON)
def test_patch_turns_before_into_after(before: Any, after: Any) -> None:
    patch = make_patch(before, after)
    assert jsonpatch.apply_patch(copy.deepcopy(before), patch) == after
    assert json.loads(json.dumps(patch)) == patch


def test_pointer_tokens_escape_tilde_then_slash() -> None:
    assert pointer_token("tasklane.io/injected") == "tasklane.io~1injected"
    assert pointer_token("a~/b") == "a~0~1b"
    pod = {"metadata": {"annotations": {"x": "1"}}}
    patch = make_patch(pod, {"metadata": {"annotations": {"x": "1", ANNOTATION_INJECTED: "v"}}})
    assert patch == [
        {"op": "add", "path": "/metadata/annotations/tasklane.io~1injected", "value": "v"}
    ]


# --- AdmissionReview -------------------------------------------------------------------------


def load_review(name: str) -> dict[str, Any]:
    return json.loads((K8S / name).read_text())


def test_review_patches_a_meshed_pod_like_the_cli() -> None:
    body = load_review("review-deployment-pod.json")
    answer = review(body, OPTIONS)
    response = answer["response"]
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    assert response["uid"] == body["request"]["uid"]
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    pod = body["request"]["object"]
    assert jsonpatch.apply_patch(pod, patch) == inject_pod(pod, OPTIONS)


@pytest.mark.parametrize(
    "change",
    [
        lambda r: r.update(operation="UPDATE", oldObject=copy.deepcopy(r["object"])),
        lambda r: r["object"]["metadata"]["annotations"].update({"tasklane.io/inject": "false"}),
        lambda r: (
            r["object"]["metadata"]["labels"].pop("tasklane.io/service")
            and r["object"]["metadata"]["labels"].pop("tasklane.io/group")
        ),
        lambda r: r.update(kind={"group": "apps", "version": "v1", "kind": "Deployment"}),
    ],
    ids=["update", "opted-out", "not-meshed", "not-a-pod"],
)
def test_review_allows_without_patch(change: Any) -> None:
    body = load_review("review-deployment-pod.json")
    change(body["request"])
    assert review(body, OPTIONS)["response"] == {"uid": body["request"]["uid"], "allowed": True}


def test_review_of_an_injected_pod_has_no_patch() -> None:
    body = load_review("review-job-pod.json")
    body["request"]["object"] = inject_pod(body["request"]["object"], OPTIONS)
    assert review(body, OPTIONS)["response"] == {"uid": body["request"]["uid"], "allowed": True}


def test_review_admits_what_it_cannot_inject_with_a_warning() -> None:
    body = load_review("review-deployment-pod.json")
    body["request"]["object"]["spec"]["containers"][0]["ports"] = [{"containerPort": 15001}]
    response = review(body, OPTIONS)["response"]
    assert set(response) == {"uid", "allowed", "warnings"}
    assert response["allowed"] is True
    (warning,) = response["warnings"]
    assert warning.startswith(
        "tasklane sidecar not injected: spec.containers[0].ports[0].containerPort: 15001 is "
        "reserved"
    )
    assert len(warning) <= 256


def test_review_patches_a_client_only_pod_with_egress_only() -> None:
    body = load_review("review-deployment-pod.json")
    for container in body["request"]["object"]["spec"]["containers"]:
        container.pop("ports", None)
    patch = json.loads(base64.b64decode(review(body, OPTIONS)["response"]["patch"]))
    pod = jsonpatch.apply_patch(body["request"]["object"], patch)
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["envoy"]
    listeners = bootstrap_of(pod)["static_resources"]["listeners"]
    assert [x["name"] for x in listeners] == ["egress", "ready"]
    assert kubernetes_validate.validate(pod, KUBERNETES, strict=True) == KUBERNETES


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "expected an AdmissionReview object, got a list"),
        (
            {"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"},
            "expected apiVersion",
        ),
        ({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}, "request: expected"),
        (
            {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}},
            "request.uid: expected a non-empty string, got null",
        ),
        (
            {
                "apiVersion": "admission.k8s.io/v1",
                "kind": "AdmissionReview",
                "request": {
                    "uid": "u",
                    "operation": "CREATE",
                    "kind": {"group": "", "version": "v1", "kind": "Pod"},
                },
            },
            "request.object: expected a Pod, got null",
        ),
    ],
)
def test_malformed_review(body: object, message: str) -> None:
    with pytest.raises(BadReview, match=re.escape(message)):
        review(body, OPTIONS)
