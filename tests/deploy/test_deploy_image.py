"""The Dockerfile, .dockerignore and the container healthcheck, plus the scanners (hadolint,
checkov) over the Dockerfile and the rendered manifests."""

from __future__ import annotations

import fnmatch
import http.server
import importlib.util
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import ROOT, Rendered, Tools, run

DOCKERFILE = ROOT / "Dockerfile"
HEALTHCHECK = ROOT / "deploy/docker/healthcheck.py"
MIN_JUSTIFICATION = 20  # characters of reasoning required next to every suppression


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


# ------------------------------------------------------------------ Dockerfile properties


def test_dockerfile_build_args_and_stages() -> None:
    ins = instructions()
    args = {a for k, a in ins if k == "ARG"}
    assert "TARGET=cpu" in args and "BAKE_MODELS=false" in args
    froms = [a for k, a in ins if k == "FROM"]
    names = {f.split(" AS ")[-1] for f in froms if " AS " in f}
    assert {"base-cpu", "base-gpu", "builder", "models-true", "models-false", "runtime"} <= names
    assert "base-${TARGET} AS base" in froms
    assert "models-${BAKE_MODELS} AS models" in froms
    for f in froms:
        image = f.split()[0]
        if "$" not in image and image not in names:
            assert re.search(r":[\w.\-]+$", image) and not image.endswith(":latest"), image
    text = " ".join(a for k, a in ins if k == "RUN")
    # CPU: torch from the CPU index, then drop the companions that break that torch.
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in text
    assert ".[cpu,convert]" in text and ".[gpu,convert]" in text
    assert "pip uninstall -y torchvision torchaudio torchcodec" in text
    assert "octograph models prepare --cache-dir /models" in text


