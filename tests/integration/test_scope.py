"""A role's scope through a real `tasklane up` (with a real etcd) and real sidecars of
`tasklane run`: a caller's app calls another service through its sidecar, which asks for it
on demand; the callee joins the caller's scope (`tasklane get scope`, the API, etcd), its
access logs keep it there while it is called, it leaves after the idle time without calls,
and it survives a restart of the control plane."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from controlplane.model.scope import LEARNED, ON_DEMAND
from controlplane.store.scope import load_sightings
from tests.support.chain import Plane, Run, get, running_plane, stop_run
from tests.support.rules import service
from tests.support.up import TASKLANE, assert_one_line_error, get_json
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(120)

RULES = service("caller") + service("callee") + service("bystander")
IDLE_S = 4


def echo_app(name: str) -> list[str]:
    """demo.chain_app answering as `name`, as `tasklane run` runs it."""
    command = (
        f'exec "$0" -m demo.chain_app --service {name} --group default '
        '--instance "$TASKLANE_INSTANCE" --port "$PORT"'
    )
    return ["sh", "-c", command, sys.executable]


@pytest.fixture
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    """`tasklane up --scope-idle 4s` with the rules applied by `tasklane apply`."""
    rules = tmp_path_factory.mktemp("rules") / "rules.yaml"
    rules.write_text(RULES)
    yield from running_plane(tmp_path_factory, rules, ["--scope-idle", f"{IDLE_S}s"])


@pytest.fixture
def runs(plane: Plane) -> Iterator[dict[str, Run]]:
    """caller|default and callee|default, registered."""
    started = {name: plane.launch(name, "default", echo_app(name)) for name in ("caller", "callee")}
    try:
        for run in started.values():
            plane.registered(run)
        yield started
    finally:
        for run in started.values():
            stop_run(run)


@contextmanager
def calling(egress_port: int, host: str) -> Iterator[None]:
    """The caller's app calls `host` through its sidecar every 0.2 s (after the first 200)."""
    wait_until(lambda: get(egress_port, host, {})[0] == 200, what=f"{host} answers the caller")
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(0.2):
            get(egress_port, host, {})

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=15)


def scope_rows(plane: Plane, service_name: str) -> list[list[str]]:
    """`tasklane get scope SERVICE` as table rows (header first)."""
    done = plane.tasklane("get", "scope", service_name)
    assert done.returncode == 0, done.stderr
    return [line.split() for line in done.stdout.splitlines()]


def learned(plane: Plane, reason: str = ON_DEMAND) -> list[str] | None:
    """The row of caller|default -> callee, once in the scope for `reason`."""
    for row in scope_rows(plane, "caller")[1:]:
        if row[:3] == ["caller|default", "callee", reason]:
            return row
    return None


def test_a_called_service_is_learned_expires_and_survives_a_restart(
    plane: Plane, runs: dict[str, Run]
) -> None:
    egress = runs["caller"].instance.egress_port
    with calling(egress, "callee"):
        row = wait_until(lambda: learned(plane), what="tasklane get scope lists callee")
    assert scope_rows(plane, "caller")[0] == ["ROLE", "CALLEE", "REASON", "SINCE", "LAST", "SEEN"]
    assert row[3].endswith("s") and row[4] == "ago"  # e.g. "1s ago"
    # Only what was called: no other role, no other callee (and no calls outside the mesh).
    [sighting] = load_sightings(plane.store)
    assert (str(sighting.role), sighting.callee, sighting.reason) == (
        "caller|default",
        "callee",
        ON_DEMAND,
    )
    status, body = get_json(f"{plane.server}/api/v1/scope/caller")
    assert status == 200
    assert body["groups"]["task"] == []
    [entry] = body["groups"]["default"]
    assert entry["callee"] == "callee" and entry["reason"] == ON_DEMAND
    assert entry["since"] == sighting.since

    # No call for longer than the idle time: it leaves the scope, and etcd.
    wait_until(lambda: learned(plane) is None, timeout=IDLE_S + 10, what="callee expires")
    assert load_sightings(plane.store) == []

    # Called again: the sidecar still holds it (Envoy asks for a host once per xDS stream, so
    # a host it asked for stays while it is connected), and its access logs bring it back.
    with calling(egress, "callee"):
        wait_until(lambda: learned(plane, LEARNED), what="callee learned again")
    [before] = load_sightings(plane.store)
    plane.restart_up()  # (with the default idle time of a day)
    wait_until(lambda: learned(plane, LEARNED), what="the learned callee after a restart")
    [after] = load_sightings(plane.store)
    assert after.since == before.since


def test_get_scope_of_an_unknown_service_is_one_line(plane: Plane) -> None:
    done = plane.tasklane("get", "scope", "nope")
    assert done.returncode == 2
    assert_one_line_error(done.stderr, "no service 'nope'")
    done = plane.tasklane("get", "scope")
    assert done.returncode == 2
    assert_one_line_error(done.stderr, "tasklane get scope needs a SERVICE name")


def test_get_scope_json_lists_every_group(plane: Plane) -> None:
    done = plane.tasklane("get", "scope", "bystander", "-o", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "service": "bystander",
        "groups": {"default": [], "task": []},
    }


def test_tasklane_up_refuses_a_bad_scope_idle_in_one_line(tmp_path: Path) -> None:
    for value, message in (
        ("3x", "--scope-idle: '3x' is not a duration"),
        ("0", "--scope-idle must be longer than 0s"),
    ):
        state = tmp_path / "state"
        done = subprocess.run(
            [*TASKLANE, "up", "--state-dir", str(state), "--scope-idle", value],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 2, done.stderr
        assert_one_line_error(done.stderr, message)
        assert not state.exists()  # nothing started, nothing written
