"""Rule documents for tests, written as the YAML a user would apply."""

from __future__ import annotations


def service(
    name: str,
    protocol: str = "http",
    groups: tuple[str, ...] = ("default", "task"),
    calls: str = "",
) -> str:
    """A Service document whose groups allow a couple of replicas each; `calls` is YAML
    flow text (`[a, b]`)."""
    listed = ", ".join(f"{{name: {g}, maxReplicas: 2}}" for g in groups)
    declared = f", calls: {calls}" if calls else ""
    return f"""---
apiVersion: tasklane.io/v1
kind: Service
metadata: {{name: {name}}}
spec: {{protocol: {protocol}, groups: [{listed}]{declared}}}
"""


def chain(name: str, hops: str, fallback: str = "strict", dye: str = "") -> str:
    """A TaskChain document; `hops` and `dye` are YAML flow text, the dye defaulting to the
    chain's name and its per-iteration prefix (`name@*`)."""
    dye = dye or f'{{values: [{name}, "{name}@*"]}}'
    return f"""---
apiVersion: tasklane.io/v1
kind: TaskChain
metadata: {{name: {name}}}
spec:
  dye: {dye}
  fallback: {fallback}
  hops: {hops}
"""


def mesh(services: int, chains: int, prefix: str = "svc", task_max: int = 4) -> list[str]:
    """A generated mesh as one document per rule: `services` Services (svc-00000...) and
    `chains` TaskChains (svc-chain-00000...) of three hops over them; join with "" for a file."""
    documents = [
        f"---\napiVersion: tasklane.io/v1\nkind: Service\nmetadata: {{name: {prefix}-{n:05d}}}\n"
        "spec: {groups: [{name: default, minReplicas: 1, maxReplicas: 4},"
        f" {{name: task, minReplicas: 0, maxReplicas: {task_max}}}]}}\n"
        for n in range(services)
    ]
    for c in range(chains):
        hops = ", ".join(
            f"{{service: {prefix}-{(c * 3 + h) % services:05d}, group: task}}" for h in (0, 1, 2)
        )
        documents.append(chain(f"{prefix}-chain-{c:05d}", f"[{hops}]"))
    return documents
