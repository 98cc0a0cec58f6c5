"""Issue 17 item 8: client input never makes a 5xx. A lone surrogate in the JSON, a negative
seed or one outside int64 on the byte-level paths (byte_exact completions, ensemble chat) are a
400 or a 200; a routing timeout is a 504; each error with the OpenAI error body."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from service.protocol.internal import ScoreRequest, ScoreResponse

LONE = b'"\\ud800 hello"'  # a JSON string holding a lone surrogate (valid JSON, not UTF-8)


def openai_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    assert "Traceback" not in error["message"]
    return error


async def raw_post(url: str, path: str, body: bytes) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=30, trust_env=False) as c:
        return await c.post(path, content=body, headers={"content-type": "application/json"})


USER = b'"messages": [{"role": "user", "content": ' + LONE + b"}]"
HI = b'"messages": [{"role": "user", "content": "hi"}]'


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/route", b'{"model": "auto", "prompt": ' + LONE + b"}"),
        ("/v1/route", b'{"model": "auto", ' + USER + b"}"),
        ("/v1/chat/completions", b'{"model": "general", ' + USER + b"}"),
        ("/v1/chat/completions", b'{"model": "auto", ' + USER + b"}"),
        ("/v1/completions", b'{"model": "general", "prompt": ' + LONE + b"}"),
        ("/v1/chat/completions", b'{"model": "blend", ' + HI + b', "stop": [' + LONE + b"]}"),
    ],
)
async def test_lone_surrogate_is_a_400(spine: Any, path: str, body: bytes) -> None:
    stack = await spine()
    error = openai_error(await raw_post(stack.url, path, body), 400)
    assert error["type"] == "invalid_request_error"
    # The front door's JSON parser refuses the body as JSON; FastAPI's (json.loads) lets it
    # through to the model, which refuses the text.
    assert error["message"] in (
        "the request body is not valid JSON",
        "the request body is not valid UTF-8 text",
    )


SEEDS = [-1, -(2**63), 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30]


@pytest.mark.parametrize("seed", SEEDS)
async def test_byte_level_seeds_are_never_a_5xx(spine: Any, seed: int) -> None:
    stack = await spine()
    hi = [{"role": "user", "content": "hi"}]
    requests = [
        ("/v1/completions", {"model": "general", "prompt": "The cat sa", "byte_exact": True}),
        ("/v1/chat/completions", {"model": "blend", "messages": hi}),
        ("/v1/completions", {"model": "blend", "prompt": "The cat"}),
    ]
    for path, body in requests:
        for stream in (False, True):
            r = await stack.post({**body, "seed": seed, "max_tokens": 4, "stream": stream}, path)
            if -(2**63) <= seed < 2**63:
                assert r.status_code == 200, (path, seed, r.text)
                assert "error" not in r.text, (path, seed, r.text)
            else:
                error = openai_error(r, 400)
                assert error["param"] == "seed", error


async def test_routing_timeout_is_a_504(spine: Any) -> None:
    stack = await spine(request_timeout_s=0.5)
    router = stack.engines["routerm"]
    fast = router.score

    async def slow(request: ScoreRequest) -> ScoreResponse:
        await asyncio.sleep(3)
        return await fast(request)

    router.score = slow  # type: ignore[method-assign]
    chat = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
    for path, body in (
        ("/v1/chat/completions", chat),
        ("/v1/chat/completions", {**chat, "stream": True}),
        ("/v1/route", {"model": "auto", "prompt": "hi"}),
    ):
        error = openai_error(await stack.post(body, path), 504)
        assert "deadline" in error["message"], error
