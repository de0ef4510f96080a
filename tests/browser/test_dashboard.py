"""The dashboard in a real headless Chromium against a real control plane.

The control plane runs in-process (tests/support/plane.py) with the scaler on a dry-run
actuator, so decisions with reasons are recorded; the demo rules are applied through the API;
every instance is a `tasklane run` process (the demo app behind a real Envoy sidecar), and
requests go through the sidecars. The page is read as a person reads it, without reloads:
the live checks wait for the page's own polling to show a change.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from controlplane.runtime.etcd import EmbeddedEtcd
from controlplane.runtime.process import dying_with_parent
from controlplane.scaler.actuators import DryRunActuator
from controlplane.scaler.policy import PolicyConfig
from controlplane.xds.types import CLUSTER, LISTENER
from testkit.ads_client import AdsClient
from tests.support.chain import chain_app
from tests.support.plane import Plane
from tests.support.up import TASKLANE
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parents[2]
DEMO_RULES = REPO / "demo" / "rules.yaml"
CHAIN = ("fund-facade", "account-svc", "nav-pricing")
GROUPS = ("default", "task")
# Bounded waits. The page polls every 2 s, so a change shows within a few seconds.
REGISTER_TIMEOUT = 40.0
SERVE_TIMEOUT = 30.0
PAGE_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
SCALE_PERIOD_S = 1.0
FAKE_SIDECARS = 200
NACKING_SIDECARS = 5
NACK_MESSAGE = "fake sidecar: cluster rejected for the dashboard test"
# One poll renders everything; far above this, 20 chains and 200 sidecars would stutter.
RENDER_BUDGET_MS = 250

# Straight to the API and the sidecars even when http_proxy is set in the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --- the mesh ----------------------------------------------------------------------------------


@dataclass
class Mesh:
    """A control plane with the demo rules and `tasklane run` instances."""

    plane: Plane
    state_dir: Path
    logs: Path
    runs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.plane.url

    def token(self) -> str | None:
        """The API token, once the control plane keeps one (writes need it)."""
        path = self.state_dir / "api-token"
        return path.read_text().strip() if path.exists() else None

    def request(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        token = self.token()
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with _opener.open(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def apply(self, name: str, text: str) -> None:
        code, body = self.request(
            "POST", "/api/v1/apply", {"files": [{"name": name, "text": text}], "dryRun": False}
        )
        assert code == 200, body

    def launch(self, service: str, group: str, name: str) -> subprocess.Popen:
        """`tasklane run` of the demo app (not waiting for it to register)."""
        env = {"TASKLANE_TOKEN": self.token() or ""}
        log = self.logs / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                dying_with_parent(
                    [*TASKLANE, "run", "--server", self.url, "--service", service]
                    + ["--group", group, "--", *chain_app(service, group)]
                ),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, **env},
            )
        self.runs[name] = proc
        return proc

    def instances(self) -> list[dict]:
        code, body = self.request("GET", "/api/v1/instances")
        assert code == 200, body
        return body["items"]

    def count(self, service: str, group: str) -> int:
        return sum(1 for i in self.instances() if (i["service"], i["group"]) == (service, group))

    def stop(self, name: str) -> None:
        proc = self.runs.pop(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def check_runs(self) -> None:
        for name, proc in self.runs.items():
            if proc.poll() is not None:
                log = (self.logs / f"{name}.log").read_text()[-3000:]
                raise AssertionError(f"tasklane run {name} exited {proc.returncode}:\n{log}")

    def egress(self) -> int:
        """The egress port of some sidecar: requests into the mesh go through it."""
        return next(i["egress_port"] for i in self.instances() if i["service"] == "nav-pricing")


def send(port: int, dyed: bool) -> tuple[int, list[tuple[str, str]]]:
    """GET / on fund-facade through a sidecar's egress; the status and the groups that served."""
    headers = {"Host": "fund-facade", **({"x-task-dye": "fund-yield"} if dyed else {})}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/", headers=headers)
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    try:
        hops = json.loads(body).get("hops", [])
    except ValueError:
        hops = []
    return response.status, [(hop["service"], hop["group"]) for hop in hops]


