"""What etcd holds of the rules, read key by key through the layout of store/rules.py (the
pointer, its generation, the generation's chunks) rather than through load_rules, so a test
checks the stored bytes and not the code that reads them."""

from __future__ import annotations

import json
from typing import Any

from controlplane.store.etcd import Store
from controlplane.store.rules import CHUNKS, GENERATIONS, REVISION_KEY


def stored_documents(store: Store) -> dict[str, Any]:
    """'Kind/name' -> canonical document of every current rule ({} when none was written)."""
    pointer = store.get(REVISION_KEY)
    if pointer is None:
        return {}
    generation = json.loads(store.get(GENERATIONS + json.loads(pointer)["generation"]) or b"")
    documents = {}
    for chunk in generation["chunks"]:
        for doc in json.loads(store.get(CHUNKS + chunk) or b""):
            documents[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return documents
