"""The workers' internal API and its shared secret (issue 17, item 4): a worker with a secret
refuses every path but its probes without `Authorization: Bearer <secret>`; the gateway sends
it on every call (lean HTTP/1.1 pool and httpx alike); a worker's metrics can live on a port
of their own; a configured secret that cannot be used stops the process (never open)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.config import GatewaySettings
from service.gateway.app import build_gateway_app
from service.graph.schema import parse_graph
from service.internal_auth import SecretFileError, read_secret_file, write_secret_file
from service.observability.metrics_server import serve_registries
from service.serving import Lifecycle
from service.worker.app import build_worker_app
from service.worker.fake_engine import FakeEngine
from tests.conftest import FAKE_GRAPH, free_port, serve_app

REPO = Path(__file__).resolve().parents[2]
SECRET = "s3cret-" + "x" * 40
GOOD = {"authorization": f"Bearer {SECRET}"}
GENERATE = {"request_id": "r1", "prompt": "hello there", "sampling": {"max_tokens": 3}}


def _engine(name: str = "alpha") -> FakeEngine:
    return FakeEngine(name=name, max_model_len=256)


async def _ready(client: httpx.AsyncClient, url: str) -> None:
    for _ in range(200):
        if (await client.get(f"{url}/readyz")).status_code == 200:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("worker not ready")


async def test_worker_with_a_secret_refuses_every_path_but_the_probes() -> None:
    served = await serve_app(build_worker_app(_engine(), Lifecycle(), secret=SECRET))
    url = served.url
    try:
        async with httpx.AsyncClient(timeout=10, trust_env=False) as c:
            await _ready(c, url)
            assert (await c.get(f"{url}/livez")).status_code == 200
            assert (await c.get(f"{url}/metrics")).status_code == 200  # shares the API port
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": SECRET}):
                r = await c.get(f"{url}/internal/info", headers=headers)
                assert r.status_code == 401, headers
                assert r.json()["error"]["type"] == "authentication_error"
                r = await c.post(f"{url}/internal/generate", json=GENERATE, headers=headers)
                assert r.status_code == 401
                r = await c.post(f"{url}/internal/abort/r1", headers=headers)
                assert r.status_code == 401
            # Deny by default: paths that are not probes need it too.
            assert (await c.get(f"{url}/openapi.json")).status_code == 401
            assert (await c.get(f"{url}/internal/info", headers=GOOD)).status_code == 200
            r = await c.post(f"{url}/internal/generate", json=GENERATE, headers=GOOD)
            assert r.status_code == 200 and '"finish"' in r.text
    finally:
        await served.stop()


async def test_worker_without_a_secret_stays_open() -> None:
    served = await serve_app(build_worker_app(_engine(), Lifecycle()))
    try:
        async with httpx.AsyncClient(timeout=10, trust_env=False) as c:
            await _ready(c, served.url)
            assert (await c.get(f"{served.url}/internal/info")).status_code == 200
    finally:
        await served.stop()


async def test_worker_metrics_on_their_own_port() -> None:
    app = build_worker_app(_engine(), Lifecycle(), secret=SECRET, metrics_on_api_port=False)
    served = await serve_app(app)
    metrics_port = free_port()
    serve_registries([app.state.worker.registry], "127.0.0.1", metrics_port)
    try:
        async with httpx.AsyncClient(timeout=10, trust_env=False) as c:
            await _ready(c, served.url)
            # Not on the API port: without the secret 401 (deny by default), with it 404.
            assert (await c.get(f"{served.url}/metrics")).status_code == 401
            assert (await c.get(f"{served.url}/metrics", headers=GOOD)).status_code == 404
            r = await c.get(f"http://127.0.0.1:{metrics_port}/metrics")
            assert r.status_code == 200 and "octograph_worker_inflight" in r.text
    finally:
        await served.stop()


class Spy:
    """Records (path, Authorization) of every request a worker app receives."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: list[tuple[str, str | None]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            auth = dict(scope["headers"]).get(b"authorization")
            self.seen.append((scope["path"], auth.decode() if auth else None))
        await self.app(scope, receive, send)


async def _stack(tmp_path: Path, gateway_secret: str) -> tuple[Any, dict[str, Spy], list[Any]]:
    graph = parse_graph(FAKE_GRAPH)
    spies: dict[str, Spy] = {}
    servers = []
    urls = {}
    for name, spec in graph.models.items():
        eng = FakeEngine(name=name, max_model_len=spec.max_model_len)
        spies[name] = Spy(build_worker_app(eng, Lifecycle(), secret=SECRET))
        served = await serve_app(spies[name])
        servers.append(served)
        urls[name] = [served.url]
    secret_file = tmp_path / "worker-secret"
    secret_file.write_text(gateway_secret + "\n")
    settings = GatewaySettings(
        health_interval_s=0.2, cooldown_s=0.5, worker_secret_file=secret_file
    )
    gateway = await serve_app(build_gateway_app(settings, graph, lifecycle=Lifecycle(), urls=urls))
    servers.append(gateway)
    return gateway, spies, servers