@pytest.fixture
def plane(etcd_server: EmbeddedEtcd, tmp_path: Path) -> Iterator[Mesh]:
    """The control plane with a dry-run scaler and the demo rules applied."""
    state_dir = tmp_path / "state"
    running = Plane(
        etcd_server.endpoint,
        state_dir=state_dir,
        actuator=lambda control_plane: DryRunActuator(),
        scaler_config=PolicyConfig(sync_period_s=SCALE_PERIOD_S),
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    mesh = Mesh(running, state_dir, logs)
    try:
        mesh.apply("demo/rules.yaml", DEMO_RULES.read_text())
        yield mesh
    finally:
        for name in list(mesh.runs):
            mesh.stop(name)
        running.stop()


@pytest.fixture
def mesh(plane: Mesh) -> Mesh:
    """One instance of every group of the demo chain, serving both lanes."""
    for service in CHAIN:
        for group in GROUPS:
            plane.launch(service, group, f"{service}-{group}-1")

    def all_registered() -> bool:
        plane.check_runs()
        return all(plane.count(s, g) >= 1 for s in CHAIN for g in GROUPS)

    wait_until(all_registered, REGISTER_TIMEOUT, "every demo instance registered")
    port = plane.egress()
    task = [(service, "task") for service in CHAIN]
    online = [(service, "default") for service in CHAIN]
    wait_until(
        lambda: send(port, True) == (200, task) and send(port, False) == (200, online),
        SERVE_TIMEOUT,
        "dyed and online requests served in their lanes",
    )
    return plane


# --- the page ----------------------------------------------------------------------------------


@dataclass
class Page:
    """A dashboard tab and what went wrong in it (console errors, page errors)."""

    page: Any
    errors: list[str]

    def value(self, selector: str) -> str | None:
        found = self.page.query_selector(selector)
        return None if found is None else found.get_attribute("data-value")

    def wait_value(
        self,
        selector: str,
        predicate: Callable[[int], bool],
        what: str,
        timeout: float = PAGE_TIMEOUT,
    ) -> int:
        seen: list[int] = []

        def check() -> bool:
            value = self.value(selector)
            if not value:
                return False
            seen.append(int(float(value)))
            return predicate(seen[-1])

        wait_until(check, timeout, what)
        return seen[-1]

    def polls(self) -> int:
        return int(self.page.evaluate("Number(document.body.dataset.polls || 0)"))

    def next_poll(self) -> None:
        before = self.polls()
        wait_until(lambda: self.polls() > before, PAGE_TIMEOUT, "the page's next poll")


@pytest.fixture
def dashboard(browser: Any) -> Iterator[Callable[[str], Page]]:
    contexts = []

    def open_page(url: str) -> Page:
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        contexts.append(context)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))

        def on_console(message: Any) -> None:
            # A 404 from /api/v1/isolation is expected while no accounting is served.
            where = (message.location or {}).get("url", "")
            if message.type == "error" and "/api/v1/isolation" not in where + message.text:
                errors.append(f"console error: {message.text} ({where})")

        page.on("console", on_console)
        page.set_default_timeout(PAGE_TIMEOUT * 1000)
        page.goto(url, wait_until="load")
        return Page(page, errors)

    yield open_page
    for context in contexts:
        context.close()


def group_selector(chain: str, service: str, group: str) -> str:
    return f'[data-chain="{chain}"] .group[data-service="{service}"][data-group="{group}"]'


# --- the tests ---------------------------------------------------------------------------------


