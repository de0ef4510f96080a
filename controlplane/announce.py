"""Instances announced by their sidecar: registered while its xDS stream lasts.

A pod (injected by `tasklane inject` or the webhook) or a compose service has no `tasklane
run` to register it through the HTTP API. Its Envoy says where it can be reached in its node
metadata (`tasklane.announce: "<ip>:<port>"`, see runtime/envoy.render_bootstrap), and the
replica holding its ADS stream keeps it in the registry under a lease: revoked when the
stream ends, so callers drop the endpoint at once, and left to expire when this replica
stops, so the sidecar has one TTL to reconnect to another replica, which registers it again
under the same key without a gap.

Callers still route to it only once their health checks through its sidecar pass (the app
accepts connections), as for any instance. Off unless `tasklane up --accept-announce`: an
announcement is not authenticated by the API token, only by the xDS port's TLS when on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from envoy.config.core.v3 import base_pb2

from controlplane.errors import StoreError
from controlplane.model.instance import DEFAULT_TTL, Instance
from controlplane.store.etcd import Store
from controlplane.store.registry import Registration, register
from controlplane.xds.names import META_ANNOUNCE, META_GROUP, META_SERVICE
from controlplane.xds.server import Observer
from controlplane.xds.status import NodeStatus

log = logging.getLogger(__name__)


def announced(identity: base_pb2.Node, now: float) -> Instance | None:
    """The instance a node announces, or None when it announces none.

    ValueError naming what is wrong for an announcement that cannot be registered.
    """
    fields = identity.metadata.fields
    if META_ANNOUNCE not in fields:
        return None
    address = fields[META_ANNOUNCE].string_value
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{META_ANNOUNCE} must be '<ip>:<port>', not {address[:60]!r}")
    service = fields[META_SERVICE].string_value if META_SERVICE in fields else ""
    group = fields[META_GROUP].string_value if META_GROUP in fields else ""
    return Instance.from_json(
        {
            "id": identity.id,
            "service": service,
            "group": group,
            "host": host.strip("[]"),
            "inbound_port": int(port),
            # Known to the pod only; 0 says so (the scaler reads in-flight requests from
            # local sidecars' admin ports alone).
            "app_port": 0,
            "admin_port": 0,
            "egress_port": 0,
            "pid": 0,
            "started_at": now,
        }
    )


class Announcements(Observer):
    """Keeps announced instances registered; an Observer of the ADS server.

    Hooks run on the event loop and must not block: etcd work goes to one worker thread, in
    order, so a stream that closes right after it opened is registered and then removed.
    """

    def __init__(self, store: Callable[[], Store], ttl: int = DEFAULT_TTL) -> None:
        self._store = store
        self._ttl = ttl
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="announce")
        self._held: dict[int, Registration] = {}  # by stream id; the worker's alone
        self._lock = threading.Lock()  # no submit after the worker's shutdown
        self._stopping = False

    def _submit(self, task: Callable[..., None], *args: object) -> None:
        with self._lock:
            if not self._stopping:
                self._worker.submit(task, *args)

    def opened(self, node: NodeStatus, identity: base_pb2.Node) -> None:
        try:
            instance = announced(identity, time.time())
        except ValueError as exc:
            log.warning("node %s: announcement ignored: %s", node.node_id, exc)
            return
        if instance is not None:
            self._submit(self._register, node.stream_id, instance)

    def closed(self, node: NodeStatus) -> None:
        self._submit(self._deregister, node.stream_id)

    def _register(self, stream_id: int, instance: Instance) -> None:
        try:
            self._held[stream_id] = register(self._store(), instance, self._ttl)
        except StoreError as exc:
            log.warning("cannot register announced %s: %s", instance.key, exc)
            return
        log.info("registered announced %s at %s:%d", instance.key, *instance.address)

    def _deregister(self, stream_id: int) -> None:
        registration = self._held.pop(stream_id, None)
        if registration is None:
            return
        key = registration.instance.key
        try:
            registration.close()
        except StoreError as exc:
            log.warning("cannot remove %s (it expires with its lease): %s", key, exc)
            return
        log.info("removed announced %s: its stream ended", key)

    def stop(self) -> None:
        """Stop renewing without revoking: each announced instance stays one TTL, for its
        sidecar to reach another replica. Call before the xDS server stops."""
        with self._lock:
            self._stopping = True
        self._worker.shutdown(wait=True)
        for registration in self._held.values():
            registration.abandon()
        self._held.clear()
