"""Bits per byte of an ensemble's members and of the ensemble on a text, in one run.

Each member scores the text as a document (its tree is rooted at the model's document-start
token: Gemma's BOS, SmolLM2's `<|endoftext|>`) through its worker's `/internal/byte-dist`:
the same trees, reductions and wire format the gateway uses.  At every byte the member's whole
257-way next-byte distribution is kept, so the ensemble is then scored under every combination
rule from the same numbers: the node's own rule and weights (what the gateway samples from),
plus the others for comparison.  The members run concurrently (one thread each); bytes/s is
the text's length over the wall time of that scoring.
"""

from __future__ import annotations

import concurrent.futures
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import numpy as np
from numpy.typing import NDArray

from service.bytelevel.byte_tables import TokenByteTable
from service.bytelevel.covering import CoveringTree
from service.bytelevel.mixing import AdaptiveMixer, mix, product
from service.bytelevel.reduction import Reduction, ReductionQuery
from service.bytelevel.wire import MAX_QUERIES_PER_CALL, from_wire, to_wire
from service.errors import error_from_status
from service.protocol.internal import ByteDistRequest, ByteDistResponse

F64 = NDArray[np.float64]
LOG2 = math.log(2.0)
# Bytes teacher-forced per oracle call: bounds one byte-dist request (about four queries and
# one new path per byte; each new path is a capture request in the worker's engine, so this
# also bounds how many run at once there).
CHUNK_BYTES = 16


class WorkerOracle:
    """A synchronous `ReductionOracle` over one worker's HTTP endpoint (for the CLI/bench)."""

    def __init__(
        self,
        url: str,
        timeout_s: float = 600.0,
        *,
        speculate: int = 0,
        speculate_min_p: float = 0.0,
        sessions: bool = True,
    ) -> None:
        self.url = url.rstrip("/")
        self.speculate = speculate  # background speculation (service/worker/byte_dist.py)
        self.speculate_min_p = speculate_min_p
        self.sessions = sessions  # streaming sessions (service/worker/path_sessions.py)
        self.http = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=5.0), trust_env=False)
        self.calls = 0
        self.queries = 0
        self.seconds = 0.0
        # The worker's account of the calls (ByteDistResponse).
        self.fetched = 0
        self.speculated = 0
        self.speculation_hits = 0
        self.extended = 0

    def reduce(self, queries: Sequence[ReductionQuery]) -> list[Reduction]:
        out: list[Reduction] = []
        t0 = time.perf_counter()
        for i in range(0, len(queries), MAX_QUERIES_PER_CALL):
            part = list(queries[i : i + MAX_QUERIES_PER_CALL])
            body = ByteDistRequest(
                request_id=f"eval-{self.calls}",
                queries=to_wire(part),
                speculate=self.speculate,
                speculate_min_p=self.speculate_min_p,
                sessions=self.sessions,
            )
            r = self.http.post(
                f"{self.url}/internal/byte-dist",
                content=body.model_dump_json().encode(),
                headers={"content-type": "application/json"},
            )
            if r.status_code != 200:
                raise error_from_status(r.status_code, r.text[:500])
            answer = ByteDistResponse.model_validate_json(r.content)
            out += [from_wire(x) for x in answer.results]
            self.fetched += answer.fetched
            self.speculated += answer.speculated
            self.speculation_hits += answer.speculation_hits
            self.extended += answer.extended
            self.calls += 1
            self.queries += len(part)
        self.seconds += time.perf_counter() - t0
        return out

    def close(self) -> None:
        self.http.close()


@dataclass
class MemberScore:
    model: str
    logps: F64  # (n, 257): the next-byte distribution before each byte
    seconds: float
    oracle_calls: int
    queries: int
    new_paths: int
    leaked_nats: float

    def nats(self, text: bytes) -> float:
        idx = np.frombuffer(text, dtype=np.uint8).astype(np.int64)
        return float(-self.logps[np.arange(len(text)), idx].sum())


def score_member(
    model: str,
    table: TokenByteTable,
    oracle: WorkerOracle,
    root: Sequence[int],
    text: bytes,
    chunk: int = CHUNK_BYTES,
    prune: float = 0.0,
) -> MemberScore:
    tree = CoveringTree(table, oracle, tuple(root), text_start=True, prune=prune)
    rows = np.empty((len(text), 257))
    t0 = time.perf_counter()
    for start in range(0, len(text), chunk):
        piece = text[start : start + chunk]
        tree.prefetch(piece)
        for j, byte in enumerate(piece):
            rows[start + j] = tree.next_byte_logprobs()
            tree.advance(byte)
    seconds = time.perf_counter() - t0
    s = tree.stats
    return MemberScore(model, rows, seconds, s.oracle_calls, s.queries, s.new_paths, s.leaked_nats)


def score_members(
    members: Sequence[tuple[str, TokenByteTable, WorkerOracle, Sequence[int]]],
    text: bytes,
    prune: float = 0.0,
) -> tuple[list[MemberScore], float]:
    """Score every member concurrently; returns the scores and the wall time."""
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(members)) as pool:
        futures = [
            pool.submit(score_member, m, table, oracle, root, text, CHUNK_BYTES, prune)
            for m, table, oracle, root in members
        ]
        scores = [f.result() for f in futures]
    return scores, time.perf_counter() - t0


def ensemble_nats(
    scores: Sequence[MemberScore],
    text: bytes,
    mode: str,
    weights: Sequence[float],
    alpha: float = 0.0,
) -> float:
    """Total -log p of `text` under the combination rule, from the members' distributions."""
    w = np.asarray(weights, dtype=np.float64)
    total = 0.0
    adaptive = AdaptiveMixer(len(scores), w, alpha) if mode == "adaptive" else None
    for i, byte in enumerate(text):
        mat = np.stack([s.logps[i] for s in scores])
        if adaptive is not None:
            total -= adaptive.update(mat, byte)
        elif mode == "product":
            total -= float(product(mat, w)[byte])
        else:
            total -= float(mix(mat, w)[byte])
    return total


def bits_per_byte(nats: float, n: int) -> float:
    return nats / LOG2 / max(n, 1)
