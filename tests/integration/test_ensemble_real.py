"""Byte-level ensemble and byte-exact completions on the real models, end to end: a gateway
process in front of the shared `real_workers` (smollm2 + gemma3), their /internal/byte-dist
doing the reductions next to vLLM."""

from __future__ import annotations

import httpx
import orjson
import pytest

from tests.integration.conftest import GatewayFactory, RealWorkers

pytestmark = pytest.mark.slow


def _config(workers: RealWorkers) -> str:
    return f"""
models:
  smollm2: {{packaged: smollm2, urls: ["{workers.url("smollm2")}"], max_model_len: 2048}}
  gemma3: {{packaged: gemma3, urls: ["{workers.url("gemma3")}"], max_model_len: 2048}}
nodes:
  blend:
    kind: ensemble
    members: [{{model: smollm2, weight: 0.5}}, {{model: gemma3, weight: 0.5}}]
  chat: {{kind: model, model: smollm2}}
"""


def test_ensemble_chat_and_byte_exact_completion(
    real_workers: RealWorkers, real_gateway: GatewayFactory
) -> None:
    gw = real_gateway(_config(real_workers))
    with httpx.Client(base_url=gw.url, timeout=300, trust_env=False) as client:
        r = client.post(
            "/v1/chat/completions",
            json={
                "model": "blend",
                "seed": 1,
                "max_tokens": 24,
                "temperature": 0.7,
                "messages": [{"role": "user", "content": "Name a colour."}],
            },
        )
        assert r.status_code == 200, r.text
        body = r.json()
        text = body["choices"][0]["message"]["content"]
        assert text and "\ufffd" not in text
        assert len(text.encode()) <= 24
        assert body["usage"]["completion_tokens"] >= len(text.encode())
        assert r.headers["x-octograph-route"].endswith("blend")

        # Streaming gives the same text for the same seed.
        chunks = []
        with client.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": "blend",
                "seed": 1,
                "max_tokens": 24,
                "temperature": 0.7,
                "stream": True,
                "messages": [{"role": "user", "content": "Name a colour."}],
            },
        ) as s:
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(orjson.loads(line[6:]))
        streamed = "".join(
            c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]
        )
        assert streamed == text

        # A prompt that ends mid-word: greedy byte-level decoding finishes the word
        # ("Fra" -> "nce"), where token-level decoding restarts after the "Fra" token.
        r = client.post(
            "/v1/completions",
            json={
                "model": "chat",
                "prompt": "The capital of Fra",
                "max_tokens": 6,
                "temperature": 0,
                "byte_exact": True,
            },
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"].startswith("nce")


def test_ensemble_chat_stops_at_the_end_of_the_turn(
    real_workers: RealWorkers, real_gateway: GatewayFactory
) -> None:
    """Gemma-3 is a base model: through the plain transcript it runs on past its answer into
    a made-up next turn ("Hello\\n\\nSystem: I am ..."). A chat request to the ensemble ends the
    turn where a chat model would: at a member's end-of-turn token or the next role marker."""
    gw = real_gateway(_config(real_workers))
    with httpx.Client(base_url=gw.url, timeout=300, trust_env=False) as client:
        for seed in range(4):
            r = client.post(
                "/v1/chat/completions",
                json={
                    "model": "blend",
                    "seed": seed,
                    "max_tokens": 160,
                    "temperature": 0.8,
                    "messages": [{"role": "user", "content": "Say hi"}],
                },
            )
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            text = choice["message"]["content"]
            for marker in ("User:", "System:", "Assistant:"):
                assert f"\n{marker}" not in text, (seed, text)
            assert choice["finish_reason"] in ("stop", "length"), choice
