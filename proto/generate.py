"""Regenerate the committed Python code of proto/ (`make proto`; see proto/README.md).

Run with the pinned grpcio-tools that `make proto` installs in its own venv: the code it emits
declares the oldest protobuf and grpcio it runs on, and pyproject.toml's floors follow them.
"""

from __future__ import annotations

import importlib.resources
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
TARGET = ROOT / "controlplane" / "api" / "proto_gen"
PROTOS = ("tasklane/v1/task.proto",)
GENERATED = "tasklane"  # the generated package: the protos' own package path


def relative_imports(directory: Path, package: str) -> None:
    """protoc writes `from tasklane.v1 import task_pb2`, which resolves only with the output
    directory on sys.path; make imports within one proto package relative instead."""
    absolute = re.compile(rf"^from {re.escape(package)} import ", re.MULTILINE)
    for path in directory.glob("*.py*"):
        text = path.read_text()
        fixed = absolute.sub("from . import ", text)
        if fixed != text:
            path.write_text(fixed)


def main() -> int:
    includes = importlib.resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{includes}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *(str(PROTO_ROOT / name) for name in PROTOS),
        ]
        if protoc.main(args) != 0:
            print(f"protoc failed: {' '.join(args)}", file=sys.stderr)
            return 1
        generated = out / GENERATED
        for directory in (generated, *(p for p in generated.rglob("*") if p.is_dir())):
            (directory / "__init__.py").touch()
            relative_imports(directory, ".".join(directory.relative_to(out).parts))
        shutil.rmtree(TARGET / GENERATED, ignore_errors=True)
        shutil.copytree(generated, TARGET / GENERATED)
    print(f"generated {TARGET / GENERATED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
