"""`tasklane inject` as a user runs it (the installed script): files, stdin, -o, byte-equal
re-injection, every output object valid against the Kubernetes 1.30 schemas, every sidecar's
bootstrap accepted by the real Envoy (`--mode validate`, with the pod's own args as the kubelet
expands them), and bad manifests refused with one line, exit code 2 and no output file."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from controlplane.pki import init_dir
from tests.support.k8s import (
    BAD,
    KUBERNETES,
    WORKLOADS,
    bootstrap_of,
    envoy_validate,
    objects,
    pod_template,
    sidecar_of,
)
from tests.support.up import TASKLANE, assert_one_line_error

pytestmark = pytest.mark.timeout(120)
CLI_TIMEOUT = 30.0


def tasklane(*args: str, stdin: bytes | None = None, cwd: Path | None = None):
    return subprocess.run(
        [*TASKLANE, *args], input=stdin, capture_output=True, timeout=CLI_TIMEOUT, cwd=cwd
    )


def injected_templates(text: str) -> list[dict[str, Any]]:
    templates = [pod_template(obj) for obj in objects(list(yaml.safe_load_all(text)))]
    return [
        t
        for t in templates
        if t is not None and "tasklane.io/injected" in t["metadata"].get("annotations", {})
    ]


def test_file_stdin_and_output_file_agree_and_reinjecting_changes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out.yaml"
    to_file = tasklane("inject", "-f", str(WORKLOADS), "-o", str(out))
    assert to_file.returncode == 0, to_file.stderr
    assert to_file.stdout == b"" and to_file.stderr == b""
    text = out.read_bytes()
    from_stdin = tasklane("inject", "-f", "-", stdin=WORKLOADS.read_bytes())
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert from_stdin.stdout == text
    again = tasklane("inject", "-f", str(out))
    assert again.returncode == 0, again.stderr
    assert again.stdout == text
    assert len(injected_templates(text.decode())) == 8
    assert [p.name for p in tmp_path.iterdir()] == ["out.yaml"]  # no temporary file left


def test_every_output_object_is_valid_kubernetes_and_every_sidecar_valid_envoy(
    tmp_path: Path,
) -> None:
    done = tasklane("inject", "-f", str(WORKLOADS))
    assert done.returncode == 0, done.stderr
    text = done.stdout.decode()
    for obj in objects(list(yaml.safe_load_all(text))):
        assert kubernetes_validate.validate(obj, KUBERNETES, strict=True) == KUBERNETES
    templates = injected_templates(text)
    assert len(templates) == 8
    init_dir(tmp_path / "tls")  # the default sidecar speaks mTLS (test below)
    for index, template in enumerate(templates):
        envoy_validate(template, f"pod-{index}", f"10.244.0.{index + 10}", tls=tmp_path / "tls")


SMALL_DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: account-svc-task
  namespace: default
spec:
  replicas: 2
  selector:
    matchLabels: {app: account-svc, group: task}
  template:
    metadata:
      labels:
        app: account-svc
        group: task
        tasklane.io/service: account-svc
        tasklane.io/group: task
    spec:
      containers:
        - name: app
          image: registry.example.com/account-svc:1.0
          ports:
            - {name: http, containerPort: 8080}
          readinessProbe:
            httpGet: {path: /healthz, port: 8080}
          livenessProbe:
            tcpSocket: {port: 8080}
          resources:
            requests: {cpu: 100m, memory: 128Mi}
"""


def test_an_injected_deployment_stays_readable_and_renders_the_bootstrap_at_start(
    tmp_path: Path,
) -> None:
    """No bootstrap in the pod spec (it was ~300 lines of `args`): a few arguments from which
    the sidecar renders it when the pod starts; the object is valid Kubernetes and what the
    sidecar renders is valid Envoy, TLS files read."""
    done = tasklane("inject", "-f", "-", stdin=SMALL_DEPLOYMENT.encode())
    assert done.returncode == 0, done.stderr
    text = done.stdout.decode()
    (deployment,) = yaml.safe_load_all(text)
    assert kubernetes_validate.validate(deployment, KUBERNETES, strict=True) == KUBERNETES
    (template,) = injected_templates(text)
    sidecar = sidecar_of(template)
    assert len(yaml.safe_dump(sidecar).splitlines()) < 80, yaml.safe_dump(sidecar)
    assert all(len(arg) < 80 and "\n" not in arg for arg in sidecar["args"]), sidecar["args"]
    assert "--config-yaml" not in sidecar["args"]
    bootstrap = bootstrap_of(template, "account-svc-task-0", "10.244.0.9")
    assert bootstrap["node"]["id"] == "account-svc|task|account-svc-task-0"
    assert bootstrap["node"]["metadata"]["tasklane.announce"] == "10.244.0.9:15006"
    init_dir(tmp_path / "tls")
    envoy_validate(template, "account-svc-task-0", "10.244.0.9", tls=tmp_path / "tls")


