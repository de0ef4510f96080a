"""A small real mesh for routing tests: demo chain apps behind real Envoy sidecars, fed by the
real ADS server from rules through the real translator.

It skips etcd and `tasklane run` (their own tests cover them) so that routing tests start in a
second and measure only routing: what each request returned, hop by hop. Like the control
plane, the ADS port also serves the AccessLogService: `mesh.isolation()` is the accounting of
what the sidecars logged, `mesh.metrics_text()` its Prometheus page.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from controlplane.errors import RuntimeFailure
from controlplane.model.load import load_text
from controlplane.model.rules import RuleSet
from controlplane.model.validate import apply
from controlplane.runtime.envoy import EnvoyProcess
from controlplane.runtime.ports import free_port
from controlplane.sync import full_views
from controlplane.telemetry import Telemetry
from controlplane.telemetry.report import isolation_report
from controlplane.translate import Asked, Translator
from controlplane.xds.cache import SnapshotCache
from controlplane.xds.names import ALLOW_ANY, HEALTH_PATH, STATIC_CLUSTERS, full_view, view_role
from controlplane.xds.server import AdsServer, serve
from controlplane.xds.status import StatusBoard
from demo.chain_app import ChainApp, start_in_thread
from testkit.ads_server import AdsThread, RunningAds
from tests.support.wait import wait_until

# A sidecar whose picked ports another process took first is started again on new ones.
PORT_ATTEMPTS = 3
# (instance name, egress address) -> (app port, stop): how to start an app behind a sidecar.
AppStarter = Callable[[str, tuple[str, int]], tuple[int, Callable[[], None]]]


@dataclass
class Instance:
    service: str
    group: str
    name: str
    app_port: int
    inbound_port: int
    egress_port: int
    envoy: EnvoyProcess
    stop_app: object = field(repr=False)
    app_running: bool = True

    def kill_app(self) -> None:
        """The app dies; its sidecar stays (the worst case for health checking)."""
        if self.app_running:
            self.stop_app()
            self.app_running = False


class _AdsWithLogs(AdsThread):
    """The ADS server with the AccessLogService on the same port, as `tasklane up` serves it
    (the sidecar bootstrap sends access logs to its `xds` cluster)."""

    def __init__(self, telemetry: Telemetry, status: StatusBoard, mesh: Mesh) -> None:
        super().__init__(observer=telemetry.metrics.xds, static_clusters=STATIC_CLUSTERS)
        self.telemetry, self.board, self.mesh = telemetry, status, mesh

    async def _start(self) -> RunningAds:
        self._stack = contextlib.AsyncExitStack()
        cache = SnapshotCache(self.static_clusters)
        cache.on_new_watch = self.mesh.view_wanted
        ads = AdsServer(cache, self.board, self.observer, self.mesh, sotw_view=full_view)
        server, port = await serve(ads, "127.0.0.1:0", (self.telemetry.access_logs.handler(),))
        self._stack.push_async_callback(server.stop, 0)
        return RunningAds(cache, ads, port)


class Mesh:
    """Context manager: an ADS server (with access logs), and instances added with add()."""

    def __init__(
        self, tmp_path: Path, rules_yaml: str, delta: bool = True, outbound_policy: str = ALLOW_ANY
    ) -> None:
        self.tmp_path, self.delta = tmp_path, delta
        self.rules = apply(RuleSet.empty(), load_text(rules_yaml, "rules.yaml"))
        self.translator = Translator(outbound_policy)
        self.asked_hosts = Asked()  # what sidecars asked for on demand, as sync.Sync keeps it
        status = StatusBoard()
        self.telemetry = Telemetry(lambda: self.rules, self.registered, status)
        self.ads = _AdsWithLogs(self.telemetry, status, self)
        self.instances: list[Instance] = []

    def __enter__(self) -> Mesh:
        self.ads.__enter__()
        self.publish()
        return self

    def __exit__(self, *exc) -> None:
        """Stops everything; a NACK from any sidecar fails the test (every generated config
        must be accepted by real Envoys)."""
        try:
            nacks = self.nacks() if exc[0] is None else {}
        finally:
            for instance in self.instances:
                instance.envoy.stop()
                instance.kill_app()
            self.ads.__exit__(*exc)
        assert not nacks, f"Envoy rejected generated config: {nacks}"

    def set_rules(self, rules_yaml: str) -> None:
        self.rules = apply(RuleSet.empty(), load_text(rules_yaml, "rules.yaml"))
        self.publish()

    def registered(self) -> dict[tuple[str, str], int]:
        """Instances per (service, group) as registered (read from the ADS thread)."""
        return Counter((i.service, i.group) for i in list(self.instances))

    def isolation(self) -> dict:
        """The accounting's snapshot (GET /api/v1/isolation of a control plane)."""
        return self.ads.call(isolation_report, self.telemetry.accounting)

    def metrics_text(self) -> str:
        """The Prometheus page (GET /metrics of a control plane)."""
        return self.ads.call(self.telemetry.metrics.render)[0].decode()

    def endpoints(self) -> dict[tuple[str, str], list[tuple[str, int]]]:
        out: dict[tuple[str, str], list[tuple[str, int]]] = {}
        for i in self.instances:
            out.setdefault((i.service, i.group), []).append(("127.0.0.1", i.inbound_port))
        return out

    def publish(self) -> None:
        self.ads.call(self._publish)

    def _publish(self) -> None:
        """Build and publish, as sync.Sync does (on the server's loop)."""
        cache = self.ads.running.cache
        scopes = self.asked_hosts.scopes(full=full_views(cache))
        snapshots = self.translator.build(self.rules, self.endpoints(), scopes)
        outcomes = cache.set_snapshots(snapshots)
        refused = {role: o for role, o in outcomes.items() if isinstance(o, Exception)}
        assert not refused, f"inconsistent snapshots: {refused}"

    def asked(self, node: str, role: str, authority: str) -> bool:
        """The ADS server's OnDemand, as sync.Sync (called on the server's loop)."""
        answer = self.asked_hosts.ask(self.rules, node, role, authority)
        if answer.changed:
            self._publish()
        return answer.comes

    def gone(self, node: str) -> None:
        if self.asked_hosts.gone(node):
            self._publish()

    def view_wanted(self, key: str) -> None:
        if view_role(key)[1] and self.ads.running is not None:
            self._publish()

    def add(
        self,
        service: str,
        group: str,
        next_services: Sequence[str] = (),
        start_app: AppStarter | None = None,
    ) -> Instance:
        """Start an app (a demo ChainApp calling `next_services`, unless `start_app` says how
        to start another one) and its sidecar, register it, wait until the sidecar is ready."""
        name = f"{service}/{group}/{sum(1 for i in self.instances if i.service == service) + 1}"
        for _ in range(PORT_ATTEMPTS):
            instance = self._start(service, group, name, next_services, start_app)
            if instance is not None:
                return instance
        raise AssertionError(f"{name}: no free ports in {PORT_ATTEMPTS} attempts")

    def _start(
        self,
        service: str,
        group: str,
        name: str,
        next_services: Sequence[str],
        start_app: AppStarter | None,
    ) -> Instance | None:
        """The instance, ready; None when another process took a port picked for its sidecar
        first (free ports are only free until bound): the caller picks again."""
        egress, inbound = free_port(), free_port()
        if start_app is None:
            app = ChainApp(service, group, name, list(next_services), ("127.0.0.1", egress))
            app_port, stop_app = start_in_thread(app)
        else:
            app_port, stop_app = start_app(name, ("127.0.0.1", egress))
        envoy = EnvoyProcess(
            node_id=name,
            service=service,
            group=group,
            xds_host="127.0.0.1",
            xds_port=self.ads.port,
            admin_port=free_port(),
            delta=self.delta,
            work_dir=self.tmp_path / name.replace("/", "-"),
            parts={
                "sidecar.yaml": {
                    "egress_port": egress,
                    "inbound_host": "127.0.0.1",
                    "inbound_port": inbound,
                    "app_port": app_port,
                    "health_path": HEALTH_PATH,
                }
            },
        )
        instance = Instance(service, group, name, app_port, inbound, egress, envoy, stop_app)
        self.instances.append(instance)
        envoy.start()
        self.publish()
        try:
            envoy.wait_ready()
            for port in (egress, inbound):  # bound once the config arrived
                wait_until(lambda p=port: _accepts(p), timeout=10, what=f"{name} listens")
        except (RuntimeFailure, AssertionError):
            if "Address already in use" not in envoy.log_tail(200):
                raise
            self.remove(instance)
            return None
        return instance

    def remove(self, instance: Instance) -> None:
        """Deregister and stop an instance (what `tasklane run` does when its app exits)."""
        self.instances.remove(instance)
        self.publish()
        instance.envoy.stop()
        instance.kill_app()

    def nacks(self) -> dict[str, str]:
        """node -> last NACK message, for every connected sidecar that rejected anything."""
        out = {}
        for node in self.ads.call(self.ads.running.ads.status.nodes):
            for type_url, status in node.types.items():
                if status.last_nack is not None:
                    out[f"{node.node_id} {type_url}"] = status.last_nack.message
        return out


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def request(
    port: int, service: str, path: str = "/", headers: dict[str, str] | None = None
) -> tuple[int, dict]:
    """GET through a sidecar's egress listener with `Host: service`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": service, **(headers or {})})
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace")
    finally:
        conn.close()
    try:
        return resp.status, json.loads(body)
    except ValueError:
        return resp.status, {"error": body}


def served_by(answer: dict) -> list[tuple[str, str]]:
    """[(service, group)] of every hop that served a request."""
    return [(hop["service"], hop["group"]) for hop in answer.get("hops", [])]
