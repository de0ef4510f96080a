"""docker-compose.yml, checked offline (no Docker daemon here): valid for the Compose
Specification's schema, in agreement with the demo rules and the tasklane CLI, and every
sidecar bootstrap it renders accepted by the real Envoy binary (`envoy --mode validate`)."""

from __future__ import annotations

import copy
import ipaddress
import json
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from controlplane.cli import build_parser
from controlplane.deploy import compose, manifests
from controlplane.inject import pod
from controlplane.model.load import load_files
from controlplane.model.rules import Service, TaskChain
from controlplane.runtime.envoy import envoy_binary
from controlplane.xds.names import META_ANNOUNCE

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
SCHEMA = ROOT / "tests" / "data" / "schemas" / "compose-spec.json"
RULES = ROOT / "demo" / "rules.yaml"
SIDECAR_MODULE = ["python", "-m", "controlplane.deploy.compose"]
CHAIN_APP = ["python", "-m", "demo.chain_app"]


@pytest.fixture(scope="module")
def spec() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())  # merge keys (<<) resolved as Compose does


@pytest.fixture(scope="module")
def services(spec: dict) -> dict[str, dict]:
    return spec["services"]


@pytest.fixture(scope="module")
def sidecars(services: dict[str, dict]) -> dict[str, compose.Sidecar]:
    """Compose service name -> the sidecar its command describes."""
    found = {
        name: compose.parse(service["command"][len(SIDECAR_MODULE) :])
        for name, service in services.items()
        if service.get("command", [])[: len(SIDECAR_MODULE)] == SIDECAR_MODULE
    }
    assert found, "no sidecar in docker-compose.yml"
    return found


def flags(command: list[str]) -> dict[str, list[str]]:
    """--name=value flags of a command line (the style docker-compose.yml uses)."""
    out: dict[str, list[str]] = {}
    for arg in command:
        name, equals, value = arg.partition("=")
        if name.startswith("--") and equals:
            out.setdefault(name, []).append(value)
    return out


# ------------------------------------------------------------------------------------ schema


def test_valid_for_the_compose_specification(spec: dict) -> None:
    schema = json.loads(SCHEMA.read_text())
    # Its "$schema" is draft-07's URL without the trailing "#", which jsonschema does not
    # recognise: name the draft.
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(spec)]
    assert not errors, "\n".join(errors)
    # Not vacuous: a misspelt key anywhere in a service is refused.
    broken = copy.deepcopy(spec)
    broken["services"]["tasklane"]["healthcheck"]["intervall"] = "5s"
    assert not validator.is_valid(broken)


def test_the_image_is_the_one_make_image_builds(services: dict[str, dict]) -> None:
    """One Dockerfile for compose, `make image` and the manifests (test_image.py checks it)."""
    assert services["tasklane"]["build"] == {"context": ".", "dockerfile": "Dockerfile"}
    assert (ROOT / "Dockerfile").is_file()
    # Every other service of the image uses the one the `tasklane` service builds.
    image = services["tasklane"]["image"]
    for name, service in services.items():
        if service.get("image") == image and name != "tasklane":
            assert service["pull_policy"] == "never" and "build" not in service, name


def test_etcd_is_the_release_the_kubernetes_manifests_run(services: dict[str, dict]) -> None:
    assert services["etcd"]["image"] == manifests.ETCD_IMAGE


# ------------------------------------------------------------------------ the tasklane commands


def test_tasklane_commands_are_ones_the_cli_accepts(spec: dict) -> None:
    services, parser = spec["services"], build_parser()
    up = parser.parse_args(services["tasklane"]["command"][1:])
    assert up.command == "up" and up.host == "0.0.0.0" and up.accept_announce
    assert up.etcd == "etcd:2379"
    state = str(up.state_dir)
    assert f"tasklane-state:{state}" in services["tasklane"]["volumes"]

    apply = parser.parse_args(services["apply"]["command"][1:])
    assert apply.command == "apply"
    (rules_file,) = apply.filename  # the demo rules, mounted from the checkout
    assert f"./{RULES.relative_to(ROOT)}:{rules_file}:ro" in services["apply"]["volumes"]
    assert apply.server == f"http://tasklane:{up.http_port}"
    assert str(apply.token_file) == f"{state}/api-token"
    assert f"tasklane-state:{state}:ro" in services["apply"]["volumes"]

    gateway = parser.parse_args(services["gateway"]["command"][1:])
    assert gateway.command == "gateway" and gateway.server == apply.server
    (ipam,) = spec["networks"]["mesh"]["ipam"]["config"]
    assert gateway.trusted_cidr == [ipam["subnet"]]


# ------------------------------------------------------------------------ the demo's services