def test_image_and_xds_address_options() -> None:
    done = tasklane(
        "inject", "-f", str(WORKLOADS),
        "--image", "registry.example.com/envoy:v1.40.0",
        "--xds-address", "10.96.0.20:18001",
        "--plaintext-xds",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    template = injected_templates(done.stdout.decode())[0]
    # One image for the sidecar and the redirect before it.
    assert [c["image"] for c in template["spec"]["initContainers"][:2]] == [
        "registry.example.com/envoy:v1.40.0"
    ] * 2
    assert "volumeMounts" not in sidecar_of(template)
    bootstrap = bootstrap_of(template)
    xds = bootstrap["static_resources"]["clusters"][0]
    assert xds["type"] == "STATIC"
    endpoint = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "10.96.0.20", "port_value": 18001}
    envoy_validate(template, "web-0", "fd00::5")


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_manifest_exit_2_one_line_and_no_output(path: Path, tmp_path: Path) -> None:
    expected = path.read_text().splitlines()[0].removeprefix("# expect: ")
    out = tmp_path / "out.yaml"
    done = tasklane("inject", "-f", str(path), "-o", str(out))
    assert done.returncode == 2
    assert done.stdout == b""
    assert_one_line_error(done.stderr.decode(), f"{path}: {expected}")
    assert list(tmp_path.iterdir()) == []
    # An existing output file is left as it was.
    out.write_text("kept\n")
    assert tasklane("inject", "-f", str(path), "-o", str(out)).returncode == 2
    assert out.read_text() == "kept\n"
    from_stdin = tasklane("inject", "-f", "-", stdin=path.read_bytes())
    assert from_stdin.returncode == 2 and from_stdin.stdout == b""
    assert_one_line_error(from_stdin.stderr.decode(), f"<stdin>: {expected}")


@pytest.mark.parametrize(
    ("args", "stdin", "expected"),
    [
        (["-f", "missing.yaml"], None, "missing.yaml: cannot read: No such file or directory"),
        (["-f", "-"], b"kind: Pod\nname: \xff\n", "<stdin>: not UTF-8 text (byte 16)"),
        (["-f", "-", "--xds-address", "nowhere"], b"", "--xds-address: 'nowhere' is not HOST:PORT"),
        (["-f", "-", "--image", "two words"], b"", "--image: 'two words' is not an image"),
        (["-f", "-", "-o", "no/such/dir/out.yaml"], b"", "no/such/dir/out.yaml: cannot write"),
        (
            ["-f", "-", "--plaintext-xds", "--tls-secret", "s"],
            b"",
            "--plaintext-xds: contradicts --tls-secret",
        ),
    ],
    ids=[
        "missing-file",
        "not-utf8",
        "bad-xds-address",
        "bad-image",
        "bad-output-dir",
        "plaintext-and-tls",
    ],
)
def test_bad_invocation(args: list[str], stdin: bytes | None, expected: str, tmp_path: Path):
    done = tasklane("inject", *args, stdin=stdin, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout == b""
    assert_one_line_error(done.stderr.decode(), expected)
    assert list(tmp_path.iterdir()) == []


def test_sidecars_speak_mtls_to_xds_with_the_manifests_secret_by_default(tmp_path: Path) -> None:
    """`tasklane k8s manifests` runs the control plane with --tls-dir and makes the Secret
    tasklane-sidecar-tls: without options, the sidecars use it."""
    tls = tmp_path / "tls"
    init_dir(tls)
    done = tasklane("inject", "-f", str(WORKLOADS))
    assert done.returncode == 0, done.stderr
    text = done.stdout.decode()
    for obj in objects(list(yaml.safe_load_all(text))):
        assert kubernetes_validate.validate(obj, KUBERNETES, strict=True) == KUBERNETES
    templates = injected_templates(text)
    for template in templates[:2]:
        volumes = template["spec"]["volumes"]
        assert volumes[-1] == {
            "name": "tasklane-tls",
            "secret": {"secretName": "tasklane-sidecar-tls"},
        }
        assert sidecar_of(template)["volumeMounts"] == [
            {"name": "tasklane-tls", "mountPath": "/etc/tasklane/tls", "readOnly": True}
        ]
        envoy_validate(template, "web-0", "10.244.0.9", tls=tls)
    # Without the files, Envoy refuses the bootstrap: the test above did read them.
    with pytest.raises(AssertionError, match="Invalid path: /etc/tasklane/tls/ca.crt"):
        envoy_validate(templates[0], "web-0", "10.244.0.9")
