"""The graph file: models (engines) and nodes (what clients address), validated at load.

Errors name the node and the field, and the line in the YAML file where that node starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
NodeId = Annotated[str, Field(pattern=ID_PATTERN)]
RESERVED_IDS = {"auto"}


class GraphError(ValueError):
    """A graph file that cannot be served. The message is meant for the person who wrote it."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingDefaults(Strict):
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)


class ModelSpec(Strict):
    """An engine. Embedded mode starts a worker for it; otherwise `urls` lists its replicas."""

    kind: Literal["worker"] = "worker"
    packaged: str | None = Field(None, description="name of a packaged model (smollm2, gemma3)")
    path: str | None = Field(None, description="model directory or hub id resolved by the worker")
    revision: str | None = Field(
        None,
        description="hub models: the commit to serve (40 hex digits; service/models/hub.py)",
        pattern=r"^[0-9a-f]{40}$",
    )
    urls: list[str] = Field(default_factory=list, description="worker replicas (http://host:port)")
    max_model_len: int = Field(2048, ge=16)
    engine: Literal["vllm", "fake"] = Field(
        "vllm", description="fake = canned tokens, no weights (tests, overhead benchmarks)"
    )
    build: dict[str, Any] | None = Field(
        None, description="how to build this model when missing (router models)"
    )
    tool_parser: str | None = Field(
        None,
        description="vLLM's tool parser for the model's own tool-call format (hermes, "
        "llama3_json, mistral, ...): enables tool_choice 'auto' on its nodes",
    )

    @model_validator(mode="after")
    def _has_source(self) -> ModelSpec:
        if not (self.packaged or self.path or self.urls or self.engine == "fake"):
            raise ValueError("a model needs one of: packaged, path, urls")
        return self


SECRET_HEADERS = {"authorization", "api-key", "x-api-key", "proxy-authorization"}


class OpenAIModelSpec(Strict):
    """A model served by any OpenAI-compatible server (vLLM, TGI, llama.cpp, Ollama, a hosted
    API): the gateway routes to it and passes chat/completions through
    (service/gateway/runners/remote.py)."""

    kind: Literal["openai"]
    base_url: list[str] = Field(
        ..., min_length=1, description="the upstream's /v1 URL; a list = replicas of one model"
    )
    model: str = Field(..., min_length=1, description="the upstream's name for the model")
    api_key_env: str | None = Field(None, description="environment variable holding the key")
    api_key_file: str | None = Field(None, description="file holding the key (a mounted secret)")
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(
        120.0, gt=0, description="longest wait for bytes (a whole non-streamed reply)"
    )
    max_concurrency: int = Field(64, ge=1, description="requests in flight; over it: 429")
    headers: dict[str, str] = Field(default_factory=dict, description="sent with every call")
    health_path: str | None = Field(
        "/models", description="probed under base_url like a worker's /readyz; null: no probe"
    )
    max_model_len: int | None = Field(None, ge=16, description="informational")
    passthrough: list[str] = Field(
        default_factory=list,
        description="request fields forwarded as the client sent them, beyond the ones the "
        "gateway supports (e.g. reasoning_effort); nothing else reaches the upstream",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secret(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if "api_key" in data:
            raise ValueError(
                "api_key: keys are never written in the graph file; "
                "use api_key_env (an environment variable) or api_key_file (a secret file)"
            )
        headers = data.get("headers")
        if isinstance(headers, dict) and SECRET_HEADERS & {str(k).lower() for k in headers}:
            raise ValueError(
                "headers: credentials are never written in the graph file; "
                "use api_key_env or api_key_file (sent as 'Authorization: Bearer ...')"
            )
        if isinstance(data.get("base_url"), str):
            data = {**data, "base_url": [data["base_url"]]}
        return data

    @model_validator(mode="after")
    def _one_key_source(self) -> OpenAIModelSpec:
        if self.api_key_env and self.api_key_file:
            raise ValueError("give one of api_key_env and api_key_file, not both")
        for url in self.base_url:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"base_url: '{url}' must start with http:// or https://")
        if self.health_path is not None and not self.health_path.startswith("/"):
            raise ValueError("health_path: a path under base_url, starting with /")
        return self


def _model_kind(data: Any) -> str:
    kind = data.get("kind", "worker") if isinstance(data, dict) else getattr(data, "kind", None)
    return "openai" if kind == "openai" else "worker"


AnyModelSpec = Annotated[
    Annotated[ModelSpec, Tag("worker")] | Annotated[OpenAIModelSpec, Tag("openai")],
    Discriminator(_model_kind),
]


class ModelNode(Strict):
    kind: Literal["model"]
    model: str
    description: str = ""
    system_prompt: str | None = None
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults)
    examples: list[str] = Field(default_factory=list)


