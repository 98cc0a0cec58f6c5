"""Not open by accident (issue 17, items 9 and 10): no keyless gateway on a public address
unless asked for, no public example key, JSON-only POSTs (CSRF), loopback-only Host values
without keys (DNS rebinding), a 413 that clients which write their whole body first can
read, and a keys file reloaded on content (a deleted file revokes its keys)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import pytest
import requests

from service.gateway import auth
from service.gateway.middleware import loopback_host_header
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
CHAT = {"model": "general", "messages": [{"role": "user", "content": "hi"}]}
GRAPH = """
models:
  a: {urls: ["http://127.0.0.1:9"]}
nodes:
  general: {kind: model, model: a}
"""


def _cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    cfg = tmp_path / "graph.yaml"
    cfg.write_text(GRAPH)
    base = {k: v for k, v in os.environ.items() if not k.startswith("OCTOGRAPH_")}
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", *args, "--config", str(cfg)],
        cwd=REPO,
        env={**base, "OCTOGRAPH_LOG_DIR": str(tmp_path / "logs"), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.parametrize(
    ("command", "env", "needle"),
    [
        (["gateway", "--host", "0.0.0.0"], {}, "refusing to serve without API keys on 0.0.0.0"),
        (["up", "--host", "0.0.0.0"], {}, "refusing to serve without API keys on 0.0.0.0"),
        (["gateway", "--host", "::"], {}, "OCTOGRAPH_ALLOW_OPEN=true"),
        (
            ["gateway"],
            {"OCTOGRAPH_API_KEYS_FILE": "{tmp}/keys"},
            "public example key",
        ),
        (
            ["gateway", "--host", "0.0.0.0"],
            {"OCTOGRAPH_API_KEYS": '["octograph-local-dev-key-change-me"]'},
            "public example key",
        ),
    ],
)
def test_cli_refuses_to_expose_an_open_or_publicly_keyed_gateway(
    tmp_path: Path, command: list[str], env: dict[str, str], needle: str
) -> None:
    # A keys file as the old compose example was: the public key on a line of its own.
    (tmp_path / "keys").write_text("# example\noctograph-local-dev-key-change-me\n")
    env = {k: v.replace("{tmp}", str(tmp_path)) for k, v in env.items()}
    proc = _cli(tmp_path, *command, "--port", str(free_port()), env=env)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert needle in out and "Traceback" not in out, out
    assert not (tmp_path / "logs").exists()  # `up` refused before starting any worker


def _serves(proc: subprocess.Popen[str], port: int) -> bool:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if httpx.get(f"http://127.0.0.1:{port}/livez", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            time.sleep(0.1)
    return False


@pytest.mark.parametrize(
    "env",
    [
        {"OCTOGRAPH_ALLOW_OPEN": "true"},
        {"OCTOGRAPH_API_KEYS": '["a-key-of-my-own-that-nobody-knows"]'},
    ],
)
def test_public_bind_with_keys_or_explicitly_open_starts(tmp_path: Path, env: dict) -> None:
    port = free_port()
    proc = _cli(tmp_path, "gateway", "--host", "0.0.0.0", "--port", str(port), env=env)
    try:
        assert _serves(proc, port), proc.communicate(timeout=5)[0] if proc.poll() else ""
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/v1/chat/completions", {}),
        ("/v1/chat/completions", {"content-type": "text/plain"}),
        ("/v1/completions", {"content-type": "application/x-www-form-urlencoded"}),
        ("/v1/chat/completions", {"content-type": "multipart/form-data; boundary=x"}),
        ("/v1/route", {"content-type": "text/plain;charset=UTF-8"}),
    ],
)
async def test_post_v1_needs_a_json_content_type(make_stack, path: str, headers: dict) -> None:
    stack = await make_stack()
    body = {**CHAT, "prompt": "hi"} if path == "/v1/completions" else CHAT
    r = await stack.client.post(path, content=json.dumps(body), headers=headers)
    assert r.status_code == 415, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "unsupported_media_type"
    assert stack.engine("alpha").generated == []


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"]
)
async def test_json_content_types_pass(make_stack, content_type: str) -> None:
    stack = await make_stack()
    r = await stack.client.post(
        "/v1/chat/completions",
        content=json.dumps(CHAT),
        headers={"content-type": content_type},
    )
    assert r.status_code == 200, r.text


def test_loopback_host_values() -> None:
    for host in (
        "localhost",
        "localhost:8000",
        "LOCALHOST.",
        "app.localhost:3000",
        "127.0.0.1",
        "127.0.0.1:8000",
        "127.8.9.10:1",
        "[::1]",
        "[::1]:8000",
    ):
        assert loopback_host_header(host), host
    for host in (
        "evil.example",
        "evil.example:8000",
        "localhost.evil.example",
        "127.0.0.1.nip.io",
        "10.0.0.1",
        "[::ffff:7f00:1]:8000",
        "0.0.0.0:8000",
        "",
    ):
        assert not loopback_host_header(host), host


async def test_keyless_gateway_answers_only_to_loopback_hosts(make_stack) -> None:
    stack = await make_stack()
    evil = {"host": "rebind.evil.example:8000"}
    for method, path in (
        ("GET", "/v1/models"),
        ("GET", "/console/api/stats"),
        ("POST", "/v1/chat/completions"),
    ):
        r = await stack.client.request(method, path, headers=evil, json=CHAT)
        assert r.status_code == 400, path
        assert r.json()["error"]["code"] == "host_not_allowed"
    assert stack.engine("alpha").generated == []
    # Probes stay open whatever the Host (kubelets probe pod IPs).
    assert (await stack.client.get("/livez", headers=evil)).status_code == 200
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
        r = await stack.client.get("/v1/models", headers={"host": host})
        assert r.status_code == 200, host


async def test_any_host_with_keys_or_allow_open(make_stack) -> None:
    key = "a-key-of-my-own-that-nobody-knows"
    keyed = await make_stack(api_keys=[key])
    evil = {"host": "api.example.com", "authorization": f"Bearer {key}"}
    assert (await keyed.client.get("/v1/models", headers=evil)).status_code == 200
    opened = await make_stack(allow_open=True)
    r = await opened.client.get("/v1/models", headers={"host": "api.example.com"})
    assert r.status_code == 200


async def test_oversized_body_413_is_readable_by_write_first_clients(make_stack) -> None:
    """urllib and requests write the whole body before reading the answer: before, they met a
    reset connection (BrokenPipe / ConnectionReset) instead of the 413."""
    stack = await make_stack(max_body_bytes=1_000_000)
    url = f"{stack.url}/v1/chat/completions"
    big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 12_000_000}]}).encode()

    def with_urllib() -> tuple[int, dict]:
        req = urllib.request.Request(url, data=big, headers={"content-type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=30)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())
        raise AssertionError("no error")

    def with_requests() -> tuple[int, dict]:
        r = requests.post(url, data=big, headers={"content-type": "application/json"}, timeout=30)
        return r.status_code, r.json()

    for call in (with_urllib, with_requests):
        for _ in range(3):
            status, body = await asyncio.to_thread(call)
            assert status == 413 and body["error"]["type"] == "invalid_request_error", call
    assert stack.engine("alpha").generated == []


# -- the keys file ---------------------------------------------------------------------------


@pytest.fixture
def keys_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(auth, "FILE_CHECK_INTERVAL_S", 0.0)
    path = tmp_path / "keys"
    path.write_text("key-one-0123456789\n")
    return path


def _ok(keys: auth.ApiKeys, key: str) -> bool:
    return keys.authenticate(f"Bearer {key}")[1] is None


def test_keys_reload_on_content_even_with_the_same_mtime(keys_file: Path) -> None:
    keys = auth.ApiKeys([], keys_file)
    assert _ok(keys, "key-one-0123456789")
    st = keys_file.stat()
    keys_file.write_text("key-two-0123456789\n")  # same size, and the old timestamps back
    os.utime(keys_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _ok(keys, "key-two-0123456789") and not _ok(keys, "key-one-0123456789")


def test_a_half_written_file_is_corrected_on_the_next_check(keys_file: Path) -> None:
    keys = auth.ApiKeys([], keys_file)
    st = keys_file.stat()
    keys_file.write_text("")  # the reader lands between truncate and write
    os.utime(keys_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert not _ok(keys, "key-one-0123456789")
    keys_file.write_text("key-one-0123456789\nkey-three-01234567\n")
    os.utime(keys_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _ok(keys, "key-one-0123456789") and _ok(keys, "key-three-01234567")


def test_a_deleted_keys_file_revokes_its_keys(keys_file: Path) -> None:
    keys = auth.ApiKeys(["static-key-0123456789"], keys_file)
    assert _ok(keys, "key-one-0123456789")
    keys_file.unlink()
    assert not _ok(keys, "key-one-0123456789")
    assert _ok(keys, "static-key-0123456789")  # keys from settings are not the file's
    keys_file.write_text("key-one-0123456789\n")
    assert _ok(keys, "key-one-0123456789")


def test_an_undecodable_keys_file_keeps_the_previous_keys(keys_file: Path) -> None:
    keys = auth.ApiKeys([], keys_file)
    keys_file.write_bytes(b"\xff\xfe broken")
    assert _ok(keys, "key-one-0123456789")  # no 500, no lock-out


def test_the_public_example_key_is_dropped_on_reload(keys_file: Path) -> None:
    keys = auth.ApiKeys([], keys_file)
    keys_file.write_text("octograph-local-dev-key-change-me\nkey-four-012345678\n")
    assert _ok(keys, "key-four-012345678")
    assert not _ok(keys, "octograph-local-dev-key-change-me")