def test_demo_chain_renders_and_updates_live(
    mesh: Mesh, dashboard: Callable[[str], Page], output_dir: Path
) -> None:
    tab = dashboard(mesh.url + "/")
    page = tab.page
    try:
        # The demo chain: three hops left to right, each with its task and online groups.
        chain = page.locator('[data-chain="fund-yield"]')
        chain.locator("li.hop").nth(2).wait_for()
        assert chain.locator("li.hop h4").all_inner_texts() == list(CHAIN)
        for service in CHAIN:
            for group in GROUPS:
                selector = group_selector("fund-yield", service, group)
                tab.wait_value(f"{selector} [data-k=ready]", lambda n: n == 1, f"{service}|{group}")
        boxes = [chain.locator(f'li.hop[data-service="{s}"]').bounding_box() for s in CHAIN]
        assert boxes[0]["x"] < boxes[1]["x"] < boxes[2]["x"], boxes  # left to right
        assert "fund-yield@*" in chain.locator(".chain-meta").inner_text()

        # The sidecars table lists every node the control plane serves.
        nodes = [node["node_id"] for node in mesh.plane.status()["nodes"]]
        assert len(nodes) >= len(CHAIN) * len(GROUPS)
        for node in nodes:
            page.locator(f'#sidecars tbody tr[data-node="{node}"]').wait_for()
        row = page.locator("#sidecars tbody tr").first
        assert row.locator("td.version").count() == 4
        assert "none" in row.locator("td.nack").inner_text()

        # The scaling timeline of a task group: the profile ahead, and the dry-run scaler's
        # decisions with their reasons.
        timeline = page.locator(
            'figure.timeline-group[data-service="fund-facade"][data-group="task"]'
        )
        timeline.locator("svg path.line.profile").wait_for(state="attached")
        assert timeline.locator("svg path.line.profile").get_attribute("d")
        timeline.locator("ol.decisions li").first.wait_for(timeout=30_000)
        assert "replicas:" in timeline.locator("ol.decisions li").first.inner_text()

        # Live, without a reload (the page keeps its own marker while it polls): dyed requests
        # sent now show up in the counters the access logs feed.
        page.evaluate("window.__sameDocument = true")
        counter = f"{group_selector('fund-yield', 'fund-facade', 'task')} [data-k=dyed]"
        before = tab.wait_value(counter, lambda n: n >= 0, "the dyed counter")
        port = mesh.egress()
        for _ in range(20):
            assert send(port, True)[0] == 200
        tab.wait_value(counter, lambda n: n >= before + 20, "the dyed counter to grow")
        leaks = f"{group_selector('fund-yield', 'fund-facade', 'task')} [data-k=leaks]"
        assert tab.value(leaks) == "0"
        # Scaling by hand: a second nav-pricing task instance shows up, ready 1 -> 2, with its
        # sidecar in the table; stopping it takes it away again.
        ready = f"{group_selector('fund-yield', 'nav-pricing', 'task')} [data-k=ready]"
        mesh.launch("nav-pricing", "task", "nav-pricing-task-2")
        tab.wait_value(ready, lambda n: n == 2, "a second nav-pricing task instance", 45)
        wait_until(
            lambda: page.locator('#sidecars tbody tr[data-node^="nav-pricing|task|"]').count() == 2,
            PAGE_TIMEOUT,
            "its sidecar in the table",
        )
        mesh.stop("nav-pricing-task-2")
        tab.wait_value(ready, lambda n: n == 1, "the instance gone again")
        # A propagation probe (`tasklane probe`): its verdict and each hop's group show live.
        code, report = mesh.request("POST", "/api/v1/probe/fund-yield", {})
        assert (code, report["ok"]) == (200, True), report
        probe = chain.locator('.probe[data-ok="true"]')
        probe.wait_for()
        assert "fund-facade task → account-svc task → nav-pricing task" in probe.inner_text()
        assert page.evaluate("window.__sameDocument === true")
        assert page.locator("#live").get_attribute("data-state") == "ok"
        assert tab.errors == []
    finally:
        page.screenshot(path=str(output_dir / "dashboard.png"), full_page=True)


# A few more services and 19 more chains over them: 20 chains on one page.
EXTRA_SERVICES = ("ledger-svc", "risk-svc", "quote-svc", "report-svc", "notify-svc")


