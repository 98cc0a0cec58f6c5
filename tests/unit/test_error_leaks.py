"""Issue 17 item 10 (part): what reaches a client or a log line.

Worker URLs / IP addresses and an upstream's raw error bodies never reach clients (they are
logged; the client gets the gateway's own words), except an upstream's message about the
client's own request (400/413/422), bounded. Logs redact credentials in messages, fields and
tracebacks, in JSON and in plain text."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from service.errors import sanitize_message
from service.gateway.clients.http11 import ConnectFailed, ProtocolFailure
from service.gateway.clients.upstream import failure_from_exception, failure_from_status
from service.observability.logging import JsonFormatter, RedactingFormatter

INTERNAL = b'{"error": {"message": "pool db-7 at http://10.2.3.4:5432/x exploded (org-Secret)"}}'


@pytest.mark.parametrize("status", [429, 500, 502, 503, 418])
def test_upstream_error_bodies_are_logged_not_relayed(
    status: int, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        failure = failure_from_status("hosted", status, INTERNAL)
    message = failure.error.message
    for leak in ("db-7", "10.2.3.4", "exploded", "org-Secret", "http://"):
        assert leak not in message, message
    assert "hosted" in message
    assert any("exploded" in str(getattr(r, "body", "")) for r in caplog.records)  # logged


def test_client_mistakes_keep_the_upstreams_message_bounded() -> None:
    bad = failure_from_status("hosted", 400, b'{"error": {"message": "max_tokens is too large"}}')
    assert bad.error.status == 400 and bad.error.message == "max_tokens is too large"
    long = failure_from_status("hosted", 422, json.dumps({"error": "x" * 5000}).encode())
    assert len(long.error.message) <= 501


@pytest.mark.parametrize(
    "exc",
    [
        ConnectFailed("OSError: [Errno 111] Connect call failed ('10.0.0.5', 8000)"),
        ProtocolFailure("connection closed: peer 10.0.0.5:8000 reset"),
    ],
)
def test_upstream_call_failures_name_no_address(exc: Exception) -> None:
    message = failure_from_exception("hosted", exc).error.message
    assert "10.0.0.5" not in message and "Errno" not in message, message


def test_every_client_message_is_sanitized() -> None:
    said = sanitize_message(
        "worker http://worker-3.octograph.svc:8001/internal/generate at 10.1.1.7:8001 "
        "(file /srv/app/x.py) failed"
    )
    for leak in ("worker-3", "10.1.1.7", "/srv/app", "8001"):
        assert leak not in said, said
    assert sanitize_message("3.14 and version 1.2.3 stay") == "3.14 and version 1.2.3 stay"


async def test_remote_failure_reaches_the_client_without_its_body(spine: Any) -> None:
    stack = await spine()
    stack.upstream.fail_statuses = [500, 500, 500]
    r = await stack.post({"model": "remote", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code >= 500
    error = r.json()["error"]
    assert "upstream says" not in error["message"], error
    assert "127.0.0.1" not in r.text


async def test_dead_worker_url_never_reaches_the_client(make_stack: Any) -> None:
    stack = await make_stack()
    await stack.workers["alpha"][0].stop()
    r = await stack.client.post(
        "/v1/chat/completions",
        json={"model": "general", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code >= 500
    assert "127.0.0.1" not in r.text and "http://" not in r.text, r.text


def _record_with_traceback(msg: str) -> logging.LogRecord:
    try:
        raise RuntimeError(
            "call failed: headers={'Authorization': 'Bearer sk-live-abcdef123'} "
            "url=https://admin:hunter2@upstream.example/v1 api_key=plain-secret-9"
        )
    except RuntimeError:
        import sys

        exc_info = sys.exc_info()
    return logging.LogRecord("t", logging.ERROR, __file__, 1, msg, None, exc_info)


def test_tracebacks_are_redacted_in_json_and_text_logs() -> None:
    secrets = ("sk-live-abcdef123", "hunter2", "plain-secret-9", "sk-other-998877")
    record = _record_with_traceback("failed with key sk-other-998877")
    record.headers = {"authorization": "Bearer sk-live-abcdef123", "x": ["sk-other-998877"]}
    record.completion_tokens = 12
    out = JsonFormatter().format(record)
    for secret in secrets:
        assert secret not in out, out
    parsed = json.loads(out)
    assert "RuntimeError" in parsed["exc"] and parsed["completion_tokens"] == 12
    text = RedactingFormatter("%(levelname)s %(message)s").format(
        _record_with_traceback("failed with key sk-other-998877")
    )
    assert "RuntimeError" in text
    for secret in secrets:
        assert secret not in text, text
