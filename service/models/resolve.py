"""Where a worker finds its weights: a directory, or a name prepared in the model cache."""

from __future__ import annotations

from pathlib import Path

from service.models import packaged


class ModelNotFound(Exception):
    pass


def resolve_model_dir(name_or_dir: str, cache_dir: Path | None = None) -> Path:
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    candidate = packaged.model_dir(name_or_dir, cache_dir)
    if (candidate / "config.json").is_file():
        return candidate
    if name_or_dir in packaged.PACKAGED_MODELS:
        raise ModelNotFound(
            f"model '{name_or_dir}' is not prepared yet: "
            f"run `octograph models prepare {name_or_dir}`"
        )
    if "/" in name_or_dir and not name_or_dir.startswith((".", "/", "~")):
        # A hub id (org/name): vLLM loads it from the hub cache at the commit that
        # service/models/hub.py pins.
        return Path(name_or_dir)
    raise ModelNotFound(f"'{name_or_dir}' is neither a model directory nor a prepared model")
