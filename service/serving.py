"""Running an ASGI app under uvicorn with a drain phase on SIGTERM/SIGINT.

uvicorn alone closes its listening socket at once on SIGTERM; we first flip the app to draining
(readiness 503, new requests 503), let in-flight requests finish within the grace period, and
only then let uvicorn exit. Kubernetes stops routing to the pod when readiness fails.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import uvicorn

log = logging.getLogger(__name__)


@dataclass
class Lifecycle:
    """Shared by the app (readiness, admission) and the server (drain)."""

    draining: bool = False
    inflight: int = 0
    started_at: float = field(default_factory=time.monotonic)
    _idle: asyncio.Event | None = None

    def enter(self) -> None:
        self.inflight += 1

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        if self.inflight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, grace_s: float) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.grace_s = grace_s
        self._drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.lifecycle.draining:
            # A second signal: stop now.
            super().handle_exit(sig, frame)
            return
        log.info("draining", extra={"signal": signal.Signals(sig).name, "grace_s": self.grace_s})
        self.lifecycle.draining = True
        loop = asyncio.get_event_loop()
        self._drain_task = loop.create_task(self._drain_then_exit(sig, frame))

    async def _drain_then_exit(self, sig: int, frame: FrameType | None) -> None:
        drained = await self.lifecycle.wait_idle(self.grace_s)
        log.info(
            "drained" if drained else "grace period over", extra={"left": self.lifecycle.inflight}
        )
        super().handle_exit(sig, frame)


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port with SO_REUSEPORT, as each of several gateway processes
    binds it (`--processes N`): the kernel spreads new connections across their sockets, and a
    socket closed by a dead process leaves the group at once. Not listening yet: uvicorn calls
    listen() with its backlog."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn decides
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def serve(
    app: Any,
    host: str,
    port: int,
    lifecycle: Lifecycle,
    grace_s: float,
    *,
    reuse_port: bool = False,
    **kw: Any,
) -> None:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(grace_s) + 1,
        timeout_keep_alive=30,
        **kw,
    )
    # uvicorn re-raises the signal it caught once it has shut down, to whatever handler was
    # installed before it; a no-op there makes a drained shutdown exit 0 instead of dying by
    # the signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    # Other signals (SIGHUP...) are left to whoever installed them.
    sockets = [reuse_port_socket(host, port)] if reuse_port else None
    try:
        DrainingServer(config, lifecycle, grace_s).run(sockets=sockets)
    finally:
        for sock in sockets or ():
            sock.close()  # uvicorn closes them on a clean shutdown; not if start-up failed
