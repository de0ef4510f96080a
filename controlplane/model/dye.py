"""How a dye reads in a W3C `baggage` member: one definition for the parts of the mesh that
recognise a baggage dye (the translator's Envoy regexes, the accounting). The app library
`controlplane.propagation` imports nothing of tasklane, so it repeats `member_dye` in its
`_baggage_dye`; tests/unit/test_dye.py holds them to the same answers.

Baggage values are percent-encoded (https://www.w3.org/TR/baggage/#value), and OpenTelemetry
re-encodes what it forwards: its Python propagator quotes every character but letters, digits
and `_.-~` (`urllib.parse.quote_plus`), so the per-run dye `fund-yield@<run id>` leaves an
instrumented app as `fund-yield%40<run id>`. It also keeps a member's properties inside the
value, so `task-dye=x;src=cron` goes on as `task-dye=x%3Bsrc%3Dcron`. A member therefore
carries the dye its value *decodes* to, up to the first `;`. Dyes never contain `%` (the rules
refuse it), so a literal `%` in a member is always the start of an encoding.
"""

from __future__ import annotations

import re
import string
from urllib.parse import unquote

# W3C baggage-octet: printable ASCII except space, '"', ',', ';' and '\'.
BAGGAGE_OCTETS = r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]"
_VALUE = re.compile(BAGGAGE_OCTETS + "*")
# Never escaped by any encoder seen (Python's quote, Java's URLEncoder, JavaScript's
# encodeURIComponent, Go): RFC 3986's unreserved set less '~', which Java escapes. Matching
# only their literal form keeps each regex small (a dye is mostly letters and digits).
_LITERAL = frozenset(string.ascii_letters + string.digits + "-._")
_OWS = " \t"


def _char_pattern(char: str) -> str:
    if char in _LITERAL:
        return re.escape(char)
    high, low = f"{ord(char):02X}"
    hexes = "".join(f"[{h}{h.lower()}]" if h.isalpha() else h for h in (high, low))
    return f"(?:{re.escape(char)}|%{hexes})"


def value_pattern(dye: str, *, prefix: bool = False) -> str:
    """An RE2 fragment matching the raw baggage values that carry `dye` (any value starting with
    it when `prefix`): each character as written or, but for letters, digits and `-._`,
    percent-encoded (either case of hex); then, for an exact dye, nothing but percent-encoded
    properties (`%3B...`). What follows the value unencoded (`;props`, `,` and the next member)
    is for the caller's regex to allow."""
    body = "".join(map(_char_pattern, dye))
    if prefix:
        return body + BAGGAGE_OCTETS + "*"
    return body + f"(?:%3[Bb]{BAGGAGE_OCTETS}*)?"


def member_dye(value: str) -> str | None:
    """The dye a baggage member's value (what follows `key=`) carries, or None when it is not a
    valid baggage value: cut at the first `;`, trimmed of the whitespace W3C allows around it,
    percent-decoded, cut again at the first `;` it decodes to."""
    raw = value.split(";", 1)[0].strip(_OWS)
    if not _VALUE.fullmatch(raw):
        return None
    return unquote(raw).split(";", 1)[0] or None
