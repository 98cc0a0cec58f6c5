"""Speculation (workers fetching the likeliest children of new paths ahead) changes when and
in which engine step a row is computed, and streaming sessions (a child path computed as its
parent's session's next chunk) how its KV was computed, never the scores: bits per byte of
`blend` and its members on held-out text, with the default pruning, equal with each on and off.

Each side runs `octograph ensemble eval` as a command that starts its own workers (as
`octograph up` configures ensemble members) and stops them: a worker keeps every row it
computed in its path LRU, and vLLM keeps the paths' KV blocks, so on shared workers the second
run would read the first one's rows and compare nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service.models import packaged
from tests.integration.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

CONFIG = REPO / "configs" / "local.yaml"
HELD_OUT = REPO / "configs" / "eval" / "heldout.txt"
# Long enough for dozens of new paths per member, most of them speculated before the text
# reaches them; short enough for two worker starts and two evaluations in about 3 minutes.
HELD_OUT_BYTES = 200
DEFAULT_PRUNE = 0.01  # the gateway's (service/gateway/runners/ensemble.py)
# Two children per query, whatever their share of the mass: many speculated rows, most of the
# tree's new paths among them (the gateway's `speculate` is off by default, and 0.8 of the mass
# when on: fewer rows, the same mechanism).
SPECULATE = 2
SPECULATE_MIN_P = 0.0
# Same rows, same sums; but a speculated row is computed in another engine batch than it would
# have been, and bf16 logits on CPU depend on the batch's shape: one full-suite run measured
# 8e-6 bits/byte between the two sides (smollm2), others 0. Anything structural (a row missing,
# taken from the wrong path, counted twice) moves bits/byte by 1e-3 or more.
TOL_BPB = 1e-4


def eval_fresh_workers(speculate: int, sessions: bool = True) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "service.cli", "ensemble", "eval", "--node", "blend",
        "--config", str(CONFIG), "--text", str(HELD_OUT), "--max-bytes", str(HELD_OUT_BYTES),
        "--prune", str(DEFAULT_PRUNE), "--speculate", str(speculate),
        "--speculate-min-p", str(SPECULATE_MIN_P), "--json",
    ]  # fmt: skip
    # Sessions off the way an operator turns them off: the workers' setting (the requests still
    # allow them), which `octograph up` passes to every worker it starts.
    env = os.environ | ({} if sessions else {"OCTOGRAPH_WORKER_PATH_SESSIONS": "0"})
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def test_speculation_leaves_bits_per_byte_on_held_out_text_unchanged(tmp_path: Path) -> None:
    for name in ("smollm2", "gemma3"):
        if not packaged.is_prepared(name):
            pytest.fail(f"packaged model {name} not prepared: run `octograph models prepare`")
    off = eval_fresh_workers(0)
    on = eval_fresh_workers(SPECULATE)
    assert on["bytes"] == off["bytes"] == HELD_OUT_BYTES
    for member in on["members"]:  # speculation ran, and the trees used its rows
        assert member["speculated"] > 0 and member["speculation_hits"] > 0, member
    assert all(m["speculated"] == 0 for m in off["members"])
    for a, b in zip(off["members"], on["members"], strict=True):
        assert a["model"] == b["model"]
        assert abs(a["bpb"] - b["bpb"]) <= TOL_BPB, (a, b)
    assert abs(on["ensemble_bpb"] - off["ensemble_bpb"]) <= TOL_BPB, (on, off)


def test_streaming_sessions_leave_bits_per_byte_on_held_out_text_unchanged() -> None:
    for name in ("smollm2", "gemma3"):
        if not packaged.is_prepared(name):
            pytest.fail(f"packaged model {name} not prepared: run `octograph models prepare`")
    off = eval_fresh_workers(0, sessions=False)
    on = eval_fresh_workers(0, sessions=True)
    assert on["bytes"] == off["bytes"] == HELD_OUT_BYTES
    for a, b in zip(off["members"], on["members"], strict=True):
        assert a["model"] == b["model"]
        assert a["extended"] == 0, a
        # Sessions ran. The eval asks for a whole layer of new paths per call (13 calls for
        # 200 bytes), and only a path whose parent was computed in an earlier call can extend
        # a session: ~13 rows a member, each used for several bytes; a wrong row moves
        # bits/byte far more than TOL_BPB. (Generation, one path per call: 60% of new paths.)
        assert b["extended"] > 0, b
        # Same paths fetched either way: a session changes how a row is computed, not which.
        assert a["fetched"] == b["fetched"], (a, b)
        assert abs(a["bpb"] - b["bpb"]) <= TOL_BPB, (a, b)
    assert abs(on["ensemble_bpb"] - off["ensemble_bpb"]) <= TOL_BPB, (on, off)
