"""The dye matcher: which chain a request's dye names, as a `VirtualHost.matcher` tree of
exact and prefix maps on each dye header and on the baggage filter's header (the `baggage`
member, read once per request: translate/baggage.py), so lookup cost does not grow with the
number of chains.
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.route.v3 import route_components_pb2 as route_pb2
from envoy.type.matcher.v3 import http_inputs_pb2
from xds.core.v3 import extension_pb2
from xds.type.matcher.v3 import matcher_pb2, string_pb2

from controlplane.model.rules import TaskChain
from controlplane.translate.baggage import baggage_carried, keys_metadata
from controlplane.translate.common import packed
from controlplane.xds.names import BAGGAGE_DYE_HEADER


def _header_input(header: str) -> extension_pb2.TypedExtensionConfig:
    match_input = http_inputs_pb2.HttpRequestHeaderMatchInput(header_name=header)
    return extension_pb2.TypedExtensionConfig(name=header, typed_config=packed(match_input))


def _on_route(route: route_pb2.Route) -> matcher_pb2.Matcher.OnMatch:
    return matcher_pb2.Matcher.OnMatch(
        action=extension_pb2.TypedExtensionConfig(name=route.name, typed_config=packed(route))
    )


def bounded_parts(items: Sequence[str], budget: int, separator: str) -> list[list[str]]:
    """`items` in order, cut into runs that joined by `separator` stay within `budget`
    characters; an item longer than the budget has a run of its own."""
    parts: list[list[str]] = [[]]
    used = 0
    for item in items:
        if parts[-1] and used + len(separator) + len(item) > budget:
            parts.append([])
        if not parts[-1]:
            used = -len(separator)
        parts[-1].append(item)
        used += len(separator) + len(item)
    return parts


def _single_predicate(
    header: str, value: string_pb2.StringMatcher
) -> matcher_pb2.Matcher.MatcherList.Predicate:
    single = matcher_pb2.Matcher.MatcherList.Predicate.SinglePredicate(
        input=_header_input(header), value_match=value
    )
    return matcher_pb2.Matcher.MatcherList.Predicate(single_predicate=single)


def _any_value(header: str) -> matcher_pb2.Matcher.MatcherList.Predicate:
    # The matcher API has no predicate that is always true; "not the empty string" is the
    # cheapest (a string compare). The tree behind it decides.
    never = _single_predicate(header, string_pb2.StringMatcher(exact=""))
    return matcher_pb2.Matcher.MatcherList.Predicate(not_matcher=never)


def _step(
    predicate: matcher_pb2.Matcher.MatcherList.Predicate, nested: matcher_pb2.Matcher
) -> matcher_pb2.Matcher.MatcherList.FieldMatcher:
    return matcher_pb2.Matcher.MatcherList.FieldMatcher(
        predicate=predicate, on_match=matcher_pb2.Matcher.OnMatch(matcher=nested)
    )


def dye_host(
    host: route_pb2.VirtualHost,
    entries: Sequence[tuple[TaskChain, route_pb2.Route]],
    otherwise: route_pb2.Route,
) -> None:
    """Make `host` route by dye (dye_matcher); the baggage filter's header stops here."""
    host.matcher.CopyFrom(dye_matcher(entries, otherwise))
    host.request_headers_to_remove.append(BAGGAGE_DYE_HEADER)


def dye_matcher(
    entries: Sequence[tuple[TaskChain, route_pb2.Route]], otherwise: route_pb2.Route
) -> matcher_pb2.Matcher:
    """Route a request by its dye: exact, then prefix maps per dye header name, then the same
    on the baggage dye (BAGGAGE_DYE_HEADER, `<baggage key>=<dye>`), then `otherwise`.

    The steps are one flat list whose nested matchers have no `on_no_match`: one that finds
    nothing falls through to the next step (xds `Matcher.OnMatch.matcher`). Nesting each step
    in the previous one's `on_no_match` instead made the depth grow with the number of header
    names: past ~20 Envoy's JSON parser and past ~24 protobuf (upb, depth 100) refused it.

    `otherwise` carries the baggage keys of the entries' chains in its metadata: the baggage
    filter, which runs after Envoy's first lookup, reads them there and fills in the header
    (a request whose dye header matched has a chain's route and needs no second lookup).
    """
    OnMatch = matcher_pb2.Matcher.OnMatch
    tables: dict[str, tuple[dict[str, OnMatch], dict[str, OnMatch]]] = {}
    for chain, route in entries:
        on_match = _on_route(route)  # packed once, copied into each map
        baggage = baggage_carried(chain.dye.baggage_key, "")
        for header, lead in ((chain.dye.header, ""), (BAGGAGE_DYE_HEADER, baggage)):
            exact, prefix = tables.setdefault(header, ({}, {}))
            for value in chain.dye.exact:
                exact[lead + value] = on_match
            for value in chain.dye.prefixes:
                prefix[lead + value] = on_match
    steps = matcher_pb2.Matcher.MatcherList()
    headers = sorted(tables.keys() - {BAGGAGE_DYE_HEADER})
    for header in [*headers, BAGGAGE_DYE_HEADER]:
        for kind, table in zip(
            ("exact_match_map", "prefix_match_map"), tables[header], strict=True
        ):
            if not table:
                continue
            tree = matcher_pb2.Matcher.MatcherTree(input=_header_input(header))
            for value, on_match in table.items():
                getattr(tree, kind).map[value].CopyFrom(on_match)
            steps.matchers.append(_step(_any_value(header), matcher_pb2.Matcher(matcher_tree=tree)))
    fallthrough = route_pb2.Route()
    fallthrough.CopyFrom(otherwise)
    namespace, keys = keys_metadata(chain.dye.baggage_key for chain, _ in entries)
    fallthrough.metadata.filter_metadata[namespace].CopyFrom(keys)
    return matcher_pb2.Matcher(matcher_list=steps, on_no_match=_on_route(fallthrough))
