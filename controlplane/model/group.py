"""One (service, group) pair: a role of sidecars, an EDS cluster, a target of the scaler.

Written `service|group` in Envoy's names (a role's snapshot key, a cluster name) and in the
API. Neither a service nor a group name may hold `|` (they are DNS labels), so the text parses
back exactly; a longer name such as the loose cluster `service|group|loose` parses to its pair.
"""

from __future__ import annotations

from typing import NamedTuple

SEPARATOR = "|"
DEFAULT_GROUP = "default"  # the online group every service has


class GroupKey(NamedTuple):
    """A tuple, so code and JSON that hold `(service, group)` pairs keep working with it."""

    service: str
    group: str

    def __str__(self) -> str:
        return f"{self.service}{SEPARATOR}{self.group}"

    def node_id(self, instance: str) -> str:
        """The Envoy node id of one instance of the pair: `service|group|instance`."""
        return f"{self}{SEPARATOR}{instance}"

    @classmethod
    def parse(cls, text: str) -> GroupKey:
        """`service|group[|...]` -> its pair; a missing group is ""."""
        service, _, rest = text.partition(SEPARATOR)
        return cls(service, rest.partition(SEPARATOR)[0])
