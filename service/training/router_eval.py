"""`octograph router eval`: leaf-level routing accuracy per node, a confusion matrix, and
routing latency percentiles, on a held-out JSON-lines file ({"query": ..., "node": ...}).

Two ways to run the router:
- through a running gateway (`--gateway URL`): POST /v1/route per query, the real path
  (gateway -> router worker -> vLLM), latency as the client sees it;
- in-process with transformers on the built model dir: the same prompt (prompt.py), the same
  per-hop decision (policy.decide); latency is one un-cached forward pass at batch size 1.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.gateway.routing import decide, scored_routers
from service.graph.functional_tokens import assign_tokens, token_name
from service.graph.router_prompt import router_prompt_ids
from service.graph.schema import GraphConfig, RouterNode
from service.training.router_build import Example, RouterBuildError, load_examples

EVAL_TIMEOUT_S = 30.0


@dataclass
class Outcome:
    query: str
    expected: str
    got: str
    route: list[str]
    seconds: float


@dataclass
class EvalReport:
    mode: str
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        if not self.outcomes:
            return 0.0
        return sum(o.expected == o.got for o in self.outcomes) / len(self.outcomes)

    def per_node(self) -> dict[str, tuple[int, int]]:
        """node -> (correct, total), over the expected labels."""
        totals: Counter[str] = Counter(o.expected for o in self.outcomes)
        right: Counter[str] = Counter(o.expected for o in self.outcomes if o.expected == o.got)
        return {n: (right[n], totals[n]) for n in sorted(totals)}

    def confusion(self) -> tuple[list[str], dict[str, Counter[str]]]:
        labels = sorted({o.expected for o in self.outcomes} | {o.got for o in self.outcomes})
        matrix: dict[str, Counter[str]] = {n: Counter() for n in labels}
        for o in self.outcomes:
            matrix[o.expected][o.got] += 1
        return labels, matrix

    def latency_ms(self) -> dict[str, float]:
        return latency_percentiles([o.seconds for o in self.outcomes])

    def as_dict(self) -> dict[str, Any]:
        labels, matrix = self.confusion()
        return {
            "mode": self.mode,
            "queries": len(self.outcomes),
            "accuracy": round(self.accuracy, 4),
            "per_node": {n: {"correct": c, "total": t} for n, (c, t) in self.per_node().items()},
            "confusion": {e: dict(matrix[e]) for e in labels},
            "latency_ms": self.latency_ms(),
            "errors": [
                {"query": o.query, "expected": o.expected, "got": o.got, "route": o.route}
                for o in self.outcomes
                if o.expected != o.got
            ],
        }


def latency_percentiles(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {}
    ordered = sorted(seconds)

    def pct(p: float) -> float:
        # Nearest rank: an observed value, no interpolation.
        k = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
        return round(ordered[k] * 1000, 2)

    return {
        "p50": pct(50),
        "p90": pct(90),
        "p99": pct(99),
        "mean": round(sum(ordered) / len(ordered) * 1000, 2),
    }


def load_eval_rows(path: Path, graph: GraphConfig) -> list[Example]:
    try:
        rows = load_examples(path)
    except RouterBuildError as exc:
        raise SystemExit(f"error: {exc}") from None
    unknown = sorted({r.node for r in rows if r.node not in graph.nodes})
    if unknown:
        raise SystemExit(f"error: {path}: labels that are not nodes of the graph: {unknown}")
    return rows


def format_report(report: EvalReport) -> str:
    lines = [
        f"routing eval ({report.mode}): {len(report.outcomes)} queries, "
        f"leaf accuracy {report.accuracy:.1%}",
        "",
        f"{'node':12s} {'correct':>7s} {'total':>5s} {'accuracy':>8s}",
    ]
    for node, (right, total) in report.per_node().items():
        lines.append(f"{node:12s} {right:7d} {total:5d} {right / total:8.1%}")
    labels, matrix = report.confusion()
    short = [label[:5] for label in labels]
    lines += ["", "confusion (rows: expected, columns: routed to)"]
    lines.append(f"{'':12s} " + " ".join(f"{s:>5s}" for s in short))
    for e in labels:
        if sum(matrix[e].values()) == 0:
            continue
        cells = " ".join(f"{matrix[e][g] or '.':>5}" for g in labels)
        lines.append(f"{e:12s} {cells}")
    lat = report.latency_ms()
    lines += [
        "",
        "routing latency (ms): "
        + ", ".join(f"{k} {v:.1f}" for k, v in lat.items())
        + ("  [POST /v1/route]" if report.mode.startswith("gateway") else "  [forward pass]"),
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- gateway


def evaluate_gateway(graph: GraphConfig, rows: list[Example], url: str) -> EvalReport:
    import httpx
    from tqdm import tqdm

    del graph  # the gateway has its own copy; labels were checked against this one
    report = EvalReport(mode=f"gateway {url}")
    with httpx.Client(base_url=url, timeout=EVAL_TIMEOUT_S, trust_env=False) as client:
        for row in tqdm(rows, desc="routing via gateway", unit="q"):
            body = {"model": "auto", "messages": [{"role": "user", "content": row.query}]}
            t0 = time.perf_counter()
            resp = client.post("/v1/route", json=body)
            dt = time.perf_counter() - t0
            resp.raise_for_status()
            data = resp.json()
            route = [str(x) for x in data["octograph"]["route"]]
            report.outcomes.append(Outcome(row.query, row.node, str(data["node"]), route, dt))
    return report


# --------------------------------------------------------------------------- in-process


class InProcessRouter:
    """The router model run by transformers; decisions exactly as policy.Router makes them."""

    def __init__(self, graph: GraphConfig, model_dir: Path, threads: int = 1) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(max(1, threads))
        self.graph = graph
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model = model.eval()
        self.tokens = assign_tokens(graph)
        vocab = self.tokenizer.get_added_vocab()
        self.token_ids: dict[str, int] = {}
        for child, index in self.tokens.items():
            name = token_name(index)
            if name in vocab:
                self.token_ids[child] = int(vocab[name])

    def scores(self, query: str, router_id: str) -> dict[str, float]:
        """Raw next-token logprobs of the tokens of `router_id` and the routers below it."""
        import torch

        node = self.graph.nodes[router_id]
        assert isinstance(node, RouterNode)
        children = [
            c for r in scored_routers(self.graph, router_id) for c in self.graph.router_children(r)
        ]
        missing = [c for c in children if c not in self.token_ids]
        if missing:
            raise SystemExit(f"error: the router model has no functional token for {missing}")
        ids = router_prompt_ids(self.tokenizer, query, node.prompt_format)
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            lps = torch.log_softmax(logits, dim=-1)
        return {c: float(lps[self.token_ids[c]]) for c in children}

    def route(self, start: str, query: str) -> list[str]:
        route, node_id, scored = [start], start, {}
        while isinstance(node := self.graph.nodes.get(node_id), RouterNode):
            if not all(c in scored for c in node.children):
                scored = self.scores(query, node_id)
            node_id, _ = decide(node, {c: scored[c] for c in node.children})
            route.append(node_id)
        return route


def evaluate_in_process(
    graph: GraphConfig, rows: list[Example], model_dir: Path, threads: int = 1
) -> EvalReport:
    from tqdm import tqdm

    if graph.root is None:
        raise SystemExit("error: the graph has no root router")
    router = InProcessRouter(graph, model_dir, threads)
    report = EvalReport(mode=f"in-process {model_dir}")
    for row in tqdm(rows, desc="routing in-process", unit="q"):
        t0 = time.perf_counter()
        route = router.route(graph.root, row.query)
        dt = time.perf_counter() - t0
        report.outcomes.append(Outcome(row.query, row.node, route[-1], route, dt))
    return report
