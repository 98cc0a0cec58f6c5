"""Structured outputs and tool calls on the real engines: the official SDK against a gateway
process in front of the shared `real_workers` (smollm2 + gemma3). A local node decodes under
vLLM's structured outputs; the `blend` ensemble (SmolLM2's byte-level BPE and Gemma-3's
SentencePiece) under the byte-level grammar. Sampled at temperature 1: every output must parse
and validate, whatever the members' vocabularies."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.integration.conftest import GatewayFactory, RealWorkers

pytestmark = pytest.mark.slow


# Strings are bounded: a 135M model sampling at temperature 1 can ramble inside a string until
# max_tokens, which is a valid prefix but no complete value.
class City(BaseModel):
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population_millions: float = Field(ge=0, le=50)


class Trip(BaseModel):
    """Nested objects, an enum, an array and numbers."""

    destination: City
    season: Literal["spring", "summer", "autumn", "winter"]
    days: int = Field(ge=1, le=30)
    stops: list[Annotated[str, Field(max_length=24)]] = Field(max_length=3)


class Verdict(BaseModel):
    label: Literal["positive", "negative", "neutral"]
    confidence: float = Field(ge=0, le=1)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


def _config(workers: RealWorkers) -> str:
    return f"""
models:
  smollm2: {{packaged: smollm2, urls: ["{workers.url("smollm2")}"], max_model_len: 2048}}
  smol-tools:  # the same worker, read with vLLM's hermes tool parser (tool_choice auto)
    {{packaged: smollm2, urls: ["{workers.url("smollm2")}"], tool_parser: hermes}}
  gemma3: {{packaged: gemma3, urls: ["{workers.url("gemma3")}"], max_model_len: 2048}}
nodes:
  blend:
    kind: ensemble
    members: [{{model: smollm2, weight: 0.5}}, {{model: gemma3, weight: 0.5}}]
  chat: {{kind: model, model: smollm2}}
  agent: {{kind: model, model: smol-tools}}
"""


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)


def _parsed(
    client: openai.OpenAI, model: str, schema: type[BaseModel], seed: int, max_tokens: int = 400
) -> Any:
    try:
        done = client.chat.completions.parse(
            model=model,
            messages=[{"role": "user", "content": "Describe a trip, a city or a verdict in JSON."}],
            response_format=schema,
            temperature=1.0,
            seed=seed,
            max_tokens=max_tokens,
        )
    except openai.LengthFinishReasonError as exc:  # a valid prefix, no complete value: show it
        text = exc.completion.choices[0].message.content
        pytest.fail(f"seed {seed}: max_tokens {max_tokens} reached inside {text!r}")
    choice = done.choices[0]
    assert choice.finish_reason == "stop", choice
    return choice.message.parsed


@pytest.mark.parametrize("schema", [Trip, Verdict])  # Trip: nested object, enum, array, numbers
def test_sdk_parse_on_a_local_node_always_validates(
    real_workers: RealWorkers, real_gateway: GatewayFactory, schema: type[BaseModel]
) -> None:
    client = _client(real_gateway(_config(real_workers)).url)
    parsed = [_parsed(client, "chat", schema, seed) for seed in range(20)]
    assert all(isinstance(p, schema) for p in parsed)  # 20/20


# A known defect, not a flake: on a VM without bfloat16 arithmetic the ensemble, sampling City
# at temperature 1, did not finish seed 7's value in 400 bytes (CI) nor in 1,200 (the gateway's
# deadline passed first). JSON Schema cannot bound a float's digits, and nothing else bounds
# them yet; earlier VMs passed 20/20. Not strict: a seed that finishes shows as XPASS.
ENSEMBLE_CITY_DIGITS = pytest.mark.xfail(
    reason="ensemble + JSON schema: a sampled float's digits are unbounded (seed 7 ran on)",
    strict=False,
)


@pytest.mark.parametrize("schema", [pytest.param(City, marks=ENSEMBLE_CITY_DIGITS), Verdict])
def test_sdk_parse_on_the_ensemble_always_validates(
    real_workers: RealWorkers, real_gateway: GatewayFactory, schema: type[BaseModel]
) -> None:
    client = _client(real_gateway(_config(real_workers)).url)
    parsed = [_parsed(client, "blend", schema, seed) for seed in range(20)]
    assert all(isinstance(p, schema) for p in parsed)  # 20/20


def test_tool_calls_on_smollm2_required_named_streamed_and_continued(
    real_workers: RealWorkers, real_gateway: GatewayFactory
) -> None:
    client = _client(real_gateway(_config(real_workers)).url)
    messages: list[Any] = [{"role": "user", "content": "What's the weather in Lyon?"}]
    params = WEATHER["function"]["parameters"]
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice, parallel in (("required", False), ("required", True), (named, True)):
        for seed in range(4):
            done = client.chat.completions.create(
                model="chat", messages=messages, tools=[WEATHER], tool_choice=choice,  # type: ignore[arg-type]
                parallel_tool_calls=parallel, temperature=1.0, seed=seed, max_tokens=600,
            )  # fmt: skip
            assert done.choices[0].finish_reason == "tool_calls", (
                choice,
                parallel,
                done.model_dump_json()[:1500],
            )
            calls = done.choices[0].message.tool_calls
            assert calls and all(c.function.name == "get_weather" for c in calls)
            assert len(calls) <= (8 if parallel else 1)
            for call in calls:
                jsonschema.validate(json.loads(call.function.arguments), params)
    # Streamed: the SDK's stream helper reassembles the deltas into the same shape.
    with client.chat.completions.stream(
        model="chat", messages=messages, tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=200,
    ) as stream:  # fmt: skip
        for _ in stream:
            pass
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    jsonschema.validate(json.loads(call.function.arguments), params)
    # A tool-result turn continues the conversation with text.
    follow = [
        *messages,
        {"role": "assistant", "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21, "sky": "clear"}'},
    ]
    answer = client.chat.completions.create(model="chat", messages=follow, max_tokens=40)
    assert answer.choices[0].message.content


def test_tool_choice_auto_without_a_tool_format_names_the_node(
    real_workers: RealWorkers, real_gateway: GatewayFactory
) -> None:
    client = _client(real_gateway(_config(real_workers)).url)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER]
        )
    assert "chat" in str(info.value) and "tool_choice" in str(info.value)


def test_tool_choice_auto_runs_vllms_parser_on_the_real_worker(
    real_workers: RealWorkers, real_gateway: GatewayFactory
) -> None:
    """SmolLM2 has no tool format of its own, so what it writes is rarely a call; the claim
    is the path: the real worker runs vLLM's hermes parser on its real tokenizer's output and
    answers either text or well-formed calls."""
    client = _client(real_gateway(_config(real_workers)).url)
    system = (
        'To call a function, answer only with <tool_call>{"name": ..., "arguments": '
        "{...}}</tool_call>."
    )
    for seed in range(3):
        done = client.chat.completions.create(
            model="agent",
            messages=[
                {"role": "system", "content": system},
                {"role": "user", "content": "What's the weather in Lyon?"},
            ],
            tools=[WEATHER],
            seed=seed,
            max_tokens=80,
        )
        message = done.choices[0].message
        assert message.content or message.tool_calls
        for call in message.tool_calls or []:
            assert done.choices[0].finish_reason == "tool_calls"
            json.loads(call.function.arguments)
