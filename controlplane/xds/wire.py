"""Hand-assembled protobuf framing for discovery responses.

Each resource is serialised once per version (`Resource`), and a response to any number of
streams is the concatenation of those pre-encoded fields plus a nonce: protobuf allows
fields in any order, and a repeated message field is just its entries one after another.
This keeps the per-stream cost of a push at a few byte copies, whatever the resource size.
"""

_LEN = 2  # wire type "length-delimited"


_ONE_BYTE = tuple(bytes((value,)) for value in range(0x80))


def varint(value: int) -> bytes:
    # Tags and most lengths fit one or two bytes: a rebuild encodes millions of them.
    if value < 0x80:
        return _ONE_BYTE[value]
    if value < 0x4000:
        return bytes(((value & 0x7F) | 0x80, value >> 7))
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes or sub-message)."""
    return varint((number << 3) | _LEN) + varint(len(payload)) + payload


def text(number: int, value: str) -> bytes:
    """A string field, omitted when empty as proto3 does."""
    return field(number, value.encode()) if value else b""


def any_message(type_url: str, value: bytes) -> bytes:
    """google.protobuf.Any{type_url = 1, value = 2}."""
    return text(1, type_url) + field(2, value)


# DiscoveryResponse (state of the world).
def sotw_response(version: str, entries: list[bytes], type_url: str, nonce: str) -> bytes:
    """DiscoveryResponse: version_info = 1, resources = 2 (pre-encoded), type_url = 4, nonce = 5."""
    return text(1, version) + b"".join(entries) + text(4, type_url) + text(5, nonce)


def delta_response(
    system_version: str, entries: list[bytes], type_url: str, removed: list[str], nonce: str
) -> bytes:
    """DeltaDiscoveryResponse: system_version_info = 1, resources = 2, type_url = 4,
    nonce = 5, removed_resources = 6."""
    return (
        text(1, system_version)
        + b"".join(entries)
        + text(4, type_url)
        + text(5, nonce)
        + b"".join(text(6, name) for name in removed)
    )
