"""Checks that need more than one rule: references between kinds and dye conflicts.

An apply is merged into the stored set and the whole result is checked, so a change that
breaks a rule stored earlier (a Service losing a group a chain uses) is refused as well as
a new rule that is wrong. Messages name the document of the rule that refers; a stored rule
is named "stored TaskChain x", with the applied document that broke it.

Every problem is found, not only the first, one line each, so a file is fixed in one round
trip; a name that is close to a known one is suggested (model/text.py did_you_mean).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from controlplane.errors import MAX_PROBLEMS_SHOWN, RuleError, rule_errors
from controlplane.model.dye import DyeClaims
from controlplane.model.load import Key, Parsed, Unread
from controlplane.model.rules import Rule, RuleSet, ScheduledTask, Service, TaskChain
from controlplane.model.text import did_you_mean, quote


def apply(current: RuleSet, parsed: list[Parsed], unread: Unread | None = None) -> RuleSet:
    """`current` with the parsed rules added or replaced, refused whole if any check fails:
    a RuleError with every problem, those of `unread` (documents that were not rules) first.
    """
    unread = unread or Unread()
    problems = list(unread.problems)
    origins: dict[Key, Parsed] = {}
    for item in parsed:
        key = (item.kind, item.name)
        if key in origins:
            first = origins[key]
            problems.append(
                f"{item.where}: metadata.name: {item.kind} {item.name} is also defined in "
                f"{first.file}: document {first.document}"
            )
            continue
        origins[key] = item
    merged = current.with_rules(item.rule for item in origins.values())
    if unread.complete:  # else rules after a YAML syntax error would be called missing
        problems += _problems(merged, origins, unread.claimed)
    if problems:
        raise rule_errors(problems)
    return merged


def check(ruleset: RuleSet, origins: Mapping[Key, Parsed] | None = None) -> None:
    """Raise RuleError naming every broken reference and dye conflict in `ruleset`.

    Rules in `origins` (the ones being applied) are checked first and named by their
    document; the others are named as stored rules.
    """
    problems = _problems(ruleset, origins or {}, frozenset())
    if problems:
        raise rule_errors(problems)


def _problems(
    ruleset: RuleSet, origins: Mapping[Key, Parsed], claimed: frozenset[Key]
) -> list[str]:
    """One line per problem; none caused by a rule in `claimed` (a document that failed
    its own checks: it is reported already, and missing here only because of them)."""
    report = _Report(origins, claimed)
    claims = DyeClaims(ruleset.chains.values())
    consumers = _queue_consumers(ruleset)
    for rule in _check_order(ruleset, report.origins):
        if isinstance(rule, Service):
            _check_calls(rule, ruleset, report)
        elif isinstance(rule, TaskChain):
            _check_chain(rule, ruleset, claims, report)
            _check_queue_hops(rule, consumers, report)
        elif isinstance(rule, ScheduledTask):
            _check_task(rule, ruleset, report)
    return report.problems


def check_delete(current: RuleSet, kind: str, name: str) -> None:
    """Refuse deleting a Service or TaskChain that another rule still refers to."""
    current.get(kind, name)  # RuleError for an unknown kind
    referrers: list[str] = []
    if kind == "Service":
        referrers.extend(
            f"Service {service.name} (spec.calls[{service.calls.index(name)}])"
            for service in sorted(current.services.values(), key=lambda service: service.name)
            if name in service.calls and service.name != name
        )
        for chain in sorted(current.chains.values(), key=lambda chain: chain.name):
            referrers.extend(
                f"TaskChain {chain.name} (spec.hops[{index}].service)"
                for index, hop in enumerate(chain.hops)
                if hop.service == name
            )
    elif kind == "TaskChain":
        referrers.extend(
            f"ScheduledTask {task.name} (spec.chain)"
            for task in sorted(current.tasks.values(), key=lambda task: task.name)
            if task.chain == name
        )
    if referrers:
        raise RuleError(f"cannot delete {kind} {name}: still referred to by {', '.join(referrers)}")


def _check_order(ruleset: RuleSet, origins: Mapping[Key, Parsed]) -> Iterator[Rule]:
    """Applied rules in document order, then the stored ones."""
    for kind, name in origins:
        rule = ruleset.get(kind, name)
        if rule is not None:
            yield rule
    for rule in ruleset.all():
        if (rule.kind, rule.name) not in origins:
            yield rule


class _Report:
    """Collects problems, each as the message naming the referring rule's document."""

    def __init__(self, origins: Mapping[Key, Parsed], claimed: frozenset[Key]) -> None:
        self.origins, self.claimed = origins, claimed
        self.problems: list[str] = []
        self._conflicts: set[tuple[str, str]] = set()

    def fail(self, rule: Rule, path: str, problem: str, causes: tuple[Key, ...] = ()) -> None:
        if any(key in self.claimed for key in causes):
            return
        origin = self.origins.get((rule.kind, rule.name))
        if origin is not None:
            self.problems.append(f"{origin.where}: {path}: {problem}")
            return
        cause = next((self.origins[key] for key in causes if key in self.origins), None)
        suffix = f" (changed by {cause.where})" if cause is not None else ""
        self.problems.append(f"stored {rule.kind} {rule.name}: {path}: {problem}{suffix}")

    def did_you_mean(self, word: str, options: Iterable[str]) -> str:
        """model.text.did_you_mean() for the problems shown only: each costs a pass over
        `options` (10,000 services, say), and thousands of problems must stay fast."""
        return did_you_mean(word, options) if len(self.problems) < MAX_PROBLEMS_SHOWN else ""

    def first_time(self, *claims: tuple[str, str]) -> bool:
        """False when one of these (chain, dye value) claims is in a conflict reported
        already: the other chain of a conflict would otherwise report it again."""
        seen = any(claim in self._conflicts for claim in claims)
        self._conflicts.update(claims)
        return not seen

    def describe(self, kind: str, name: str) -> str:
        """'TaskChain x (rules.yaml: document 2)' or 'TaskChain x (stored)'."""
        origin = self.origins.get((kind, name))
        place = f"{origin.file}: document {origin.document}" if origin else "stored"
        return f"{kind} {name} ({place})"


