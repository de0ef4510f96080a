"""A chain of real OpenTelemetry-instrumented apps (Flask + requests under
`opentelemetry-instrument`, no tasklane code in them) behind real Envoy sidecars: the dye rides
only in W3C baggage, which OpenTelemetry re-encodes at every hop (`fund-yield@<run id>` goes on
as `fund-yield%40<run id>`, `;src=cron` as `%3Bsrc%3Dcron`). Each hop must still be served by
the task group, as the apps' answers say."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.support.mesh import Mesh, request, served_by
from tests.support.otel_app import start_otel_app
from tests.support.rules import chain, service
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(120)

RULES = (
    service("fund-facade")
    + service("account-svc")
    + service("nav-pricing")
    + chain(
        "fund-yield",
        "[{service: fund-facade, group: task}, {service: account-svc, group: task},"
        " {service: nav-pricing, group: task}]",
    )
)
NEXT = {"fund-facade": ["account-svc"], "account-svc": ["nav-pricing"], "nav-pricing": []}
ALL_TASK = [(service, "task") for service in NEXT]
ALL_DEFAULT = [(service, "default") for service in NEXT]
RUN = "20261203T075400Z-a1b2c3"  # a run id as `tasklane` makes them (store.runs.new_run_id)
REQUESTS = 20


def test_opentelemetry_baggage_keeps_exact_and_per_run_dyes_in_the_task_group(
    tmp_path: Path,
) -> None:
    with Mesh(tmp_path, RULES) as mesh:
        client = None
        for name in reversed(NEXT):
            for group in ("default", "task"):
                instance = mesh.add(name, group, start_app=start_otel_app(name, group, NEXT[name]))
                client = instance if (name, group) == ("fund-facade", "default") else client
        port = client.egress_port

        def hops(sent: str | dict[str, str] | None) -> tuple[int, list[tuple[str, str]], list]:
            """One request: `sent` is its baggage header, or all its headers."""
            headers = {"baggage": sent} if isinstance(sent, str) else sent or {}
            status, answer = request(port, "fund-facade", headers=headers)
            return status, served_by(answer), answer.get("hops", [])

        # New hosts start unhealthy until their first health check passes (interval 1 s).
        wait_until(
            lambda: (
                hops(None)[:2] == (200, ALL_DEFAULT)
                and hops("task-dye=fund-yield")[:2] == (200, ALL_TASK)
            ),
            what="every instance healthy",
        )
        cases = [
            (None, ALL_DEFAULT),
            ("task-dye=fund-yield", ALL_TASK),  # exact: OpenTelemetry forwards it unchanged
            (f"task-dye=fund-yield@{RUN}", ALL_TASK),  # per run: '@' goes on as %40
            ("tenant=7,task-dye=fund-yield;src=cron", ALL_TASK),  # properties go on encoded
            (f"task-dye=fund-yield@{RUN};src=cron, tenant=7", ALL_TASK),
            ("task-dye=fund-yieldx", ALL_DEFAULT),
            ("tenant=7", ALL_DEFAULT),
            # OpenTelemetry forwards baggage, not the mesh's own header: only the first hop.
            ({"x-task-dye": "fund-yield"}, ALL_TASK[:1] + ALL_DEFAULT[1:]),
        ]
        for sent, expected in cases:
            results = Counter()
            for _ in range(REQUESTS):
                status, served, _ = hops(sent)
                results[(status, tuple(served))] += 1
            assert results == {(200, tuple(expected)): REQUESTS}, sent

        # What the second and third hops received: OpenTelemetry's re-encoding, not what the
        # client sent, so the routes above were taken on the encoded form.
        _, _, answer = hops(f"tenant=7,task-dye=fund-yield@{RUN};src=cron")
        received = [hop["baggage"] for hop in answer]
        assert received[0] == f"tenant=7,task-dye=fund-yield@{RUN};src=cron"
        for later in received[1:]:
            assert f"task-dye=fund-yield%40{RUN}%3Bsrc%3Dcron" in later, received
            assert "tenant=7" in later, received
