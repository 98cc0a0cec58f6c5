"""The Octopus-v4 output parser: `<nexa_k>('query')<nexa_end>`, including what the released
parser gets wrong (quotes inside the query, whitespace before the end token, no end token)."""

from __future__ import annotations

import pytest

from service.graph.functional_tokens import parse_octopus_output


def test_canonical_call() -> None:
    call = parse_octopus_output("<nexa_4>('What is the derivative of x^2?')<nexa_end>")
    assert call is not None
    assert (call.index, call.query, call.complete) == (4, "What is the derivative of x^2?", True)


@pytest.mark.parametrize(
    ("text", "query"),
    [
        ("<nexa_2>('what's the capital of France?')<nexa_end>", "what's the capital of France?"),
        ("<nexa_2>('he said \\'hi\\' to me')<nexa_end>", "he said 'hi' to me"),
        ('<nexa_2>("a \\"quoted\\" word")<nexa_end>', 'a "quoted" word'),
        ("<nexa_2>('f(x) = (x + 1)')<nexa_end>", "f(x) = (x + 1)"),
    ],
)
def test_quotes_and_parentheses_inside_the_query(text: str, query: str) -> None:
    call = parse_octopus_output(text)
    assert call is not None and call.query == query and call.complete


@pytest.mark.parametrize(
    "text",
    [
        "<nexa_7>('reverse a list')  <nexa_end>",
        "<nexa_7>('reverse a list')\n<nexa_end>",
        "<nexa_7> ( 'reverse a list' ) \n <nexa_end>",
        "  some preamble <nexa_7>('reverse a list')<nexa_end> trailing",
    ],
)
def test_whitespace_and_surroundings(text: str) -> None:
    call = parse_octopus_output(text)
    assert call is not None
    assert (call.index, call.query, call.complete) == (7, "reverse a list", True)


@pytest.mark.parametrize(
    "text",
    [
        "<nexa_3>('how do vaccines work')",
        "<nexa_3>('how do vaccines work'",
        "<nexa_3>('how do vaccines work",
    ],
)
def test_missing_end_token(text: str) -> None:
    call = parse_octopus_output(text)
    assert call is not None
    assert (call.index, call.query, call.complete) == (3, "how do vaccines work", False)


def test_token_without_arguments() -> None:
    call = parse_octopus_output("<nexa_12><nexa_end>")
    assert call is not None
    assert (call.index, call.query, call.complete) == (12, None, True)
    bare = parse_octopus_output("<nexa_0>")
    assert bare is not None and bare.query is None and not bare.complete


@pytest.mark.parametrize("text", ["", "no call here", "<nexa_>('x')", "<nexa_end>", "nexa_3('x')"])
def test_no_call(text: str) -> None:
    assert parse_octopus_output(text) is None


def test_first_call_wins() -> None:
    call = parse_octopus_output("<nexa_1>('a')<nexa_end><nexa_2>('b')<nexa_end>")
    assert call is not None and call.index == 1 and call.query == "a"
