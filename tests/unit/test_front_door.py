"""The generation endpoints' front door (service/gateway/front_door.py), their only
implementation, answers as FastAPI's routes do: the same error bodies for bad input (/v1/route is
FastAPI's), 405 for other methods, other routes untouched, and it is described in the OpenAPI
document."""

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


async def test_openapi_describes_the_generation_operations(make_stack) -> None:
    """No FastAPI handler serves them, yet clients and the fuzzer find them in the schema."""
    stack = await make_stack()
    schema = (await stack.client.get("/openapi.json")).json()
    for path, model in (
        ("/v1/chat/completions", "ChatCompletionRequest"),
        ("/v1/completions", "CompletionRequest"),
    ):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"]["$ref"] == f"#/components/schemas/{model}"
        assert "messages" in str(schema["components"]["schemas"][model]) or path.endswith(
            "/completions"
        )
    from service.gateway.routes import openai_routes

    names = {r.path for r in openai_routes.router.routes}  # type: ignore[attr-defined]
    assert "/v1/chat/completions" not in names and "/v1/completions" not in names
