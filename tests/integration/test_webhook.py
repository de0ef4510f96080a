"""The admission webhook over real HTTPS (a test CA from controlplane.pki): AdmissionReview v1
documents as the API server sends them (tests/data/k8s/review-*.json) are POSTed to
/inject; the answer's patch is decoded and applied with the `jsonpatch` library, the patched
pod must be valid Kubernetes (1.30 schemas, strict) and its sidecar's bootstrap accepted by
the real Envoy. Also: no patch for pods to leave alone, a warning instead of a refusal, 400
for what is not an AdmissionReview, TLS only with the right CA, and the latency."""

from __future__ import annotations

import base64
import copy
import json
import signal
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import requests

from controlplane.inject.pod import InjectOptions, inject_pod
from controlplane.pki import CA_CERT, init_dir
from controlplane.runtime.ports import free_port
from tests.support.k8s import K8S, KUBERNETES, bootstrap_of, envoy_validate, local_app_port
from tests.support.up import TASKLANE, assert_one_line_error, start_up

pytestmark = pytest.mark.timeout(120)
REVIEWS = sorted(K8S.glob("review-*.json"))
OPTIONS = InjectOptions()
STOP_TIMEOUT = 10.0
REQUEST_TIMEOUT = 10.0  # the API server's default webhook timeout


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tls")
    init_dir(directory)
    return directory


@pytest.fixture(scope="module")
def webhook(tls_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The /inject URL of a real `tasklane up --tls-dir DIR --webhook-port PORT`."""
    up = start_up(
        tmp_path_factory.mktemp("up"),
        options=["--tls-dir", str(tls_dir), "--webhook-port", str(free_port())],
    )
    try:
        line = up.stdout().splitlines()[0]
        url = line.split("sidecar injector on ")[1].split(",")[0]
        yield url.replace("127.0.0.1", "localhost")  # the name the certificate has
    finally:
        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(timeout=STOP_TIMEOUT) == 0, up.stderr()


@pytest.fixture
def session(tls_dir: Path) -> Iterator[requests.Session]:
    """HTTPS that trusts the test CA only, and no proxy from the environment."""
    with requests.Session() as http:
        http.trust_env = False
        http.verify = str(tls_dir / CA_CERT)
        yield http


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def post(session: requests.Session, url: str, body: object) -> dict[str, Any]:
    answer = session.post(url, json=body, timeout=REQUEST_TIMEOUT)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith("application/json")
    return answer.json()


def patched(body: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    """The pod as the API server stores it: the request's object with the patch applied."""
    response = answer["response"]
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"], validate=True))
    return jsonpatch.apply_patch(body["request"]["object"], patch)


@pytest.mark.parametrize("path", REVIEWS, ids=[p.stem for p in REVIEWS])
def test_meshed_pod_is_patched_into_a_valid_pod_with_a_valid_envoy(
    path: Path, webhook: str, session: requests.Session, tls_dir: Path
) -> None:
    body = load(path)
    answer = post(session, webhook, body)
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == body["request"]["uid"]
    assert answer["response"]["allowed"] is True
    assert "warnings" not in answer["response"]
    pod = patched(body, answer)
    assert pod == inject_pod(body["request"]["object"], OPTIONS)  # the same as the CLI's
    assert kubernetes_validate.validate(pod, KUBERNETES, strict=True) == KUBERNETES
    spec = pod["spec"]
    assert [c["name"] for c in spec["initContainers"][:2]] == ["tasklane-redirect", "envoy"]
    assert spec["initContainers"][1]["restartPolicy"] == "Always"
    assert spec["initContainers"][2:] == body["request"]["object"]["spec"].get("initContainers", [])
    assert pod["metadata"]["annotations"]["tasklane.io/injected"] == OPTIONS.version
    # Its control plane has --tls-dir: the sidecar speaks mTLS with the default Secret's files.
    assert {"name": "tasklane-tls", "secret": {"secretName": "tasklane-sidecar-tls"}} in (
        spec["volumes"]
    )
    envoy_validate(pod, "account-svc-7c9d8f6b5d-x2b9q", "10.244.1.17", tls=tls_dir)
    # Generated names: the pod's name only exists once the API server has admitted it.
    assert "name" not in pod["metadata"]
    bootstrap = bootstrap_of(pod, pod_name="p-1")
    assert bootstrap["node"]["id"].endswith("|p-1")
    # The job's pod names its port in an annotation (http: 8081, not the first port).
    assert local_app_port(bootstrap) == (8081 if "job" in path.stem else 8080)

    # The patched pod comes back (a re-invocation, a replay): nothing more to do.
    again = copy.deepcopy(body)
    again["request"]["object"] = pod
    assert post(session, webhook, again)["response"] == {
        "uid": body["request"]["uid"],
        "allowed": True,
    }


def test_pods_to_leave_alone_are_allowed_without_patch(
    webhook: str, session: requests.Session
) -> None:
    base = load(K8S / "review-deployment-pod.json")
    opted_out = copy.deepcopy(base)
    opted_out["request"]["object"]["metadata"]["annotations"]["tasklane.io/inject"] = "false"
    unmeshed = copy.deepcopy(base)
    for key in ("tasklane.io/service", "tasklane.io/group"):
        del unmeshed["request"]["object"]["metadata"]["labels"][key]
    update = copy.deepcopy(base)
    update["request"]["operation"] = "UPDATE"
    update["request"]["oldObject"] = update["request"]["object"]
    for body in (opted_out, unmeshed, update):
        body["request"]["uid"] = f"uid-{id(body)}"
        assert post(session, webhook, body)["response"] == {
            "uid": body["request"]["uid"],
            "allowed": True,
        }


def test_a_pod_the_mesh_cannot_handle_is_admitted_with_a_warning(
    webhook: str, session: requests.Session
) -> None:
    body = load(K8S / "review-job-pod.json")
    body["request"]["object"]["metadata"]["annotations"]["tasklane.io/app-port"] = "grpc"
    response = post(session, webhook, body)["response"]
    assert response == {
        "uid": body["request"]["uid"],
        "allowed": True,
        "warnings": [
            "tasklane sidecar not injected: metadata.annotations[tasklane.io/app-port]: "
            "no container port named 'grpc' (named ports: http, metrics)"
        ],
    }


def test_a_client_only_pod_gets_an_egress_only_sidecar(
    webhook: str, session: requests.Session, tls_dir: Path
) -> None:
    """A task's trigger declares no port: it only calls out."""
    body = load(K8S / "review-job-pod.json")
    pod = body["request"]["object"]
    pod["metadata"]["annotations"].pop("tasklane.io/app-port")
    for container in pod["spec"]["containers"]:
        container.pop("ports", None)
    injected = patched(body, post(session, webhook, body))
    assert kubernetes_validate.validate(injected, KUBERNETES, strict=True) == KUBERNETES
    assert [c["name"] for c in injected["spec"]["initContainers"]][:1] == ["envoy"]
    assert "tasklane-redirect" not in json.dumps(injected)
    bootstrap = bootstrap_of(injected)
    assert [x["name"] for x in bootstrap["static_resources"]["listeners"]] == ["egress", "ready"]
    assert "tasklane.announce" not in bootstrap["node"]["metadata"]
    envoy_validate(injected, "fund-yield-trigger-x2b9q", "10.244.1.18", tls=tls_dir)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"{not json", "body is not JSON: "),
        (b"", "body is not JSON: "),
        (b'"AdmissionReview"', "expected an AdmissionReview object, got string"),
        (b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}', "request: expected"),
    ],
    ids=["broken-json", "empty", "string", "no-request"],
)
def test_malformed_review_is_400_with_a_json_error(
    data: bytes, error: str, webhook: str, session: requests.Session
) -> None:
    answer = session.post(
        webhook, data=data, headers={"Content-Type": "application/json"}, timeout=REQUEST_TIMEOUT
    )
    assert answer.status_code == 400
    assert answer.json()["error"].startswith(error)


