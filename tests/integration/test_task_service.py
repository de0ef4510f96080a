"""tasklane.v1.TaskService with a real grpcio client and the generated stubs, against a real
control plane (its xDS port) and etcd; and the code generation those stubs come from."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from controlplane.api.proto_gen.tasklane.v1 import task_pb2, task_pb2_grpc
from controlplane.store.runs import run_key
from tests.support.runs import Plane, plane_with_rules

pytestmark = pytest.mark.timeout(120)

# 2024-03-01 02:00 in Asia/Shanghai: when nightly-fund-yield (tests/rules/good) fires.
FIRE = datetime.fromisoformat("2024-03-01T02:00:00+08:00").timestamp()


@pytest.fixture(scope="module")
def plane(etcd_endpoint_module: str) -> Iterator[Plane]:
    yield from plane_with_rules(etcd_endpoint_module)


@pytest.fixture(scope="module")
def stub(plane: Plane) -> Iterator[task_pb2_grpc.TaskServiceStub]:
    channel = plane.grpc_channel()
    try:
        yield task_pb2_grpc.TaskServiceStub(channel)
    finally:
        channel.close()


def stamp(seconds: float) -> Timestamp:
    result = Timestamp()
    result.FromNanoseconds(round(seconds * 1e9))
    return result


def new_task(plane: Plane) -> str:
    """A task on the batch-debit chain, so the fund-yield groups' profile stays the rules' own."""
    return plane.new_task("batch-debit", "{account-svc: 1}")


def test_start_finish_list(plane: Plane, stub: task_pb2_grpc.TaskServiceStub) -> None:
    task = new_task(plane)
    first = stub.StartRun(task_pb2.StartRunRequest(task=task, id="g1", at=stamp(FIRE)), timeout=10)
    assert (first.task, first.id, first.started_at.seconds) == (task, "g1", int(FIRE))
    assert not first.HasField("finished_at") and first.outcome == ""
    second = stub.StartRun(task_pb2.StartRunRequest(task=task), timeout=10)
    assert second.id and second.started_at.seconds > FIRE

    done = stub.FinishRun(task_pb2.FinishRunRequest(task=task), timeout=10)  # the latest open
    assert (done.id, done.outcome) == (second.id, "succeeded") and done.HasField("finished_at")
    failed = stub.FinishRun(
        task_pb2.FinishRunRequest(task=task, id="g1", at=stamp(FIRE + 90.5), outcome="failed"),
        timeout=10,
    )
    assert failed.finished_at.ToNanoseconds() == round((FIRE + 90.5) * 1e9)

    listed = stub.ListRuns(task_pb2.ListRunsRequest(task=task), timeout=10).runs
    assert [run.id for run in listed] == ["g1", second.id]
    assert list(listed) == [failed, done]
    everything = stub.ListRuns(task_pb2.ListRunsRequest(), timeout=10).runs
    assert {run.id for run in everything if run.task == task} == {"g1", second.id}
    # etcd holds exactly these runs, as the HTTP API shows them.
    assert sorted(plane.stored(task)) == sorted([run_key(task, "g1"), run_key(task, second.id)])
    assert plane.stored(task)[run_key(task, "g1")]["finished_at"] == FIRE + 90.5


@pytest.mark.parametrize(
    ("call", "request_", "code", "message"),
    [
        ("StartRun", {"task": "nope"}, "NOT_FOUND", "ScheduledTask 'nope' not found"),
        ("FinishRun", {"task": "nope"}, "NOT_FOUND", "ScheduledTask 'nope' not found"),
        ("ListRuns", {"task": "nope"}, "NOT_FOUND", "ScheduledTask 'nope' not found"),
        ("StartRun", {"id": "dup"}, "ALREADY_EXISTS", "already has a run 'dup'"),
        ("FinishRun", {}, "FAILED_PRECONDITION", "has no open run"),
        ("FinishRun", {"id": "dup"}, "FAILED_PRECONDITION", "already finished"),
        ("FinishRun", {"id": "other"}, "NOT_FOUND", "has no run 'other'"),
        ("StartRun", {"id": "no spaces"}, "INVALID_ARGUMENT", "invalid run id 'no spaces'"),
        ("FinishRun", {"outcome": "x" * 65}, "INVALID_ARGUMENT", "invalid outcome"),
    ],
)
def test_refusals_carry_status_codes(
    plane: Plane,
    stub: task_pb2_grpc.TaskServiceStub,
    call: str,
    request_: dict,
    code: str,
    message: str,
) -> None:
    task = new_task(plane)
    stub.StartRun(task_pb2.StartRunRequest(task=task, id="dup"), timeout=10)
    stub.FinishRun(task_pb2.FinishRunRequest(task=task, id="dup"), timeout=10)
    request_class = getattr(task_pb2, f"{call}Request")
    with pytest.raises(grpc.RpcError) as caught:
        getattr(stub, call)(request_class(**{"task": task, **request_}), timeout=10)
    assert caught.value.code() == getattr(grpc.StatusCode, code)
    assert message in caught.value.details()
    assert list(plane.stored(task)) == [run_key(task, "dup")]


def test_profile_from_schedule_and_history(
    plane: Plane, stub: task_pb2_grpc.TaskServiceStub
) -> None:
    """nightly-fund-yield fires at 02:00 Shanghai with fund-facade: 4 on fund-facade|task."""
    around_fire = task_pb2.GetProfileRequest(start=stamp(FIRE - 150), minutes=5)
    profile = stub.GetProfile(around_fire, timeout=10)
    assert profile.start.seconds == FIRE - 180  # rounded down to the minute
    assert profile.minutes == 5
    groups = {(g.service, g.group): list(g.replicas) for g in profile.groups}
    assert set(groups) == {
        ("account-svc", "debit"),
        ("account-svc", "task"),
        ("fund-facade", "task"),
        ("nav-pricing", "task"),
    }
    assert groups[("fund-facade", "task")] == [0, 0, 0, 4, 4]
    assert groups[("nav-pricing", "task")] == [0, 0, 0, 2, 2]

    # A reported run replaces the predicted one: it ends when it finished, not 7 h later.
    stub.StartRun(
        task_pb2.StartRunRequest(task="nightly-fund-yield", id="n1", at=stamp(FIRE)), timeout=10
    )
    stub.FinishRun(
        task_pb2.FinishRunRequest(task="nightly-fund-yield", id="n1", at=stamp(FIRE + 3600)),
        timeout=10,
    )
    around_end = task_pb2.GetProfileRequest(
        start=stamp(FIRE + 3600 - 120), minutes=4, service="fund-facade"
    )
    profile = stub.GetProfile(around_end, timeout=10)
    assert [(g.service, g.group, list(g.replicas)) for g in profile.groups] == [
        ("fund-facade", "task", [4, 4, 0, 0])
    ]


def test_profile_defaults_and_refusals(stub: task_pb2_grpc.TaskServiceStub) -> None:
    profile = stub.GetProfile(task_pb2.GetProfileRequest(), timeout=10)
    assert profile.minutes == 1440 and profile.start.seconds % 60 == 0
    assert all(len(group.replicas) == 1440 for group in profile.groups)
    for request_, code, message in [
        ({"service": "nope"}, grpc.StatusCode.NOT_FOUND, "Service 'nope' not found"),
        ({"minutes": 10081}, grpc.StatusCode.INVALID_ARGUMENT, "at most 10080"),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetProfile(task_pb2.GetProfileRequest(**request_), timeout=10)
        assert caught.value.code() == code
        assert message in caught.value.details()
