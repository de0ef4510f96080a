"""RFC 6902 JSON Patch between two JSON documents, for the admission webhook's answer.

The webhook computes the injected pod with the same pure function as `tasklane inject`, then
sends the difference: the API server applies it to the pod it has. The diff is the simplest
correct one: members added, removed or replaced; lists of equal length compared item by item
(containers keep their index), any other changed list replaced whole (a container's env, the
init containers), so no operation depends on how a list was edited.
"""

from __future__ import annotations

from typing import Any

WEBHOOK_PATH = "/inject"  # where the admission webhook answers (inject/webhook.py)

Operation = dict[str, Any]


def pointer_token(key: str | int) -> str:
    """One JSON Pointer token (RFC 6901): `~` is written `~0` and `/` is written `~1`, so
    `tasklane.io/injected` becomes `tasklane.io~1injected`."""
    return str(key).replace("~", "~0").replace("/", "~1")


def make_patch(before: Any, after: Any, path: str = "") -> list[Operation]:
    """Operations that turn `before` into `after` (both parsed JSON)."""
    if isinstance(before, dict) and isinstance(after, dict):
        ops: list[Operation] = []
        for key in before:
            if key not in after:
                ops.append({"op": "remove", "path": f"{path}/{pointer_token(key)}"})
        for key, value in after.items():
            where = f"{path}/{pointer_token(key)}"
            if key not in before:
                ops.append({"op": "add", "path": where, "value": value})
            else:
                ops.extend(make_patch(before[key], value, where))
        return ops
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [
            op
            for index, (old, new) in enumerate(zip(before, after, strict=True))
            for op in make_patch(old, new, f"{path}/{index}")
        ]
    if before == after and type(before) is type(after):
        return []
    return [{"op": "replace", "path": path, "value": after}]
