"""A built wheel is the whole product: installed into a fresh venv, run from outside the
checkout, `tasklane demo` brings up the control plane, Envoy sidecars and the chain."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.procs import alive_mentioning

REPO = Path(__file__).resolve().parents[2]
# What a source tree has that a wheel must not need (a checkout's venv, caches, git).
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv*", ".tasklane", "build", "*.egg-info", "__pycache__", ".*_cache", "test-output"
)


def _run(args: list[str], cwd: Path, timeout: float) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(args)}:\n{output[-3000:]}"
    return output


def test_wheel_installs_into_a_fresh_venv_and_runs_the_demo(tmp_path: Path) -> None:
    source, dist, outside = tmp_path / "source", tmp_path / "dist", tmp_path / "elsewhere"
    shutil.copytree(REPO, source, ignore=NOT_SOURCES)
    outside.mkdir()
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(source)],
        tmp_path,
        300,
    )
    (wheel,) = dist.glob("tasklane-*.whl")

    venv = tmp_path / "venv"
    _run([sys._base_executable, "-m", "venv", str(venv)], tmp_path, 120)
    _run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], outside, 600)
    shutil.rmtree(source)  # nothing may be read from a checkout any more

    where = _run(
        [str(venv / "bin" / "python"), "-c", "import controlplane; print(controlplane.__file__)"],
        outside,
        60,
    )
    assert where.strip().startswith(str(venv)), where

    work = tmp_path / "demo"
    work.mkdir()
    output = _run(
        [str(venv / "bin" / "tasklane"), "demo", "--duration", "20", "--work-dir", str(work)],
        outside,
        300,
    )
    summary = output[output.rindex("summary") :]
    assert "leaks: 0" in summary, summary
    assert alive_mentioning(str(work)) == []
