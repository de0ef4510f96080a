"""The API token's file: made once per state dir (`<state-dir>/api-token`, mode 0600) and
reused after, so `tasklane run` instances, schedulers and a restarted control plane agree on
it, while another control plane's token (another state dir) is refused. It is compared in
constant time and never logged; ApiToken's repr shows the file, not the token.

Kept apart from api/auth.py (which guards the HTTP and gRPC writes with it) so the CLI reads
its token without importing the servers.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
from pathlib import Path

from controlplane.errors import RuntimeFailure, TasklaneError

log = logging.getLogger(__name__)

TOKEN_FILE = "api-token"
# Where the CLI looks when neither --token-file nor $TASKLANE_TOKEN says: `tasklane up`'s
# default state dir, relative to the working directory.
DEFAULT_TOKEN_PATH = Path(".tasklane") / TOKEN_FILE
TOKEN_ENV = "TASKLANE_TOKEN"
# What a header can carry: visible ASCII, no spaces (token_urlsafe gives [A-Za-z0-9_-]).
_TOKEN_SHAPE = re.compile(r"[\x21-\x7e]+")
_MISSING = (
    "this write needs the API token: send 'Authorization: Bearer <token>' "
    f"(the token is in the control plane's state dir, file {TOKEN_FILE})"
)
_WRONG = f"the API token is not this control plane's (see {TOKEN_FILE} in its state dir)"


class ApiToken:
    """One control plane's token: load() reads or makes it at start; until then, and for any
    other token, accepts() is False."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / TOKEN_FILE
        self.created = False  # made by this load(): `tasklane up` says so once
        self._value: str | None = None
        self._digest: bytes | None = None

    def __repr__(self) -> str:
        return f"ApiToken({str(self.path)!r})"

    @property
    def value(self) -> str:
        """The token itself, for the local actuator's children; only after load()."""
        if self._value is None:
            raise RuntimeFailure("the API token is not loaded: the control plane is not started")
        return self._value

    def load(self) -> None:
        """Read the token, or make it on first start; RuntimeFailure when the state dir cannot
        hold it or the file holds no usable token."""
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            token = _read(self.path)
            if token is None:
                self.created = _create(self.path)
                token = _read(self.path)  # ours, or the one another control plane made first
        except OSError as exc:
            raise RuntimeFailure(
                f"cannot keep the API token in {self.path}: {exc.strerror or exc}"
            ) from None
        if token is None:
            raise RuntimeFailure(f"{self.path} was removed while the control plane started")
        self._value, self._digest = token, _digest(token)

    def accepts(self, authorization: str | None) -> bool:
        """True when an `Authorization` value is `Bearer <this token>`. Digests of equal
        length are compared, in constant time, so neither content nor length leaks."""
        if self._digest is None or not authorization:
            return False
        scheme, _, presented = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(_digest(presented.strip()), self._digest)

    def refusal(self, authorization: str | None) -> str:
        """Why a write is refused: no token at all, or not ours."""
        return _WRONG if authorization else _MISSING


def client_token(token_file: Path | None) -> str:
    """The token a CLI write sends: from --token-file, else $TASKLANE_TOKEN, else
    .tasklane/api-token in the working directory; TasklaneError (one line) when none is."""
    from_env = os.environ.get(TOKEN_ENV, "").strip()
    if token_file is None and from_env:
        token, source = from_env, f"${TOKEN_ENV}"
    else:
        path = DEFAULT_TOKEN_PATH if token_file is None else Path(token_file)
        try:
            token, source = path.read_text().strip(), str(path)
        except FileNotFoundError:
            if token_file is not None:
                raise TasklaneError(f"cannot read the API token: {path}: no such file") from None
            raise TasklaneError(
                f"this command writes, and needs the API token: no {path} here; give "
                f"--token-file FILE (the api-token in `tasklane up`'s state dir) or set "
                f"${TOKEN_ENV}"
            ) from None
        except OSError as exc:
            raise TasklaneError(
                f"cannot read the API token: {path}: {exc.strerror or exc}"
            ) from None
    if not _TOKEN_SHAPE.fullmatch(token):
        raise TasklaneError(f"{source} holds no API token (empty, or not one printable word)")
    return token


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def _read(path: Path) -> str | None:
    """The stored token; None when there is none yet."""
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        return None
    if not _TOKEN_SHAPE.fullmatch(token):
        raise RuntimeFailure(
            f"{path} holds no API token (empty, or not one printable word): "
            "delete it and a new one is made at the next start"
        )
    # Group read is allowed: it is how Kubernetes hands a secret to a non-root pod (fsGroup).
    if path.stat().st_mode & 0o037:
        log.warning("%s can be read by other users: chmod 600 it", path)
    return token


def _create(path: Path) -> bool:
    """Write a new token to a private temporary file, then link it into place: the file is
    never seen half-written, and a token another control plane sharing the state dir made
    first is kept. True when ours was linked."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(32) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.link(temporary, path)
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    return True
