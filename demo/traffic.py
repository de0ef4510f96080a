"""Demo traffic and its isolation count: the fund-yield task's dyed shards, online users, and a
per hop x group tally built from what every request's answer says served it."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from controlplane.errors import RuntimeFailure

CHAIN = {"fund-facade": "task", "account-svc": "task", "nav-pricing": "task"}
ENTRY = "fund-facade"
COLUMNS = ("requests", "dyed", "online", "leaks")
EXPECTED = frozenset({"online ok", "task ok", "task 429"})  # Tally.outcomes that are no failure


@dataclass
class Tally:
    """Per (service, group): requests served, dyed, online, and leaks — an online request in
    a task group, or a dyed one outside its chain's group (the chain is `strict`)."""

    cells: dict[tuple[str, str], Counter] = field(default_factory=dict)
    outcomes: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, dyed: bool, status: int, hops: list[dict]) -> None:
        with self.lock:
            kind = "task" if dyed else "online"
            self.outcomes[f"{kind} {'ok' if status == 200 else status}"] += 1
            for hop in hops:
                cell = self.cells.setdefault((hop["service"], hop["group"]), Counter())
                cell["requests"] += 1
                cell["dyed" if dyed else "online"] += 1
                expected = CHAIN.get(hop["service"], "default") if dyed else "default"
                if hop["group"] != expected:
                    cell["leaks"] += 1

    def leaks(self) -> int:
        with self.lock:
            return sum(cell["leaks"] for cell in self.cells.values())

    def failures(self) -> int:
        """Requests not answered 200, apart from dyed ones a hop's rate limit refused (429):
        the rules call for those."""
        with self.lock:
            return sum(n for outcome, n in self.outcomes.items() if outcome not in EXPECTED)

    def render(self, replicas: dict[tuple[str, str], tuple[int, int]] | None = None) -> str:
        """The live table: one row per (service, group) of the chain, with its instances
        ready/desired when `replicas` is given."""
        replicas = replicas or {}
        with self.lock:
            keys = set(self.cells) | {k for k in replicas if k[0] in CHAIN}
            rows = sorted(keys, key=lambda k: (list(CHAIN).index(k[0]), k))
            lines = [
                f"{'hop':<14}{'group':<9}{'ready/desired':>15}"
                + "".join(f"{c:>10}" for c in COLUMNS)
            ]
            for service, group in rows:
                cell = self.cells.get((service, group), Counter())
                ready, desired = replicas.get((service, group), (0, 0))
                shown = f"{ready}/{desired}" if replicas else "-"
                counts = "".join(f"{cell[c]:>10}" for c in COLUMNS)
                lines.append(f"{service:<14}{group:<9}{shown:>15}{counts}")
            outcome = ", ".join(f"{k}: {v}" for k, v in sorted(self.outcomes.items()))
            lines.append(f"requests: {outcome or 'none yet'}")
            return "\n".join(lines)


def send(port: int, path: str, headers: dict[str, str]) -> tuple[int, list[dict]]:
    """GET fund-facade through the gateway; returns the status and the hops that served it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": ENTRY, **headers})
        resp = conn.getresponse()
        body = resp.read()
    except OSError:
        return 599, []
    finally:
        conn.close()
    try:
        return resp.status, json.loads(body).get("hops", [])
    except ValueError:
        return resp.status, []


def run_task(
    port: int, run_id: str, users: int, tally: Tally, trust: dict[str, str], workers: int = 8
) -> None:
    """One run of the fund-yield task: every user's yield, sharded over `workers`, each request
    dyed with this run's dye (a per-iteration dye, `fund-yield@<run id>`)."""
    headers = {"x-task-dye": f"fund-yield@{run_id}", **trust}

    def shard(user: int) -> None:
        status, hops = send(port, f"/yield?user={user}", headers)
        tally.record(True, status, hops)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(shard, range(users)))


def online_users(port: int, rate: float, stop: threading.Event, tally: Tally) -> None:
    """Undyed requests at about `rate` per second until `stop`; a dye sent by an outside
    client would be stripped by the gateway, so one is sent now and then to show it."""
    sent = 0
    while not stop.is_set():
        spoof = {"x-task-dye": "fund-yield"} if sent % 10 == 9 else {}
        status, hops = send(port, f"/portfolio?user={sent}", spoof)
        tally.record(False, status, hops)
        sent += 1
        stop.wait(max(0.0, 1 / rate - 0.001))


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeFailure(f"demo: {what} not ready after {timeout:g}s")
        time.sleep(0.1)
