"""service/worker/scoring_head.py on a stand-in model (the real router: tests/integration/
test_router_model.py): the narrowed output layer gives the scored tokens exactly the logits the
full layer gives them, -inf elsewhere, and stays out of the way where it cannot apply."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from service.worker import scoring_head

VOCAB, HIDDEN = 50, 8


class Processor:
    def __init__(self, scale: float = 1.0, soft_cap: float | None = None) -> None:
        self.scale, self.soft_cap, self.org_vocab_size = scale, soft_cap, VOCAB

    def __call__(self, head: torch.nn.Embedding, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden @ head.weight.t())[:, :VOCAB] * self.scale


class Model(torch.nn.Module):
    def __init__(self, processor: Processor) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lm_head = torch.nn.Embedding(VOCAB + 14, HIDDEN)  # padded rows, as vLLM pads
        self.logits_processor = processor
        self.config = SimpleNamespace(vocab_size=VOCAB)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden)


def _worker(model: Model) -> SimpleNamespace:
    return SimpleNamespace(model_runner=SimpleNamespace(model=model))


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_scored_rows_equal_the_full_layers_and_the_rest_is_minus_inf(scale: float) -> None:
    model = Model(Processor(scale))
    hidden = torch.randn(3, HIDDEN)
    with torch.no_grad():
        full = model.compute_logits(hidden)
        ids = [41, 7, 49, 7]
        assert scoring_head.install(ids, _worker(model)) == 3
        narrow = model.compute_logits(hidden)
    assert narrow.shape == full.shape == (3, VOCAB)
    scored = sorted(set(ids))
    torch.testing.assert_close(narrow[:, scored], full[:, scored])
    rest = [i for i in range(VOCAB) if i not in scored]
    assert torch.isneginf(narrow[:, rest]).all()
    # What routing reads: the softmax over a node's children is the same.
    children = [7, 41]
    torch.testing.assert_close(
        torch.softmax(narrow[:, children], -1), torch.softmax(full[:, children], -1)
    )


def test_it_leaves_models_it_cannot_narrow_alone() -> None:
    capped = Model(Processor(soft_cap=30.0))
    original = capped.compute_logits
    assert scoring_head.install([1, 2], _worker(capped)) == 0
    assert capped.compute_logits == original
    assert scoring_head.install([VOCAB + 3], _worker(Model(Processor()))) == 0  # a padding row
    assert scoring_head.install([], _worker(Model(Processor()))) == 0
    assert scoring_head.install([1], SimpleNamespace()) == 0  # no model runner
