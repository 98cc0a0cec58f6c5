"""docker-compose.yml, as resolved by the Compose v2 engine (`docker compose config`, offline),
and the Prometheus scrape config it mounts."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from deploy_helpers import KEYS_FILE_HOST, ROOT, Tools, run

CPU_WORKERS = ["worker-smollm2", "worker-gemma3", "worker-router"]
GPU_WORKERS = [f"{w}-gpu" for w in CPU_WORKERS]


def seconds(value: str) -> float:
    """Compose durations as printed by `config`: 45s, 1m0s, 15m0s, 1h2m3s."""
    total = 0.0
    for amount, unit in re.findall(r"([\d.]+)(h|ms|m|s)", value):
        total += float(amount) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[unit]
    return total


@pytest.fixture(scope="module")
def services(compose_config: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = compose_config["services"]
    return found


ONE_SHOTS = {"models", "worker-secret"}
KEYS_ENV = {"OCTOGRAPH_API_KEYS_FILE_HOST": KEYS_FILE_HOST}


def test_compose_is_valid_and_profiles_split_cpu_from_gpu(tools: Tools) -> None:
    compose = tools.get("docker-compose")
    default = run([compose, "-f", "docker-compose.yml", "config", "--services"], env=KEYS_ENV)
    assert default.returncode == 0, default.stderr
    assert set(default.stdout.split()) == {
        *ONE_SHOTS,
        *CPU_WORKERS,
        "gateway",
        "prometheus",
        "redis",
    }
    gpu = run(
        [compose, "-f", "docker-compose.yml", "--profile", "gpu", "config", "--services"],
        env=KEYS_ENV,
    )
    assert gpu.returncode == 0, gpu.stderr
    assert set(gpu.stdout.split()) - set(default.stdout.split()) == {*GPU_WORKERS, "gateway-gpu"}


def test_compose_needs_an_api_keys_file_of_your_own(tools: Tools) -> None:
    """No committed (so public) key is a fallback: compose refuses to resolve without one."""
    compose = tools.get("docker-compose")
    env = {"OCTOGRAPH_API_KEYS_FILE_HOST": ""}
    proc = run([compose, "-f", "docker-compose.yml", "config", "--format", "json"], env=env)
    # (This Compose engine exits 0 after an interpolation error; docker compose exits 1. Both
    # print the message and resolve nothing.)
    assert "set OCTOGRAPH_API_KEYS_FILE_HOST to a file with your API keys" in proc.stderr
    assert not proc.stdout.strip()
    example = (ROOT / "deploy/compose/api-keys.example").read_text()
    keys = [ln for ln in example.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert keys == [], "a key committed in git is public"


def test_worker_secret_is_a_one_shot_into_its_own_volume(services: dict[str, Any]) -> None:
    init = services["worker-secret"]
    assert init["command"] == [
        "worker-secret",
        "--file",
        "/var/lib/octograph/secret/worker-secret",
    ]
    assert init["restart"] == "no" and init["network_mode"] == "none"
    vol = [v for v in init["volumes"] if v["target"] == "/var/lib/octograph/secret"]
    assert vol and vol[0]["source"] == "worker-secret" and not vol[0].get("read_only")
    for name in CPU_WORKERS + GPU_WORKERS + ["gateway", "gateway-gpu"]:
        s = services[name]
        mount = next(v for v in s["volumes"] if v["source"] == "worker-secret")
        assert mount["read_only"] is True, name
        secret_file = s["environment"]["OCTOGRAPH_WORKER_SECRET_FILE"]
        assert secret_file == "/var/lib/octograph/secret/worker-secret", name
        if name.startswith("worker-"):
            assert s["depends_on"]["worker-secret"]["condition"] == (
                "service_completed_successfully"
            )


def test_models_is_a_one_shot_prepare_into_a_named_volume(services: dict[str, Any]) -> None:
    models = services["models"]
    # --graph: the same one-shot also builds the router model the router worker loads.
    assert models["command"] == [
        "models",
        "prepare",
        "--cache-dir",
        "/models",
        "--graph",
        "/opt/octograph/configs/local.yaml",
    ]
    assert models["restart"] == "no"
    vol = [v for v in models["volumes"] if v["target"] == "/models"]
    assert vol and vol[0]["type"] == "volume" and not vol[0].get("read_only")
    assert models["healthcheck"].get("disable") is True


@pytest.mark.parametrize("name", CPU_WORKERS + GPU_WORKERS)
def test_workers_wait_for_models_and_report_readiness(services: dict[str, Any], name: str) -> None:
    w = services[name]
    model = name.removeprefix("worker-").removesuffix("-gpu")
    assert w["command"] == [
        "worker",
        "--model",
        f"/models/{model}",
        "--host",
        "0.0.0.0",
        "--port",
        "8001",
        "--metrics-port",
        "9100",
    ]
    assert w["depends_on"]["models"]["condition"] == "service_completed_successfully"
    hc = w["healthcheck"]
    assert hc["test"][0] == "CMD" and "/readyz" in hc["test"] and "8001" in hc["test"]
    assert seconds(hc["start_period"]) >= 600, "first model load can take minutes"
    assert {
        k: v
        for k, v in next(v for v in w["volumes"] if v["target"] == "/models").items()
        if k in ("target", "read_only")
    } == {"target": "/models", "read_only": True} | {}
    assert not w.get("ports"), "workers are not published"
    assert w["networks"] == {"backend": None}
    grace = float(w["environment"]["OCTOGRAPH_WORKER_SHUTDOWN_GRACE_S"])
    assert seconds(w["stop_grace_period"]) > grace


@pytest.mark.parametrize(
    ("gateway", "workers", "graph"),
    [
        ("gateway", CPU_WORKERS, "deploy/compose/graph.yaml"),
        ("gateway-gpu", GPU_WORKERS, "deploy/compose/graph-gpu.yaml"),
    ],
)
def test_gateway_starts_after_healthy_workers(
    services: dict[str, Any], gateway: str, workers: list[str], graph: str
) -> None:
    gw = services[gateway]
    assert {w: gw["depends_on"][w]["condition"] for w in workers} == dict.fromkeys(
        workers, "service_healthy"
    )
    args = gw["command"]
    assert args[0] == "gateway" and args[args.index("--port") + 1] == "8000"
    assert args[args.index("--metrics-port") + 1] == "9100"
    config = args[args.index("--config") + 1]
    mount = next(v for v in gw["volumes"] if v["target"] == config)
    assert mount["type"] == "bind" and mount["read_only"] is True
    assert mount["source"] == str(ROOT / graph)
    assert "/readyz" in gw["healthcheck"]["test"]
    # The graph reaches exactly these workers, by compose DNS name, on the worker port.
    spec = yaml.safe_load((ROOT / graph).read_text())
    hosts = {u.split("//")[1] for m in spec["models"].values() for u in m["urls"]}
    assert hosts == {f"{w}:8001" for w in workers}
    grace = float(gw["environment"]["OCTOGRAPH_SHUTDOWN_GRACE_S"])
    assert seconds(gw["stop_grace_period"]) > grace
    assert gw["environment"]["OCTOGRAPH_API_KEYS_FILE"] == gw["secrets"][0]["target"]
    published = gw["ports"][0]
    assert published["target"] == 8000 and published["host_ip"] == "127.0.0.1"


def test_gpu_profile_reserves_nvidia_devices(services: dict[str, Any]) -> None:
    for name in GPU_WORKERS:
        w = services[name]
        assert w["profiles"] == ["gpu"]
        devices = w["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
        assert w["build"]["args"]["TARGET"] == "gpu"
    for name in CPU_WORKERS + ["gateway", "gateway-gpu", *ONE_SHOTS]:
        s = services[name]
        assert "devices" not in s.get("deploy", {}).get("resources", {}).get("reservations", {})
        assert s["build"]["args"]["TARGET"] == "cpu"
    for name in CPU_WORKERS + ["gateway", "prometheus", *ONE_SHOTS]:
        assert not services[name].get("profiles"), f"{name} must run in the default profile"


def test_app_containers_are_hardened(services: dict[str, Any]) -> None:
    for name, s in services.items():
        assert s.get("read_only") is True, name
        assert s.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in s.get("security_opt", []), name
        assert s["deploy"]["resources"]["limits"]["memory"], name
        if name != "prometheus":
            assert s["init"] is True, f"{name}: PID 1 must forward SIGTERM and reap children"
            assert any(t.startswith("/tmp") for t in s["tmpfs"]), name


def test_prometheus_scrapes_every_octograph_service(services: dict[str, Any]) -> None:
    prom = services["prometheus"]
    mount = next(v for v in prom["volumes"] if v["target"] == "/etc/prometheus/prometheus.yml")
    assert mount["source"] == str(ROOT / "configs/prometheus.yml")
    assert prom["healthcheck"]["test"][0] == "CMD"
    config = yaml.safe_load((ROOT / "configs/prometheus.yml").read_text())
    targets = {
        t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    # Workers are scraped on their metrics port: their API port needs the worker secret.
    expected = {f"{w}:9100" for w in CPU_WORKERS + GPU_WORKERS} | {
        "gateway:9100",
        "gateway-gpu:9100",
    }
    assert expected <= targets
    assert not [t for t in targets if t.endswith(":8001")], "a worker's API port is not scraped"
    for t in targets - {"127.0.0.1:9090"}:
        host, port = t.split(":")
        assert host in services and port in services[host]["expose"], t
    # Prometheus sits on the workers' internal network, or it could not reach them.
    assert "backend" in prom["networks"]


@pytest.mark.parametrize("gateway", ["gateway", "gateway-gpu"])
def test_gateways_share_limits_through_the_redis_service(
    services: dict[str, Any], gateway: str
) -> None:
    """The per-key limits live in the `redis` service (service/gateway/shared/limits.py): every
    gateway points at it and waits for it; it is on the internal network only and keeps
    nothing on disk."""
    gw = services[gateway]
    assert gw["environment"]["OCTOGRAPH_REDIS_URL"] == "redis://redis:6379/0"
    assert gw["depends_on"]["redis"]["condition"] == "service_healthy"
    redis = services["redis"]
    assert list(redis["networks"]) == ["backend"] and not redis.get("ports")
    args = redis["command"]
    assert args[0] == "redis-server"
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert not redis.get("profiles"), "the default profile needs it"
