"""Structured outputs and tool calls: what a request's `response_format`, `tools` and
`tool_choice` ask of decoding, and how a constrained output becomes OpenAI `tool_calls`.

Every constraint is a JSON schema, validated here once (llguidance compiles it; a schema it
refuses is a 400 naming the parameter), then enforced by the node's runner: vLLM's structured
outputs on a local worker, the byte-level grammar (bytelevel/grammar.py) on an ensemble, the
upstream itself on a remote node.

- `response_format`: `json_object` (any JSON object) or `json_schema` (its schema; `strict`
  forbids properties the schema does not name).
- `tool_choice` a named function: the output is that function's arguments, constrained to its
  `parameters`; `required`: a JSON array of `{"name", "parameters"}` calls, one of the tools
  each (at most one with `parallel_tool_calls: false`), vLLM's own form for `required`.
- `tool_choice` `auto` (the default when tools are given): the model's own tool-call format,
  parsed on the worker by vLLM's tool parser that the model's `tool_parser` names
  (worker/tool_calls.py); a node whose model has none answers 400. `none`: tools are ignored.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from service.bytelevel.grammar import json_grammar
from service.errors import BadRequest
from service.protocol.internal import StructuredOutput
from service.protocol.openai import ChatCompletionRequest, SamplingFields, ToolSpec

ToolMode = Literal["auto", "required", "named"]
MAX_PARALLEL_CALLS = 8  # calls in one `required` answer (1 with parallel_tool_calls false)


@dataclass(frozen=True)
class ToolCallShape:
    """How a constrained choice's text becomes `tool_calls`: the text is the arguments of
    `named`, or (named None) a JSON array of `{"name", "parameters"}`."""

    named: str | None


@dataclass(frozen=True)
class Constraints:
    structured: StructuredOutput | None = None
    tool_mode: ToolMode | None = None
    tool_call: ToolCallShape | None = None
    tools: list[dict[str, Any]] | None = None  # what the chat template receives


def constraints_of(req: SamplingFields) -> Constraints:
    structured = _response_format(req)
    if not isinstance(req, ChatCompletionRequest) or not req.tools:
        if isinstance(req, ChatCompletionRequest) and req.tool_choice not in (None, "none"):
            raise BadRequest("tool_choice needs tools", param="tool_choice")
        return Constraints(structured=structured)
    tools = req.tools
    choice = req.tool_choice or "auto"
    if choice == "none":
        return Constraints(structured=structured)
    specs = [t.model_dump(exclude_none=True) for t in tools]
    for i, tool in enumerate(tools):
        _check_schema(_parameters(tool), f"tools[{i}].function.parameters")
    if choice == "auto":
        return Constraints(structured=structured, tool_mode="auto", tools=specs)
    if structured is not None:
        raise BadRequest(
            "response_format cannot be combined with tool_choice 'required' or a named "
            "function: the output is then the tool call",
            param="response_format",
        )
    if choice == "required":
        schema = _required_schema(tools, single=req.parallel_tool_calls is False)
        return Constraints(
            structured=StructuredOutput(json_schema=schema),
            tool_mode="required",
            tool_call=ToolCallShape(named=None),
            tools=specs,
        )
    assert not isinstance(choice, str)
    name = choice.function.name
    chosen = next((t for t in tools if t.function.name == name), None)
    if chosen is None:
        raise BadRequest(
            f"tool_choice names '{name}', which is not one of the tools", param="tool_choice"
        )
    strict = bool(chosen.function.strict)
    return Constraints(
        structured=StructuredOutput(
            json_schema=_strict(_parameters(chosen), strict), strict=strict
        ),
        tool_mode="named",
        tool_call=ToolCallShape(named=name),
        tools=specs,
    )


def tool_calls(shape: ToolCallShape, text: str) -> list[dict[str, Any]] | None:
    """The OpenAI `tool_calls` of a constrained output; None when the text is not a complete
    call (cut short by max_tokens): it is then returned as content, with its finish reason."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if shape.named is not None:
        return [_call(shape.named, text)] if isinstance(value, dict) else None
    if not isinstance(value, list):
        return None
    calls = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        calls.append(_call(item["name"], json.dumps(item.get("parameters", {}))))
    return calls


def with_ids(calls: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Calls a worker's tool parser found ({"name", "arguments"}) in OpenAI's form."""
    return [_call(c["name"], c["arguments"]) for c in calls]


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def _response_format(req: SamplingFields) -> StructuredOutput | None:
    rf = req.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return StructuredOutput(json_schema={"type": "object"}, json_object=True)
    assert rf.json_schema is not None
    strict = bool(rf.json_schema.strict)
    schema = _strict(rf.json_schema.schema_ or {"type": "object"}, strict)
    _check_schema(schema, "response_format.json_schema.schema")
    return StructuredOutput(json_schema=schema, strict=strict)


def _parameters(tool: ToolSpec) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object", "properties": {}}


def _required_schema(tools: list[ToolSpec], *, single: bool) -> dict[str, Any]:
    one_of = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [t.function.name]},
                "parameters": _parameters(t),
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    # At most MAX_PARALLEL_CALLS calls: an unbounded array lets a small model append calls
    # until max_tokens cuts it, a valid prefix but no answer.
    limit = 1 if single else MAX_PARALLEL_CALLS
    return {"type": "array", "minItems": 1, "maxItems": limit, "items": {"anyOf": one_of}}


def _strict(schema: Any, strict: bool) -> Any:
    """`strict: true`: objects admit only the properties they name (OpenAI's structured-output
    rule), written into the schema so every engine enforces the same thing."""
    if not strict:
        return schema
    if isinstance(schema, list):
        return [_strict(s, True) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v, True) if k != "enum" and k != "const" else v for k, v in schema.items()}
    if out.get("type") == "object" or "properties" in out:
        out.setdefault("additionalProperties", False)
    return out


def _check_schema(schema: dict[str, Any], param: str) -> None:
    try:
        json_grammar(schema)
    except ValueError as exc:
        raise BadRequest(f"{param}: not a usable JSON schema: {exc}", param=param) from None
