"""tasklane.v1.TaskService (proto/tasklane/v1/task.proto): the run lifecycle and the profile
over gRPC, so schedulers in any language can report runs with generated stubs.

Served on the control plane's xDS port (one more handler on the same grpc.aio server); etcd
calls run in a worker thread, like the HTTP API's, because that event loop also serves xDS.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from controlplane.api.context import ApiContext
from controlplane.api.proto_gen.tasklane.v1 import task_pb2
from controlplane.errors import StoreError
from controlplane.model.group import GroupKey
from controlplane.model.run import Run
from controlplane.model.text import quote
from controlplane.scaler.profile import profile
from controlplane.store import runs as runs_store
from controlplane.store.etcd import Store
from controlplane.store.rules import load_rules
from controlplane.store.runs import DuplicateRun, RunConflict, RunError, RunNotFound, UnknownTask

SERVICE = "tasklane.v1.TaskService"
DEFAULT_PROFILE_MINUTES = 24 * 60
MAX_PROFILE_MINUTES = 7 * 24 * 60

T = TypeVar("T")


def status_code(exc: RunError) -> grpc.StatusCode:
    """The gRPC status of a refused run report (the HTTP API's 404/409/400)."""
    if isinstance(exc, (UnknownTask, RunNotFound)):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, DuplicateRun):
        return grpc.StatusCode.ALREADY_EXISTS
    if isinstance(exc, RunConflict):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INVALID_ARGUMENT


def run_message(run: Run) -> task_pb2.Run:
    message = task_pb2.Run(task=run.task, id=run.id, outcome=run.outcome)
    message.started_at.CopyFrom(_timestamp(run.started_at))
    if run.finished_at is not None:
        message.finished_at.CopyFrom(_timestamp(run.finished_at))
    return message


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(round(seconds * 1e9))
    return stamp


def _seconds(stamp: Timestamp) -> float:
    return stamp.seconds + stamp.nanos / 1e9


class TaskService:
    """The servicer; `handler()` is what `xds.server.serve(extra_handlers=...)` takes."""

    def __init__(self, context: ApiContext) -> None:
        self._context = context

    def handler(self) -> grpc.GenericRpcHandler:
        """One unary handler per RPC of the proto's service, so an RPC added to the proto
        without a method here fails at start-up, not at the first call."""
        service = task_pb2.DESCRIPTOR.services_by_name["TaskService"]
        handlers = {
            method.name: grpc.unary_unary_rpc_method_handler(
                getattr(self, method.name),
                request_deserializer=getattr(task_pb2, method.input_type.name).FromString,
                response_serializer=getattr(task_pb2, method.output_type.name).SerializeToString,
            )
            for method in service.methods
        }
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    async def _call(
        self, context: grpc.aio.ServicerContext, call: Callable[..., T], *args: Any
    ) -> T:
        """Run a blocking store call in a thread; refusals and etcd failures become statuses."""
        try:
            return await asyncio.to_thread(call, self._context.store, *args)
        except RunError as exc:
            await context.abort(status_code(exc), str(exc))
        except StoreError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    async def StartRun(
        self, request: task_pb2.StartRunRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.Run:
        at = _seconds(request.at) if request.HasField("at") else None
        run = await self._call(context, runs_store.start_run, request.task, request.id or None, at)
        return run_message(run)

    async def FinishRun(
        self, request: task_pb2.FinishRunRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.Run:
        at = _seconds(request.at) if request.HasField("at") else None
        outcome = request.outcome or runs_store.DEFAULT_OUTCOME
        run = await self._call(
            context, runs_store.finish_run, request.task, request.id or None, at, outcome
        )
        return run_message(run)

    async def ListRuns(
        self, request: task_pb2.ListRunsRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.ListRunsResponse:
        def listing(store: Store, task: str | None) -> list[Run]:
            runs = runs_store.list_runs(store, task)
            if task is not None and not runs:
                runs_store.require_task(store, task)  # NOT_FOUND for a task that does not exist
            return runs

        runs = await self._call(context, listing, request.task or None)
        return task_pb2.ListRunsResponse(runs=[run_message(run) for run in runs])

    async def GetProfile(
        self, request: task_pb2.GetProfileRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.Profile:
        minutes = request.minutes or DEFAULT_PROFILE_MINUTES
        if minutes > MAX_PROFILE_MINUTES:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"minutes must be at most {MAX_PROFILE_MINUTES} (7 days), not {minutes}",
            )
        now = time.time()
        start = _seconds(request.start) if request.HasField("start") else now
        start = math.floor(start / 60) * 60
        service = request.service

        def compute(store: Store) -> dict[GroupKey, list[int]] | None:
            rules, _ = load_rules(store)
            if service and service not in rules.services:
                return None
            return profile(rules, runs_store.list_runs(store), start, minutes, now)

        groups = await self._call(context, compute)
        if groups is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"Service {quote(service)} not found")
        return task_pb2.Profile(
            start=_timestamp(start),
            minutes=minutes,
            groups=[
                task_pb2.GroupProfile(service=key[0], group=key[1], replicas=replicas)
                for key, replicas in sorted(groups.items())
                if not service or key[0] == service
            ],
        )
