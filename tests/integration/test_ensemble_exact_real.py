"""The served byte-level ensemble against an exact reference, on the real models.

Served: what `octograph ensemble eval` computes (service/training/ensemble_eval.py), i.e. the
gateway's covering trees (service/bytelevel/covering.py) over the real bf16 workers'
`POST /internal/byte-dist` (the shared `real_workers`, configured as `octograph up` configures
ensemble members), mixed by the `blend` node's rule (configs/local.yaml: mix, 0.5 / 0.5). It
runs in-process for the per-byte distributions, and as the command itself for bits/byte.

Reference: every tokenization of the text enumerated by brute force
(tests/unit/ensemble_fixtures.BruteForce: a depth-first walk over the token sequences whose
bytes spell the text, the canonical ones kept, covers summed directly; no covering tree, no
reduction, no worker), with next-token distributions from the model's own forward passes, run
here by `transformers` on CPU in float64 on the same converted model directories
(packaged.model_dir: the weights the workers load, bf16 upcast exactly). Shared with the served
side: the token byte table (byte spellings, stop ids) and the canonical tokenizer, which
tests/unit/test_ensemble_byte_tables.py checks against the tokenizers' own decoders.

Tolerances (what bf16 workers can honestly meet; measured on this text, 2026-12-06):
- The workers compute in bf16: 8 significant bits, so a logit near 20 is known to about
  +-0.06 (half an ulp of 0.125), and a next-token log-probability to a few hundredths of a
  nat. A byte's log-probability is a log-sum of such terms. Measured against the float64
  reference, worst byte: SmolLM2 0.151 nats, Gemma-3 0.049, blend 0.048; worst total
  variation of a 257-way row: 0.025 / 0.019 / 0.013; bits/byte over the text: -0.0030 /
  +0.0015 / +0.0003. (For scale: the same weights in bf16 under transformers on CPU, which
  also rounds the accumulations, are off by up to 1.27 nats a byte for SmolLM2.)
- TOL_BYTE_NATS = 0.25 a byte (two bf16 ulps of a logit near 20; the bound
  tests/integration/test_byte_dist_real.py already holds the captured rows to against vLLM's
  own top-20), TOL_TV = 0.05 per row, TOL_BPB = 0.015 bits/byte over the text (5x the worst
  measured; per-byte errors are of both signs and largely cancel). Anything structural (a
  cover missed or double counted, a wrong stop rule, a wrong canonical test, mixing weights)
  moves bytes by whole nats, or rows by tenths.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from service.bytelevel.byte_tables import TokenByteTable
from service.graph.schema import EnsembleNode, load_graph
from service.models import packaged
from service.training.ensemble_eval import WorkerOracle, score_members
from tests.integration.conftest import REPO, RealWorkers
from tests.unit.ensemble_fixtures import BruteForce

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

CONFIG = REPO / "configs" / "local.yaml"
# A few dozen bytes of plain prose, with one two-byte character (provisional paths inside it).
TEXT = "At the café, the boy paid 3 coins for the oranges.".encode()
LOG2 = math.log(2.0)
TOL_BYTE_NATS = 0.25
TOL_TV = 0.05
TOL_BPB = 0.015
# The claim about the default pruning (service/gateway/runners/ensemble.py, DEFAULT_PRUNE):
# "On held-out text (`octograph ensemble eval --prune`) 0.01 changes bits/byte by about 0.001".
DEFAULT_PRUNE = 0.01
PRUNE_CLAIM_BPB = 0.001
# "About": measured on the first 200 / 800 bytes of configs/eval/heldout.txt, pruned minus
# exact, SmolLM2 -0.0019 / -0.0016, Gemma-3 -0.0015 / -0.0012, blend -0.0017 / -0.0014 (in
# pruning's favour: the dropped mass goes to the kept continuations, which the text mostly
# takes). The change may be up to 3x the claim either way; a loss may not exceed the claim.
PRUNE_ABOUT_BPB = 3 * PRUNE_CLAIM_BPB
HELD_OUT = REPO / "configs" / "eval" / "heldout.txt"
HELD_OUT_BYTES = 200
F64 = NDArray[np.float64]


class TorchLM:
    """Next-token log-probabilities of a token path from the model's own forward pass
    (transformers, CPU, float64). One forward per path not yet seen; a causal LM's output at
    position i is the distribution after the first i + 1 tokens, so the distributions of every
    prefix of a forwarded path are kept too."""

    def __init__(self, model_dir: Path, vocab_size: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(2)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.float64, attn_implementation="eager"
        ).eval()
        self.vocab_size = vocab_size
        self.cache: dict[tuple[int, ...], F64] = {}
        self.forwards = 0

    def one(self, path: tuple[int, ...]) -> F64:
        hit = self.cache.get(path)
        if hit is not None:
            return hit
        torch = self.torch
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([list(path)])).logits[0]
        self.forwards += 1
        # The model's own normalisation (over its whole output), then the tokenizer's ids.
        lps = torch.log_softmax(logits.double(), dim=-1)[:, : self.vocab_size].numpy()
        for i in range(len(path)):
            self.cache.setdefault(path[: i + 1], lps[i])
        return self.cache[path]


def document_start(name: str, model_dir: Path) -> int:
    """The token a document starts after, read from the model's own files: Gemma-3's BOS;
    SmolLM2 has none, its documents follow <|endoftext|>."""
    config = json.loads((model_dir / "config.json").read_text())
    if name == "gemma3":
        return int(config["bos_token_id"])
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    return next(int(a["id"]) for a in tokenizer["added_tokens"] if a["content"] == "<|endoftext|>")


def reference_rows(name: str, text: bytes) -> F64:
    """(n, 257): the normalised next-byte log-probabilities before each byte of `text`."""
    model_dir = packaged.model_dir(name)
    table = TokenByteTable.from_tokenizer_file(model_dir / "tokenizer.json")
    lm = TorchLM(model_dir, table.vocab_size)
    brute = BruteForce(table, lm, root=(document_start(name, model_dir),))  # type: ignore[arg-type]
    rows = np.empty((len(text), 257))
    for i in range(len(text)):
        logits, _ = brute.logits(text[:i])
        rows[i] = logits - np.logaddexp.reduce(logits)
    print(f"reference {name}: {lm.forwards} float64 forwards")
    return rows


def mixed(rows: Sequence[F64], weights: Sequence[float]) -> F64:
    """log sum_m w_m p_m over normalised weights (written here, not service.bytelevel.mix)."""
    w = np.asarray(weights, dtype=np.float64)
    log_w = np.log(w / w.sum())
    return np.logaddexp.reduce(np.stack([lw + r for lw, r in zip(log_w, rows, strict=True)]), 0)


def byte_logprobs(rows: F64, text: bytes) -> F64:
    return np.array([rows[i, b] for i, b in enumerate(text)])


def bpb(rows: F64, text: bytes) -> float:
    return float(-byte_logprobs(rows, text).sum() / LOG2 / len(text))


@dataclass
class Blend:
    members: list[str]
    weights: list[float]
    reference: dict[str, F64]  # member -> rows, and "blend" -> the mixture's rows

    def served(self, real_workers: RealWorkers, prune: float) -> dict[str, F64]:
        """In-process, as `octograph ensemble eval` scores: each member's tree over its worker."""
        from service.gateway.runners.ensemble_assets import load_member_assets

        plan = []
        for name in self.members:
            assets = load_member_assets(name, packaged.model_dir(name), 2048)
            assert assets.prompts.start_id == document_start(name, packaged.model_dir(name))
            oracle = WorkerOracle(real_workers.url(name))
            plan.append((name, assets.table, oracle, [assets.prompts.start_id]))
        try:
            scores, _ = score_members(plan, TEXT, prune)
        finally:
            for _, _, oracle, _ in plan:
                oracle.close()
        rows = {s.model: s.logps for s in scores}
        rows["blend"] = mixed([rows[m] for m in self.members], self.weights)
        return rows