def test_runtime_stage_is_non_root_exec_form_with_python_healthcheck() -> None:
    runtime = stages()[-1]
    assert runtime[0][1].endswith("AS runtime")
    kinds = [k for k, _ in runtime]
    user = [a for k, a in runtime if k == "USER"]
    assert user and user[-1].split(":")[0] not in {"0", "root"}
    assert int(user[-1].split(":")[0]) >= 10000
    assert kinds.index("USER") < kinds.index("ENTRYPOINT")
    entry = [a for k, a in runtime if k == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["octograph"], "exec form: SIGTERM reaches octograph"
    cmd = json.loads([a for k, a in runtime if k == "CMD"][-1])
    assert cmd[0] == "gateway"
    health = [a for k, a in runtime if k == "HEALTHCHECK"][-1]
    assert "CMD [" in health, "exec-form HEALTHCHECK"
    probe = json.loads(health[health.index("CMD") + 3 :].strip())
    assert probe[0] == "octograph-healthcheck" and "/livez" in probe
    assert not re.search(r"\b(curl|wget)\b", health)
    copied = " ".join(a for k, a in runtime if k == "COPY")
    assert "deploy/docker/healthcheck.py /usr/local/bin/octograph-healthcheck" in copied
    assert HEALTHCHECK.read_text().startswith("#!/usr/bin/env python3")


def _ignored(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore semantics, enough for these patterns: the last match wins, a
    pattern matching a parent folder matches everything below it, `**/` matches zero or more
    folders."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        variants = {pat, pat[3:]} if pat.startswith("**/") else {pat}
        if any(fnmatch.fnmatchcase(p, v) for p in prefixes for v in variants):
            verdict = not negate
    return verdict


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    needed = [
        "pyproject.toml",
        "README.md",
        "service/__init__.py",
        "service/cli.py",
        "service/models/packaged.py",
        "service/worker/vllm_engine.py",
        "deploy/docker/healthcheck.py",
    ]
    excluded = [
        ".git/config",
        ".venv/bin/python",
        ".venv-deploy/bin/checkov",
        "service/__pycache__/cli.cpython-311.pyc",
        ".pytest_cache/v/x",
        ".mypy_cache/x",
        "models/smollm2/model.safetensors",
        "x.gguf",
        "tests/unit/test_x.py",
        "bench/results/r.json",
        "deploy/overlays/gpu/graph.yaml",
        ".octograph/models/x",
        "deploy/compose/api-keys.example",
        ".env",
    ]
    for path in needed:
        assert not _ignored(patterns, path), f"{path} must reach the build context"
    for path in excluded:
        assert _ignored(patterns, path), f"{path} must not reach the build context"


# ------------------------------------------------------------------ healthcheck script


@pytest.fixture(scope="module")
def health_server() -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            code = {"/livez": 200, "/readyz": 503}.get(self.path, 404)
            self.send_response(code)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


@pytest.mark.parametrize(("path", "code"), [("/livez", 0), ("/readyz", 1), ("/nope", 1)])
def test_healthcheck_exit_codes(health_server: int, path: str, code: int) -> None:
    proc = subprocess.run(
        [sys.executable, str(HEALTHCHECK), "--port", str(health_server), "--path", path],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert proc.returncode == code, proc.stderr


def test_healthcheck_refused_port_is_unhealthy() -> None:
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, str(HEALTHCHECK), "--port", str(port), "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert proc.returncode == 1


def test_healthcheck_finds_the_port_of_the_running_role() -> None:
    spec = importlib.util.spec_from_file_location("octo_healthcheck", HEALTHCHECK)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (
        mod._port_from(
            [
                "/opt/venv/bin/python",
                "/opt/venv/bin/octograph",
                "worker",
                "--model",
                "/models/x",
                "--port",
                "8123",
            ]
        )
        == 8123
    )
    assert mod._port_from(["octograph", "gateway", "--port=8000", "--metrics-port", "9100"]) == 8000
    assert mod._port_from(["octograph", "gateway", "--metrics-port", "9100"]) is None


# ------------------------------------------------------------------ scanners


def test_hadolint_clean(tools: Tools) -> None:
    hadolint = tools.get("hadolint")
    proc = run([hadolint, "--format", "json", "--failure-threshold", "style", str(DOCKERFILE)])
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], "hadolint findings:\n" + "\n".join(
        f"line {f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings
    )
    assert proc.returncode == 0


def test_every_dockerfile_suppression_is_justified() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            codes = line.split("=", 1)[1].split(",")
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#") and "hadolint" not in above, (
                f"line {i + 1}: explain {codes} in the comment above the ignore"
            )
            context = " ".join(lines[max(0, i - 4) : i])
            assert any(c.strip() in context for c in codes) or len(above) > MIN_JUSTIFICATION
        m = re.search(r"checkov:skip=(CKV\w+):(.*)", line)
        if m:
            assert len(m.group(2).strip()) >= MIN_JUSTIFICATION, f"line {i + 1}: justify {m[1]}"


def test_checkov_has_no_failed_checks(checkov_report: list[dict[str, Any]]) -> None:
    """Open-source checkov offline reports no severities, so the bar is: zero failures."""
    by_type = {r["check_type"]: r for r in checkov_report}
    assert {"kubernetes", "dockerfile"} <= set(by_type), by_type.keys()
    problems = []
    for check_type, r in by_type.items():
        s = r["summary"]
        assert s["parsing_errors"] == 0, f"{check_type}: parsing errors"
        assert s["passed"] > 50, f"{check_type}: suspiciously few checks ran: {s}"
        for f in r["results"].get("failed_checks", []):
            problems.append(
                f"{f['check_id']} {f['check_name']} @ {f['resource']} ({f['file_path']})"
            )
    assert not problems, "checkov failures:\n" + "\n".join(problems)


def test_checkov_skips_are_justified(
    checkov_report: list[dict[str, Any]], rendered: dict[str, Rendered]
) -> None:
    dockerfile = DOCKERFILE.read_text()
    resources = {}
    for r in rendered.values():
        for d in r.docs:
            ns = d["metadata"].get("namespace", "default")
            resources[f"{d['kind']}.{ns}.{d['metadata']['name']}"] = d
    skipped = [c for r in checkov_report for c in r["results"].get("skipped_checks", [])]
    assert skipped, "expected the documented skips (e.g. CKV_K8S_43) to be reported"
    for c in skipped:
        cid = c["check_id"]
        if c["file_path"].endswith("Dockerfile"):
            m = re.search(rf"checkov:skip={cid}:(.*)", dockerfile)
            assert m and len(m.group(1).strip()) >= MIN_JUSTIFICATION, f"Dockerfile: justify {cid}"
            continue
        doc = resources[c["resource"]]
        notes = [
            v
            for k, v in doc["metadata"].get("annotations", {}).items()
            if k.startswith("checkov.io/skip") and v.startswith(cid + "=")
        ]
        assert notes, f"{c['resource']}: {cid} skipped without an annotation"
        assert len(notes[0].split("=", 1)[1]) >= MIN_JUSTIFICATION, (
            f"{c['resource']}: justify {cid}"
        )


# ------------------------------------------------------------------ dashboard


REQUIRED_METRICS = [
    "octograph_requests_total",
    "octograph_request_errors_total",
    "octograph_gateway_inflight_requests",
    "octograph_ttft_seconds_bucket",
    "octograph_request_duration_seconds_bucket",
    "octograph_routing_decisions_total",
    "octograph_ensemble_bytes_per_second",
]


def test_grafana_dashboard(rendered: dict[str, Rendered]) -> None:
    dash = json.loads((ROOT / "deploy/grafana/octograph.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for metric in REQUIRED_METRICS:
        assert metric in exprs, f"no panel uses {metric}"
    assert "histogram_quantile(0.50" in exprs and "histogram_quantile(0.99" in exprs
    assert "sum by (reason)" in exprs and "sum by (router, node)" in exprs
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "${datasource}"
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
    for r in rendered.values():
        cm = r.get("ConfigMap", "octograph-grafana-dashboard")
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(cm["data"]["octograph.json"]) == dash


def test_prometheus_adapter_example_exposes_the_hpa_metric() -> None:
    values = yaml.safe_load((ROOT / "deploy/monitoring/prometheus-adapter-values.yaml").read_text())
    rules = values["rules"]["custom"]
    assert any(
        "octograph_gateway_inflight_requests" in r["seriesQuery"]
        and r["name"]["as"] == "octograph_gateway_inflight_requests"
        for r in rules
    )


def test_deploy_tools_script_is_idempotent(tools: Tools) -> None:
    tools.get("checkov")  # installed (else skipped with the reason)
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts/deploy-tools.sh")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stderr


def test_tools_are_not_in_the_main_venv() -> None:
    main_venv = Path(ROOT / ".venv/bin")
    if not main_venv.exists():
        pytest.skip("no main .venv here")
    for name in ("checkov", "kubernetes-validate", "hadolint"):
        assert not (main_venv / name).exists(), f"{name} leaked into the main venv"