async def test_gateway_sends_the_secret_on_every_worker_call(tmp_path: Path) -> None:
    gateway, spies, servers = await _stack(tmp_path, SECRET)
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30, trust_env=False) as c:
            for _ in range(100):
                if (await c.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            chat = {"model": "math", "messages": [{"role": "user", "content": "hi"}]}
            r = await c.post("/v1/chat/completions", json=chat)  # generate, lean pool
            assert r.status_code == 200, r.text
            r = await c.post("/v1/chat/completions", json={**chat, "stream": True})
            assert r.status_code == 200 and "[DONE]" in r.text
            r = await c.post("/v1/route", json={"model": "auto", "prompt": "quarks?"})  # score
            assert r.status_code == 200, r.text
            r = await c.post("/v1/chat/completions", json={**chat, "model": "auto"})
            assert r.status_code == 200, r.text
        # /internal/info (httpx) is fetched by the health probe once a replica is up.
        state = gateway.server.config.app.state.gateway
        for _ in range(100):
            if all(rep.info for p in state.pools.workers.values() for rep in p.replicas):
                break
            await asyncio.sleep(0.05)
        assert all(rep.info for p in state.pools.workers.values() for rep in p.replicas)
        paths = {path for spy in spies.values() for path, _ in spy.seen}
        assert {"/readyz", "/internal/info", "/internal/generate", "/internal/score"} <= paths
        for spy in spies.values():
            for path, auth in spy.seen:
                assert auth == f"Bearer {SECRET}", path
    finally:
        for s in reversed(servers):
            await s.stop()


async def test_a_secret_mismatch_is_a_502_for_the_client_not_a_401(tmp_path: Path) -> None:
    gateway, _, servers = await _stack(tmp_path, "another-secret-" + "y" * 40)
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30, trust_env=False) as c:
            chat = {"model": "math", "messages": [{"role": "user", "content": "hi"}]}
            r = await c.post("/v1/chat/completions", json=chat)
            assert r.status_code == 502, r.text
            assert "worker secret" in r.json()["error"]["message"]
    finally:
        for s in reversed(servers):
            await s.stop()


def test_secret_files_that_cannot_be_used_are_errors(tmp_path: Path) -> None:
    with pytest.raises(SecretFileError, match="at least 32"):
        short = tmp_path / "short"
        short.write_text("too-short\n")
        read_secret_file(short)
    with pytest.raises(SecretFileError, match="FileNotFoundError"):
        read_secret_file(tmp_path / "absent")
    path = write_secret_file(tmp_path)
    try:
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.parent.stat().st_mode & 0o777 == 0o700
        assert len(read_secret_file(path)) >= 32
    finally:
        path.unlink()
        path.parent.rmdir()


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.parametrize("role", ["worker", "gateway"])
def test_cli_refuses_a_bad_secret_file_with_exit_2(tmp_path: Path, role: str) -> None:
    short = tmp_path / "secret"
    short.write_text("short\n")
    args = ["worker", "--fake", "--model", "a"] if role == "worker" else ["gateway"]
    proc = _cli(*args, "--port", str(free_port()), env={"OCTOGRAPH_WORKER_SECRET_FILE": str(short)})
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert "worker secret file" in out and "Traceback" not in out


def test_worker_cli_secret_and_metrics_port(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    port, metrics_port = free_port(), free_port()
    proc = _cli(
        "worker",
        "--fake",
        "--model",
        "a",
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        env={"OCTOGRAPH_WORKER_SECRET_FILE": str(secret)},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "worker not ready"
            try:
                if httpx.get(f"{url}/readyz", timeout=1, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        assert httpx.get(f"{url}/internal/info", trust_env=False).status_code == 401
        r = httpx.get(f"{url}/internal/info", headers=GOOD, trust_env=False)
        assert r.status_code == 200 and r.json()["model"] == "a"
        assert httpx.get(f"{url}/metrics", headers=GOOD, trust_env=False).status_code == 404
        r = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", trust_env=False)
        assert r.status_code == 200 and "octograph_worker_inflight" in r.text
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_worker_without_secret_on_a_public_bind_warns() -> None:
    proc = _cli("worker", "--fake", "--model", "a", "--host", "0.0.0.0", "--port", str(free_port()))
    try:
        deadline = time.monotonic() + 60
        out = ""
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            out += line
            if "no worker secret" in line or not line:
                break
        assert "no worker secret" in out, out
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_worker_secret_command_writes_once_and_keeps(tmp_path: Path) -> None:
    """`octograph worker-secret --file` (the compose stack's one-shot): a fresh 0600 secret the
    first time, the same one afterwards; a file without a usable secret gets a new one."""
    path = tmp_path / "worker-secret"
    path.write_text("# placeholder, no secret\n")
    seen = []
    for _ in range(2):
        proc = _cli("worker-secret", "--file", str(path))
        out = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0, out
        seen.append(read_secret_file(path))
    assert seen[0] == seen[1]
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["worker-secret"]  # no temporary left