def test_every_group_of_every_demo_service_has_one_instance(
    sidecars: dict[str, compose.Sidecar],
) -> None:
    rules = [parsed.rule for parsed in load_files([RULES])]
    wanted = sorted(
        (rule.name, group.name)
        for rule in rules
        if isinstance(rule, Service)
        for group in rule.groups
    )
    assert {group for _, group in wanted} == {"default", "task"}
    assert sorted((s.service, s.group) for s in sidecars.values()) == wanted


def test_apps_and_sidecars_agree(spec: dict, sidecars: dict[str, compose.Sidecar]) -> None:
    """Each sidecar shares its app's network namespace, announces the app's fixed address,
    proxies to the app's port, and is the egress the app calls the next hop through, in the
    order of the demo chain."""
    services = spec["services"]
    (chain,) = [p.rule for p in load_files([RULES]) if isinstance(p.rule, TaskChain)]
    order = [hop.service for hop in chain.hops]
    following = dict(zip(order, order[1:], strict=False))
    (ipam,) = spec["networks"]["mesh"]["ipam"]["config"]
    subnet = ipaddress.ip_network(ipam["subnet"])
    dynamic = ipaddress.ip_network(ipam["ip_range"])
    up = build_parser().parse_args(services["tasklane"]["command"][1:])
    announced = []
    for name, sidecar in sidecars.items():
        mode, _, app_name = services[name]["network_mode"].partition(":")
        assert mode == "service", name
        app = services[app_name]
        assert app["command"][: len(CHAIN_APP)] == CHAIN_APP, app_name
        app_flags = flags(app["command"])
        assert app_flags["--service"] == [sidecar.service]
        assert app_flags["--group"] == [sidecar.group]
        assert app_flags["--port"] == [str(sidecar.app_port)]
        assert app_flags["--egress"] == [f"127.0.0.1:{sidecar.egress_port}"]
        assert app_flags.get("--next", []) == (
            [following[sidecar.service]] if sidecar.service in following else []
        )
        ip, _, port = sidecar.announce.rpartition(":")
        assert app["networks"]["mesh"]["ipv4_address"] == ip
        address = ipaddress.ip_address(ip)
        assert address in subnet and address not in dynamic, "Docker could hand it out"
        assert int(port) == pod.INBOUND_PORT  # the injected pod's ports, everywhere
        assert (sidecar.xds_host, sidecar.xds_port) == ("tasklane", up.xds_port)
        announced.append(ip)
    assert len(set(announced)) == len(announced)


# --------------------------------------------------------------------------------- envoy


def test_every_bootstrap_is_accepted_by_envoy(
    sidecars: dict[str, compose.Sidecar], tmp_path: Path
) -> None:
    binary = envoy_binary()
    version = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=30
    ).stdout
    for name, sidecar in sorted(sidecars.items()):
        text = sidecar.bootstrap()
        doc = yaml.safe_load(text)
        assert doc["node"]["metadata"][META_ANNOUNCE] == sidecar.announce
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        done = subprocess.run(
            [str(binary), "--mode", "validate", "-c", str(path), "-l", "error"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"{name} ({version.strip()}):\n{done.stdout}{done.stderr}"
        assert "OK" in done.stdout


def test_the_sidecar_command_line() -> None:
    sidecar = compose.parse(
        ["--service", "nav-pricing", "--announce", "172.30.0.31:15006", "--xds", "cp:18000"]
    )
    assert sidecar.group == "default" and sidecar.node_id == "nav-pricing|default|172.30.0.31-15006"
    command = compose.envoy_command(Path("/tmp/b.yaml"))
    assert command[0] == str(envoy_binary()) and command[1:3] == ["-c", "/tmp/b.yaml"]
    for bad in (["--announce", "fund-facade:15006"], ["--announce", "172.30.0.31"]):
        with pytest.raises(SystemExit):
            compose.parse(["--service", "s", "--xds", "cp:18000", *bad])


def test_the_sidecar_spreads_over_control_plane_replicas() -> None:
    sidecar = compose.parse(
        ["--service", "s", "--announce", "172.30.0.31:15006", "--xds", "cp-0:18000,cp-1:18001"]
    )
    (xds,) = (c for c in yaml.safe_load(sidecar.bootstrap())["static_resources"]["clusters"]
              if c["name"] == "xds")  # fmt: skip
    (locality,) = xds["load_assignment"]["endpoints"]
    dialled = [e["endpoint"]["address"]["socket_address"] for e in locality["lb_endpoints"]]
    assert dialled == [
        {"address": "cp-0", "port_value": 18000},
        {"address": "cp-1", "port_value": 18001},
    ]
    with pytest.raises(SystemExit):
        compose.parse(["--service", "s", "--announce", "172.30.0.31:15006", "--xds", "cp:1,"])
