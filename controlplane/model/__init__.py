"""Rule kinds, YAML loading, validation and cron: pure (no etcd, no Envoy, no network).

The names below are the model's public API; the modules hold the details:
`rules` (kinds, RuleSet, documents), `load` (files), `validate` (cross-references),
`cron` (schedules and durations), `dye` (the dye's grammar, baggage form and index),
`group` (a (service, group) pair), `instance` (a registered instance).
"""

from controlplane.model.cron import fires_between, next_fire, parse_cron, parse_duration
from controlplane.model.dye import Dye
from controlplane.model.group import DEFAULT_GROUP
from controlplane.model.load import Parsed, Unread, load_files, load_text, read_texts
from controlplane.model.rules import (
    API_VERSION,
    KINDS,
    Group,
    Hop,
    RateLimit,
    Rule,
    RuleSet,
    ScheduledTask,
    Service,
    TaskChain,
    from_document,
    to_document,
)
from controlplane.model.validate import apply, check, check_delete

__all__ = [
    "API_VERSION",
    "DEFAULT_GROUP",
    "KINDS",
    "Dye",
    "Group",
    "Hop",
    "Parsed",
    "Unread",
    "RateLimit",
    "Rule",
    "RuleSet",
    "ScheduledTask",
    "Service",
    "TaskChain",
    "apply",
    "check",
    "check_delete",
    "fires_between",
    "from_document",
    "load_files",
    "load_text",
    "read_texts",
    "next_fire",
    "parse_cron",
    "parse_duration",
    "to_document",
]
