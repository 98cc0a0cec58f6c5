"""The shared secret between the gateway and its workers.

A worker's internal API (`/internal/generate`, `/score`, `/byte-dist`, `/abort`, `/info`) is
unmetered inference: no API keys, no admission, `n` up to 16. When a secret file is configured
(`OCTOGRAPH_WORKER_SECRET_FILE`, read by both the worker and the gateway), every worker path
except the probes (and `/metrics` when it shares the API port) needs
`Authorization: Bearer <secret>`, compared in constant time. No secret configured = open, as
before (tests with in-process fake workers, a worker on loopback); a worker that binds a
non-loopback address without one says so in its log.

The file is read once at start-up: rotating the secret means restarting workers and gateways
(the Kubernetes manifests roll both when the generated Secret's name changes).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import tempfile
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from pathlib import Path
from typing import Any

from service.config import StartupError
from service.errors import Unauthorized, render

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SECRET_ENV = "OCTOGRAPH_WORKER_SECRET_FILE"
MIN_SECRET_CHARS = 32
SECRET_FILE_NAME = "worker-secret"


class SecretFileError(StartupError):
    """The configured secret file cannot be used: the process must not start (never open)."""


def read_secret_file(path: Path) -> str:
    """The secret in `path`: its first line that is neither blank nor a `#` comment, stripped.
    Raises SecretFileError when the file is unreadable, holds no secret or a short one: a
    configured secret never falls back to open."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretFileError(f"worker secret file {path}: {type(exc).__name__}") from None
    found = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    secret = found[0] if found else ""
    if len(secret) < MIN_SECRET_CHARS:
        raise SecretFileError(
            f"worker secret file {path}: the secret must be at least {MIN_SECRET_CHARS} "
            f"characters (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    return secret


def write_secret_file(directory: Path | None = None) -> Path:
    """A fresh random secret in a new 0700 directory, file mode 0600 (embedded mode makes one
    per run). The caller removes the directory."""
    folder = Path(tempfile.mkdtemp(prefix="octograph-secret-", dir=directory))
    return ensure_secret_file(folder / SECRET_FILE_NAME)


def ensure_secret_file(path: Path) -> Path:
    """`path` holds a usable secret afterwards: kept if it has one, else a fresh random one
    (mode 0600, written to a temporary file and renamed over, so never half-written).
    `octograph worker-secret --file` (the compose stack's one-shot init) runs this."""
    try:
        read_secret_file(path)
        return path
    except SecretFileError:
        pass
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    tmp.replace(path)
    return path


def auth_header(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def is_loopback_host(host: str) -> bool:
    """Whether a bind address only listens on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class InternalAuth:
    """Pure-ASGI guard of a worker app: every path but `open_paths` needs the secret. Deny by
    default, so a future /internal route cannot be added unguarded."""

    def __init__(self, app: ASGIApp, *, secret: str, open_paths: Iterable[str]) -> None:
        self.app = app
        self._expected = _digest(b"Bearer " + secret.encode())
        self._open = frozenset(open_paths)

    def allowed(self, authorization: bytes | None) -> bool:
        # Digests of equal length, compared in constant time: the time taken says nothing
        # about how much of the secret a guess got right.
        return hmac.compare_digest(_digest(authorization or b""), self._expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._open:
            await self.app(scope, receive, send)
            return
        given = None
        for k, v in scope.get("headers", ()):
            if k == b"authorization":
                given = bytes(v)
                break
        if self.allowed(given):
            await self.app(scope, receive, send)
            return
        status, headers, body = render(
            Unauthorized("this worker API needs the gateway's worker secret", code="worker_secret")
        )
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*headers, (b"www-authenticate", b"Bearer")],
            }
        )
        await send({"type": "http.response.body", "body": body})
