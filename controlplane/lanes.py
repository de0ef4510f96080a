"""Tell an app which service and group it runs as, so a task-group instance stays out of
online work.

The mesh keeps online requests out of a task group, but an app also does work nobody asked it
for: queue listeners, schedulers, registrations in online registries. A task-group copy of the
app that starts those takes online messages and fires online jobs twice. ``tasklane run`` and
injected pods set ``TASKLANE_SERVICE`` and ``TASKLANE_GROUP``; this module reads them:

    from controlplane import lanes

    @lanes.online_only
    def start_order_listener(): ...       # runs in `default`, returns None in a task group

    @lanes.online_only
    async def consume_orders(): ...       # async too: awaiting it gives None in a task group

    if lanes.is_task_group(): ...

An app started outside the mesh (no ``TASKLANE_GROUP``) is in ``default``: it does what it always
did. The environment is read at each call, so tests may set it.

This module imports nothing else of tasklane because it runs inside user apps.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable
from typing import ParamSpec, TypeVar

__all__ = [
    "DEFAULT_GROUP",
    "GROUP_ENV",
    "SERVICE_ENV",
    "current_group",
    "current_service",
    "is_task_group",
    "online_only",
]

DEFAULT_GROUP = "default"
GROUP_ENV = "TASKLANE_GROUP"
SERVICE_ENV = "TASKLANE_SERVICE"

_P = ParamSpec("_P")
_R = TypeVar("_R")
log = logging.getLogger(__name__)


def current_group() -> str:
    """The group this instance serves; ``default`` outside the mesh or when unset."""
    return os.environ.get(GROUP_ENV) or DEFAULT_GROUP


def current_service() -> str | None:
    """The service this instance is, or None outside the mesh."""
    return os.environ.get(SERVICE_ENV) or None


def is_task_group() -> bool:
    """True in a task group, where only dyed requests arrive and online work must not start."""
    return current_group() != DEFAULT_GROUP


def online_only(fn: Callable[_P, _R]) -> Callable[_P, _R | None]:
    """``fn`` that runs only in ``default``; in a task group it is skipped (returns None, or for
    an async ``fn`` a coroutine giving None, so ``await`` works in both) and says so in the
    log once per function, so a listener or scheduler never starts where tasks run."""
    said = False

    def skipped() -> bool:
        nonlocal said
        if not is_task_group():
            return False
        if not said:
            said = True
            log.info(
                "%s not started: group %s serves task traffic only",
                getattr(fn, "__qualname__", fn),
                current_group(),
            )
        return True

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def guarded_async(*args: _P.args, **kwargs: _P.kwargs) -> object:
            return None if skipped() else await fn(*args, **kwargs)

        return guarded_async  # type: ignore[return-value]

    @functools.wraps(fn)
    def guarded(*args: _P.args, **kwargs: _P.kwargs) -> _R | None:
        return None if skipped() else fn(*args, **kwargs)

    return guarded
