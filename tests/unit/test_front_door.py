"""The generation endpoints' plain-ASGI lane (service/gateway/front_door.py) answers exactly as
the FastAPI routes it shadows would: same error bodies for bad input, other methods and routes
untouched, headers and bodies of replies as before."""

from __future__ import annotations

import pytest

BAD_BODIES = ["not json", "[]", "42", '{"model": "general"}', '{"model": 1, "prompt": "x"}']


@pytest.mark.parametrize("body", BAD_BODIES)
async def test_bad_bodies_get_the_fastapi_error_bodies(make_stack, body: str) -> None:
    stack = await make_stack()
    headers = {"content-type": "application/json"}
    fast = await stack.client.post("/v1/completions", content=body, headers=headers)
    # /v1/route is served by FastAPI with the same validation-to-error mapping.
    slow = await stack.client.post("/v1/route", content=body, headers=headers)
    assert fast.status_code == slow.status_code == 400
    fast_err, slow_err = fast.json()["error"], slow.json()["error"]
    assert fast_err["type"] == slow_err["type"]
    if body in ("not json", "[]", "42"):
        assert fast_err["message"] == slow_err["message"], (fast_err, slow_err)
    assert fast.headers["x-request-id"]


async def test_other_methods_fall_through_to_fastapi(make_stack) -> None:
    stack = await make_stack()
    r = await stack.client.get("/v1/chat/completions")
    assert r.status_code == 405
    assert r.json()["error"]["message"] == "method not allowed on this route"
    assert (await stack.client.get("/v1/models")).status_code == 200


async def test_replies_keep_their_headers(make_stack) -> None:
    stack = await make_stack()
    body = {"model": "general", "messages": [{"role": "user", "content": "hi"}]}
    r = await stack.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert int(r.headers["content-length"]) == len(r.content)
    assert r.headers["x-octograph-route"] == "general"
    async with stack.client.stream(
        "POST", "/v1/chat/completions", json={**body, "stream": True}
    ) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        assert s.headers["x-octograph-route"] == "general"
        lines = [line async for line in s.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
