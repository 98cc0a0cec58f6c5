"""Structured outputs and tool calls: the plan's constraints, the byte-level grammar mask (exact
against brute force), the reply's tool_calls, and bad input. Fake workers and toy models; the
real engines' side is tests/integration/test_structured_real.py."""

from __future__ import annotations

import json
import math
import random
from typing import Any, Literal

import jsonschema
import numpy as np
import openai
import pytest
from pydantic import BaseModel, Field

from service.bytelevel.covering import CoveringTree
from service.bytelevel.grammar import STOP, ByteGrammar, json_grammar
from service.bytelevel.reduction import LocalReductionOracle
from tests.conftest import sse_events
from tests.unit.ensemble_fixtures import BruteForce, HashModel, tiny_table
from tests.unit.test_ensemble_runner import ensemble_stack

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["C", "F"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string"}},
            "required": ["zone"],
        },
    },
}
USER = [{"role": "user", "content": "Weather in Paris?"}]


class Answer(BaseModel):
    city: str
    days: int


class Bounded(BaseModel):
    """Toy models ramble: free strings and numbers are bounded so an output ends in budget."""

    city: str = Field(max_length=8)
    days: int = Field(ge=0, le=30)
    unit: Literal["C", "F"]


# -- the byte-level mask ------------------------------------------------------------------------

FINITE = {
    "type": "object",
    "properties": {"k": {"enum": ["ab", "a", "ba"]}, "n": {"enum": [1, 12]}},
    "required": ["k", "n"],
    "additionalProperties": False,
}
# Every output FINITE accepts, compact: the independent reference for the allowed bytes.
FINITE_OUTPUTS = [
    json.dumps({"k": k, "n": n}, separators=(",", ":")).encode()
    for k in ("ab", "a", "ba")
    for n in (1, 12)
]


def reference_allowed(prefix: bytes) -> set[int]:
    out = {s[len(prefix)] for s in FINITE_OUTPUTS if s.startswith(prefix) and len(s) > len(prefix)}
    if prefix in FINITE_OUTPUTS:
        out.add(STOP)
    return out


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece"])
def test_constrained_byte_distribution_is_the_masked_brute_force(kind: str) -> None:
    """At every step of sampled outputs: the grammar allows exactly the bytes some valid
    output continues with (enumerated independently), and the constrained distribution is the
    brute-force next-byte distribution of the toy model masked to them and renormalised."""
    table = tiny_table(kind)
    model = HashModel(table.vocab_size, seed=7, sigma=2.5)
    root = (int(table.stop_ids[0]),)
    brute = BruteForce(table, model, root)
    rng = random.Random(3)
    for _ in range(4):
        grammar = ByteGrammar(json_grammar(FINITE))
        tree = CoveringTree(table, LocalReductionOracle(table, model), root)
        text = b""
        while True:
            allowed = set(np.flatnonzero(grammar.allowed()).tolist())
            assert allowed == reference_allowed(text), text
            got = grammar.constrain(tree.next_byte_logprobs())
            logs, _ = brute.logits(text)
            want = np.where(grammar.allowed(), logs, -math.inf)
            want = want - np.logaddexp.reduce(want[np.isfinite(want)])
            fin = np.isfinite(want)
            assert np.array_equal(np.isfinite(got), fin), text
            assert np.allclose(got[fin], want[fin], rtol=0, atol=1e-9), text
            outcome = rng.choices(range(257), weights=np.exp(got).tolist())[0]
            grammar.advance(outcome)
            if outcome == STOP:
                break
            text += bytes([outcome])
            tree.advance(outcome)
        assert text in FINITE_OUTPUTS  # no dead end: every sampled output completes


def test_a_schema_the_grammar_engine_refuses_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        json_grammar({"type": "nonsense"})


# -- local nodes (fake workers) -------------------------------------------------------------------


