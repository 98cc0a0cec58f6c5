"""`tool_choice: "auto"` on a worker: the model writes tool calls in its own format, and vLLM's
tool parser for that format (the model's `tool_parser` in the graph: hermes, llama3_json,
mistral, ...) turns the finished text into calls. Reused, not rewritten: the parser is the one
vLLM's own OpenAI server runs (vllm.tool_parsers).

A choice's text is held until it finishes (a half-written call is not content), then goes out as
one delta: content (text outside the calls) and/or `tool_calls` ([{"name", "arguments"}]); its
finish reason is `tool_calls` when there are calls.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from service.errors import BadRequest
from service.protocol.internal import GenerateEvent, GenerateRequest


def parser_for(request: GenerateRequest, tokenizer: Any) -> tuple[Any, Any]:
    """(vLLM's tool parser named by the request, the vLLM request object it reads)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.tool_parsers import ToolParserManager

    assert request.tool_parser is not None
    try:
        parser_cls = ToolParserManager.get_tool_parser(request.tool_parser)
    except KeyError:
        raise BadRequest(
            f"tool_parser '{request.tool_parser}' is not one of vLLM's tool parsers",
            param="tool_choice",
        ) from None
    vllm_request = ChatCompletionRequest(
        model="octograph",
        messages=[{"role": "user", "content": ""}],
        tools=request.tools or [],
        tool_choice="auto",
    )
    tools: Any = vllm_request.tools
    return parser_cls(tokenizer, tools), vllm_request


async def with_tool_calls(
    events: AsyncIterator[GenerateEvent], request: GenerateRequest, tokenizer: Any
) -> AsyncIterator[GenerateEvent]:
    parser, vllm_request = parser_for(request, tokenizer)
    held: dict[int, str] = {}
    try:
        async for event in events:
            kind = event["type"]
            if kind == "delta":
                index = event.get("index", 0)
                held[index] = held.get(index, "") + event.get("text", "")
                continue
            if kind == "finish":
                index = event.get("index", 0)
                info = parser.extract_tool_calls(held.pop(index, ""), vllm_request)
                delta: GenerateEvent = {"type": "delta", "index": index, "text": info.content or ""}
                if info.tools_called and info.tool_calls:
                    delta["tool_calls"] = [
                        {"name": c.function.name, "arguments": c.function.arguments or "{}"}
                        for c in info.tool_calls
                    ]
                    event = {**event, "finish_reason": "tool_calls"}
                if delta["text"] or "tool_calls" in delta:
                    yield delta
            yield event
    finally:
        await events.aclose()  # type: ignore[attr-defined]
