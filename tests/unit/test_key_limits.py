"""Issue 17 item 6: the per-key limits the README documents exist.

OCTOGRAPH_RATE_LIMIT_TPM: prompt + completion tokens per API key per minute, counted when a
request ends (JSON and streamed alike); a key at or over it gets 429 + Retry-After until its
minute has passed, other keys are untouched. OCTOGRAPH_MAX_INFLIGHT_PER_KEY: sequences in flight
per key (a request weighs prompts x n), 429 beyond it, other keys untouched."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from service.errors import Overloaded
from service.gateway.admission import TokenWindow
from tests.conftest import sse_events

CHAT = {"model": "general", "messages": [{"role": "user", "content": "hello there"}]}
K1 = {"authorization": "Bearer k1"}
K2 = {"authorization": "Bearer k2"}


async def test_tokens_per_minute_per_key(make_stack: Any) -> None:
    # One request of this shape costs prompt + 12 completion tokens (FakeEngine: words).
    stack = await make_stack(api_keys=["k1", "k2"])
    probe = (await stack.client.post("/v1/chat/completions", json=CHAT, headers=K1)).json()
    per_request = probe["usage"]["total_tokens"]
    assert per_request > 12
    await stack.close()

    stack = await make_stack(api_keys=["k1", "k2"], rate_limit_tpm=2 * per_request + 1)
    c = stack.client
    first = await c.post("/v1/chat/completions", json=CHAT, headers=K1)
    assert first.status_code == 200 and first.json()["usage"]["total_tokens"] == per_request
    # A streamed request's tokens count too (its usage chunk says how many).
    streamed = await c.post(
        "/v1/chat/completions",
        json={**CHAT, "stream": True, "stream_options": {"include_usage": True}},
        headers=K1,
    )
    events = [e for e in sse_events(streamed.text) if e != "DONE"]
    assert events[-1]["usage"]["total_tokens"] == per_request
    # 2 x per_request < limit: still admitted (a request under the limit is served whole).
    third = await c.post("/v1/chat/completions", json=CHAT, headers=K1)
    assert third.status_code == 200
    # Now 3 x per_request >= limit: refused, with the OpenAI body and a Retry-After.
    refused = await c.post("/v1/chat/completions", json=CHAT, headers=K1)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "tokens_rate_limit_exceeded" and "tokens per minute" in error["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    # /v1/route is refused for that key too; another key is untouched.
    assert (
        await c.post("/v1/route", json={"model": "auto", "prompt": "x"}, headers=K1)
    ).status_code == 429
    assert (await c.post("/v1/chat/completions", json=CHAT, headers=K2)).status_code == 200
    assert stack.app.state.gateway.pipeline.admission.inflight == 0
    rejected = stack.app.state.gateway.registry.get_sample_value(
        "octograph_admission_rejected_total", {"scope": "tokens"}
    )
    assert rejected == 2


def test_token_window_slides(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("service.gateway.admission.time.monotonic", lambda: now[0])
    w = TokenWindow(100)
    w.spend("k", 60)
    now[0] += 20
    w.spend("k", 50)
    with pytest.raises(Overloaded) as refused:
        w.check("k")
    # Under the limit again once the first 60 tokens leave the window, 40 s from now.
    assert refused.value.retry_after_s == pytest.approx(40.0)
    w.check("other")
    now[0] += 40.5
    w.check("k")  # 50 left in the window
    now[0] += 20
    w.check("k")
    assert w._spent == {} and w._used == {}  # an idle key holds no memory


async def test_max_inflight_per_key(make_stack: Any) -> None:
    stack = await make_stack(api_keys=["k1", "k2"], max_inflight_per_key=2)
    gate = asyncio.Event()
    stack.engine("alpha").gate = gate
    c = stack.client
    held = asyncio.create_task(c.post("/v1/chat/completions", json={**CHAT, "n": 2}, headers=K1))
    admission = stack.app.state.gateway.pipeline.admission
    for _ in range(200):
        if list(admission.by_key.values()) == [2]:  # keyed by a digest of the key
            break
        await asyncio.sleep(0.01)
    assert list(admission.by_key.values()) == [2]
    refused = await c.post("/v1/chat/completions", json=CHAT, headers=K1)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "key_concurrency_exceeded"
    assert "retry-after" in refused.headers
    # A request of cost 3 is over the bound on its own; another key is untouched meanwhile.
    other = asyncio.create_task(c.post("/v1/chat/completions", json=CHAT, headers=K2))
    await asyncio.sleep(0.1)
    gate.set()
    assert (await held).status_code == 200
    assert (await other).status_code == 200
    assert admission.by_key == {}
    again = await c.post("/v1/chat/completions", json={**CHAT, "n": 2}, headers=K1)
    assert again.status_code == 200, json.dumps(again.json())
    too_big = await c.post("/v1/chat/completions", json={**CHAT, "n": 3}, headers=K1)
    assert too_big.status_code == 429
