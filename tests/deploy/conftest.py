"""Offline validation of the deployment files (Dockerfile, docker-compose.yml, deploy/).

The tools live in .venv-deploy/ (scripts/deploy-tools.sh), never in the main venv. When one is
missing, the session runs that script once (idempotent; it needs PyPI); a test is skipped only
when the script could not provide its tool, and the skip reason quotes the script's output.
Set OCTOGRAPH_DEPLOY_AUTOINSTALL=0 to never install from the tests.

Nothing here needs a network, a Docker daemon or a cluster at test time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deploy_helpers import (  # noqa: E402
    KEYS_FILE_HOST,
    OVERLAYS,
    ROOT,
    SCRIPT,
    TOOLS,
    VENV,
    Rendered,
    Tools,
    present_tools,
    run,
)


@pytest.fixture(scope="session")
def tools() -> Tools:
    found = present_tools()
    reason = ""
    if len(found) < len(TOOLS) and os.environ.get("OCTOGRAPH_DEPLOY_AUTOINSTALL", "1") != "0":
        if shutil.which("bash") is None:
            reason = "bash is not available to run scripts/deploy-tools.sh"
        else:
            proc = subprocess.run(
                ["bash", str(SCRIPT)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=900,
                env={**os.environ, "DEPLOY_VENV": str(VENV)},
            )
            reason = (proc.stdout + proc.stderr).strip()[-800:]
        found = present_tools()
    elif len(found) < len(TOOLS):
        reason = "OCTOGRAPH_DEPLOY_AUTOINSTALL=0 and the tools are not installed"
    return Tools(found, reason)


@pytest.fixture(scope="session")
def rendered_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rendered")


@pytest.fixture(scope="session")
def rendered(tools: Tools, rendered_dir: Path) -> dict[str, Rendered]:
    """`kubectl kustomize deploy/overlays/<name>` for every overlay, rendered once."""
    kubectl = tools.get("kubectl")
    out: dict[str, Rendered] = {}
    for overlay in OVERLAYS:
        proc = run([kubectl, "kustomize", f"deploy/overlays/{overlay}"])
        assert proc.returncode == 0, f"kustomize {overlay} failed:\n{proc.stderr}"
        path = rendered_dir / f"{overlay}.yaml"
        path.write_text(proc.stdout)
        docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
        out[overlay] = Rendered(overlay, path, docs)
    return out


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest, rendered: dict[str, Rendered]) -> Rendered:
    return rendered[request.param]


@pytest.fixture(scope="session")
def checkov_report(
    tools: Tools, rendered: dict[str, Rendered], rendered_dir: Path
) -> list[dict[str, Any]]:
    """One checkov run over both rendered overlays and the Dockerfile (offline)."""
    checkov = tools.get("checkov")
    scan = rendered_dir / "checkov-input"
    scan.mkdir(exist_ok=True)
    for r in rendered.values():
        shutil.copy(r.path, scan / r.path.name)
    shutil.copy(ROOT / "Dockerfile", scan / "Dockerfile")
    proc = run(
        [
            checkov,
            "-d",
            scan,
            "--framework",
            "kubernetes",
            "dockerfile",
            "--skip-download",
            "--output",
            "json",
        ],
    )
    # checkov exits 1 when a check fails; anything else is a crash.
    assert proc.returncode in (0, 1), f"checkov crashed:\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout)
    return report if isinstance(report, list) else [report]


@pytest.fixture(scope="session")
def compose_config(tools: Tools) -> dict[str, Any]:
    """docker-compose.yml as Compose v2 itself resolves it, every profile enabled (with the
    API keys file that compose requires from the environment)."""
    compose = tools.get("docker-compose")
    proc = run(
        [compose, "-f", "docker-compose.yml", "--profile", "gpu", "config", "--format", "json"],
        env={"OCTOGRAPH_API_KEYS_FILE_HOST": KEYS_FILE_HOST},
    )
    assert proc.returncode == 0, f"docker compose config failed:\n{proc.stderr}"
    config: dict[str, Any] = json.loads(proc.stdout)
    return config