class RouterNode(Strict):
    kind: Literal["router"]
    model: str
    children: list[NodeId] = Field(..., min_length=1)
    fallback: NodeId | None = None
    threshold: float = Field(0.0, ge=0.0, le=1.0, description="min probability of the best child")
    reformat: bool = Field(False, description="generate the reformatted query after the token")
    tokens: dict[str, int] | None = Field(
        None, description="child -> functional token index (Octopus-v4 checkpoints)"
    )
    prompt_format: Literal["octograph", "octopus-v4"] = "octograph"
    description: str = ""
    examples: list[str] = Field(default_factory=list)


class EnsembleMember(Strict):
    model: str
    weight: float = Field(1.0, gt=0.0)
    speculate: int | None = Field(
        None,
        ge=0,
        le=8,
        description="children per query the member's worker fetches ahead, in the "
        "background (0: none; unset: the gateway's default, see runners/ensemble.py)",
    )


class EnsembleNode(Strict):
    kind: Literal["ensemble"]
    members: list[EnsembleMember] = Field(..., min_length=2)
    mode: Literal["mix", "product", "adaptive"] = "mix"
    description: str = ""
    system_prompt: str | None = None
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults)
    examples: list[str] = Field(default_factory=list)


Node = Annotated[ModelNode | RouterNode | EnsembleNode, Field(discriminator="kind")]


class GraphConfig(Strict):
    models: dict[NodeId, AnyModelSpec] = Field(..., min_length=1)
    nodes: dict[NodeId, Node] = Field(default_factory=dict)
    root: NodeId | None = Field(None, description="the router that model='auto' starts at")

    @model_validator(mode="after")
    def _check_structure(self) -> GraphConfig:
        check_structure(self)
        return self

    def tool_parsers(self) -> dict[str, str]:
        """Worker models whose tool-call format a vLLM tool parser reads (tool_choice auto)."""
        return {n: m.tool_parser for n, m in self.worker_models().items() if m.tool_parser}

    def worker_models(self) -> dict[str, ModelSpec]:
        """Models served by Octograph workers (embedded mode starts these)."""
        return {k: m for k, m in self.models.items() if isinstance(m, ModelSpec)}

    def openai_models(self) -> dict[str, OpenAIModelSpec]:
        """Models on OpenAI-compatible upstreams (kind: openai)."""
        return {k: m for k, m in self.models.items() if isinstance(m, OpenAIModelSpec)}

    def router_children(self, node_id: str) -> list[str]:
        node = self.nodes[node_id]
        return list(node.children) if isinstance(node, RouterNode) else []


def check_structure(graph: GraphConfig) -> None:
    """Cross-references the schema cannot express; raises ValueError naming node and field."""
    for nid in list(graph.nodes) + list(graph.models):
        if nid in RESERVED_IDS:
            raise ValueError(f"'{nid}' is reserved and cannot be a node or model id")
    for nid, node in graph.nodes.items():
        models = [m.model for m in node.members] if isinstance(node, EnsembleNode) else [node.model]
        for m in models:
            if m not in graph.models:
                known = ", ".join(sorted(graph.models))
                raise ValueError(f"node '{nid}': model '{m}' is not defined (models: {known})")
        if isinstance(node, RouterNode):
            _check_router(graph, nid, node)
        _check_openai_use(graph, nid, node)
    if graph.root is not None:
        root = graph.nodes.get(graph.root)
        if not isinstance(root, RouterNode):
            raise ValueError(f"root: '{graph.root}' must be a node of kind router")
    _check_tokens(graph)
    _check_acyclic(graph)


def _check_openai_use(
    graph: GraphConfig, nid: str, node: ModelNode | RouterNode | EnsembleNode
) -> None:
    """An OpenAI-compatible upstream generates text and nothing more: it exposes neither the
    next-byte distribution an ensemble mixes nor the functional-token scores a router reads.
    (The model is quoted with " so the error points at the node's line, not the model's.)"""
    remote = graph.openai_models()
    if isinstance(node, EnsembleNode):
        for m in node.members:
            if m.model in remote:
                raise ValueError(
                    f"node '{nid}': member \"{m.model}\" is an openai model and cannot be an "
                    "ensemble member: an OpenAI-compatible upstream exposes no next-token "
                    "scores (ensembles need the full next-token distribution of each member)"
                )
    elif isinstance(node, RouterNode) and node.model in remote:
        raise ValueError(
            f"node '{nid}': model \"{node.model}\" is an openai model and cannot be a router "
            "model: routing reads functional-token scores, which an OpenAI-compatible "
            "upstream does not expose"
        )


