"""Hub models at pinned commits (issue 17, item 7): the prefetch downloads each hub model of a
graph at its `revision:` (or pins it on first download, in a lock file), and a worker loads
exactly that commit, offline, waiting for the snapshot if the prefetch is still running. A fake
hub client stands in for huggingface_hub (no network)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from service.graph.schema import GraphError, parse_graph
from service.models import hub

PIN = "a" * 40
MAIN = "b" * 40
GRAPH = f"""
models:
  pinned: {{path: org/pinned, urls: ["http://w1:8001"], revision: "{PIN}"}}
  loose:  {{path: org/loose, urls: ["http://w2:8001"]}}
  local:  {{path: /models/router, urls: ["http://w3:8001"]}}
  pack:   {{packaged: smollm2}}
nodes:
  a: {{kind: model, model: pinned}}
  b: {{kind: model, model: loose}}
  c: {{kind: model, model: local}}
  d: {{kind: model, model: pack}}
"""


class FakeHub:
    def __init__(self, files: dict[str, list[str]] | None = None) -> None:
        self.files = files or {}
        self.calls: list[tuple[str, ...]] = []

    def model_info(self, repo: str) -> Any:
        self.calls.append(("model_info", repo))
        return type("Info", (), {"sha": MAIN})()

    def list_repo_files(self, repo: str, revision: str) -> list[str]:
        self.calls.append(("list", repo, revision))
        return self.files.get(repo, ["config.json", "model.safetensors"])

    def snapshot_download(
        self, repo: str, *, revision: str, cache_dir: str, allow_patterns: list[str]
    ) -> str:
        self.calls.append(("download", repo, revision, ",".join(sorted(allow_patterns))))
        snap = hub.snapshot_dir(Path(cache_dir), repo, revision)
        snap.mkdir(parents=True)
        (snap / "config.json").write_text("{}")
        return str(snap)


def test_download_pins_every_hub_model_and_only_those(tmp_path: Path) -> None:
    graph = parse_graph(GRAPH)
    assert hub.hub_models(graph) == {"pinned": ("org/pinned", PIN), "loose": ("org/loose", None)}
    api = FakeHub(files={"org/loose": ["config.json", "pytorch_model.bin"]})
    got = {f.model: f for f in hub.download(graph, cache=tmp_path, api=api)}
    assert (got["pinned"].revision, got["pinned"].pinned_by) == (PIN, "graph")
    assert (got["loose"].revision, got["loose"].pinned_by) == (MAIN, "first download")
    assert hub.read_lock(tmp_path) == {"org/pinned": PIN, "org/loose": MAIN}
    downloads = {c[1]: c for c in api.calls if c[0] == "download"}
    assert downloads["org/pinned"][2] == PIN and "*.bin" not in downloads["org/pinned"][3]
    assert "*.bin" in downloads["org/loose"][3]  # no safetensors: the .bin weights
    assert [c for c in api.calls if c[0] == "model_info"] == [("model_info", "org/loose")]

    # Again: nothing downloads, and the loose model stays at its recorded commit even though
    # `main` has moved since.
    api2 = FakeHub()
    api2.model_info = lambda repo: pytest.fail("the lock must be used")  # type: ignore[method-assign]
    again = {f.model: f for f in hub.download(graph, cache=tmp_path, api=api2)}
    assert {f.status for f in again.values()} == {"present"}
    assert (again["loose"].revision, again["loose"].pinned_by) == (MAIN, "lock")
    assert api2.calls == []


def test_a_revision_must_be_a_commit() -> None:
    with pytest.raises(GraphError, match="revision"):
        parse_graph(GRAPH.replace(PIN, "main"))


async def test_worker_waits_for_the_pinned_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    waiter = asyncio.create_task(
        hub.wait_for_snapshot("org/loose", None, timeout_s=10, poll_s=0.02)
    )
    await asyncio.sleep(0.1)
    assert not waiter.done()  # no lock, no snapshot yet
    FakeHub().snapshot_download(
        "org/loose", revision=MAIN, cache_dir=str(tmp_path), allow_patterns=[]
    )
    hub._write_lock(tmp_path, {"org/loose": MAIN})
    assert await asyncio.wait_for(waiter, 5) == MAIN
    # A configured revision wins over the lock, and is what must be present.
    with pytest.raises(hub.HubError, match=f"org/loose@{PIN}"):
        await hub.wait_for_snapshot("org/loose", PIN, timeout_s=0.05, poll_s=0.01)


def test_hub_ids() -> None:
    assert hub.is_hub_id("Qwen/Qwen2.5-7B-Instruct")
    for not_hub in (None, "", "/models/router", "./a/b", "~/x/y", "smollm2", "a/b/c"):
        assert not hub.is_hub_id(not_hub), not_hub
