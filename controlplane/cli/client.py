"""The CLI as a client of the control plane's HTTP API: where it is, the token, calls and
one-line errors."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import http.client
import json
import os
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from controlplane.api.token import DEFAULT_TOKEN_PATH, client_token
from controlplane.errors import TasklaneError

DEFAULT_SERVER = "http://127.0.0.1:8080"
SERVER_ENV = "TASKLANE_SERVER"
# Bounds a hung server only: an apply is one validation and one etcd transaction.
REQUEST_TIMEOUT = 60.0
OUTPUTS = ("table", "yaml", "json")
# Sent with every request; the rules' history records it (api/rules.py).
CLIENT_HEADER = "X-Tasklane-Client"
STDIN = "-"

# Straight to the control plane: apps (and tests) set http_proxy for the mesh's egress.
_api_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def server_option() -> argparse.ArgumentParser:
    """--server, for every command that talks to a running control plane."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--server",
        metavar="URL",
        default=os.environ.get(SERVER_ENV, DEFAULT_SERVER),
        help="HTTP address of the control plane, or of its replicas as a comma list (requests "
        f"go to the first that accepts a connection; default: ${SERVER_ENV} or {DEFAULT_SERVER})",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="the API token, which writes need (default: $TASKLANE_TOKEN, else "
        f"{DEFAULT_TOKEN_PATH}, written by `tasklane up` into its state dir)",
    )
    return parser


def output(text: str) -> None:
    """Write to stdout; a reader that has gone away (`tasklane get svc | head -1`) is not an
    error, so no traceback, and nothing more is written to the closed pipe."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def structured(body: object, form: str) -> str:
    """An API answer as `-o json` or `-o yaml` prints it."""
    if form == "json":
        return json.dumps(body, indent=2, ensure_ascii=False) + "\n"
    return yaml.safe_dump(body, sort_keys=False, allow_unicode=True)


def api_token(args: argparse.Namespace) -> str:
    """The API token a write sends (see --token-file)."""
    return client_token(args.token_file)


class ApiError(TasklaneError):
    """The control plane answered with an error status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Unreachable(TasklaneError):
    """No connection to the control plane could be made: the request was not sent."""


def servers(server: str) -> list[str]:
    """The URLs of --server: one control plane, or its replicas as a comma list (like
    etcdctl's --endpoints); TasklaneError naming an empty entry."""
    urls = [url.strip() for url in server.split(",")]
    if not all(urls):
        raise TasklaneError(f"--server {server!r}: an empty URL in the list")
    return urls


def call(server: str, method: str, path: str, body: object = None, token: str | None = None) -> Any:
    """One API request, with `token` for writes, to the first replica of `server` (see
    servers()) that accepts a connection: a dead replica is skipped, a request it may have
    received is never sent twice. Its JSON answer, or TasklaneError (ApiError for an error
    status) with a one-line reason."""
    *others, last = servers(server)
    for url in others:
        with contextlib.suppress(Unreachable):
            return _call_one(url, method, path, body, token)
    return _call_one(last, method, path, body, token)


def _call_one(server: str, method: str, path: str, body: object, token: str | None) -> Any:
    base = (server if "://" in server else f"http://{server}").rstrip("/")
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    headers[CLIENT_HEADER] = _client_name()
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
        with _api_opener.open(request, timeout=REQUEST_TIMEOUT) as response:
            payload = response.read()
    except urllib.error.HTTPError as exc:
        raise ApiError(_api_error(base, exc), exc.code) from None
    except urllib.error.URLError as exc:  # before the request was sent: connecting failed
        raise _unreachable(base, exc.reason, Unreachable) from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise _unreachable(base, exc) from None
    try:
        return json.loads(payload)
    except ValueError:
        raise TasklaneError(
            f"{base} did not answer with JSON: is it a tasklane control plane?"
        ) from None


def _client_name() -> str:
    """'user@host': who the rules' history says made a change (with the client's address)."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name and no $USER: a bare container
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def _unreachable(
    base: str, reason: object, kind: type[TasklaneError] = TasklaneError
) -> TasklaneError:
    shown = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
    return kind(f"cannot reach the control plane at {base}: {shown} (is `tasklane up` running?)")


def _api_error(base: str, exc: urllib.error.HTTPError) -> str:
    """The API's own one-line message, or the HTTP status when the answer has none."""
    try:
        message = json.loads(exc.read())["error"]
    except (OSError, ValueError, KeyError, TypeError):
        message = None
    if isinstance(message, str) and message:
        return message
    return f"{base} answered HTTP {exc.code} {exc.reason}: is it a tasklane control plane?"


def quote_segment(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")