def _check_router(graph: GraphConfig, nid: str, node: RouterNode) -> None:
    if len(set(node.children)) != len(node.children):
        raise ValueError(f"node '{nid}': children lists a node twice")
    for child in node.children:
        if child not in graph.nodes:
            raise ValueError(f"node '{nid}': child '{child}' is not a node")
        if child == nid:
            raise ValueError(f"node '{nid}': a router cannot be its own child")
    if node.fallback is not None and node.fallback not in graph.nodes:
        raise ValueError(f"node '{nid}': fallback '{node.fallback}' is not a node")
    if node.fallback == nid:
        raise ValueError(f"node '{nid}': fallback: a router cannot fall back to itself")
    if node.tokens is not None:
        missing = set(node.children) - set(node.tokens)
        if missing:
            raise ValueError(f"node '{nid}': tokens has no entry for {sorted(missing)}")
        values = list(node.tokens.values())
        if len(set(values)) != len(values):
            raise ValueError(f"node '{nid}': tokens: two children share a functional token")


def _check_tokens(graph: GraphConfig) -> None:
    """Functional tokens are graph-wide (one router model serves every router): explicit
    `tokens:` maps of different routers must agree on each child and never share an index."""
    owner: dict[int, tuple[str, str]] = {}  # index -> (child, router that set it)
    given: dict[str, tuple[int, str]] = {}  # child -> (index, router that set it)
    for nid, node in graph.nodes.items():
        if not isinstance(node, RouterNode) or not node.tokens:
            continue
        for child, idx in node.tokens.items():
            if child in given and given[child][0] != idx:
                first, where = given[child]
                raise ValueError(
                    f"node '{nid}': tokens: '{child}' is <nexa_{idx}> here but "
                    f"<nexa_{first}> in node '{where}'"
                )
            if idx in owner and owner[idx][0] != child:
                other, where = owner[idx]
                raise ValueError(
                    f"node '{nid}': tokens: <nexa_{idx}> of '{child}' is already the token of "
                    f"'{other}' (node '{where}')"
                )
            given[child] = (idx, nid)
            owner[idx] = (child, nid)


def _check_acyclic(graph: GraphConfig) -> None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(nid: str, path: list[str]) -> None:
        if state.get(nid) == 2:
            return
        if state.get(nid) == 1:
            cycle = " -> ".join(path[path.index(nid) :] + [nid])
            raise ValueError(f"the routers form a cycle: {cycle}")
        state[nid] = 1
        # A fallback is an edge too: a router falling back to one of its ancestors would loop.
        node = graph.nodes[nid]
        fallback = [node.fallback] if isinstance(node, RouterNode) and node.fallback else []
        for child in graph.router_children(nid) + fallback:
            visit(child, path + [nid])
        state[nid] = 2

    for nid in graph.nodes:
        visit(nid, [])


def _node_lines(text: str) -> dict[str, int]:
    """Line numbers (1-based) of each key under `nodes:` and `models:` for error messages."""
    lines: dict[str, int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if not isinstance(root, yaml.MappingNode):
        return lines
    for key, value in root.value:
        if isinstance(value, yaml.MappingNode) and key.value in ("nodes", "models"):
            for k, _ in value.value:
                lines.setdefault(str(k.value), k.start_mark.line + 1)
    return lines


class _DuplicateKey(yaml.MarkedYAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys without a word; in a graph file that silently
    drops a node (two `math:` entries) or a model, so a repeated key is an error here."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:  # an unhashable key: PyYAML's own check reports it
                continue
            if key in seen:
                raise _DuplicateKey(
                    None,
                    None,
                    f"duplicate key '{key}' (first defined on line {seen[key]})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def parse_graph(text: str, source: str = "<graph>") -> GraphConfig:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        what = "" if isinstance(exc, _DuplicateKey) else "not valid YAML: "
        raise GraphError(f"{source}{where}: {what}{getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise GraphError(f"{source}: the graph must be a mapping with 'models' and 'nodes'")
    lines = _node_lines(text)
    try:
        return GraphConfig.model_validate(data)
    except ValidationError as exc:
        raise GraphError(_format_errors(exc, source, lines)) from None


def _format_errors(exc: ValidationError, source: str, lines: dict[str, int]) -> str:
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        # Drop pydantic's discriminator tag ("model"/"router") from the path.
        if len(loc) >= 3 and loc[0] == "nodes" and loc[2] in ("model", "router", "ensemble"):
            loc.pop(2)
        if len(loc) >= 3 and loc[0] == "models" and loc[2] in ("worker", "openai"):
            loc.pop(2)
        where = f"{source}"
        if len(loc) >= 2 and loc[1] in lines:
            where += f" line {lines[loc[1]]}"
        msg = err["msg"].removeprefix("Value error, ")
        if not loc:
            named = _named_in(msg, lines)
            if named:
                where += f" line {lines[named]}"
        field = ".".join(loc)
        out.append(f"{where}: {field + ': ' if field else ''}{msg}")
    return "\n".join(out)


def _named_in(msg: str, lines: dict[str, int]) -> str | None:
    for name in lines:
        if f"'{name}'" in msg:
            return name
    return None


def load_graph(path: Path) -> GraphConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise GraphError(f"cannot read graph file {path}: {exc.strerror}") from None
    return parse_graph(text, source=str(path))
