"""Hub models at pinned revisions: fetched once, by one job, then served offline.

A graph model whose `path` is a hub id (`org/name`) is served at one commit of its repository:
its `revision:` in the graph (a 40-hex commit id; Kubernetes passes the same value to the
worker as OCTOGRAPH_WORKER_REVISION). `octograph models download --graph G` (the GPU overlay's
model-prefetch Job, the only pod with egress) downloads each such model at that commit into
the hub cache on the shared volume. A model with no `revision:` is pinned on first download:
the commit `main` points to then is recorded in the lock file next to the cache
(`octograph-revisions.json`) and reused by every later download and by the workers, so it
never moves by itself; write it into the graph to make it explicit.

Workers run with HF_HUB_OFFLINE=1 on a read-only mount: they load the pinned snapshot or
nothing (`wait_for_snapshot` lets a worker that starts before the Job has finished wait for
it instead of failing).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.graph.schema import GraphConfig

log = logging.getLogger(__name__)
LOCK_NAME = "octograph-revisions.json"
COMMIT = re.compile(r"^[0-9a-f]{40}$")
# What a worker needs: weights (safetensors, else PyTorch .bin), configs, tokenizer files.
ALLOW = [
    "*.json",
    "*.safetensors",
    "*.bin",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.py",
    "*.jinja",
]


class HubError(Exception):
    pass


def is_hub_id(path: str | None) -> bool:
    return bool(
        path
        and path.count("/") == 1
        and not path.startswith((".", "/", "~"))
        and not Path(path).expanduser().exists()
    )


def hub_cache() -> Path:
    """huggingface_hub's cache folder, from the same variables it reads."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(home) / "hub"


def read_lock(cache: Path) -> dict[str, str]:
    try:
        data = json.loads((cache / LOCK_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise HubError(f"{cache / LOCK_NAME}: unreadable ({exc})") from None
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _write_lock(cache: Path, lock: dict[str, str]) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{LOCK_NAME}.tmp"
    tmp.write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(cache / LOCK_NAME)  # atomic: a reader sees the old or the new lock


def snapshot_dir(cache: Path, repo: str, revision: str) -> Path:
    return cache / f"models--{repo.replace('/', '--')}" / "snapshots" / revision


def has_snapshot(cache: Path, repo: str, revision: str) -> bool:
    return (snapshot_dir(cache, repo, revision) / "config.json").is_file()


def pinned_revision(repo: str, revision: str | None, cache: Path | None = None) -> str | None:
    """The commit a worker loads: its configured revision, else the one the lock recorded."""
    if revision:
        return revision
    return read_lock(cache or hub_cache()).get(repo)


@dataclass(frozen=True)
class Fetched:
    model: str
    repo: str
    revision: str
    status: str  # "present" | "downloaded"
    pinned_by: str  # "graph" | "lock" | "first download"


def hub_models(graph: GraphConfig) -> dict[str, tuple[str, str | None]]:
    """{model name: (hub id, revision from the graph or None)} of the graph's hub models."""
    out: dict[str, tuple[str, str | None]] = {}
    for name, spec in graph.worker_models().items():
        if not spec.packaged and is_hub_id(spec.path):
            assert spec.path is not None
            out[name] = (spec.path, spec.revision)
    return out


def download(graph: GraphConfig, *, cache: Path | None = None, api: Any = None) -> list[Fetched]:
    """Every hub model of `graph` into the cache at its pinned commit (see the module doc).
    Needs the network (and HF_HUB_OFFLINE unset or 0 before huggingface_hub is imported)."""
    cache = cache or hub_cache()
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    lock = read_lock(cache)
    done = []
    for name, (repo, revision) in hub_models(graph).items():
        if revision:
            pinned_by = "graph"
        elif repo in lock:
            revision, pinned_by = lock[repo], "lock"
        else:
            revision, pinned_by = str(api.model_info(repo).sha), "first download"
            log.warning("pinned %s to its current commit %s (lock file)", repo, revision)
        if not COMMIT.match(revision):
            raise HubError(f"model '{name}': revision {revision!r} is not a 40-hex commit id")
        status = "present"
        if not has_snapshot(cache, repo, revision):
            files = api.list_repo_files(repo, revision=revision)
            # PyTorch .bin weights only when the repo has no safetensors (never both).
            patterns = [p for p in ALLOW if p != "*.bin"]
            if not any(f.endswith(".safetensors") for f in files):
                patterns.append("*.bin")
            api.snapshot_download(
                repo, revision=revision, cache_dir=str(cache), allow_patterns=patterns
            )
            status = "downloaded"
        if not has_snapshot(cache, repo, revision):
            raise HubError(f"model '{name}': {repo}@{revision} has no config.json")
        lock[repo] = revision
        _write_lock(cache, lock)
        done.append(Fetched(name, repo, revision, status, pinned_by))
    return done


async def wait_for_snapshot(
    repo: str, revision: str | None, *, timeout_s: float, poll_s: float = 10.0
) -> str:
    """The commit of `repo` to load, once its snapshot is in the cache (polled up to
    `timeout_s`: a worker may start before the prefetch Job is done). Raises HubError."""
    cache = hub_cache()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    waited = False
    while True:
        pinned = pinned_revision(repo, revision, cache)
        if pinned and has_snapshot(cache, repo, pinned):
            if waited:
                log.info("weights of %s@%s are on the volume", repo, pinned)
            return pinned
        if loop.time() >= deadline:
            what = f"{repo}@{pinned}" if pinned else f"{repo} (no revision, none in the lock)"
            raise HubError(
                f"the weights of {what} are not in {cache}: the model-prefetch Job "
                "(`octograph models download --graph ...`) fills it"
            )
        if not waited:
            log.warning("waiting for the weights of %s in %s", repo, cache)
            waited = True
        await asyncio.sleep(poll_s)