def test_only_https_with_the_right_ca(webhook: str, tmp_path: Path) -> None:
    with requests.Session() as plain:
        plain.trust_env = False
        with pytest.raises(requests.exceptions.SSLError):
            plain.post(webhook, json={}, timeout=REQUEST_TIMEOUT)  # the system CAs
        init_dir(tmp_path)
        with pytest.raises(requests.exceptions.SSLError):
            plain.post(webhook, json={}, timeout=REQUEST_TIMEOUT, verify=str(tmp_path / CA_CERT))
        with pytest.raises(requests.exceptions.ConnectionError):
            plain.post(webhook.replace("https:", "http:"), json={}, timeout=REQUEST_TIMEOUT)


def test_latency(webhook: str, session: requests.Session) -> None:
    """200 reviews over one kept-alive connection, as the API server sends them."""
    bodies = [load(path) for path in REVIEWS]
    timings = []
    for index in range(200):
        body = copy.deepcopy(bodies[index % len(bodies)])
        body["request"]["uid"] = f"uid-{index}"
        started = time.perf_counter()
        answer = post(session, webhook, body)
        timings.append(time.perf_counter() - started)
        assert answer["response"]["uid"] == f"uid-{index}"
        assert "patch" in answer["response"]
    timings.sort()
    p50, p99 = statistics.median(timings), timings[int(len(timings) * 0.99) - 1]
    print(f"webhook latency over {len(timings)} reviews: p50 {p50 * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms, max {timings[-1] * 1000:.1f} ms")  # fmt: skip
    assert p99 < 1.0  # the API server gives up after 10 s; a shared 2-core machine is slow


def test_the_injector_without_tls_is_one_line_and_starts_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    done = subprocess.run(
        [*TASKLANE, "up", "--state-dir", str(state), "--webhook-port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=STOP_TIMEOUT,
    )
    assert done.returncode == 2, done.stderr
    assert_one_line_error(done.stderr, "the sidecar injector is served over HTTPS")
    assert not (state / "etcd").exists()