async def test_response_format_json_schema_reaches_the_worker_and_parses(spine: Any) -> None:
    stack = await spine()
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="x", max_retries=0)
    done = await client.chat.completions.parse(
        model="general", messages=USER, response_format=Answer
    )
    assert isinstance(done.choices[0].message.parsed, Answer)
    sent = stack.engines["alpha"].requests[-1].sampling.structured
    assert sent is not None and sent.strict and sent.json_schema["required"] == ["city", "days"]
    r = await stack.post(
        {"model": "general", "messages": USER, "response_format": {"type": "json_object"}}
    )
    assert r.status_code == 200 and isinstance(
        json.loads(r.json()["choices"][0]["message"]["content"]), dict
    )
    assert stack.engines["alpha"].requests[-1].sampling.structured.json_object


@pytest.mark.parametrize("stream", [False, True])
async def test_named_function_is_answered_as_tool_calls(spine: Any, stream: bool) -> None:
    stack = await spine()
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="x", max_retries=0)
    choice = {"type": "function", "function": {"name": "get_weather"}}
    kwargs: dict[str, Any] = {"model": "general", "messages": USER, "tools": [WEATHER, TIME]}
    if stream:
        async with client.chat.completions.stream(**kwargs, tool_choice=choice) as s:
            async for _ in s:
                pass
            done = await s.get_final_completion()
    else:
        done = await client.chat.completions.create(**kwargs, tool_choice=choice)
    message = done.choices[0].message
    assert done.choices[0].finish_reason == "tool_calls" and message.content is None
    assert [c.function.name for c in message.tool_calls] == ["get_weather"]
    args = json.loads(message.tool_calls[0].function.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    assert message.tool_calls[0].id.startswith("call_")
    sent = stack.engines["alpha"].requests[-1]
    assert sent.sampling.structured.json_schema == WEATHER["function"]["parameters"]
    assert [t["function"]["name"] for t in sent.tools] == ["get_weather", "get_time"]


async def test_required_tool_choice_and_a_tool_result_turn(spine: Any) -> None:
    stack = await spine()
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="x", max_retries=0)
    first = await client.chat.completions.create(
        model="general",
        messages=USER,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    calls = first.choices[0].message.tool_calls
    assert first.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    assert calls[0].function.name in ("get_weather", "get_time")
    schema = stack.engines["alpha"].requests[-1].sampling.structured.json_schema
    assert schema["type"] == "array" and schema["maxItems"] == 1
    # The conversation goes on with the call and its result.
    follow = [
        *USER,
        {"role": "assistant", "tool_calls": [c.model_dump() for c in calls]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "18 C, sunny"},
    ]
    again = await client.chat.completions.create(model="general", messages=follow)
    assert again.choices[0].message.content
    turns = stack.engines["alpha"].requests[-1].messages
    assert [t.role for t in turns] == ["user", "assistant", "tool"]
    assert calls[0].function.name in turns[1].content and turns[2].content == "18 C, sunny"


BAD_SCHEMA = {"name": "x", "schema": {"type": "nonsense"}}
JSON_OBJECT = {"type": "json_object"}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": BAD_SCHEMA}},
         "response_format.json_schema.schema"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}],
          "tool_choice": "required"}, "tools[0].function.parameters"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER]}, "tool_choice"),  # auto on a model without a tool-call format
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": JSON_OBJECT},
         "response_format"),
    ],
)  # fmt: skip
async def test_bad_constraints_are_a_400_naming_the_parameter(
    spine: Any, body: dict[str, Any], param: str
) -> None:
    stack = await spine()
    r = await stack.post({"model": "general", "messages": USER, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    if param == "tool_choice" and "tools" in body and "tool_choice" not in body:
        assert "general" in r.json()["error"]["message"]  # names the node
    assert stack.engines["alpha"].requests == []


async def test_routing_with_tools_hands_them_to_the_chosen_node(spine: Any) -> None:
    stack = await spine()
    stack.steer("general")
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = await stack.post(
        {"model": "auto", "messages": USER, "tools": [WEATHER], "tool_choice": choice}
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-octograph-route"] == "root>general"
    assert r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    # The router read the user's text, not the tools.
    assert "Weather in Paris?" in stack.engines["routerm"].scored[-1]


async def test_remote_nodes_get_tools_and_response_format_as_sent(spine: Any) -> None:
    stack = await spine()
    body = {
        "model": "remote",
        "messages": USER,
        "tools": [WEATHER],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "response_format": {"type": "json_object"},
    }
    r = await stack.post(body)
    assert r.status_code == 200, r.text
    seen = stack.upstream.calls[-1]
    for key in ("tools", "tool_choice", "parallel_tool_calls", "response_format"):
        assert seen[key] == body[key], key


# -- ensembles: grammar-constrained at the byte level ---------------------------------------------

SCHEMAS = [
    Bounded.model_json_schema(),
    {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
            "score": {"type": "integer", "minimum": -5, "maximum": 5},
            "inner": {
                "type": "object",
                "properties": {"ok": {"type": "boolean"}},
                "required": ["ok"],
            },
        },
        "required": ["tags", "score", "inner"],
        "additionalProperties": False,
    },
]


@pytest.mark.parametrize("schema", SCHEMAS)
async def test_ensemble_outputs_always_validate_against_the_schema(
    make_stack: Any, schema: dict[str, Any]
) -> None:
    stack = await ensemble_stack(make_stack)
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}
    for seed in range(20):
        r = await stack.client.post(
            "/v1/chat/completions",
            json={"model": "blend", "messages": USER, "response_format": fmt, "seed": seed,
                  "temperature": 1.0, "max_tokens": 400},
        )  # fmt: skip
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)


