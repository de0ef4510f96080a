"""`tasklane inject`: the sidecar added to every meshed workload of a YAML stream.

Pure text in, text out (the CLI does the I/O), so a failure leaves nothing half-written.
Documents are reformatted (like `istioctl kube-inject`) but otherwise unchanged unless they
are a workload whose pod template carries the tasklane labels. The output is canonical YAML,
and an injected pod is left alone, so injecting the output again gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml

from controlplane.errors import TasklaneError
from controlplane.inject.pod import (
    LABEL_GROUP,
    LABEL_SERVICE,
    InjectError,
    InjectOptions,
    inject_pod,
    join,
    mapping,
    opted_out,
)
from controlplane.model.load import yaml_documents
from controlplane.model.text import describe, quote

# (API group, kind) -> where the pod template is; "" is the core group (v1).
TEMPLATE_PATHS: dict[tuple[str, str], tuple[str, ...]] = {
    ("", "Pod"): (),
    ("apps", "Deployment"): ("spec", "template"),
    ("apps", "StatefulSet"): ("spec", "template"),
    ("apps", "DaemonSet"): ("spec", "template"),
    ("apps", "ReplicaSet"): ("spec", "template"),
    ("batch", "Job"): ("spec", "template"),
    ("batch", "CronJob"): ("spec", "jobTemplate", "spec", "template"),
}


def inject_text(text: str, filename: str, options: InjectOptions) -> str:
    """Every document of a YAML stream, injected where it applies; TasklaneError naming the
    file, the document (1-based, empty ones count) and the field at the first problem."""
    out: list[Any] = []
    for number, doc in yaml_documents(text, filename):
        if doc is None:
            continue
        try:
            if not isinstance(doc, dict):
                raise InjectError(
                    "", f"expected a Kubernetes object (a mapping), got {describe(doc)}"
                )
            out.append(inject_object(doc, options))
        except InjectError as exc:
            raise TasklaneError(f"{filename}: document {number}: {exc}") from None
    return dump_documents(out)


def inject_object(doc: dict[str, Any], options: InjectOptions) -> dict[str, Any]:
    """One Kubernetes object (a `kind: List` item by item) with its pod template injected;
    the object itself when there is nothing to inject. Fields in errors are relative to it."""
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        return doc
    if (api_version, kind) == ("v1", "List"):
        items = doc.get("items")
        if not isinstance(items, list):
            raise InjectError("items", f"expected a list, got {describe(items)}")
        injected = [_item(item, index, options) for index, item in enumerate(items)]
        return doc if injected == items else {**doc, "items": injected}
    group = api_version.rpartition("/")[0] if "/" in api_version else ""
    path = TEMPLATE_PATHS.get((group, kind))
    if path is None:
        return doc
    field = ".".join(path)
    template = _template(doc, path)
    if opted_out(template):
        return doc
    if path:
        _check_owner_labels(doc, template, field)
    try:
        new = inject_pod(template, options)
    except InjectError as exc:
        raise exc.within(field) from None
    return doc if new is None else _replace(doc, path, new)


def _item(item: object, index: int, options: InjectOptions) -> Any:
    try:
        return inject_object(mapping(item, ""), options)
    except InjectError as exc:
        raise exc.within(f"items[{index}]") from None


def _template(doc: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    node = doc
    for depth, key in enumerate(path):
        node = mapping(node.get(key), ".".join(path[: depth + 1]))
    return node


def _check_owner_labels(doc: dict[str, Any], template: dict[str, Any], field: str) -> None:
    """Labels on the workload itself are not the pods': refuse the likely mistake of putting
    them there only, or two different ones."""
    metadata = doc.get("metadata")
    owner = metadata.get("labels") if isinstance(metadata, dict) else None
    pod_meta = template.get("metadata")
    pod = pod_meta.get("labels") if isinstance(pod_meta, dict) else None
    for key in (LABEL_SERVICE, LABEL_GROUP):
        if not isinstance(owner, dict) or key not in owner:
            continue
        mine = pod.get(key) if isinstance(pod, dict) else None
        if mine is None:
            raise InjectError(
                join(field, f"metadata.labels[{key}]"),
                f"missing: the {doc['kind']} has this label, the pods need it on the template",
            )
        if owner[key] != mine:
            raise InjectError(
                f"metadata.labels[{key}]",
                f"{quote(str(owner[key]))} conflicts with the pod template's label "
                f"({quote(str(mine))})",
            )


def _replace(doc: dict[str, Any], path: tuple[str, ...], new: dict[str, Any]) -> dict[str, Any]:
    """A copy of `doc` with the mapping at `path` replaced; `doc` is left as it was."""
    if not path:
        return new
    head, *rest = path
    return {**doc, head: _replace(doc[head], tuple(rest), new)}


class _Dumper(yaml.SafeDumper):
    """Canonical output: no anchors (YAML aliases in the input are written out), block style
    for multi-line strings such as the sidecar's bootstrap."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _represent_str)


def dump_documents(docs: Iterable[Any]) -> str:
    """A YAML stream of the documents, `---` between them, keys in their given order."""
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1 << 20)
