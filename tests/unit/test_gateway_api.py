"""The OpenAI surface of the gateway against fake workers (real HTTP on loopback)."""

from __future__ import annotations

import json

import openai
import pytest

from tests.conftest import sse_events

pytestmark = pytest.mark.asyncio


async def test_models_lists_auto_nodes_and_models(make_stack):
    stack = await make_stack()
    r = await stack.client.get("/v1/models")
    assert r.status_code == 200
    ids = [m["id"] for m in r.json()["data"]]
    assert ids[0] == "auto"
    for expected in ("root", "science", "math", "physics", "general", "alpha", "beta", "routerm"):
        assert expected in ids


async def test_chat_non_streaming_with_openai_client(make_stack):
    stack = await make_stack()
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="x")
    resp = await client.chat.completions.create(
        model="math", messages=[{"role": "user", "content": "integrate banana"}]
    )
    assert resp.choices[0].message.content.startswith("fake answer 0 about")
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens == 12
    assert resp.usage.prompt_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 12
    # The node's system prompt reached the worker (the fake echoes the prompt's words).
    await client.close()


async def test_chat_node_system_prompt_and_defaults_reach_worker(make_stack):
    stack = await make_stack()
    seen = []
    eng = stack.engine("alpha")
    original = eng.prepare

    async def spy(request):
        seen.append(request)
        return await original(request)

    eng.prepare = spy  # type: ignore[method-assign]
    r = await stack.client.post(
        "/v1/chat/completions",
        json={"model": "math", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 200
    req = seen[0]
    assert req.messages[0].role == "system"
    assert req.messages[0].content == "You are a math tutor."
    assert req.sampling.temperature == 0.2  # node default
    r = await stack.client.post(
        "/v1/chat/completions",
        json={"model": "math", "temperature": 0.9, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert seen[1].sampling.temperature == 0.9  # request wins
    r = await stack.client.post(
        "/v1/chat/completions",
        json={"model": "alpha", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 200
    assert seen[2].messages[0].role == "user"  # raw model: no node system prompt


async def test_chat_streaming_chunks_and_done(make_stack):
    stack = await make_stack()
    r = await stack.client.post(
        "/v1/chat/completions",
        json={
            "model": "general",
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "tell me about kiwis"}],
        },
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "DONE"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text.startswith("fake answer 0 about kiwis")
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


async def test_streaming_with_openai_client(make_stack):
    stack = await make_stack()
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="x")
    stream = await client.chat.completions.create(
        model="general", stream=True, messages=[{"role": "user", "content": "x y z"}]
    )
    parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(parts).startswith("fake answer 0 about z")
    await client.close()


async def test_n_choices_are_distinct_and_counted(make_stack):
    stack = await make_stack()
    r = await stack.client.post(
        "/v1/chat/completions",
        json={"model": "general", "n": 3, "messages": [{"role": "user", "content": "q"}]},
    )
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert {c["message"]["content"].split()[2] for c in body["choices"]} == {"0", "1", "2"}
    assert body["usage"]["completion_tokens"] == 36


async def test_stop_sequence_truncates(make_stack):
    stack = await make_stack()
    r = await stack.client.post(
        "/v1/chat/completions",
        json={
            "model": "general",
            "stop": ["about"],
            "messages": [{"role": "user", "content": "q"}],
        },
    )
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == "fake answer 0 "
    assert choice["finish_reason"] == "stop"


async def test_max_tokens_gives_length(make_stack):
    stack = await make_stack()
    r = await stack.client.post(
        "/v1/chat/completions",
        json={"model": "general", "max_tokens": 3, "messages": [{"role": "user", "content": "q"}]},
    )
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == "fake answer 0"
    assert choice["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 3


async def test_chat_logprobs_shape(make_stack):
    stack = await make_stack()
    r = await stack.client.post(
        "/v1/chat/completions",
        json={
            "model": "general",
            "logprobs": True,
            "top_logprobs": 2,
            "max_tokens": 2,
            "messages": [{"role": "user", "content": "q"}],
        },
    )
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 2
    assert content[0]["token"] == "fake" and content[0]["logprob"] == -0.5
    assert content[0]["bytes"] == list(b"fake")
    assert len(content[0]["top_logprobs"]) == 2


async def test_completions_multiple_prompts_and_n(make_stack):
    stack = await make_stack()
    r = await stack.client.post(
        "/v1/completions",
        json={"model": "general", "prompt": ["one apple", "two pears"], "n": 2, "max_tokens": 5},
    )
    body = r.json()
    assert body["object"] == "text_completion"
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["choices"][0]["text"] == "fake answer 0 about apple"
    assert body["choices"][1]["text"] == "fake answer 1 about apple"
    assert body["choices"][2]["text"] == "fake answer 0 about pears"
    assert body["usage"]["completion_tokens"] == 20


async def test_completions_default_max_tokens_is_16(make_stack):
    stack = await make_stack(engine_kwargs={"reply_words": 40})
    r = await stack.client.post("/v1/completions", json={"model": "general", "prompt": "p"})
    assert r.json()["usage"]["completion_tokens"] == 16


async def test_completions_echo_and_logprobs(make_stack):
    stack = await make_stack()
    r = await stack.client.post(
        "/v1/completions",
        json={
            "model": "general",
            "prompt": "hello there",
            "echo": True,
            "logprobs": 1,
            "max_tokens": 2,
        },
    )
    choice = r.json()["choices"][0]
    assert choice["text"] == "hello therefake answer"
    lp = choice["logprobs"]
    assert lp["tokens"][0] == "hello" and lp["token_logprobs"][0] is None
    assert len(lp["tokens"]) == 4


async def test_completions_streaming(make_stack):
    stack = await make_stack()
    r = await stack.client.post(
        "/v1/completions",
        json={"model": "general", "prompt": "stream me", "stream": True, "max_tokens": 4},
    )
    events = sse_events(r.text)
    assert events[-1] == "DONE"
    text = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
    assert text == "fake answer 0 about"


async def test_route_header_and_body_field(make_stack):
    stack = await make_stack()
    r = await stack.client.post(
        "/v1/chat/completions",
        json={"model": "physics", "messages": [{"role": "user", "content": "q"}]},
    )
    assert r.headers["x-octograph-route"] == "physics"
    assert r.json()["octograph"]["route"] == ["physics"]


@pytest.mark.parametrize(
    "body,status,param",
    [
        ("not json", 400, None),
        ("[]", 400, None),
        ("42", 400, None),
        ("null", 400, None),
        (json.dumps({"model": "general"}), 400, "messages"),
        (json.dumps({"model": "general", "messages": []}), 400, "messages"),
        (json.dumps({"model": "general", "messages": "hi"}), 400, "messages"),
        (
            json.dumps(
                {
                    "model": "general",
                    "messages": [{"role": "user", "content": "x"}],
                    "temperature": 5,
                }
            ),
            400,
            "temperature",
        ),
        (
            json.dumps(
                {"model": "general", "messages": [{"role": "user", "content": "x"}], "n": 0}
            ),
            400,
            "n",
        ),
        (
            json.dumps(
                {
                    "model": "general",
                    "messages": [{"role": "user", "content": "x"}],
                    "max_tokens": -1,
                }
            ),
            400,
            "max_tokens",
        ),
        (
            json.dumps({"model": "general", "messages": [{"role": "wizard", "content": "x"}]}),
            400,
            None,
        ),
        (
            json.dumps(
                {
                    "model": "general",
                    "messages": [{"role": "user", "content": "x"}],
                    "tools": [{"type": "function"}],
                }
            ),
            400,
            None,
        ),
        (json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}), 404, None),
    ],
)
async def test_bad_requests_get_openai_errors(make_stack, body, status, param):
    stack = await make_stack()
    r = await stack.client.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "/" not in err["message"] and "Traceback" not in err["message"]
    if param:
        assert err["param"] is not None and err["param"].startswith(param)
    assert stack.engine("alpha").generated == []


async def test_context_overflow_is_400_and_engine_not_called(make_stack):
    stack = await make_stack()
    long = " ".join(["word"] * 400)  # alpha's context is 256 fake tokens
    r = await stack.client.post(
        "/v1/chat/completions",
        json={"model": "general", "messages": [{"role": "user", "content": long}]},
    )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert stack.engine("alpha").generated == []


async def test_unknown_route_is_404_json(make_stack):
    stack = await make_stack()
    r = await stack.client.get("/v1/nothing")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found_error"


async def test_request_id_echoed_but_never_the_engine_id(make_stack):
    """The client's x-request-id is echoed (logs, tracing), but the id the engine registers,
    and the response `id`, are always the gateway's: vLLM aborts every request under one id,
    so two clients sending the same header must not share an engine id."""
    stack = await make_stack()
    body = {"model": "general", "messages": [{"role": "user", "content": "q"}]}
    first = await stack.client.post(
        "/v1/chat/completions", headers={"x-request-id": "abc-123"}, json=body
    )
    second = await stack.client.post(
        "/v1/chat/completions", headers={"x-request-id": "abc-123"}, json=body
    )
    assert first.headers["x-request-id"] == second.headers["x-request-id"] == "abc-123"
    engine_ids = stack.engine("alpha").generated
    assert len(engine_ids) == 2 and len(set(engine_ids)) == 2 and "abc-123" not in engine_ids
    ids = {first.json()["id"], second.json()["id"]}
    assert len(ids) == 2 and all(i.startswith("chatcmpl-") and "abc-123" not in i for i in ids)


async def test_byte_exact_without_tokenizer_files_is_a_400_naming_it(make_stack):
    """Found by the fuzz test once `model` was pinned: `byte_exact` on a model the gateway has
    no tokenizer files for was a 503. The request is fine without it (the client's choice),
    so it is a 400 on `byte_exact`, as for a remote model; the engine is not called."""
    stack = await make_stack()
    for model in ("alpha", "general"):
        r = await stack.client.post(
            "/v1/completions", json={"model": model, "prompt": "The capi", "byte_exact": True}
        )
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "byte_exact" and "tokenizer files" in error["message"]
    assert stack.engine("alpha").generated == []
