"""API keys: deny by default when any key is configured; constant-time comparison of SHA-256
digests; keys from settings and/or a file re-read when it changes (rotation without restart).
Keys never reach logs: only their digests are kept."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from pathlib import Path

from service.errors import ServiceError, Unauthorized

log = logging.getLogger(__name__)
FILE_CHECK_INTERVAL_S = 1.0


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    def __init__(
        self,
        keys: list[str],
        keys_file: Path | None = None,
    ) -> None:
        self._static = [_digest(k) for k in keys if k]
        self._file = keys_file
        self._file_digests: list[bytes] = []
        self._file_mtime: float | None = None
        self._checked_at = 0.0
        self._reload(force=True)

    @property
    def enabled(self) -> bool:
        return bool(self._static or self._file_digests or self._file is not None)

    def _reload(self, force: bool = False) -> None:
        if self._file is None:
            return
        now = time.monotonic()
        if not force and now - self._checked_at < FILE_CHECK_INTERVAL_S:
            return
        self._checked_at = now
        try:
            mtime = os.stat(self._file).st_mtime
        except OSError:
            if self._file_digests:
                log.warning("api keys file unreadable; keeping the previous keys")
            return
        if mtime == self._file_mtime:
            return
        lines = self._file.read_text(encoding="utf-8").splitlines()
        keys = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        self._file_digests = [_digest(k) for k in keys]
        self._file_mtime = mtime
        log.info("api keys loaded", extra={"count": len(keys)})

    def authenticate(self, authorization: str | None) -> tuple[str | None, ServiceError | None]:
        """(the key's identity, None) when allowed (identity None in open mode), else
        (None, the error to send). The identity is a digest prefix, never the key."""
        self._reload()
        if not self.enabled:
            return None, None
        if not authorization or not authorization.lower().startswith("bearer "):
            return None, Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        given = _digest(authorization[7:].strip())
        ok = False
        for known in (*self._static, *self._file_digests):
            # No early exit: the time taken does not depend on which key matched.
            ok |= hmac.compare_digest(given, known)
        if not ok:
            return None, Unauthorized("invalid API key")
        return given.hex()[:16], None
