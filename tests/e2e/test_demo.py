"""`tasklane demo` end to end: every piece a real process, isolation counted from the apps'
answers, and nothing left running afterwards."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.support.procs import alive_mentioning

REPO = Path(__file__).resolve().parents[2]


def test_demo_runs_the_chain_without_leaks_or_failures(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    work.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "controlplane", "demo", "--duration", "40", "--work-dir", str(work)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    summary = output[output.rindex("summary") :]
    assert "leaks: 0" in summary
    # Every dyed and online request answered 200, apart from the 429s of the chain's rate
    # limit; and no hop answered a 5xx, by the control plane's own accounting (the dashboard).
    assert "failures: 0" in summary, summary
    assert "5xx in the control plane's accounting: 0\n" in summary, summary
    assert re.search(r"online ok: [1-9]", summary) and re.search(r"task ok: [1-9]", summary)
    rows = {
        (m["service"], m["group"]): (int(m["requests"]), int(m["dyed"]), int(m["online"]))
        for m in re.finditer(
            r"^(?P<service>[a-z-]+)\s+(?P<group>default|task)\s+\S+\s+(?P<requests>\d+)\s+"
            r"(?P<dyed>\d+)\s+(?P<online>\d+)\s+\d+$",
            summary,
            re.M,
        )
    }
    for service in ("fund-facade", "account-svc", "nav-pricing"):
        requests, dyed, online = rows[(service, "task")]
        assert dyed > 0 and online == 0, rows
        requests, dyed, online = rows[(service, "default")]
        assert online > 0 and dyed == 0, rows
    assert alive_mentioning(str(work)) == []
