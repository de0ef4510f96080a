"""Kubernetes test material: the manifests and AdmissionReviews under tests/data/k8s, the
injected sidecar's parts, and Envoy's validate mode on a pod's sidecar as the kubelet would
start it (used by the inject and webhook tests)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from controlplane.inject.pod import REDIRECT_NAME, SIDECAR_TLS_DIR, InjectOptions
from controlplane.inject.start import bootstrap
from controlplane.inject.workloads import TEMPLATE_PATHS, inject_text
from controlplane.pki import CA_CERT, CLIENT_CERT, CLIENT_KEY

ENVOY_TIMEOUT = 30.0
K8S = Path(__file__).resolve().parents[1] / "data" / "k8s"
WORKLOADS = K8S / "workloads.yaml"
BAD = sorted((K8S / "bad").glob("*.yaml"))
KUBERNETES = "1.30"  # the oldest schema kubernetes-validate ships with native sidecars is 1.29
OPTIONS = InjectOptions()


def kubelet_expand(text: str, env: dict[str, str]) -> str:
    """`$(VAR)` expansion as the kubelet does it in args (Kubernetes'
    third_party/forked/golang/expansion): `$$` is one `$`, unknown variables stay as written."""
    out: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char != "$" or index + 1 == len(text):
            out.append(char)
            index += 1
            continue
        following = text[index + 1]
        if following == "$":
            out.append("$")
            index += 2
        elif following == "(" and (close := text.find(")", index + 2)) != -1:
            name = text[index + 2 : close]
            out.append(env.get(name, f"$({name})"))
            index = close + 1
        else:
            out.append("$" + following)
            index += 2
    return "".join(out)


def injected_docs(path: Path = WORKLOADS) -> tuple[list[Any], list[Any]]:
    """(input documents, output documents) of one file."""
    text = path.read_text()
    return list(yaml.safe_load_all(text)), list(yaml.safe_load_all(inject_text(text, "x", OPTIONS)))


def objects(docs: list[Any]) -> list[dict[str, Any]]:
    """Every object, `kind: List` items included."""
    out: list[dict[str, Any]] = []
    for doc in docs:
        out.extend(doc["items"] if doc["kind"] == "List" else [doc])
    return out


def pod_template(obj: dict[str, Any]) -> dict[str, Any] | None:
    group = obj["apiVersion"].rpartition("/")[0]
    path = TEMPLATE_PATHS.get((group, obj["kind"]))
    if path is None:
        return None
    for key in path:
        obj = obj[key]
    return obj


def sidecar_of(template: dict[str, Any]) -> dict[str, Any]:
    """The sidecar: the first init container but for the redirect before it."""
    (sidecar, *_) = [c for c in template["spec"]["initContainers"] if c["name"] != REDIRECT_NAME]
    assert sidecar["name"] == "envoy"
    return sidecar


def sidecar_command(
    template: dict[str, Any], pod_name: str = "web-0", pod_ip: str = "10.1.2.3"
) -> list[str]:
    """The sidecar's command line as the kubelet starts it, the image's `python` being this
    one (which has tasklane and the Envoy wheel installed, as the image has)."""
    sidecar = sidecar_of(template)
    assert sidecar["command"] == ["python", "-m", "controlplane.inject.start"], sidecar["command"]
    args = [kubelet_expand(a, {"POD_NAME": pod_name, "POD_IP": pod_ip}) for a in sidecar["args"]]
    return [sys.executable, "-m", "controlplane.inject.start", *args]


def bootstrap_of(template: dict[str, Any], pod_name: str = "web-0", pod_ip: str = "10.1.2.3"):
    """The bootstrap the sidecar renders when the pod starts, and gives Envoy."""
    return yaml.safe_load(bootstrap(sidecar_command(template, pod_name, pod_ip)[3:]))


def local_app_port(bootstrap: dict[str, Any]) -> int:
    (cluster,) = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "local-app"]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    return endpoint["address"]["socket_address"]["port_value"]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


# --- manifests ------------------------------------------------------------------------------


def mount_tls(source: Path) -> str:
    """Shell lines for a private mount namespace (`unshare --mount`) that put a TLS directory's
    client files where the sidecar reads its Secret, as the kubelet mounts it; /etc becomes an
    empty tmpfs there, the machine's own is untouched."""
    files = " ".join(shlex.quote(str(source / name)) for name in (CA_CERT, CLIENT_CERT, CLIENT_KEY))
    return (
        f"mount -t tmpfs tmpfs /etc && mkdir -p {SIDECAR_TLS_DIR} && cp {files} {SIDECAR_TLS_DIR}"
    )


def envoy_validate(
    template: dict[str, Any], pod_name: str, pod_ip: str, tls: Path | None = None
) -> None:
    """Envoy run with the sidecar's args as the kubelet passes them, in validate mode: the
    bootstrap is parsed and every static resource built (TLS files read), nothing is bound or
    started. `tls`: a TLS directory whose client files the sidecar's Secret holds."""
    command = [*sidecar_command(template, pod_name, pod_ip), "--mode", "validate"]
    assert not any("$(" in arg for arg in command)
    if tls is not None:
        command = [
            "unshare",
            "--mount",
            "sh",
            "-c",
            f'{mount_tls(tls)} && exec "$@"',
            "-",
            *command,
        ]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=ENVOY_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OK" in done.stdout, done.stdout