async def test_ensemble_named_tool_call_streams_as_tool_calls(make_stack: Any) -> None:
    stack = await ensemble_stack(make_stack)
    body = {
        "model": "blend",
        "messages": USER,
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "stream": True,
        "seed": 1,
        "max_tokens": 300,
    }
    r = await stack.client.post("/v1/chat/completions", json=body)
    events = [e for e in sse_events(r.text) if e != "DONE"]
    calls = [c for e in events for ch in e["choices"] for c in ch["delta"].get("tool_calls", [])]
    assert len(calls) == 1 and calls[0]["function"]["name"] == "get_weather"
    jsonschema.validate(
        json.loads(calls[0]["function"]["arguments"]), WEATHER["function"]["parameters"]
    )
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    r = await stack.client.post(
        "/v1/chat/completions", json={**body, "stream": False, "tool_choice": "auto"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    assert "blend" in r.json()["error"]["message"]


AUTO_GRAPH = """
models:
  toolm: {urls: ["http://placeholder"], max_model_len: 512, tool_parser: hermes}
nodes:
  agent: {kind: model, model: toolm}
"""
HERMES_CALL = (
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Lyon", "unit": "C"}}</tool_call>'
)


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_choice_auto_is_parsed_by_vllms_parser_for_the_models_format(
    make_stack: Any, stream: bool
) -> None:
    """A model whose graph entry names a tool parser (here vLLM's own `hermes`) serves
    tool_choice auto: the worker runs that parser on the model's text."""
    stack = await make_stack(AUTO_GRAPH)
    engine = stack.engine("toolm")
    engine.reply = lambda _prepared, _index: ["Let me check.", HERMES_CALL]  # type: ignore[method-assign]
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="x", max_retries=0)
    kwargs: dict[str, Any] = {"model": "agent", "messages": USER, "tools": [WEATHER]}
    if stream:
        async with client.chat.completions.stream(**kwargs) as s:
            async for _ in s:
                pass
            done = await s.get_final_completion()
    else:
        done = await client.chat.completions.create(**kwargs)
    message = done.choices[0].message
    assert done.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in message.tool_calls] == ["get_weather"]
    assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Lyon", "unit": "C"}
    assert (message.content or "").strip() == "Let me check."
    assert engine.requests[-1].tool_parser == "hermes"
    # Plain text stays text.
    engine.reply = lambda _prepared, _index: ["Sunny", "today."]  # type: ignore[method-assign]
    plain = await client.chat.completions.create(**kwargs)
    assert plain.choices[0].message.content == "Sunny today."
    assert not plain.choices[0].message.tool_calls
