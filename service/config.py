"""Process settings. One pydantic-settings class per process kind, built once in the entry point
and passed explicitly: nothing reads the environment after start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.affinity import parse_cpu_list


class StartupError(Exception):
    """A configuration the process refuses to start with (an open public bind, a public example
    key, an unusable secret file). The CLI prints the message and exits 2, no traceback."""


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OCTOGRAPH_", extra="ignore")

    config: Path = Field(Path("configs/local.yaml"), description="graph YAML file")
    graph_reload_interval_s: float = Field(
        0.5,  # a change is served within a second: one interval + 50 ms to see it settled
        ge=0.0,
        description="how often the graph file is checked for a new content (SHA-256 of its "
        "bytes) to reload without a restart; 0 = never (SIGHUP still reloads)",
    )
    host: str = "127.0.0.1"
    port: PositiveInt = 8000
    metrics_port: int | None = Field(
        None, description="serve /metrics on this separate port instead of behind auth"
    )
    processes: PositiveInt = Field(
        1,
        description="gateway processes on host:port (SO_REUSEPORT), under one parent that "
        "restarts them; above 1, per-key limits need redis_url (service/gateway/processes.py)",
    )

    # Admission, in sequences (a request's prompts x n): refuse instead of queueing.
    max_inflight: PositiveInt = 256
    max_inflight_per_node: PositiveInt = 128
    max_inflight_per_key: PositiveInt | None = None
    max_request_sequences: PositiveInt = Field(
        64, description="prompts x n of one request; more is refused with a 400"
    )
    max_body_bytes: PositiveInt = 2 * 1024 * 1024
    body_timeout_s: PositiveFloat = Field(
        15.0, description="a request body must arrive within this; 408 after it"
    )

    # Deadlines: every request and every worker call is bounded.
    request_timeout_s: PositiveFloat = 300.0
    stream_idle_timeout_s: PositiveFloat = 60.0
    worker_connect_timeout_s: PositiveFloat = 2.0
    worker_read_timeout_s: PositiveFloat = 120.0
    shutdown_grace_s: PositiveFloat = 30.0

    # Health of workers: probe period and how long a failing replica sits out.
    health_interval_s: PositiveFloat = 2.0
    cooldown_s: PositiveFloat = 5.0

    # Auth: empty = open, which the gateway accepts on a loopback bind only (and then answers
    # only to loopback Host values) unless allow_open says the operator means it.
    api_keys: list[SecretStr] = Field(default_factory=list)
    api_keys_file: Path | None = None
    admin_keys: list[SecretStr] = Field(
        default_factory=list,
        description="API keys that also see every client's routing decisions in the console "
        "(/console/api/stats); with API keys set, other keys see counters only",
    )
    allow_open: bool = Field(
        False, description="serve without API keys on a non-loopback address (and any Host)"
    )
    rate_limit_rpm: PositiveInt | None = Field(
        None, description="sequences per minute per API key (a request weighs prompts x n)"
    )
    rate_limit_tpm: PositiveInt | None = Field(
        None,
        description="prompt + completion tokens per minute per API key (counted when a "
        "request ends; a key over it is refused until its minute has passed)",
    )
    # Shared state (service/gateway/shared/): unset = every limit and the console's view are
    # per process (the embedded default); set = kept in this Redis for every gateway replica.
    redis_url: SecretStr | None = Field(
        None, description="redis://[:password@]host:port/db shared by every gateway replica"
    )
    redis_timeout_s: PositiveFloat = Field(
        0.25, description="connect, read and pool-wait bound of every Redis call"
    )
    redis_max_connections: PositiveInt = 32
    redis_failure: Literal["fail_open", "fail_closed"] = Field(
        "fail_open",
        description="when Redis cannot be reached: admit on per-process limits (fail_open) "
        "or refuse with 503 (fail_closed); either way a metric and a log line",
    )
    redis_lease_ttl_s: PositiveFloat = Field(
        30.0,
        description="a request's in-flight lease in Redis lives this long unless its gateway "
        "renews it (every third of it): how soon a crashed gateway's slots come back",
    )
    # The workers' shared secret (service/internal_auth.py); the same variable as the
    # workers' own setting, OCTOGRAPH_WORKER_SECRET_FILE. Unset = workers are called without.
    worker_secret_file: Path | None = None

    log_json: bool = True
    log_level: str = "INFO"


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OCTOGRAPH_WORKER_", extra="ignore")

    model: str = Field(..., description="packaged model name, a model directory or a hub id")
    revision: str | None = Field(
        None, description="hub id models: the commit to load (else the prefetch lock's)"
    )
    weights_wait_s: float = Field(
        0.0,
        ge=0.0,
        description="hub id models, offline: wait this long for the prefetch Job's snapshot",
    )
    served_name: str | None = None
    host: str = "127.0.0.1"
    port: PositiveInt = 8001
    max_model_len: PositiveInt = 2048
    max_num_seqs: PositiveInt = 64
    dtype: str = "bfloat16"
    threads: int | None = Field(None, description="CPU threads for the engine (CPU builds)")
    cpus: str | None = Field(
        None,
        description="pin the engine's processes to these cores, a Linux CPU list such as "
        "'0-3,8' (None: unpinned); see service.affinity",
    )
    kv_cache_gib: PositiveFloat = 2.0
    # KV block size (None: vLLM's default, 128 tokens on CPU). Prefix caching reuses whole
    # blocks only, so 32 lets a router worker keep its 64-token system prefix cached (routing
    # p50 78 -> 63 ms) and byte-level scoring reuse the shared part of its token paths.
    block_size: PositiveInt | None = None
    # In bf16 a prompt whose prefix comes from the prefix cache gets slightly different logits
    # than one computed in full, enough to flip a sample now and then. So seeded and greedy
    # generation requests compute their whole prompt (vLLM's skip_reading_prefix_cache) and
    # reproduce; other sampling, scoring and byte-level capture read the cache. False trades
    # that guarantee for prefix reuse on long seeded/greedy prompts.
    reproducible_generation: bool = True
    compile: bool = Field(
        True,
        description="torch.compile the model at start (False: eager, vLLM's enforce_eager)",
    )
    executor: Literal["mp", "uni"] | None = Field(
        None, description="vLLM executor backend (None: vLLM's choice, 'mp' on CPU)"
    )
    max_inflight: PositiveInt = 256
    shutdown_grace_s: PositiveFloat = 30.0
    # The gateway's shared secret (service/internal_auth.py): every path but /livez, /readyz
    # (and /metrics on the API port) needs it. Unset = open (a warning off loopback).
    secret_file: Path | None = None
    metrics_port: int | None = Field(
        None, description="serve /metrics on this separate port (and not on the API port)"
    )
    enable_capture: bool = Field(
        True, description="full-distribution capture for byte-level scoring (ensembles)"
    )
    scoring_only: bool = Field(
        False,
        description="the model only scores its functional tokens (a router that generates "
        "nothing): its output layer computes their rows only (service/worker/scoring_head.py)",
    )
    byte_dist_timeout_s: PositiveFloat = Field(
        120.0, description="deadline of one /internal/byte-dist request's model forwards"
    )
    path_sessions: int = Field(
        4,
        ge=0,
        le=32,
        description="byte-level scoring: live vLLM streaming sessions that extend a token path "
        "by its next tokens in one step (service/worker/path_sessions.py); each paused one "
        "holds its KV and one of max_num_seqs; 0: a new engine request per path",
    )
    byte_dist_cache_mib: PositiveInt = Field(
        256, description="LRU of prepared paths for byte-level scoring (2 MiB a Gemma-3 path)"
    )
    cache_dir: Path | None = None
    fake_token_delay_s: float = Field(0.0, ge=0.0, description="--fake workers only")
    fake_reply_words: PositiveInt = Field(12, description="--fake workers only: tokens a reply")
    log_json: bool = True
    log_level: str = "INFO"

    @field_validator("cpus")
    @classmethod
    def _cpu_list(cls, value: str | None) -> str | None:
        if value is not None:
            parse_cpu_list(value)  # ValueError -> a settings error naming the field
        return value

    def cpu_set(self) -> frozenset[int] | None:
        return None if self.cpus is None else parse_cpu_list(self.cpus)
