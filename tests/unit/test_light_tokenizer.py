"""The gateway's LightTokenizer (the `tokenizers` library alone, no transformers tokenizer, no
torch) encodes and renders prompts exactly as transformers' AutoTokenizer does, which is what
the workers (vLLM) use: on both packaged models, for plain text with and without special
tokens, and for chat conversations through the model's template (or its absence)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from service.gateway.runners.ensemble_assets import HFPromptEncoder, LightTokenizer
from service.models import packaged
from service.protocol.internal import ChatTurn, GenerateRequest
from tests.unit.ensemble_fixtures import CORPUS

MODELS = ["smollm2", "gemma3"]

TEXTS = [
    "Hello world",
    " leading space",
    "a",
    "   ",
    "\n\n\n",
    "<|im_start|>user\nhi<|im_end|>",
    "<bos> <eos> <start_of_turn>user <b>bold</b>",
    "naïve café ▁ x\t tabs  and  double  spaces",
    *(CORPUS[i : i + 97] for i in range(0, len(CORPUS), 89)),
]

CONVERSATIONS = [
    [ChatTurn(role="user", content="What is the capital of France?")],
    [
        ChatTurn(role="system", content="You are a careful mathematics tutor."),
        ChatTurn(role="user", content="solve 2x + 1 = 5"),
    ],
    [
        ChatTurn(role="user", content="hi"),
        ChatTurn(role="assistant", content="Hello! How can I help?"),
        ChatTurn(role="user", content="Name a prime.  Then\nanother one: ▁ <eos>"),
    ],
]


def model_dir(name: str) -> Path:
    return packaged.model_dir(name)


@pytest.fixture(scope="module", params=MODELS)
def pair(request: pytest.FixtureRequest) -> tuple[LightTokenizer, object]:
    from transformers import AutoTokenizer

    path = model_dir(request.param)
    return LightTokenizer(path), AutoTokenizer.from_pretrained(str(path))


def test_plain_text_encodes_alike(pair: tuple[LightTokenizer, object]) -> None:
    light, hf = pair
    for text in TEXTS:
        for special in (True, False):
            assert light.encode(text, add_special_tokens=special) == hf.encode(  # type: ignore[attr-defined]
                text, add_special_tokens=special
            ), (text, special)


def test_special_ids_and_template_alike(pair: tuple[LightTokenizer, object]) -> None:
    light, hf = pair
    assert light.bos_token_id == hf.bos_token_id  # type: ignore[attr-defined]
    assert light.eos_token_id == hf.eos_token_id  # type: ignore[attr-defined]
    assert light.chat_template == hf.chat_template  # type: ignore[attr-defined]
    assert light.special_tokens_map == hf.special_tokens_map  # type: ignore[attr-defined]
    assert light.get_vocab() == hf.get_vocab()  # type: ignore[attr-defined]


def test_prompts_encode_alike(pair: tuple[LightTokenizer, object]) -> None:
    light, hf = pair
    light_enc, hf_enc = HFPromptEncoder(light), HFPromptEncoder(hf)
    assert light_enc.start_id == hf_enc.start_id
    assert light_enc.has_chat_template == hf_enc.has_chat_template
    for i, turns in enumerate(CONVERSATIONS):
        for gen in (True, False):
            req = GenerateRequest(request_id=f"r{i}", messages=turns, add_generation_prompt=gen)
            assert light_enc.encode(req) == hf_enc.encode(req), (i, gen)
    req = GenerateRequest(request_id="p", prompt="The capital of Fra")
    assert light_enc.encode(req) == hf_enc.encode(req)


def test_no_torch_in_the_gateway_for_it() -> None:
    """Loading and using it imports neither torch nor a transformers tokenizer class."""
    import subprocess

    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from service.gateway.runners.ensemble_assets import LightTokenizer\n"
        f"t = LightTokenizer(Path({str(model_dir('smollm2'))!r}))\n"
        "t.apply_chat_template([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True)\n"
        "print('torch' in sys.modules, 'transformers.tokenization_utils_base' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr
