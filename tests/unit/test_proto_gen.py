"""The committed TaskService code matches proto/ and the dependency floors it declares."""

from __future__ import annotations

import importlib.resources
import re
import tomllib
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from controlplane.api.proto_gen.tasklane.v1 import task_pb2, task_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
PROTO = "tasklane/v1/task.proto"


def test_committed_code_is_the_compiled_proto(tmp_path: Path) -> None:
    """Compared as descriptors, so any grpcio-tools can check code another one generated."""
    out = tmp_path / "task.pb"
    includes = importlib.resources.files("grpc_tools") / "_proto"
    args = ["protoc", f"-I{ROOT / 'proto'}", f"-I{includes}", f"--descriptor_set_out={out}", PROTO]
    assert protoc.main(args) == 0
    compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    for message in compiled.message_type:  # descriptor sets add json_name; embedded code not
        for field in message.field:
            field.ClearField("json_name")
    committed = descriptor_pb2.FileDescriptorProto.FromString(task_pb2.DESCRIPTOR.serialized_pb)
    assert committed == compiled, "proto/ changed: run `make proto` and commit the result"


def _floor(dependencies: list[str], name: str) -> str:
    (spec,) = [d for d in dependencies if re.match(rf"{name}\s*>=", d)]
    return spec.split(">=")[1].strip()


def test_dependency_floors_are_the_ones_the_code_declares() -> None:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    source = Path(task_pb2.__file__).read_text()
    major, minor, patch = re.search(
        r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),", source
    ).groups()
    assert _floor(dependencies, "protobuf") == f"{major}.{minor}.{patch}"
    grpc = tuple(int(part) for part in task_pb2_grpc.GRPC_GENERATED_VERSION.split("."))
    assert tuple(int(part) for part in _floor(dependencies, "grpcio").split(".")) <= grpc
    assert "grpcio-tools" not in " ".join(dependencies)  # only `make proto` and the tests use it
