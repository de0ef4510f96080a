"""The dye matcher: which chain a request's dye names, as a `VirtualHost.matcher` tree
(exact and prefix maps on each dye header, then a bounded regex per chain on the `baggage`
member), so lookup cost does not grow with the number of chains.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from envoy.config.route.v3 import route_components_pb2 as route_pb2
from envoy.type.matcher.v3 import http_inputs_pb2
from xds.core.v3 import extension_pb2
from xds.type.matcher.v3 import matcher_pb2, regex_pb2, string_pb2

from controlplane.model.dye import value_pattern
from controlplane.model.rules import TaskChain
from controlplane.translate.common import packed

# RE2 refuses a pattern whose compiled program outgrows its memory budget: Envoy 1.40 NACKs
# "pattern too large - compile failed" from ~700 KB of baggage regex (passes at ~400 KB). A
# chain's dye values are split so that each regex's alternation stays within this. (The
# program-size check, runtime `re2.max_program_size.error_level` = 100, applies to route-level
# `safe_regex` only, not to these matcher-tree regexes: checked with the level set to 10.)
MAX_REGEX_TEXT = 64 * 1024


def _header_input(header: str) -> extension_pb2.TypedExtensionConfig:
    match_input = http_inputs_pb2.HttpRequestHeaderMatchInput(header_name=header)
    return extension_pb2.TypedExtensionConfig(name=header, typed_config=packed(match_input))


def _on_route(route: route_pb2.Route) -> matcher_pb2.Matcher.OnMatch:
    return matcher_pb2.Matcher.OnMatch(
        action=extension_pb2.TypedExtensionConfig(name=route.name, typed_config=packed(route))
    )


def baggage_regexes(chain: TaskChain) -> list[str]:
    """RE2s matching a `baggage` header whose member `<key>` has one of the chain's dyes: one,
    unless the chain has so many values that they must be split (`MAX_REGEX_TEXT`)."""
    values = [value_pattern(v) for v in chain.dye.exact]
    values += [value_pattern(p, prefix=True) for p in chain.dye.prefixes]
    key = re.escape(chain.dye.baggage_key)
    return [
        rf"(?:^|.*,)\s*{key}\s*=\s*(?:{'|'.join(part)})\s*(?:[;,].*)?"
        for part in bounded_parts(values, MAX_REGEX_TEXT, separator="|")
    ]


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


def dye_matcher(
    entries: Sequence[tuple[TaskChain, route_pb2.Route]], otherwise: route_pb2.Route
) -> matcher_pb2.Matcher:
    """Route a request by its dye: header trees first (exact, then prefix maps, per header
    name), then the baggage carrier, then `otherwise`.

    The steps are one flat list whose nested matchers have no `on_no_match`: one that finds
    nothing falls through to the next step (xds `Matcher.OnMatch.matcher`). Nesting each step
    in the previous one's `on_no_match` instead made the depth grow with the number of header
    names: past ~20 Envoy's JSON parser and past ~24 protobuf (upb, depth 100) refused it.

    A baggage member cannot be looked up in a map, so each chain has a regex; they sit behind
    a cheap `contains <key>` guard per baggage key, so online requests that carry unrelated
    baggage (OpenTelemetry) do not pay for every chain's regex (bench/dataplane.py).
    """
    steps = matcher_pb2.Matcher.MatcherList()
    by_header: dict[str, list[tuple[TaskChain, route_pb2.Route]]] = {}
    for chain, route in entries:
        by_header.setdefault(chain.dye.header, []).append((chain, route))
    for header in sorted(by_header):
        prefix_map: dict[str, matcher_pb2.Matcher.OnMatch] = {}
        exact_map: dict[str, matcher_pb2.Matcher.OnMatch] = {}
        for chain, route in by_header[header]:
            for value in chain.dye.prefixes:
                prefix_map[value] = _on_route(route)
            for value in chain.dye.exact:
                exact_map[value] = _on_route(route)
        for kind, table in (("exact_match_map", exact_map), ("prefix_match_map", prefix_map)):
            if not table:
                continue
            tree = matcher_pb2.Matcher.MatcherTree(input=_header_input(header))
            for value, on_match in table.items():
                getattr(tree, kind).map[value].CopyFrom(on_match)
            steps.matchers.append(_step(_any_value(header), matcher_pb2.Matcher(matcher_tree=tree)))
    by_key: dict[str, list[tuple[TaskChain, route_pb2.Route]]] = {}
    for chain, route in entries:
        by_key.setdefault(chain.dye.baggage_key, []).append((chain, route))
    for key in sorted(by_key):
        regexes = matcher_pb2.Matcher.MatcherList()
        for chain, route in by_key[key]:
            for pattern in baggage_regexes(chain):
                regex = regex_pb2.RegexMatcher(regex=pattern, google_re2={})
                regexes.matchers.add(
                    predicate=_single_predicate(
                        "baggage", string_pb2.StringMatcher(safe_regex=regex)
                    ),
                    on_match=_on_route(route),
                )
        guard = _single_predicate("baggage", string_pb2.StringMatcher(contains=key))
        steps.matchers.append(_step(guard, matcher_pb2.Matcher(matcher_list=regexes)))
    return matcher_pb2.Matcher(matcher_list=steps, on_no_match=_on_route(otherwise))
