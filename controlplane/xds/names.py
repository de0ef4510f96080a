"""Names shared by the translator, the Envoy bootstrap templates and the sidecar runtime.

The sidecar's listeners are static (their ports differ per instance, while one snapshot
serves every instance of a role); the control plane fills in the routes they name.
"""

from controlplane.model.group import SEPARATOR

EGRESS_ROUTE = "egress"  # route config of the egress listener (and of the gateway)
INBOUND_ROUTE = "inbound"  # route config of the inbound listener, in front of the app
LOCAL_APP_CLUSTER = "local-app"  # static cluster of the sidecar: its own app
# Hosts that are no service of the mesh, in Istio's words (no DNS label, so no service's
# name): the sidecar's static dynamic-forward-proxy cluster that reaches them, and the name
# of the egress route that refuses them under REGISTRY_ONLY.
PASSTHROUGH_CLUSTER = "PassthroughCluster"
BLACK_HOLE_ROUTE = "BlackHoleCluster"
PASSTHROUGH_HEADER = "x-tasklane-passthrough"  # on requests passed through (loop detection)
STATIC_CLUSTERS = frozenset({LOCAL_APP_CLUSTER, PASSTHROUGH_CLUSTER})
# What the egress does with those hosts (`tasklane up --outbound-traffic-policy`).
ALLOW_ANY, REGISTRY_ONLY = "ALLOW_ANY", "REGISTRY_ONLY"
OUTBOUND_POLICIES = (ALLOW_ANY, REGISTRY_ONLY)
HEALTH_PATH = "/.tasklane/health"  # answered by the inbound listener from the app's health
# The inbound listener's requests in flight (the scaler's reactive signal): the admin path
# that shows that one stat alone, as Prometheus text (the filter
# `^http\.inbound\.downstream_rq_active$`, percent-encoded so that no client or proxy on the
# way rewrites it), and the metric it is there (the listener's stat prefix `inbound` becomes a
# label). An injected pod's ready listener (templates/pod.yaml) passes on this exact path and
# query, and nothing else of the admin's /stats.
ACTIVE_REQUESTS_PATH = "/stats/prometheus?filter=%5Ehttp%5C.inbound%5C.downstream_rq_active%24"
ACTIVE_REQUESTS_METRIC = "envoy_http_downstream_rq_active"
# The injected sidecar's container port of that ready listener (inject/pod.py): the kubelet's
# probes go there, and the scaler reads a pod's requests in flight there.
READY_PORT_NAME = "tasklane-ready"
GATEWAY_ROLE = "@gateway|default"  # never a service name: names are DNS labels
# The gateway's HTTP filter whose config (the dye names to strip) comes over ECDS, and the
# dynamic metadata namespace in which its trust filter marks a trusted request.
GATEWAY_DYE_FILTER = "tasklane.gateway.dyes"
GATEWAY_TRUST_METADATA = "tasklane.gateway"
# The `baggage` dye, read once per request by the baggage filter (translate/baggage.py) into
# this header as `<baggage key>=<dye>`, on which the dye matcher looks it up; the filter's name
# is also the route metadata namespace that tells it which baggage keys a host reads.
BAGGAGE_DYE_HEADER = "x-tasklane-baggage-dye"
BAGGAGE_FILTER = "tasklane.baggage"
# Fallbacks the caller sees: the response header saying why a dyed request was not served by
# its hop's group (a loose fallback to `default`, or no healthy instance at all), and the
# metadata namespace of the routes and endpoints it is decided from (templates/sidecar.yaml).
FALLBACK_HEADER = "x-tasklane-fallback"
# Its values. Served by `default` instead of the hop's group of a loose chain: the group has
# no registered instance, or none healthy. Not served at all (a 503): a strict chain's group
# has no healthy instance, or neither has a loose chain's group nor `default`.
NO_INSTANCE, UNHEALTHY = "no_instance", "unhealthy"
STRICT_REJECT, UNAVAILABLE = "strict_reject", "unavailable"
TASKLANE_METADATA = "tasklane"
LOCAL_RATE_LIMIT = "envoy.filters.http.local_ratelimit"
# Node metadata of every sidecar (templates/bootstrap.yaml): its role, and optionally the inbound
# address ("host:port") it asks to be registered at while its xDS stream lasts (announce.py).
META_SERVICE, META_GROUP = "tasklane.service", "tasklane.group"
META_ANNOUNCE = "tasklane.announce"


def cluster_name(service: str, group: str) -> str:
    """The EDS cluster of one group of a service, e.g. `account-svc|task` (GroupKey's text,
    written directly: a rebuild names every group's cluster, thousands of times)."""
    return f"{service}{SEPARATOR}{group}"


def loose_cluster_name(service: str, group: str) -> str:
    """The aggregate cluster that fails over from a task group to `default`."""
    return f"{cluster_name(service, group)}{SEPARATOR}loose"


def role_name(service: str, group: str) -> str:
    """The snapshot key of every Delta sidecar of (service, group); see server.role_of."""
    return cluster_name(service, group)


# The snapshot key of a role's state-of-the-world sidecars: they cannot ask for a host on
# demand (VHDS is Delta only), so they hold the whole mesh's config, as before scoping.
_FULL_VIEW = f"{SEPARATOR}full"
# The snapshot key of a rollout's canary sidecars (model/rollout.py): either view above, built
# from the candidate rules. Roles have one separator, so a suffix never makes another role.
_CANARY_VIEW = f"{SEPARATOR}canary"


def full_view(role: str) -> str:
    return role + _FULL_VIEW


def canary_view(key: str) -> str:
    return key + _CANARY_VIEW


def split_canary(key: str) -> tuple[str, bool]:
    """(the view's key without the canary suffix, whether it had one)."""
    if key.endswith(_CANARY_VIEW) and key.count(SEPARATOR) >= 2:
        return key[: -len(_CANARY_VIEW)], True
    return key, False


def view_role(key: str) -> tuple[str, bool]:
    """(role, whether it is the full view) of a snapshot key, canary or not."""
    key = split_canary(key)[0]
    if key.endswith(_FULL_VIEW) and key.count(SEPARATOR) == 2:
        return key[: -len(_FULL_VIEW)], True
    return key, False
