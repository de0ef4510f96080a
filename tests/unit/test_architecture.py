"""ARCHITECTURE.md is true: every import in the package points down its floors, and the pure
floors do no I/O. The floors are read from the document, so the two cannot drift apart."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "controlplane"
GENERATED = PACKAGE / "api" / "proto_gen" / "tasklane"
# Modules that mean I/O, and who may use them.
ETCD_CLIENT = "pyetcd"
IO_MODULES = (
    "grpc",
    "aiohttp",
    ETCD_CLIENT,
    "subprocess",
    "socket",
    "http.client",
    "urllib.request",
)
PURE = ("model", "translate")


def floors() -> dict[str, int]:
    """{package: floor} from the table in ARCHITECTURE.md (a row starting with a number opens a
    floor; the rows below it without one are on the same floor)."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    table = text.split("```", 2)[1]
    out: dict[str, int] = {}
    floor = None
    for line in table.splitlines()[2:]:  # the language tag line and the header
        match = re.match(r"(\d+)?\s+(\S+)", line)
        if not match:
            continue
        if match[1] is not None:
            floor = int(match[1])
        out[match[2]] = floor
    return out


def unit_of(module: str) -> str:
    """The floor unit of a module: its package under controlplane, or a top-level module."""
    return module.split(".")[1]


def imports() -> list[tuple[Path, str, str]]:
    """(file, importing unit, imported module) for every import in the package."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if GENERATED in path.parents:
            continue
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        package = parts[:-1]  # the package a relative import starts from
        if parts[-1] == "__init__":
            parts = parts[:-1]
        source = parts[1] if len(parts) > 1 else "controlplane"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found += [(path, source, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package[: len(package) - node.level + 1] + ([base] if base else [])
                    )
                if base == "controlplane":
                    found += [(path, source, f"controlplane.{a.name}") for a in node.names]
                else:
                    found.append((path, source, base))
    return found


def test_every_package_is_on_a_floor() -> None:
    units = {
        path.stem if path.is_file() else path.name
        for path in PACKAGE.iterdir()
        if (path.suffix == ".py" and path.stem != "__init__") or (path / "__init__.py").exists()
    }
    assert units == set(floors()), "ARCHITECTURE.md's table and the package disagree"


def test_imports_point_down_the_floors() -> None:
    floor = floors()
    wrong = sorted(
        f"{path.relative_to(ROOT)}: {source} (floor {floor[source]}) imports {module} "
        f"(floor {floor[unit_of(module)]})"
        for path, source, module in imports()
        if module.startswith("controlplane.")
        and unit_of(module) != source
        and floor[unit_of(module)] >= floor[source]
    )
    assert not wrong, "\n".join(wrong)


def test_only_the_store_talks_to_etcd_and_pure_floors_do_no_io() -> None:
    wrong = []
    for path, source, module in imports():
        top = module.split(".")[0]
        if top == ETCD_CLIENT and source != "store":
            wrong.append(f"{path.relative_to(ROOT)} imports {module}: only store talks to etcd")
        if source in PURE and any(module == m or module.startswith(m + ".") for m in IO_MODULES):
            wrong.append(f"{path.relative_to(ROOT)} imports {module}: {source} is pure")
    assert not wrong, "\n".join(wrong)
