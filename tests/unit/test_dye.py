"""How a dye reads in a W3C baggage member (controlplane.model.dye), checked against what
OpenTelemetry's real propagator forwards; the app library held to the same answer for any
member. (The sidecars' Lua reading is checked through real Envoy: test_routing.py.)"""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from opentelemetry.baggage.propagation import W3CBaggagePropagator

from controlplane import propagation
from controlplane.model.dye import DyeIndex, member_dye
from controlplane.model.load import load_text
from controlplane.model.rules import RuleSet
from controlplane.model.validate import apply
from tests.support.rules import chain, service

RULES = service("fund-facade") + chain("fund-yield", "[{service: fund-facade, group: task}]")
RUN_DYE = "fund-yield@20261203T075400Z-a1b2c3"  # the per-run form, `<chain>@<run id>`


def fund_yield() -> DyeIndex:
    rules = apply(RuleSet.empty(), load_text(RULES, "rules.yaml"))
    return DyeIndex(rules.chains)


def forwarded_by_opentelemetry(baggage: str) -> str:
    """The baggage header an OpenTelemetry-instrumented Python app sends on after receiving
    `baggage`: the real W3C propagator's extract, then inject."""
    propagator, carrier = W3CBaggagePropagator(), {}
    propagator.inject(carrier, propagator.extract({"baggage": baggage}))
    return carrier["baggage"]


@pytest.mark.parametrize(
    ("sent", "forwarded"),
    [
        ("task-dye=fund-yield", "task-dye=fund-yield"),
        (f"task-dye={RUN_DYE}", "task-dye=fund-yield%40" + RUN_DYE.split("@")[1]),
        ("task-dye=fund-yield;src=cron", "task-dye=fund-yield%3Bsrc%3Dcron"),
        (f"tenant=7,task-dye={RUN_DYE};src=cron", None),
    ],
)
def test_what_opentelemetry_forwards_still_carries_the_dye(sent: str, forwarded: str) -> None:
    dyes = fund_yield()
    out = forwarded_by_opentelemetry(sent)
    if forwarded is not None:
        assert out == forwarded  # what OpenTelemetry 1.x does today
    for header in (sent, out):
        assert dyes.chain_of("", header).name == "fund-yield", header


@pytest.mark.parametrize(
    "header",
    [
        "task-dye=fund-yieldx",
        "task-dye=fund-yield%41",  # decodes to fund-yieldA
        "task-dye=fund-yield%2Cx",  # an encoded ',' is part of the value
        "task-dye=fund-yield%2540r",  # decodes to fund-yield%40r, not fund-yield@r
        "task-dye=fund-yield+%3Bsrc",  # fund-yield+ (W3C decoding keeps '+')
        "task-dye=fund%2Dyield2",
        "task-dye=fund-yield%4",
        'task-dye=fund-yield%40"x',  # DQUOTE is not a baggage-octet
        "other=fund-yield",
    ],
)
def test_other_values_are_not_the_dye(header: str) -> None:
    dyes = fund_yield()
    assert dyes.chain_of("", header) is None


def test_the_member_dye_is_decoded_and_cut_at_its_properties() -> None:
    assert member_dye("fund-yield%40r1") == "fund-yield@r1"
    assert member_dye(" fund-yield%40r1 ;src=cron") == "fund-yield@r1"
    assert member_dye("x%3bsrc%3Dcron") == "x"
    assert member_dye("a+b") == "a+b"  # W3C: '+' is no space
    assert member_dye("") is None
    assert member_dye("%3Bsrc") is None  # nothing before the properties
    assert member_dye("a b") is None  # space is not a baggage-octet


# Dyes from a few characters of each kind: literal-only, escapable, and ones near '%' and hex.
_DYE_CHARS = "aB9-._@:+*~!/"
_RAW_CHARS = 'aB9-._@:+*~!/%34024;Ab,= "'
_NEVER_ENCODED = "aB9-._"  # letters, digits and -._: no encoder escapes them, nor need we match


def _encode(dye: str, upper: list[bool], which: list[bool]) -> str:
    out = []
    for i, char in enumerate(dye):
        code = f"%{ord(char):02X}" if upper[i % len(upper)] else f"%{ord(char):02x}"
        out.append(code if which[i % len(which)] and char not in _NEVER_ENCODED else char)
    return "".join(out)


@given(
    dye=st.text(_DYE_CHARS, min_size=1, max_size=8),
    upper=st.lists(st.booleans(), min_size=1, max_size=4),
    which=st.lists(st.booleans(), min_size=1, max_size=4),
    tail=st.sampled_from(["", ";p=1", " ;p", "%3Bp%3D1", "%3b", ",next=1"]),
)
def test_every_encoding_of_a_dye_is_decoded(
    dye: str, upper: list[bool], which: list[bool], tail: str
) -> None:
    header = f"task-dye={_encode(dye, upper, which)}{tail}"
    assert member_dye(header.removeprefix("task-dye=").split(",", 1)[0]) == dye


@given(raw=st.text(_RAW_CHARS + "%0DFf\t", max_size=12))
@example(raw="fund-yield%40r1%3Bsrc%3Dcron")  # what OpenTelemetry forwards
@example(raw="%3Bsrc")
def test_the_app_library_reads_a_member_as_the_mesh_does(raw: str) -> None:
    """controlplane.propagation cannot import the model; its own reading must agree (it also
    drops dyes that cannot travel as a header: non-ASCII or control characters)."""
    value = raw.split(",", 1)[0]
    dye = member_dye(value)
    travels = dye is not None and re.fullmatch(r"[\x21-\x7e]+", dye) is not None
    assert propagation.extract({"baggage": f"task-dye={value}"}) == (dye if travels else None)
