"""Rules and registered instances -> the Envoy resources of every sidecar role.

What each sidecar of (service S, group G) gets:

- clusters `D|g` (EDS) for every group g of every service D, and an aggregate `D|G|loose`
  for every `loose` hop (it fails over to `D|default` when the group has no *healthy* host;
  Envoy's subset fallback does not look at health, envoy#25654);
- route config `egress`: one virtual host per destination service D. Chains with a hop on D
  match their dyes in a `VirtualHost.matcher` (a flat list of steps, each an exact and a
  prefix map on one dye header: lookup cost does not grow with the number of chains, see
  matcher.py), then the same maps on the header the listener's baggage filter fills in from
  the `baggage` member (baggage.py); everything else goes to `D|default`. A dyed request
  that falls back to `default`, or that no instance can serve (503), is told why. A route
  retries as its hop says (`retries`), else as the Service says; a retry goes to another
  instance when there is one (`previous_hosts`). Any other host
  (`*`) is outside the mesh: passed through, plain HTTP and CONNECT tunnels alike, to the
  sidecar's dynamic forward proxy cluster (`ALLOW_ANY`), or refused with a reason
  (`REGISTRY_ONLY`); the gateway's `egress` has no such host;
- route config `inbound`: on a task group, only dyes of chains that use (S, G) reach the app,
  each with the hop's rate limit; anything else gets 403 and a reason. `default` accepts all.

Only `inbound` differs between roles, so clusters, endpoints and `egress` are built once and
shared by every snapshot (serialised once). Each piece is memoised on its inputs, so after a
change only the touched virtual hosts, clusters and inbound routes are rebuilt.

Pure (no I/O): the modules are `clusters`, `matcher` (the dye matcher), `baggage` (the
listeners' baggage filter), `egress`, `inbound`,
`gateway` (the gateway's dye filter), `unknown` (what a sidecar of an undefined role gets)
and `translator` (assembly and memoisation). The output is xds's Snapshot and Resource.
"""

from controlplane.translate.common import Endpoints
from controlplane.translate.scope import Asked, Scopes
from controlplane.translate.translator import Translator

__all__ = ["Asked", "Endpoints", "Scopes", "Translator"]
