"""The control plane as one object: etcd, the store, the xDS server and the HTTP API.

It is the API's context (api/context.py): the handlers see only that narrow seam.

`tasklane up` (and later the demo and in-process tests) need the same pieces started in the
same order and stopped in the reverse one, with nothing left running when a step fails.
The sync (rules and instances in etcd -> snapshots) publishes its first build before xDS
serves. Components added later (scaler) get `store`, `cache` and `status` from here and
register their HTTP routes on `http_app` before `start()`. Every replica serves xDS and the
APIs; `leadership` says which one runs the scaler.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from grpc import aio as grpc_aio

from controlplane import pki
from controlplane.announce import Announcements
from controlplane.api import auth
from controlplane.api import dashboard as dashboard_api
from controlplane.api import instances as instances_api
from controlplane.api import isolation as isolation_api
from controlplane.api import probe as probe_api
from controlplane.api import profile as profile_api
from controlplane.api import queues as queues_api
from controlplane.api import rollout as rollout_api
from controlplane.api import rules as rules_api
from controlplane.api import scope as scope_api
from controlplane.api import tasks as tasks_api
from controlplane.api.http import build_app
from controlplane.api.task_service import TaskService
from controlplane.api.token import ApiToken
from controlplane.canary import Cohorts, Judge
from controlplane.errors import RuntimeFailure, StoreError
from controlplane.inject.pod import InjectOptions
from controlplane.inject.webhook import server_ssl_context, start_webhook
from controlplane.model.group import GroupKey
from controlplane.model.instance import KEEPALIVE_INTERVAL, group_key_of
from controlplane.model.rules import RuleSet
from controlplane.model.scope import DEFAULT_IDLE, LEARNED, ON_DEMAND
from controlplane.queues import Delivery
from controlplane.runtime.etcd import EmbeddedEtcd
from controlplane.runtime.memory import collect_young, tune_gc
from controlplane.runtime.ports import port_in_use
from controlplane.scaler.actuators import Actuator
from controlplane.scaler.policy import PolicyConfig
from controlplane.scaler.reconcile import Scaler
from controlplane.store.etcd import Store
from controlplane.store.leader import Leadership
from controlplane.store.rules import DEFAULT_HISTORY_LIMIT, Candidate
from controlplane.store.scope import ScopeRecorder, expire_sightings
from controlplane.sync import Sync
from controlplane.telemetry import Telemetry
from controlplane.telemetry.probe import Probes
from controlplane.telemetry.report import isolation_report
from controlplane.translate import Translator
from controlplane.xds.cache import SnapshotCache
from controlplane.xds.names import ALLOW_ANY, STATIC_CLUSTERS, full_view
from controlplane.xds.server import (
    AdsServer,
    Observer,
    Observers,
    serve,
)
from controlplane.xds.status import StatusBoard

log = logging.getLogger(__name__)

# Embedded etcd listens on loopback only: it has no auth, and only the control plane uses it.
ETCD_HOST = "127.0.0.1"
# Sidecars hold ADS streams open forever; give them this long to see the server go away.
GRPC_STOP_GRACE = 1.0
# The longest request line the API reads (aiohttp's default is 8190 bytes).
MAX_REQUEST_LINE = 65_536
# Requests still running when the HTTP server stops get this long to finish.
HTTP_STOP_GRACE = 2.0
# After a restart longer than an instance lease's TTL, the registry is empty until each
# `tasklane run` renews (every KEEPALIVE_INTERVAL), finds its lease gone and registers again:
# sidecars sent a snapshot meanwhile would drop every endpoint (measured: 20 % of requests
# failed with the control plane down for 6 s). They keep their last config while xDS is not
# served, so serving it one keep-alive later costs nothing.
REGISTRATION_GRACE = KEEPALIVE_INTERVAL + 0.5
# The leadership replicas compete for: only its holder runs the scaler.
SCALER = "scaler"
# Idle sightings are swept this often at most (and ten times per idle time at least).
SCOPE_SWEEP_MAX = 60.0


class ControlPlane:
    """Starts and stops everything `tasklane up` runs.

    etcd_endpoint None runs an embedded etcd with its data under `state_dir/etcd`;
    `state_dir/api-token` holds the token every write must carry (api/auth.py).
    Port 0 for xDS or HTTP binds a free port; `xds_port`/`http_port` hold the bound ones.
    """

    def __init__(
        self,
        state_dir: Path = Path(".tasklane"),
        *,
        etcd_endpoint: str | None = None,
        host: str = "127.0.0.1",
        xds_port: int = 18000,
        http_port: int = 8080,
        etcd_client_port: int = 2379,
        etcd_peer_port: int = 2380,
        actuator: Callable[[ControlPlane], Actuator] | None = None,
        scaler_config: PolicyConfig | None = None,
        tls_dir: Path | None = None,
        accept_announce: bool = False,
        webhook_port: int | None = None,
        inject_options: InjectOptions | None = None,
        registration_grace: float = REGISTRATION_GRACE,
        outbound_policy: str = ALLOW_ANY,
        scope_idle: float = DEFAULT_IDLE,
        history_limit: int = DEFAULT_HISTORY_LIMIT,
    ) -> None:
        """`actuator` makes the one the scaler drives once the API is up (a local one needs
        its address); None runs no scaler. Only the elected leader among replicas scales.
        `tls_dir` (pki.py) makes the xDS port, and so ADS, ALS and the TaskService, TLS only,
        for clients with a certificate from its CA; it is read here, so a missing or bad file
        is a TlsError before anything starts. `accept_announce` registers the instances
        sidecars announce on their xDS stream (announce.py). `webhook_port` serves the sidecar
        injector (inject/webhook.py) over HTTPS with tls_dir's server certificate, injecting
        sidecars made of `inject_options`. xDS serves `registration_grace` seconds after the
        API, so that `tasklane run` instances register again after a restart first.
        `outbound_policy` says what sidecars do with hosts outside the mesh
        (translate/egress.py). A service a role's sidecars called leaves the role's scope
        after `scope_idle` seconds without a call (model/scope.py). The rules'
        history keeps the last `history_limit` revisions."""
        self.scope_idle = scope_idle
        self.scope_recorder: ScopeRecorder | None = None
        self._scope_sweeper: asyncio.Task | None = None
        self.registration_grace = registration_grace
        self._xds_credentials = None if tls_dir is None else _server_credentials(tls_dir)
        self.webhook_port = webhook_port
        self._webhook_tls: ssl.SSLContext | None = None
        if webhook_port is not None:
            if tls_dir is None:
                raise pki.TlsError("the sidecar injector is served over HTTPS: give --tls-dir")
            self._webhook_tls = server_ssl_context(tls_dir)
        self._inject_options = inject_options or InjectOptions()
        self._webhook: web.AppRunner | None = None
        self._collector: asyncio.Task | None = None
        self.host = host
        self.xds_port = xds_port
        self.http_port = http_port
        self.etcd: EmbeddedEtcd | None = None
        if etcd_endpoint is None:
            self.etcd = EmbeddedEtcd(
                Path(state_dir) / "etcd", etcd_client_port, etcd_peer_port, ETCD_HOST
            )
            etcd_endpoint = self.etcd.endpoint
        self.etcd_endpoint = etcd_endpoint
        # A sidecar of a role no rule defines gets listeners that answer 503 and say why.
        self.cache = SnapshotCache(STATIC_CLUSTERS, fallback=lambda key: self.sync.fallback(key))
        self.sync = Sync(
            self.cache,
            Translator(outbound_policy),
            on_sighted=self._asked,
            on_rollout=self._rollout_published,
        )
        self.status_board = StatusBoard()
        self.cohorts = Cohorts(self.status_board)  # a staged rollout's canaries (canary.py)
        # Access logs, isolation accounting and Prometheus metrics (xDS events come through
        # the ADS server's observer; ALS shares the xDS gRPC port).
        self.telemetry = Telemetry(
            lambda: self.sync.rules,
            self._registered,
            self.status_board,
            self.scaler_status,
            learned=self._learned,
        )
        self._registered_memo: tuple[frozenset[str], dict[GroupKey, int]] | None = None
        self.announcements = Announcements(lambda: self.store) if accept_announce else None
        observer: Observer = self.telemetry.metrics.xds  # called on every push: no fan-out
        if self.announcements is not None:  # unless announcements need the stream events too
            observer = Observers(observer, self.announcements)
        self.ads = AdsServer(
            self.cache,
            self.status_board,
            observer,
            self.sync,
            sotw_view=full_view,
            canary=self.cohorts.canary,
        )
        self.judge = Judge(
            self.cohorts,
            lambda: (self.telemetry.canary.tallies, self.telemetry.canary.since),
            history_limit,
        )
        self.api_token = ApiToken(Path(state_dir))
        self.http_app: web.Application = build_app(self)
        self.http_app.middlewares.append(auth.middleware(self.api_token))
        self.http_app.add_routes(rules_api.routes(self, history_limit))
        self.http_app.add_routes(instances_api.routes(self))
        self.http_app.add_routes(tasks_api.routes(self))
        self.http_app.add_routes(profile_api.routes(self))
        self.http_app.add_routes(isolation_api.routes(self))
        self.http_app.add_routes(queues_api.routes(self))
        self.http_app.add_routes(scope_api.routes(self))
        self.http_app.add_routes(rollout_api.routes(self, history_limit))
        self.http_app.add_routes(probe_api.routes(self))
        self.http_app.add_routes(dashboard_api.routes())
        self.task_service = TaskService(self)
        self._store: Store | None = None
        self._leadership: Leadership | None = None
        self._grpc: grpc_aio.Server | None = None
        self._http: web.AppRunner | None = None
        self._make_actuator = actuator
        self._scaler_config = scaler_config
        self.scaler: Scaler | None = None

    @property
    def store(self) -> Store:
        """The etcd store; only between start() and stop()."""
        if self._store is None:
            raise StoreError("the control plane is not running: no etcd connection")
        return self._store

    @property
    def leadership(self) -> Leadership:
        """This replica's candidacy to run the scaler; only between start() and stop()."""
        if self._leadership is None:
            raise StoreError("the control plane is not running: no leader election")
        return self._leadership

    async def start(self) -> None:
        """Start etcd (if embedded), connect the store, then serve xDS and HTTP.

        Call it from the main thread: the kernel kills the embedded etcd when the *thread*
        that started it exits (PR_SET_PDEATHSIG, see runtime/process.py). On any failure
        everything already started is stopped.
        """
        self._check_ports()
        tune_gc()
        self._collector = asyncio.create_task(collect_young())
        try:
            self.api_token.load()
            if self.etcd is not None:
                self.etcd.start()  # blocks the loop briefly; nothing else is serving yet
            self._store = Store.connect(self.etcd_endpoint)
            self.scope_recorder = ScopeRecorder(self._store, self.scope_idle)
            self.scope_recorder.start()
            self._scope_sweeper = asyncio.create_task(self._sweep_scopes(self._store))
            await self.sync.start(self._store)  # the first snapshots exist before xDS serves
            self.judge.start(self._store)
            leadership = Leadership(self._store, SCALER)
            await asyncio.to_thread(leadership.start)
            self._leadership = leadership
            await self._start_http()
            # Instances whose leases lapsed while no control plane ran (they renew through
            # this API) register again before any sidecar is sent a snapshot without them.
            await asyncio.sleep(self.registration_grace)
            await self._start_xds()
            if self.webhook_port is not None and self._webhook_tls is not None:
                self._webhook = await start_webhook(
                    self.host, self.webhook_port, self._webhook_tls, self._inject_options
                )
                self.webhook_port = self._webhook.addresses[0][1]
            if self._make_actuator is not None:
                self.scaler = Scaler(
                    self._make_actuator(self),
                    lambda: self.sync.rules,
                    lambda: leadership.is_leader,
                    self._scaler_config,
                )
                self.scaler.start(self._store)
        except BaseException:
            await self.stop()
            raise
        log.info("control plane running (etcd at %s)", self.etcd_endpoint)

    # --- the API's context (api/context.py) ----------------------------------------------

    def rules(self) -> RuleSet:
        return self.sync.rules

    async def published(self, key: str, present: bool, timeout: float) -> bool:
        return await self.sync.wait_until(
            lambda: (key in self.sync.instance_keys) == present, timeout
        )

    def status(self) -> dict[str, Any]:
        return {
            "etcd": {"endpoint": self.etcd_endpoint, "embedded": self.etcd is not None},
            "xds": self.xds_status(),
            "roles": self.cache.roles(),
            "nodes": [
                node.to_json(unknown_service=not self.cache.published(node.role))
                for node in self.status_board.nodes()
            ],
            "sync": self.sync.status(),
            "leadership": self.leadership.to_json(),
            "scaler": self.scaler_status(),
        }

    def isolation(self) -> dict[str, Any]:
        return isolation_report(self.telemetry.accounting, self.telemetry.queues)

    def deliveries(self, deliveries: list[Delivery]) -> None:
        self.telemetry.queues.ingest(deliveries)

    def metrics(self) -> tuple[bytes, str]:
        return self.telemetry.metrics.render()

    @property
    def probes(self) -> Probes:
        return self.telemetry.probes

    @property
    def xds_tls(self) -> bool:
        """True when the xDS port serves TLS only, to clients with a certificate."""
        return self._xds_credentials is not None

    def xds_status(self) -> dict:
        """Where xDS is served, and `"tls": true` when it requires TLS (clients then need
        --tls-dir): the `xds` member of GET /api/v1/status, unchanged for plaintext."""
        status: dict = {"address": f"{self.host}:{self.xds_port}"}
        if self.xds_tls:
            status["tls"] = True
        return status

    def _check_ports(self) -> None:
        """Fail before starting anything when a port is taken, e.g. by another `tasklane up`.

        Needed for xDS in particular: gRPC binds with SO_REUSEPORT, so a second server on the
        same port would start without error and share the connections.
        """
        wanted = [(self.xds_port, "xDS", self.host), (self.http_port, "HTTP", self.host)]
        if self.webhook_port is not None:
            wanted.append((self.webhook_port, "webhook", self.host))
        if self.etcd is not None:
            wanted += [
                (self.etcd.client_port, "etcd client", ETCD_HOST),
                (self.etcd.peer_port, "etcd peer", ETCD_HOST),
            ]
        seen: dict[int, str] = {}
        for port, label, host in wanted:
            if port and port in seen:
                raise RuntimeFailure(f"port {port} is given for both {seen[port]} and {label}")
            seen[port] = label
            if port and port_in_use(port, host):
                raise RuntimeFailure(
                    f"port {port} ({label}) is already in use: is another `tasklane up` running?"
                )

    async def _start_xds(self) -> None:
        address = f"{self.host}:{self.xds_port}"
        try:
            self._grpc, self.xds_port = await serve(
                self.ads,
                address,
                extra_handlers=(
                    auth.guard(self.task_service.handler(), self.api_token),
                    # Envoy streams access logs with no token, as it connects for xDS.
                    self.telemetry.access_logs.handler(),
                ),
                credentials=self._xds_credentials,
            )
        except (OSError, RuntimeError) as exc:
            raise RuntimeFailure(f"cannot serve xDS on {address}: {exc}") from exc

    def rollout(self) -> dict[str, Any] | None:
        return self.judge.status()

    def _rollout_published(self, candidate: Candidate | None, problem: str) -> None:
        """Sync published the views of `candidate` (None: no rollout): follow it, or, when
        its views could not be served, have it aborted and keep every sidecar as it is."""
        if candidate is not None and problem:
            self.judge.unbuildable[candidate.rollout.generation] = f"not served: {problem}"
            candidate = None
        rollout = candidate.rollout if candidate is not None else None
        if not self.cohorts.start(rollout):
            return
        if candidate is None:
            self.telemetry.canary.stop()
        else:
            self.telemetry.canary.start(
                candidate.rollout.generation,
                self.sync.rules,
                candidate.rules,
                self.cohorts.cohort_of,
                time.time(),
            )
        self.ads.rekey()

    def _registered(self) -> dict[GroupKey, int]:
        """Instances per (service, group) in the last published build, from their registry
        keys (`.../<service>/<group>/<id>`); recounted only when the build changed them."""
        keys = self.sync.instance_keys
        if self._registered_memo is None or self._registered_memo[0] is not keys:
            counts: dict[GroupKey, int] = {}
            for key in keys:
                group = group_key_of(key)
                counts[group] = counts.get(group, 0) + 1
            self._registered_memo = (keys, counts)
        return self._registered_memo[1]

    def _asked(self, role: GroupKey, callee: str) -> None:
        """A sidecar of `role` asked for `callee` on demand: keep it in the role's scope."""
        if self.scope_recorder is not None:
            self.scope_recorder.offer(role, callee, ON_DEMAND, time.time())

    def _learned(self, role: GroupKey, callee: str, now: float) -> None:
        """The access logs show `role` calling `callee`: keep it in the role's scope."""
        if self.scope_recorder is not None:
            self.scope_recorder.offer(role, callee, LEARNED, now)

    async def _sweep_scopes(self, store: Store) -> None:
        """Delete idle sightings, on every replica: each delete is guarded (store/scope.py)."""
        interval = min(self.scope_idle / 10, SCOPE_SWEEP_MAX)
        while True:
            await asyncio.sleep(interval)
            try:
                gone = await asyncio.to_thread(
                    expire_sightings, store, time.time(), self.scope_idle
                )
            except StoreError as exc:
                log.warning("cannot expire idle scope entries (retrying): %s", exc)
                continue
            if gone:
                log.info("%d idle scope entries expired", gone)

    def scaler_status(self) -> dict | None:
        return self.scaler.status() if self.scaler is not None else None

    async def _start_http(self) -> None:
        self._http = web.AppRunner(
            self.http_app,
            access_log=None,
            shutdown_timeout=HTTP_STOP_GRACE,
            # aiohttp answers a longer request line itself, in text/plain; up to this our
            # handlers answer, with the API's one-line JSON error (e.g. a 10 KB name).
            max_line_size=MAX_REQUEST_LINE,
        )
        await self._http.setup()
        try:
            await web.TCPSite(self._http, self.host, self.http_port).start()
        except OSError as exc:
            raise RuntimeFailure(
                f"cannot serve HTTP on {self.host}:{self.http_port}: {exc.strerror or exc}"
            ) from exc
        self.http_port = self._http.addresses[0][1]

    async def stop(self) -> None:
        """Stop HTTP, gRPC, the sync, leave the leader election (the next replica leads at
        once), close the store, then stop etcd. Safe to call twice."""
        if self._collector is not None:
            self._collector.cancel()
            self._collector = None
        if self._scope_sweeper is not None:
            self._scope_sweeper.cancel()
            self._scope_sweeper = None
        for runner in (self._webhook, self._http):
            if runner is not None:
                await runner.cleanup()
        self._webhook = self._http = None
        if self.announcements is not None:
            await asyncio.to_thread(self.announcements.stop)
        if self._grpc is not None:
            await self._grpc.stop(GRPC_STOP_GRACE)
            self._grpc = None
        await self.judge.stop()
        await self.sync.stop()
        if self.scope_recorder is not None:
            await asyncio.to_thread(self.scope_recorder.stop)
            self.scope_recorder = None
        if self.scaler is not None:
            await self.scaler.stop()  # stops what its actuator started
            self.scaler = None
        if self._leadership is not None:
            try:
                await asyncio.to_thread(self._leadership.stop)
            except StoreError as exc:  # our key then leaves with its lease, one TTL later
                log.warning("%s", exc)
            self._leadership = None
        if self._store is not None:
            try:
                self._store.close()
            except StoreError as exc:  # etcd already gone: nothing left to release
                log.warning("%s", exc)
            self._store = None
        if self.etcd is not None:
            self.etcd.stop()


def _server_credentials(tls_dir: Path) -> grpc.ServerCredentials:
    """The xDS port's TLS: the server certificate, and only clients whose certificate the CA
    signed get past the handshake."""
    ca, cert, key = pki.server_files(tls_dir).read()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )
