"""The real ADS server in its own process, serving resources from a file, for tests that kill it.

The spec file is JSON: {role: [base64 of a google.protobuf.Any, ...]}. The server polls the
file and publishes a new snapshot whenever it changes, so a test changes config by rewriting
the file, and a restarted server (same port, same file) serves the same config again.

    python -m tests.support.xds_fixture_server --port 18000 --spec spec.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
from pathlib import Path

from google.protobuf import any_pb2

from controlplane.xds.cache import SnapshotCache
from controlplane.xds.server import AdsServer, serve
from controlplane.xds.snapshot import Snapshot
from controlplane.xds.types import MESSAGE_CLASS


def write_spec(path: Path, roles: dict[str, list]) -> None:
    """Write {role: [protobuf messages]} atomically, so the server never reads half a file."""
    encoded = {}
    for role, messages in roles.items():
        entries = []
        for message in messages:
            packed = any_pb2.Any()
            packed.Pack(message)
            entries.append(base64.b64encode(packed.SerializeToString()).decode())
        encoded[role] = entries
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(encoded))
    os.replace(tmp, path)


def parse_spec(text: str) -> dict[str, Snapshot]:
    snapshots = {}
    for role, entries in json.loads(text).items():
        messages = []
        for entry in entries:
            packed = any_pb2.Any.FromString(base64.b64decode(entry))
            message = MESSAGE_CLASS[packed.type_url]()
            packed.Unpack(message)
            messages.append(message)
        snapshots[role] = Snapshot.of(messages)
    return snapshots


async def run(port: int, spec: Path) -> None:
    cache = SnapshotCache()
    server, bound = await serve(AdsServer(cache), f"127.0.0.1:{port}")
    print(f"ready {bound}", flush=True)
    seen = None
    while True:
        text = spec.read_text()
        if text != seen:
            seen = text
            for role, snapshot in parse_spec(text).items():
                cache.set_snapshot(role, snapshot)
        await asyncio.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--spec", type=Path, required=True)
    args = parser.parse_args()
    try:
        asyncio.run(run(args.port, args.spec))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
