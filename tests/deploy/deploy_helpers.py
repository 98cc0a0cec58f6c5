"""Shared helpers for tests/deploy (a uniquely named module, so that it never collides with
another test folder's conftest)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("DEPLOY_VENV", ROOT / ".venv-deploy"))
SCRIPT = ROOT / "scripts" / "deploy-tools.sh"
TOOLS = ("kubectl", "kubernetes-validate", "checkov", "hadolint", "docker-compose")
OVERLAYS = ("cpu", "gpu")
# Oldest and newest Kubernetes minor versions the manifests are validated against.
K8S_VERSIONS = ("1.29.0", "1.37.0")
TOOL_TIMEOUT_S = 180
# docker-compose.yml has no default API keys file: `config` needs one named (never read by it).
KEYS_FILE_HOST = "/run/octograph-test/api-keys"


@dataclass
class Tools:
    paths: dict[str, Path] = field(default_factory=dict)
    missing_reason: str = ""

    def get(self, name: str) -> Path:
        path = self.paths.get(name)
        if path is None:
            pytest.skip(
                f"deploy tool '{name}' could not be installed by scripts/deploy-tools.sh "
                f"into {VENV}: {self.missing_reason or 'not found'}"
            )
        return path


def present_tools() -> dict[str, Path]:
    found = {}
    for name in TOOLS:
        path = VENV / "bin" / name
        if path.exists() and os.access(path, os.X_OK):
            found[name] = path
    return found


def run(cmd: list[str | Path], **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a deploy tool; output captured as text. (All of them work with no network: checked
    under `unshare -n`; checkov needs --skip-download for that.)"""
    kw.setdefault("cwd", ROOT)
    kw.setdefault("timeout", TOOL_TIMEOUT_S)
    env = {**os.environ, **kw.pop("env", {})}
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, **kw)


@dataclass
class Rendered:
    overlay: str
    path: Path
    docs: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d.get("kind") == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        for d in self.of_kind(kind):
            if d["metadata"]["name"] == name:
                return d
        raise AssertionError(f"{self.overlay}: no {kind} named {name}")

    def by_prefix(self, kind: str, prefix: str) -> dict[str, Any]:
        hits = [d for d in self.of_kind(kind) if d["metadata"]["name"].startswith(prefix)]
        assert len(hits) == 1, f"{self.overlay}: expected one {kind} {prefix}*, got {len(hits)}"
        return hits[0]


def pod_containers(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec.get("containers", [])


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())
