"""API keys: deny by default when any key is configured; constant-time comparison of SHA-256
digests; keys from settings and/or a file re-read when it changes (rotation without restart).
Keys never reach logs: only their digests are kept.

The keys file is checked once a second and reloaded when its *content* changed (a SHA-256 of
the bytes, not the mtime: an in-place rewrite read half-way is corrected on the next check,
whatever the timestamps say). A file that disappears takes its keys with it: deleting the file
revokes them (with no static keys left, every request is refused until it is back). A file that
cannot be read or decoded keeps the keys loaded before (a warning in the log, never a 500).

Exposure rules, checked at start-up (`check_exposure`): without any key the gateway is open,
which it accepts on a loopback bind only unless OCTOGRAPH_ALLOW_OPEN=true; a key that the
repository publishes as an example is refused wherever it comes from.

Admin keys (OCTOGRAPH_ADMIN_KEYS) are API keys that may also see other clients' traffic: the
console's routing decisions. On an open gateway (no keys) there are no tenants, so every caller
may."""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from pathlib import Path

from service.config import GatewaySettings, StartupError
from service.errors import ServiceError, Unauthorized
from service.internal_auth import is_loopback_host

log = logging.getLogger(__name__)
FILE_CHECK_INTERVAL_S = 1.0
MAX_KEYS_FILE_BYTES = 1 << 20
# Keys committed to this repository as examples: public, so never accepted.
PUBLIC_EXAMPLE_KEYS = frozenset({"octograph-local-dev-key-change-me"})


class ExposureError(StartupError):
    """A configuration that would expose the API to anyone: the gateway does not start."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


_PUBLIC_DIGESTS = frozenset(_digest(k) for k in PUBLIC_EXAMPLE_KEYS)


def parse_keys(text: str) -> list[str]:
    lines = text.splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


class ApiKeys:
    def __init__(
        self,
        keys: list[str],
        keys_file: Path | None = None,
        admin_keys: list[str] | None = None,
    ) -> None:
        admins = [k for k in admin_keys or [] if k]
        self._static = [_digest(k) for k in [*keys, *admins] if k]
        # Identities (authenticate's digest prefix) of the admin keys, never the keys.
        self._admin_ids = frozenset(_digest(k).hex()[:16] for k in admins)
        self._file = keys_file
        self._file_digests: list[bytes] = []
        self._file_hash: bytes | None = None
        self._checked_at = 0.0
        self.refused_public = False  # the file held a public example key (dropped)
        self._reload(force=True)
        if any(d in _PUBLIC_DIGESTS for d in self._static) or self.refused_public:
            raise ExposureError(
                "an API key is the public example key from this repository "
                f"({', '.join(sorted(PUBLIC_EXAMPLE_KEYS))}): use keys of your own"
            )

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
            with open(self._file, "rb") as f:
                raw = f.read(MAX_KEYS_FILE_BYTES)
        except FileNotFoundError:
            if self._file_digests or self._file_hash is None:
                log.warning("api keys file is gone: its keys are revoked")
            self._file_digests, self._file_hash = [], b""
            return
        except OSError as exc:
            log.warning("api keys file unreadable (%s); keeping the previous keys", exc.strerror)
            return
        content_hash = hashlib.sha256(raw).digest()
        if content_hash == self._file_hash:
            return
        try:
            keys = parse_keys(raw.decode("utf-8"))
        except UnicodeDecodeError:
            log.warning("api keys file is not UTF-8; keeping the previous keys")
            return
        digests = [_digest(k) for k in keys]
        public = [d for d in digests if d in _PUBLIC_DIGESTS]
        if public:
            self.refused_public = True
            log.error("api keys file holds the public example key; it is not accepted")
        self._file_digests = [d for d in digests if d not in _PUBLIC_DIGESTS]
        self._file_hash = content_hash
        log.info("api keys loaded", extra={"count": len(self._file_digests)})

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

    def sees_every_client(self, identity: str | None) -> bool:
        """May the caller `authenticate` identified see other clients' traffic? Anyone on an
        open gateway; with keys, only an admin key."""
        if not self.enabled:
            return True
        return identity is not None and identity in self._admin_ids


def check_exposure(settings: GatewaySettings) -> None:
    """Refuse to serve an open API (no key) on a non-loopback address, unless the operator says
    so with OCTOGRAPH_ALLOW_OPEN=true."""
    keyed = (
        bool(settings.api_keys) or bool(settings.admin_keys) or settings.api_keys_file is not None
    )
    if keyed or settings.allow_open or is_loopback_host(settings.host):
        return
    raise ExposureError(
        f"refusing to serve without API keys on {settings.host}: anyone who can reach it could "
        "use it. Set OCTOGRAPH_API_KEYS or OCTOGRAPH_API_KEYS_FILE, bind 127.0.0.1, or set "
        "OCTOGRAPH_ALLOW_OPEN=true if an open API is what you want"
    )
