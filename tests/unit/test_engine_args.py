"""The worker settings that reach vLLM's engine arguments (no engine is started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import WorkerSettings
from service.worker.vllm_engine import VLLMEngine


def engine_args(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **env: str) -> object:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = WorkerSettings(model=str(tmp_path))
    return VLLMEngine(settings, tmp_path, "m")._engine_args([])


def test_compiled_in_bfloat16_by_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    args = engine_args(monkeypatch, tmp_path)
    assert args.enforce_eager is False  # type: ignore[attr-defined]
    assert args.dtype == "bfloat16"  # type: ignore[attr-defined]


def test_compile_off_and_dtype_reach_the_engine(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # OCTOGRAPH_WORKER_COMPILE=false: vLLM's enforce_eager (no torch.compile at start);
    # OCTOGRAPH_WORKER_DTYPE: what `octograph up` sets for a router on a CPU without bf16.
    args = engine_args(
        monkeypatch, tmp_path, OCTOGRAPH_WORKER_COMPILE="false", OCTOGRAPH_WORKER_DTYPE="float32"
    )
    assert args.enforce_eager is True  # type: ignore[attr-defined]
    assert args.dtype == "float32"  # type: ignore[attr-defined]
