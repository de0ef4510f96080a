"""Python code generated from the project's .proto files (proto/), never committed.

Only this file is in git; the generated package next to it (`tasklane/v1/task_pb2.py`, ...)
is gitignored. Importing this package, which Python does before importing any generated
module, generates the code when it is missing or was generated from other .proto sources.
So a bare `pip install -e .` works, `make` produces the code right after installing (it just
imports this package), an edited .proto takes effect on the next import, and the code always
comes from the grpcio-tools that pip resolved against the installed grpcio and protobuf
(code from a newer generator refuses to import). Parallel first imports (pytest -n, several
`tasklane up`) serialise on a file lock and swap in a complete tree, never a half-written one.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import importlib.resources
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# controlplane/api/proto_gen -> the repository root, where proto/ lives.
PROTO_ROOT = PACKAGE_DIR.parents[2] / "proto"
PROTOS = ("tasklane/v1/task.proto",)
GENERATED = "tasklane"  # the generated package: the protos' own package path
STAMP = "SOURCE_SHA256"  # inside it: the digest of the sources it was generated from
LOCK = ".generate.lock"


class GenerationError(ImportError):
    """The generated code is missing or stale and cannot be generated here."""


def source_digest(proto_root: Path = PROTO_ROOT) -> str | None:
    """A digest of every .proto source; None when they are absent (an installed wheel)."""
    digest = hashlib.sha256()
    for name in PROTOS:
        try:
            data = (proto_root / name).read_bytes()
        except FileNotFoundError:
            return None
        digest.update(name.encode() + b"\0" + data + b"\0")
    return digest.hexdigest()


def ensure(package_dir: Path = PACKAGE_DIR, proto_root: Path = PROTO_ROOT) -> bool:
    """Generate the code into package_dir unless it is current; True if it was generated."""
    digest = source_digest(proto_root)
    stamp = package_dir / GENERATED / STAMP
    if digest is None:
        if stamp.exists():  # generated at build time, shipped without the sources
            return False
        raise GenerationError(
            f"no generated gRPC code in {package_dir} and no .proto sources in {proto_root}: "
            "install tasklane from a checkout (`make` or `pip install -e .`)"
        )
    if _read(stamp) == digest:
        return False
    with _locked(package_dir / LOCK):
        if _read(stamp) == digest:  # another process generated it meanwhile
            return False
        _generate(package_dir, proto_root, digest)
    importlib.invalidate_caches()
    return True


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _generate(package_dir: Path, proto_root: Path, digest: str) -> None:
    """protoc into a temporary directory, then swap it in as the generated package."""
    try:
        from grpc_tools import protoc
    except ImportError as exc:
        raise GenerationError(
            f"generating the gRPC code from {proto_root} needs grpcio-tools "
            "(a dependency of tasklane: reinstall with `pip install -e .`)"
        ) from exc
    includes = importlib.resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    with tempfile.TemporaryDirectory(dir=package_dir, prefix=".generating-") as tmp:
        out = Path(tmp) / "out"
        out.mkdir()
        args = [
            "protoc",
            f"-I{proto_root}",
            f"-I{includes}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *(str(proto_root / name) for name in PROTOS),
        ]
        if protoc.main(args) != 0:
            raise GenerationError(f"protoc failed (see above): {' '.join(args)}")
        generated = out / GENERATED
        for directory in (generated, *(p for p in generated.rglob("*") if p.is_dir())):
            (directory / "__init__.py").touch()
            _relative_imports(directory, ".".join(directory.relative_to(out).parts))
        (generated / STAMP).write_text(digest + "\n")
        target = package_dir / GENERATED
        if target.exists():
            target.rename(Path(tmp) / "old")  # removed with tmp
        os.rename(generated, target)


def _relative_imports(directory: Path, package: str) -> None:
    """protoc writes `from tasklane.v1 import task_pb2`, which only resolves with the output
    directory on sys.path; make imports within one proto package relative instead."""
    absolute = re.compile(rf"^from {re.escape(package)} import ", re.MULTILINE)
    for path in directory.glob("*.py*"):
        text = path.read_text()
        fixed = absolute.sub("from . import ", text)
        if fixed != text:
            path.write_text(fixed)


ensure()
