"""Issue 17 item 1: slow or absent bodies hold no admission slot and get a 408.

2 x MAX_INFLIGHT raw connections send their headers and a Content-Length, then stall mid-body;
a normal request on the same endpoint still gets its 200 at once, and every stalled one gets a
408 with the OpenAI error body once OCTOGRAPH_BODY_TIMEOUT_S has passed. For the front door's
lanes (/v1/chat/completions) and for FastAPI's /v1/route alike."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

MAX_INFLIGHT = 4
BODY_TIMEOUT_S = 1.0

CHAT = {"model": "auto", "messages": [{"role": "user", "content": "integrate x"}]}
ROUTE = {"model": "auto", "prompt": "integrate x"}


async def stall(url: str, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that announces a 100-byte body, sends one byte of it, and stops."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Content-Length: 100\r\n\r\n{".encode()
    )
    await writer.drain()
    return reader, writer


async def answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    lengths = [
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    ]
    if lengths:
        return status, json.loads(await reader.readexactly(lengths[0]))
    body = b""  # chunked
    while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
        body += await reader.readexactly(size)
        await reader.readexactly(2)
    return status, json.loads(body)


@pytest.mark.parametrize(("path", "body"), [("/v1/chat/completions", CHAT), ("/v1/route", ROUTE)])
async def test_stalled_bodies_hold_no_slot_and_get_408(
    make_stack: Any, path: str, body: dict[str, Any]
) -> None:
    stack = await make_stack(max_inflight=MAX_INFLIGHT, body_timeout_s=BODY_TIMEOUT_S)
    stalled = [await stall(stack.url, path) for _ in range(2 * MAX_INFLIGHT)]
    await asyncio.sleep(0.1)  # every stalled request is inside the gateway, waiting for its body
    started = time.monotonic()
    r = await stack.client.post(path, json=body)
    took = time.monotonic() - started
    assert r.status_code == 200, r.text
    assert took < BODY_TIMEOUT_S / 2, f"a normal request waited {took:.2f}s behind stalled ones"

    results = await asyncio.wait_for(
        asyncio.gather(*(answer(reader) for reader, _ in stalled)), BODY_TIMEOUT_S * 5
    )
    waited = time.monotonic() - started
    for status, payload in results:
        assert status == 408
        assert payload["error"]["type"] == "timeout"
        assert "body" in payload["error"]["message"]
    assert waited < BODY_TIMEOUT_S * 3
    for _, writer in stalled:
        writer.close()
    # Nothing is left held: the gateway takes MAX_INFLIGHT sequences again.
    assert stack.app.state.gateway.pipeline.admission.inflight == 0
    assert stack.lifecycle.inflight == 0