def many_chains_yaml(count: int) -> str:
    docs = [
        "apiVersion: tasklane.io/v1\nkind: Service\n"
        f"metadata: {{name: {service}}}\n"
        "spec:\n  groups:\n    - {name: default, minReplicas: 1, maxReplicas: 3}\n"
        "    - {name: batch, minReplicas: 0, maxReplicas: 3}\n"
        for service in EXTRA_SERVICES
    ]
    for n in range(1, count + 1):
        length = 2 + n % 4
        hops = [EXTRA_SERVICES[(n + i) % len(EXTRA_SERVICES)] for i in range(length)]
        hop_lines = "".join(f"    - {{service: {hop}, group: batch}}\n" for hop in hops)
        docs.append(
            "apiVersion: tasklane.io/v1\nkind: TaskChain\n"
            f"metadata: {{name: batch-{n:02d}}}\n"
            f'spec:\n  dye: {{values: [batch-{n:02d}, "batch-{n:02d}@*"]}}\n'
            f"  fallback: {'loose' if n % 2 else 'strict'}\n  hops:\n{hop_lines}"
        )
    return "---\n".join(docs)


class FakeSidecars:
    """`count` ADS streams on the control plane's xDS port, like Envoys that subscribe to
    clusters and listeners and ACK them; the first `nacking` reject the first clusters."""

    def __init__(self, target: str, count: int, nacking: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.clients: list[AdsClient] = []
        self.channels: list[grpc.aio.Channel] = []
        self._call(self._start(target, count, nacking))

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    async def _start(self, target: str, count: int, nacking: int) -> None:
        # A few streams per connection, as many sidecars behind few HTTP/2 connections would.
        self.channels = [grpc.aio.insecure_channel(target) for _ in range(4)]
        for n in range(count):
            client = AdsClient(
                target,
                f"nav-pricing|default|fake-{n:03d}",
                cluster="nav-pricing|default",
                channel=self.channels[n % len(self.channels)],
            )
            if n < nacking:
                client.nack_next(CLUSTER, NACK_MESSAGE)
            await client.start()
            client.subscribe(CLUSTER)
            client.subscribe(LISTENER)
            self.clients.append(client)

    async def _close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)
        await asyncio.gather(*(c.close() for c in self.channels), return_exceptions=True)

    def close(self) -> None:
        try:
            self._call(self._close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture
def twenty_chains(plane: Mesh) -> Mesh:
    """19 more chains applied, and published: pushes racing the fake sidecars' first answers
    would make the server ignore their NACKs (a NACK of a stale nonce is no NACK in xDS)."""
    plane.apply("many-chains.yaml", many_chains_yaml(19))
    wait_until(
        lambda: f"{EXTRA_SERVICES[-1]}|batch" in plane.plane.status()["roles"],
        PAGE_TIMEOUT,
        "the new rules published",
    )
    return plane


@pytest.fixture
def fake_sidecars(twenty_chains: Mesh) -> Iterator[FakeSidecars]:
    plane = twenty_chains
    target = f"127.0.0.1:{plane.plane.control_plane.xds_port}"
    sidecars = FakeSidecars(target, FAKE_SIDECARS, NACKING_SIDECARS)
    try:
        yield sidecars
    finally:
        sidecars.close()


def test_twenty_chains_and_two_hundred_sidecars_stay_readable(
    plane: Mesh, fake_sidecars: FakeSidecars, dashboard: Callable[[str], Page], output_dir: Path
) -> None:
    def settled() -> bool:
        """The NACKing streams have NACKed clusters (they ACK only a later version), every
        other one has ACKed them."""
        nodes = plane.plane.status()["nodes"]
        clusters = [node["types"].get("cds", {}) for node in nodes]
        nacked = sum(1 for cds in clusters if cds.get("last_nack"))
        acked = sum(1 for cds in clusters if cds.get("acked_version") and not cds.get("last_nack"))
        return (nacked, acked) == (NACKING_SIDECARS, FAKE_SIDECARS - NACKING_SIDECARS)

    wait_until(settled, PAGE_TIMEOUT, "200 streams, 5 of them with a NACK")
    tab = dashboard(plane.url + "/")
    page = tab.page
    try:
        wait_until(lambda: page.locator("section.chain").count() == 20, PAGE_TIMEOUT, "20 chains")
        assert page.locator("#chain-table tbody tr").count() == 20
        wait_until(
            lambda: page.locator("#sidecars tbody tr").count() == FAKE_SIDECARS,
            PAGE_TIMEOUT,
            "200 sidecar rows",
        )
        nacked = page.locator("#sidecars tbody tr.nacked")
        assert nacked.count() == NACKING_SIDECARS
        assert NACK_MESSAGE in nacked.first.locator("td.nack").inner_text()
        assert "CDS" in nacked.first.locator("td.nack").inner_text()
        acked = page.locator('#sidecars tbody tr[data-node$="fake-199"] td.version').first
        assert acked.inner_text() not in ("", "–")  # its CDS version, ACKed

        # Readable: one poll renders in budget; the page does not scroll sideways (long hop
        # graphs scroll in their own box); the sidecars table scrolls inside a bounded box.
        tab.next_poll()
        render_ms = float(page.evaluate("document.body.dataset.renderMs"))
        assert render_ms < RENDER_BUDGET_MS, render_ms
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        wrap = page.locator("section.sidecars .table-wrap")
        assert wrap.evaluate("el => el.scrollHeight > el.clientHeight")
        assert wrap.evaluate("el => el.clientHeight") <= 1000
        # With 20 chains the timelines start closed: each opens on demand.
        assert page.locator("details.timeline[open]").count() == 0

        page.screenshot(path=str(output_dir / "dashboard-20-chains.png"), full_page=False)
        page.locator("section.sidecars").screenshot(path=str(output_dir / "dashboard-sidecars.png"))

        # Filtering by chain name, and by a run's dye (matched by the chain's prefix value).
        search = page.get_by_label("Filter by chain or dye")
        search.fill("batch-07")
        visible = page.locator("section.chain:visible")
        wait_until(lambda: visible.count() == 1, PAGE_TIMEOUT, "one chain by name")
        assert visible.first.get_attribute("data-chain") == "batch-07"
        search.fill("fund-yield@20260101T0200")
        wait_until(lambda: visible.count() == 1, PAGE_TIMEOUT, "one chain by dye")
        assert visible.first.get_attribute("data-chain") == "fund-yield"
        search.fill("")
        wait_until(lambda: visible.count() == 20, PAGE_TIMEOUT, "every chain again")

        sidecar_search = page.get_by_label("Filter sidecars")
        sidecar_search.fill("rejected for the dashboard")
        wait_until(
            lambda: page.locator("#sidecars tbody tr").count() == NACKING_SIDECARS,
            PAGE_TIMEOUT,
            "the NACKing sidecars",
        )
        assert tab.errors == []
    finally:
        page.screenshot(path=str(output_dir / "dashboard-20-chains-full.png"), full_page=True)


def test_assets_are_served_with_their_types_and_nothing_else(plane: Mesh) -> None:
    def get(path: str) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(plane.url + path)
        try:
            with _opener.open(request, timeout=10) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    status, headers, body = get("/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert b'<script type="module" src="/static/app.js"' in body
    assert "default-src 'none'" in headers["Content-Security-Policy"]  # nothing from elsewhere
    assets = {
        "app.js": "text/javascript",
        "dom.js": "text/javascript",
        "timeline.js": "text/javascript",
        "app.css": "text/css",
    }
    for name, content_type in assets.items():
        status, headers, _ = get(f"/static/{name}")
        assert (status, headers["Content-Type"]) == (200, f"{content_type}; charset=utf-8")
    for path in ("/static/index.html", "/static/nope.js", "/static/..%2Fdashboard.py"):
        status, headers, body = get(path)
        assert status == 404, path
        assert "error" in json.loads(body)


def test_page_says_what_it_lacks(plane: Mesh, dashboard: Callable[[str], Page]) -> None:
    """Without accounting (a control plane that serves no /api/v1/isolation) every group says
    so; when the API stops answering, the page says it is not updating, and recovers."""
    tab = dashboard("about:blank")
    page = tab.page
    page.route(
        "**/api/v1/isolation",
        lambda route: route.fulfill(
            status=404, content_type="application/json", body='{"error": "Not Found"}'
        ),
    )
    page.goto(plane.url + "/")
    chain = page.locator('[data-chain="fund-yield"]')
    chain.locator('[data-k="no-data"]').first.wait_for()
    assert chain.locator('[data-k="no-data"]').count() == len(CHAIN) * len(GROUPS)
    assert set(chain.locator('[data-k="no-data"]').all_inner_texts()) == {"no traffic data yet"}
    assert "no traffic data yet" in page.locator("#summary").inner_text()

    failing = {"on": True}

    def status(route: Any) -> None:
        if failing["on"]:
            route.fulfill(status=503, content_type="application/json", body='{"error": "down"}')
        else:
            route.continue_()

    page.route("**/api/v1/status", status)
    live = page.locator("#live")
    wait_until(lambda: live.get_attribute("data-state") == "error", PAGE_TIMEOUT, "an error")
    assert "not updating" in live.inner_text() and "503" in live.inner_text()
    failing["on"] = False
    wait_until(lambda: live.get_attribute("data-state") == "ok", PAGE_TIMEOUT, "live again")
    assert tab.errors == [] or all("503" in error for error in tab.errors)


def test_leaks_and_warnings_stand_out(plane: Mesh, dashboard: Callable[[str], Page]) -> None:
    """The accounting's answer with a leak, a fallback, an uncovered hop and a propagation
    break written into it (the real ones need a misregistered instance: the accounting's own
    tests make one): the page shows each where a person looks for it."""
    tab = dashboard("about:blank")
    page = tab.page

    def doctored(route: Any) -> None:
        body = route.fetch().json()
        [chain] = [c for c in body["chains"] if c["name"] == "fund-yield"]
        task = chain["hops"][1]["groups"][0]
        task.update(leaks=3, fallbacks={"no_instance": 2})
        body["uncovered"] = [
            {"chain": "fund-yield", "service": "ledger-svc", "group": "default", "requests": 7}
        ]
        body["propagation_breaks"] = [
            {"chain": "fund-yield", "service": "account-svc", "group": "task", "to": "nav-pricing"}
        ]
        body["totals"].update(leaks=3, outside_mesh=5, outside_mesh_refused=2)
        route.fulfill(status=200, content_type="application/json", body=json.dumps(body))

    page.route("**/api/v1/isolation", doctored)
    page.goto(plane.url + "/")
    leaks = page.locator(f"{group_selector('fund-yield', 'account-svc', 'task')} [data-k=leaks]")
    leaks.wait_for()
    assert leaks.get_attribute("data-value") == "3"
    assert "bad" in leaks.get_attribute("class")
    assert leaks.evaluate("el => getComputedStyle(el).color") == "rgb(180, 35, 24)"  # --bad
    fallbacks = page.locator(
        f"{group_selector('fund-yield', 'account-svc', 'task')} .counter[title*=no_instance]"
    )
    assert fallbacks.inner_text().split() == ["fallbacks", "2"]
    assert page.locator('#chain-table tr[data-chain-row="fund-yield"] td.bad').inner_text() == "3"
    warnings = page.locator("#warnings").inner_text()
    assert "Uncovered hops (1)" in warnings and "ledger-svc" in warnings
    assert "Propagation breaks (1)" in warnings and "called nav-pricing without the dye" in warnings
    # Calls outside the mesh are counted apart: passed through is no warning, refused is.
    stats = {
        stat.locator("dt").text_content(): (
            stat.locator("dd").inner_text(),
            stat.get_attribute("class"),
        )
        for stat in page.locator("#summary .stat").all()
    }
    assert stats["Outside the mesh"] == ("5", "stat ")
    assert stats["Refused outside the mesh"] == ("2", "stat warn")
    assert tab.errors == []


def test_a_sidecar_of_an_unknown_service_is_marked(
    plane: Mesh, dashboard: Callable[[str], Page], tmp_path: Path
) -> None:
    """A real Envoy whose service no rule defines: its row says UNKNOWN SERVICE."""
    with plane.plane.sidecar(tmp_path / "ghost", "ghost|default") as ghost:
        ghost.wait_ready()
        tab = dashboard(plane.url + "/")
        row = tab.page.locator('#sidecars tbody tr[data-node="ghost|default|test"]')
        row.wait_for()
        assert row.locator("td").first.inner_text() == "ghost UNKNOWN SERVICE"
        assert tab.errors == []


def test_sidecars_show_their_scope_and_why(
    plane: Mesh, dashboard: Callable[[str], Page], tmp_path: Path
) -> None:
    """Real Envoys: fund-facade's holds the chain's later hops; nav-pricing's gets the
    service it calls on demand."""
    facade = plane.plane.sidecar(tmp_path / "facade", "fund-facade|task")
    pricing = plane.plane.sidecar(tmp_path / "pricing", "nav-pricing|default")
    with facade, pricing:
        facade.wait_ready()
        pricing.wait_ready()
        tab = dashboard(plane.url + "/")
        cell = tab.page.locator('#sidecars tbody tr[data-node="fund-facade|task|test"] td.scope')
        wait_until(lambda: cell.locator("summary").inner_text() == "2", PAGE_TIMEOUT, "2 hops")
        cell.locator("summary").click()
        assert cell.locator("li").all_inner_texts() == [
            "account-svc chain fund-yield",
            "nav-pricing chain fund-yield",
        ]
        learned = tab.page.locator(
            '#sidecars tbody tr[data-node="nav-pricing|default|test"] td.scope'
        )
        assert learned.locator("summary").inner_text() == "0"
        # nav-pricing's app calls fund-facade (no instance answers: the call is still made).
        egress = pricing.parts["sidecar.yaml"]["egress_port"]
        assert send(egress, False)[0] == 503
        wait_until(lambda: learned.locator("summary").inner_text() == "1", PAGE_TIMEOUT, "learned")
        learned.locator("summary").click()
        [entry] = learned.locator("li").all()
        assert entry.get_attribute("data-reason") == "on-demand"
        assert entry.inner_text().startswith("fund-facade on-demand since ")
        assert "last seen" in entry.inner_text()
        tab.next_poll()  # an open cell stays open across polls
        assert learned.locator("details").get_attribute("open") is not None
        assert tab.errors == []


def test_a_staged_rollout_and_how_it_ended_show(
    plane: Mesh, dashboard: Callable[[str], Page]
) -> None:
    """A rollout in progress shows its verdict and both cohorts; once aborted, the outcome."""
    loose = DEMO_RULES.read_text().replace("fallback: strict", "fallback: loose")
    code, body = plane.request(
        "POST",
        "/api/v1/apply",
        {"files": [{"name": "loose.yaml", "text": loose}], "canary": {"percent": 25}},
    )
    assert code == 200 and "rollout" in body, body
    tab = dashboard(plane.url + "/")
    current = tab.page.locator('[data-rollout="current"]')
    current.wait_for()
    assert (
        current.locator("h3")
        .inner_text()
        .startswith(
            f"Rollout of revision {body['rollout']['revision']}: 25% of each role's sidecars"
        )
    )
    assert (
        current.locator('[data-verdict="wait"]')
        .inner_text()
        .startswith("verdict so far: wait: 0 of 20 canary requests seen")
    )
    assert current.locator("tbody tr").all_inner_texts() == [
        "canary\t0\t0\t0\t0\t0",
        "stable\t0\t0\t0\t0\t0",
    ]
    assert plane.request("POST", "/api/v1/rollout/abort", {})[0] == 200
    last = tab.page.locator('[data-rollout="last"][data-outcome="aborted"]')
    last.wait_for()
    assert "aborted" in last.inner_text() and "aborted by hand" in last.inner_text()
    assert current.count() == 0 and tab.errors == []
