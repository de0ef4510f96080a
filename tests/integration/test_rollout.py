"""Staged rollouts through real Envoys: a rule change applied with a canary goes to a share
of each role's sidecars first; a bad one (a strict chain's hop moved to a group with no
instance) is aborted by the control plane on its own, and the sidecars outside the canary
never see it; a good one is promoted once its window is over."""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from controlplane.model.instance import Instance
from controlplane.runtime.envoy import EnvoyProcess
from controlplane.runtime.ports import free_port
from controlplane.store.registry import register
from controlplane.store.rules import load_rules
from tests.support.echo_app import make_server
from tests.support.etcd import etcd_server  # noqa: F401
from tests.support.plane import Plane
from tests.support.rules import chain, service
from tests.support.wait import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROLE = "front|default"
SIDECARS = 4  # 50 %: two canaries, two stable
BASE = (
    service("front", groups=("default",), calls="[ledger]")
    + service("ledger", groups=("default", "task", "task2", "batch"))
    + chain("nightly", "[{service: ledger, group: task}]", fallback="strict")
)
DYE = {"x-task-dye": "nightly"}


def moved_to(group: str) -> str:
    """The chain's only hop moved to another group of ledger."""
    return chain("nightly", f"[{{service: ledger, group: {group}}}]", fallback="strict")


@dataclass
class Sidecar:
    envoy: EnvoyProcess
    egress_port: int
    answers: list[tuple[float, int, str]] = field(default_factory=list)  # (at, status, group)

    @property
    def node(self) -> str:
        return self.envoy.node_id


def ask(port: int) -> tuple[int, str]:
    """(status, group that answered) of one dyed request to ledger through an egress."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/", headers={"Host": "ledger", **DYE})
        response = conn.getresponse()
        body = response.read().decode(errors="replace")
    except OSError:
        return -1, ""
    finally:
        conn.close()
    group = body.split('"name": "ledger/', 1)[1].split('"', 1)[0] if "ledger/" in body else ""
    return response.status, group


@pytest.fixture
def mesh(etcd_server, tmp_path: Path) -> Iterator[tuple[Plane, list[Sidecar]]]:  # noqa: F811
    plane = Plane(etcd_server.endpoint)
    apps, registrations, sidecars = [], [], []
    try:
        assert plane.apply_files({"base.yaml": BASE})[0] == 200
        for group in ("default", "task", "task2"):  # batch has none
            server = make_server(f"ledger/{group}")
            threading.Thread(target=server.serve_forever, daemon=True).start()
            apps.append(server)
            port = server.server_address[1]
            record = Instance(
                id=f"ledger-{group}", service="ledger", group=group, host="127.0.0.1",
                inbound_port=port, app_port=port, admin_port=free_port(),
                egress_port=free_port(), pid=0, started_at=time.time(),
            )  # fmt: skip
            registrations.append(register(plane.store, record))
        for n in range(SIDECARS):
            egress = free_port()
            envoy = plane.sidecar(
                tmp_path / f"front-{n}", ROLE, egress_port=egress, node_id=f"front-{n}"
            )
            sidecars.append(Sidecar(envoy, egress))
            envoy.start()
        for sidecar in sidecars:
            sidecar.envoy.wait_ready()
            wait_until(lambda s=sidecar: ask(s.egress_port) == (200, "task"), timeout=20,
                       what=f"{sidecar.node} routes the chain to ledger/task")  # fmt: skip
        yield plane, sidecars
    finally:
        for sidecar in sidecars:
            sidecar.envoy.stop()
        for registration in registrations:
            registration.close()
        for server in apps:
            server.shutdown()
        plane.stop()


def rollout(plane: Plane) -> dict:
    code, body = plane.request("GET", "/api/v1/rollout")
    assert code == 200, body
    return body


def staged(plane: Plane, text: str, canary: dict) -> set[str]:
    """Apply `text` as a rollout; its canaries once the control plane follows it."""
    body = {"files": [{"name": "change.yaml", "text": text}], "canary": canary}
    code, answer = plane.request("POST", "/api/v1/apply", body)
    assert code == 200, answer
    wait_until(lambda: rollout(plane)["current"] is not None, timeout=10, what="rollout followed")
    roles = {r["role"]: r for r in rollout(plane)["current"]["roles"]}
    assert roles[ROLE]["sidecars"] == SIDECARS
    return set(roles[ROLE]["canaries"])


def until_ended(plane: Plane, sidecars: list[Sidecar]) -> dict:
    """Dyed requests through every sidecar, ~20/s each, until the rollout ends (at most
    30 s); how it ended."""
    ended = threading.Event()

    def send(sidecar: Sidecar) -> None:
        deadline = time.monotonic() + 40
        while not ended.is_set() and time.monotonic() < deadline:
            status, group = ask(sidecar.egress_port)
            sidecar.answers.append((time.monotonic(), status, group))
            time.sleep(0.05)

    threads = [threading.Thread(target=send, args=(s,), daemon=True) for s in sidecars]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: rollout(plane)["last"] is not None, timeout=30, what="rollout ended")
    finally:
        ended.set()
        for thread in threads:
            thread.join(10)
    wait_until(lambda: rollout(plane)["current"] is None, timeout=5, what="the end followed")
    return rollout(plane)["last"]


def test_a_bad_change_is_aborted_and_never_reaches_the_stable_sidecars(mesh) -> None:
    plane, sidecars = mesh
    canaries = staged(plane, moved_to("batch"), {"percent": "50%", "window": "60s",
                                                 "minRequests": 10})  # fmt: skip
    assert len(canaries) == 2
    last = until_ended(plane, sidecars)
    assert last["outcome"] == "aborted", last
    assert "strict rejections" in last["reason"], last

    for sidecar in sidecars:
        seen = Counter((status, group) for _, status, group in sidecar.answers)
        if sidecar.node in canaries:
            assert seen[(503, "")] > 0, (sidecar.node, seen)  # the canary saw the bad change
        else:
            assert set(seen) == {(200, "task")}, (sidecar.node, seen)  # the rest never did
    # The rules never changed, and every sidecar is back on them.
    rules, _ = load_rules(plane.store)
    assert rules.chains["nightly"].hops[0].group == "task"
    for sidecar in sidecars:
        wait_until(lambda s=sidecar: ask(s.egress_port) == (200, "task"), timeout=10,
                   what=f"{sidecar.node} back on the current rules")  # fmt: skip


def test_a_good_change_is_promoted_after_its_window(mesh) -> None:
    plane, sidecars = mesh
    canaries = staged(plane, moved_to("task2"), {"percent": 50, "window": "4s", "minRequests": 5})
    assert len(canaries) == 2
    last = until_ended(plane, sidecars)
    assert last["outcome"] == "promoted", last
    ended_at = last["at"] - time.time() + time.monotonic()  # on the answers' clock
    # Before the promotion, the canaries ran the candidate and the others did not.
    for sidecar in sidecars:
        before = {group for at, status, group in sidecar.answers if at < ended_at - 0.5}
        assert before == ({"task2"} if sidecar.node in canaries else {"task"}), (
            sidecar.node,
            before,
        )
    rules, _ = load_rules(plane.store)
    assert rules.chains["nightly"].hops[0].group == "task2"
    code, history = plane.request("GET", "/api/v1/history")
    assert history["items"][0]["action"] == "apply --canary 50%"
    for sidecar in sidecars:
        assert all(status == 200 for _, status, _ in sidecar.answers), sidecar.node
        wait_until(lambda s=sidecar: ask(s.egress_port) == (200, "task2"), timeout=10,
                   what=f"{sidecar.node} on the promoted rules")  # fmt: skip