@pytest.fixture(scope="module")
def blend() -> Iterator[Blend]:
    node = load_graph(CONFIG).nodes["blend"]
    assert isinstance(node, EnsembleNode) and node.mode == "mix"
    members = [m.model for m in node.members]
    weights = [m.weight for m in node.members]
    reference = {name: reference_rows(name, TEXT) for name in members}
    reference["blend"] = mixed([reference[m] for m in members], weights)
    yield Blend(members, weights, reference)


def eval_command(
    real_workers: RealWorkers,
    blend: Blend,
    prune: float,
    tmp: Path,
    text: bytes = TEXT,
    max_bytes: int | None = None,
) -> Any:
    """`octograph ensemble eval --node blend --json` on the running workers: bits/byte of each
    member and of the node's rule."""
    text_file = tmp / "text.txt"
    text_file.write_bytes(text)
    urls = [a for m in blend.members for a in ("--url", f"{m}={real_workers.url(m)}")]
    cut = ["--max-bytes", str(max_bytes)] if max_bytes else []
    cmd = [
        sys.executable, "-m", "service.cli", "ensemble", "eval", "--node", "blend",
        "--config", str(CONFIG), "--text", str(text_file), "--prune", str(prune), "--json",
        *cut, *urls,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    bpbs = {m["model"]: float(m["bpb"]) for m in out["members"]}
    bpbs["blend"] = float(out["ensemble"]["mix (node)"])
    return bpbs


def test_served_ensemble_and_members_equal_brute_force(
    real_workers: RealWorkers, blend: Blend, tmp_path: Path
) -> None:
    """Pruning off: the served next-byte distributions of each member and of `blend` are the
    exact ones (the reference), within what bf16 allows (module docstring)."""
    served = blend.served(real_workers, prune=0.0)
    command = eval_command(real_workers, blend, 0.0, tmp_path)
    for name in [*blend.members, "blend"]:
        s, r = served[name], blend.reference[name]
        diff = np.abs(byte_logprobs(s, TEXT) - byte_logprobs(r, TEXT))
        tv = 0.5 * np.abs(np.exp(s) - np.exp(r)).sum(axis=1)
        figures = {
            "served_bpb": round(bpb(s, TEXT), 5),
            "reference_bpb": round(bpb(r, TEXT), 5),
            "command_bpb": round(command[name], 5),
            "worst_byte_nats": round(float(diff.max()), 4),
            "worst_byte": int(diff.argmax()),
            "worst_tv": round(float(tv.max()), 4),
        }
        print(name, json.dumps(figures))
        # Every row is a distribution over the 257 outcomes.
        assert np.allclose(np.exp(s).sum(axis=1), 1.0, atol=1e-9), name
        assert diff.max() <= TOL_BYTE_NATS, (name, figures)
        assert tv.max() <= TOL_TV, (name, figures)
        assert abs(bpb(s, TEXT) - bpb(r, TEXT)) <= TOL_BPB, (name, figures)
        # The command reports the same served figure (one computation, two entry points).
        assert abs(command[name] - bpb(s, TEXT)) <= 1e-3, (name, figures)


def test_default_pruning_on_held_out_text_changes_bits_per_byte_by_about_0_001(
    real_workers: RealWorkers, blend: Blend, tmp_path: Path
) -> None:
    """The claim where it was made: `octograph ensemble eval --prune 0.01` against `--prune 0`
    on held-out prose (the same workers, so bf16 noise is common to both): bits/byte moves by
    about 0.001 (PRUNE_ABOUT_BPB), never up by more than the claim, and every byte keeps a
    non-zero probability (a zero would be an infinite bits/byte)."""
    text = HELD_OUT.read_bytes()
    exact = eval_command(real_workers, blend, 0.0, tmp_path, text, HELD_OUT_BYTES)
    pruned = eval_command(real_workers, blend, DEFAULT_PRUNE, tmp_path, text, HELD_OUT_BYTES)
    for name in [*blend.members, "blend"]:
        change = pruned[name] - exact[name]
        print(f"held-out {HELD_OUT_BYTES} bytes, {name}: exact {exact[name]:.5f}, "
              f"pruned {pruned[name]:.5f}, change {change:+.5f} bits/byte")  # fmt: skip
        assert math.isfinite(pruned[name]), name
        assert change <= PRUNE_CLAIM_BPB, (name, change)
        assert abs(change) <= PRUNE_ABOUT_BPB, (name, change)


@pytest.mark.xfail(
    strict=True,
    reason="default pruning gives bytes zero probability: see issue 19's closing note "
    "(SmolLM2 on '...the oranges.': 's' -9.86 nats against -4.71 exact, '.' -inf)",
)
def test_default_pruning_never_gives_a_byte_of_the_text_zero_probability(
    real_workers: RealWorkers, blend: Blend, tmp_path: Path
) -> None:
    """The same claim on the short text, byte by byte: the pruned served distribution gives
    every byte of the text a non-zero probability, and bits/byte stays within the claim of
    exact (same workers) and of the reference (plus the bf16 tolerance).

    It does not hold today (strict xfail: it fails the run once it passes, to drop the mark):
    pruning drops the future of a cover below 1% of the prefix mass ("...the orange" under
    SmolLM2: the single token " oranges" loses to " orange"), so when the text takes it, the
    byte gets only the non-canonical covers' mass ('s': -9.86 nats against -4.71 exact) or
    none ('.': -inf) until the tree rebuilds after the byte. The row the ensemble samples from
    is the pruned one: SmolLM2 alone scores inf bits/byte on this text, `blend` +0.021."""
    exact = blend.served(real_workers, prune=0.0)
    pruned = blend.served(real_workers, prune=DEFAULT_PRUNE)
    command = eval_command(real_workers, blend, DEFAULT_PRUNE, tmp_path)
    failures = []
    for name in [*blend.members, "blend"]:
        lp = byte_logprobs(pruned[name], TEXT)
        figures = {
            "pruned_bpb": round(bpb(pruned[name], TEXT), 5),
            "exact_bpb": round(bpb(exact[name], TEXT), 5),
            "reference_bpb": round(bpb(blend.reference[name], TEXT), 5),
            "command_bpb": round(command[name], 5),
            "zero_probability_bytes": [i for i, v in enumerate(lp) if v == -math.inf],
        }
        print("prune", DEFAULT_PRUNE, name, json.dumps(figures))
        loss = bpb(pruned[name], TEXT) - bpb(exact[name], TEXT)
        off = abs(bpb(pruned[name], TEXT) - bpb(blend.reference[name], TEXT))
        if (
            not np.isfinite(lp).all()
            or abs(loss) > PRUNE_CLAIM_BPB
            or off > PRUNE_CLAIM_BPB + TOL_BPB
        ):
            failures.append((name, figures))
    assert not failures, failures