def _check_calls(service: Service, ruleset: RuleSet, report: _Report) -> None:
    for index, callee in enumerate(service.calls):
        if callee not in ruleset.services:
            report.fail(
                service,
                f"spec.calls[{index}]",
                f"unknown service {quote(callee)}{report.did_you_mean(callee, ruleset.services)}",
                (("Service", callee),),
            )


def _check_chain(chain: TaskChain, ruleset: RuleSet, claims: DyeClaims, report: _Report) -> None:
    for index, hop in enumerate(chain.hops):
        path = f"spec.hops[{index}]"
        service = ruleset.services.get(hop.service)
        if service is None:
            report.fail(
                chain,
                f"{path}.service",
                f"unknown service {quote(hop.service)}"
                + report.did_you_mean(hop.service, ruleset.services),
                (("Service", hop.service),),
            )
        elif service.group(hop.group) is None:
            names = [group.name for group in service.groups]
            hint = report.did_you_mean(hop.group, names)
            if not hint:
                hint = f" (it has: {', '.join(names)})"
            report.fail(
                chain,
                f"{path}.group",
                f"service {hop.service} has no group {quote(hop.group)}{hint}",
                (("Service", hop.service),),
            )
    for value in chain.dye.written():
        conflict = claims.conflict(chain.name, value)
        if conflict is not None and report.first_time((chain.name, value), conflict):
            other, theirs = conflict
            where = report.describe("TaskChain", other)
            if theirs == value:
                problem = f"dye {quote(value)} is already claimed by {where}"
            else:
                exact = [each for each in (value, theirs) if not each.endswith("*")]
                sample = exact[0] if exact else max(value, theirs, key=len)[:-1]
                problem = (
                    f"{quote(value)} overlaps {quote(theirs)} of {where}: "
                    f"both would claim dye {quote(sample)}"
                )
            report.fail(chain, "spec.dye.values", problem, (("TaskChain", other),))


def _queue_consumers(ruleset: RuleSet) -> dict[str, tuple[str, int, str]]:
    """The first (chain, hop index, service) naming each queue, chains by name."""
    consumers: dict[str, tuple[str, int, str]] = {}
    for name in sorted(ruleset.chains):
        for index, hop in enumerate(ruleset.chains[name].hops):
            if hop.queue is not None:
                consumers.setdefault(hop.queue, (name, index, hop.service))
    return consumers


def _check_queue_hops(
    chain: TaskChain, consumers: Mapping[str, tuple[str, int, str]], report: _Report
) -> None:
    """A queue is a work queue of one service: its lanes and default queue are that service's."""
    for index, hop in enumerate(chain.hops):
        if hop.queue is None:
            continue
        other, other_index, service = consumers[hop.queue]
        if service != hop.service:
            where = report.describe("TaskChain", other)
            report.fail(
                chain,
                f"spec.hops[{index}].queue",
                f"queue {quote(hop.queue)} is consumed by service {service} "
                f"({where}, spec.hops[{other_index}]); a queue has one consuming service",
                (("TaskChain", other),),
            )


def _check_task(task: ScheduledTask, ruleset: RuleSet, report: _Report) -> None:
    chain = ruleset.chains.get(task.chain)
    if chain is None:
        report.fail(
            task,
            "spec.chain",
            f"unknown chain {quote(task.chain)}{report.did_you_mean(task.chain, ruleset.chains)}",
            (("TaskChain", task.chain),),
        )
        return
    for service_name, count in task.replicas:
        path = f"spec.replicas.{service_name}"
        hop = chain.hop_for(service_name)
        if hop is None:
            hops = [each.service for each in chain.hops]
            report.fail(
                task,
                path,
                f"service {service_name} is not a hop of TaskChain {chain.name}"
                + (report.did_you_mean(service_name, hops) or f" (its hops: {', '.join(hops)})"),
                (("TaskChain", chain.name),),
            )
            continue
        service = ruleset.services.get(service_name)
        group = service.group(hop.group) if service is not None else None
        if group is None:
            continue  # the chain's own check reports the missing service or group
        if not group.min_replicas <= count <= group.max_replicas:
            report.fail(
                task,
                path,
                f"{count} is outside the replicas of group {group.name} of service "
                f"{service_name} ({group.min_replicas}-{group.max_replicas})",
                (("Service", service_name), ("TaskChain", chain.name)),
            )
