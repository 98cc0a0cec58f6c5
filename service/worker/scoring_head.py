"""A router's output layer that computes only the rows of its functional tokens.

Why: a route is one forward of the router over the query's tokens, and its answer is the
functional tokens' scores, renormalised over a router node's children (gateway/routing.py
`decide`). vLLM computes the whole output layer for the last position anyway: SmolLM2's 49,152 x
576 rows, 21.7% of the router engine's time in a profile of /internal/score calls (py-spy, one
new token after a cached prefix), for ~13 rows that matter. A model whose worker only scores
(`WorkerSettings.scoring_only`, set by `octograph up` for a router model that answers nothing
and reformats nothing) gets its `compute_logits` replaced, in the engine process, by one that
multiplies the hidden state with those rows only and leaves every other entry at -inf.

What changes for callers: the log-probabilities are normalised over the functional tokens
instead of the whole vocabulary; after the per-node renormalisation the routing decision reads,
that is the same distribution (tests/integration/test_router_model.py compares a worker with
and without the head). Greedy generation on such a worker can only produce a functional token,
which is why only scoring-only roles get it.

Installed through `collective_rpc` after the engine starts (vllm_engine.VLLMEngine.start), in
the process that runs the model: no model class or architecture of our own for vLLM to load.
`install` returns how many rows the head computes, or 0 where it cannot apply (an output
layer split over tensor-parallel ranks, a logit soft cap, no tied or plain `lm_head`), and the
model then keeps its full output layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def install(token_ids: Sequence[int], worker: Any) -> int:
    """Replace the model's `compute_logits` with the scored rows' (runs in the model's process;
    `collective_rpc` passes vLLM's worker first)."""
    import torch

    model = getattr(getattr(worker, "model_runner", None), "model", None)
    head = getattr(model, "lm_head", None)
    processor = getattr(model, "logits_processor", None)
    weight = getattr(head, "weight", None)
    if model is None or weight is None or processor is None or not token_ids:
        return 0
    if getattr(processor, "soft_cap", None) is not None or getattr(head, "tp_size", 1) != 1:
        return 0
    vocab = int(getattr(processor, "org_vocab_size", 0) or model.config.vocab_size)
    if max(token_ids) >= min(vocab, weight.shape[0]):
        return 0
    ids = torch.tensor(sorted(set(token_ids)), dtype=torch.long, device=weight.device)
    rows = weight.detach().index_select(0, ids).contiguous()
    scale = float(getattr(processor, "scale", 1.0))

    def compute_logits(hidden_states: torch.Tensor) -> torch.Tensor:
        scores = hidden_states @ rows.t()
        if scale != 1.0:
            scores = scores * scale
        logits = hidden_states.new_full((hidden_states.shape[0], vocab), float("-inf"))
        logits[:, ids] = scores.to(logits.dtype)
        return logits

    model.compute_logits = compute_logits
    return int(ids.numel())
