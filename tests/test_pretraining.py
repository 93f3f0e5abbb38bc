"""Unit tests of course_lib.pretraining: objectives, accumulation and nucleus probabilities."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_lib import pretraining as pt
from course_lib.gpt import top_p_filter

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_next_token_loss_shifts_and_ignores():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 11, (3, 7), generator=g)
    ids[1, 4:] = -100
    total, count = 0.0, 0
    for b in range(3):
        for t in range(6):
            target = int(ids[b, t + 1])
            if target == -100:
                continue
            total -= torch.log_softmax(logits[b, t], -1)[target].item()
            count += 1
    assert pt.next_token_loss(logits, ids).item() == pytest.approx(total / count, rel=1e-12)


def test_next_token_loss_perfect_and_uniform():
    ids = torch.tensor([[1, 2, 3, 0]])
    uniform = torch.zeros(1, 4, 5)
    assert pt.next_token_loss(uniform, ids).item() == pytest.approx(math.log(5), rel=1e-6)
    sure = F.one_hot(torch.tensor([[2, 3, 0, 0]]), 5).float() * 100
    assert pt.next_token_loss(sure, ids).item() < 1e-6


def test_mlm_mask_rule_and_proportions():
    g = torch.Generator().manual_seed(1)
    vocab, mask_id, special = 1000, 3, [0, 1, 2, 3]
    ids = torch.randint(0, vocab, (400, 500), generator=g)
    inputs, labels = pt.mlm_mask(ids, 0.15, special, mask_id, vocab, torch.Generator().manual_seed(2))
    assert inputs.shape == ids.shape and labels.shape == ids.shape
    selected = labels != -100
    eligible = ~torch.isin(ids, torch.tensor(special))
    assert not (selected & ~eligible).any()
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(inputs[~selected], ids[~selected])
    assert abs(selected.float().sum() / eligible.sum() - 0.15) < 0.005
    n = selected.sum()
    masked = (inputs[selected] == mask_id).float().sum() / n
    kept = (inputs[selected] == ids[selected]).float().sum() / n
    assert abs(masked - 0.8) < 0.015 and abs(kept - 0.1) < 0.01
    replaced = inputs[selected & (inputs != mask_id) & (inputs != ids)]
    assert abs(replaced.double().mean() - (vocab - 1) / 2) < 15


def test_mlm_mask_is_reproducible():
    ids = torch.arange(200).reshape(4, 50) % 37
    a = pt.mlm_mask(ids, 0.3, [0], 36, 37, torch.Generator().manual_seed(5))
    b = pt.mlm_mask(ids, 0.3, [0], 36, 37, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _model_and_batches(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    return model, x, y


def _loss(model, x, y):
    return F.cross_entropy(model(x), y)


@pytest.mark.parametrize("opt,clip", [("sgd", 0.0), ("sgd", 0.05), ("adamw", 0.0)])
def test_accumulation_equals_one_big_batch(opt, clip):
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.5),
            "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1)}[opt]
    big, x, y = _model_and_batches(3)
    small, _, _ = _model_and_batches(3)
    opt_big, opt_small = make(big.parameters()), make(small.parameters())
    for _ in range(2):
        want = pt.train_step_with_accumulation(big, opt_big, _loss, [(x, y)], clip)
        micro = [(x[i:i + 4], y[i:i + 4]) for i in (0, 4, 8)]
        got = pt.train_step_with_accumulation(small, opt_small, _loss, micro,
                                              clip)
        assert got == pytest.approx(want, rel=1e-10)
    for a, b in zip(big.parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert b.grad is None


def test_nucleus_probs_matches_filter_and_sums_to_one():
    g = torch.Generator().manual_seed(4)
    logits = 3 * torch.randn(5, 40, generator=g)
    for p in (0.05, 0.5, 0.9, 1.0):
        probs = pt.nucleus_probs(logits, p, temperature=0.7)
        torch.testing.assert_close(probs.sum(-1), torch.ones(5))
        kept = torch.isfinite(top_p_filter(logits / 0.7, p))
        assert torch.equal(probs > 0, kept)
    # p tiny: only the most likely token is left, with probability 1
    one = pt.nucleus_probs(logits, 1e-6)
    torch.testing.assert_close(one, F.one_hot(logits.argmax(-1), 40).float())
    # hand case: probabilities 0.5, 0.3, 0.2; p = 0.6 keeps the first two (the second crosses 0.6)
    hand = torch.log(torch.tensor([0.2, 0.5, 0.3]))
    torch.testing.assert_close(pt.nucleus_probs(hand, 0.6), torch.tensor([0.0, 0.625, 0.375]))
    with pytest.raises(ValueError):
        pt.nucleus_probs(hand, 0.5, temperature=0)
