"""Behaviour of course_lib.interpret, chapter 15's reference: saliency, integrated gradients and
Grad-CAM against Captum (stated tolerances), IG's completeness, permutation importance against
scikit-learn's (means over many repeats) and its use of the generator, the ridge probe against
its normal equations, control labels per type, the residual stream and logit lens against the
model's own forward, activation patching's edge cases, and induction scores on a planted pattern."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, LayerGradCam, Saliency
from torch import nn

from course_lib import interpret
from course_lib.gpt import GPT, GPTConfig

F64 = torch.float64


def _cnn(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.Tanh(),
                         nn.Flatten(), nn.Linear(6 * 8 * 8, 5)).to(F64).eval()


def _images(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g, dtype=F64), torch.randint(0, 5, (n,), generator=g)


# --- attributions ---------------------------------------------------------------------------------


def test_saliency_matches_captum():
    model = _cnn()
    x, t = _images()
    want = Saliency(model).attribute(x.clone().requires_grad_(), target=t, abs=True)
    torch.testing.assert_close(interpret.saliency(model, x, t), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("steps", [2, 16, 50])
def test_integrated_gradients_matches_captum_midpoint(steps):
    model = _cnn()
    x, t = _images()
    baseline = torch.full_like(x, 0.25)
    want = IntegratedGradients(model).attribute(x.clone(), baselines=baseline, target=t, n_steps=steps,
                                                method="riemann_middle")
    got = interpret.integrated_gradients(model, x, t, baseline, steps)
    # Captum builds its alphas with float32 linspace: relative differences up to ~1e-7.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert got.dtype == F64 and got.shape == x.shape and not got.requires_grad


def test_integrated_gradients_completeness_and_midpoint_exactness():
    # A smooth network (tanh, no ReLU kinks): the midpoint rule's error falls like 1/steps^2.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(256, 5)).to(F64)
    x, t = _images()
    with torch.no_grad():
        gap = (model(x) - model(torch.zeros_like(x))).gather(1, t.view(-1, 1)).squeeze(1)
    sums = [interpret.integrated_gradients(model, x, t, steps=s).flatten(1).sum(1) for s in (10, 100)]
    errors = [(total - gap).abs().max().item() for total in sums]
    assert errors[1] < 1e-6 + 1e-4 * gap.abs().max().item()
    assert errors[1] < errors[0] / 50  # 10 times the steps: about 100 times smaller
    # A quadratic f(x) = sum x^2 (as a 1-class "logit"): the midpoint rule is exact for linear
    # gradients, so IG = x^2 elementwise with any number of steps.
    quad = nn.Sequential(nn.Flatten(), _Square())
    y = torch.randn(3, 1, 2, 2, dtype=F64)
    got = interpret.integrated_gradients(quad, y, torch.zeros(3, dtype=torch.long), steps=3)
    torch.testing.assert_close(got, y ** 2, rtol=1e-12, atol=1e-12)


class _Square(nn.Module):
    def forward(self, x):
        return (x ** 2).sum(1, keepdim=True)


def test_grad_cam_matches_captum():
    model = _cnn()
    x, t = _images()
    layer = model[3]
    want = LayerGradCam(model, layer).attribute(x.clone(), target=t, relu_attributions=True)
    got = interpret.grad_cam(model, layer, x, t)
    assert got.shape == (6, 8, 8)
    torch.testing.assert_close(got, want[:, 0], rtol=1e-10, atol=1e-12)
    assert len(layer._forward_hooks) == 0


# --- permutation importance --------------------------------------------------------------------------


def _tabular(seed=0, n=400):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=g, dtype=F64)
    y = (2 * X[:, 0] + 0.5 * X[:, 1] > 0).long()  # column 0 matters most, 1 a bit, 2 and 3 not at all
    return X, y


def _score(X, y):
    return ((2 * X[:, 0] + 0.5 * X[:, 1] > 0).long() == y).double().mean().item()


def test_permutation_importance_draws_as_documented():
    X, y = _tabular()
    X_in = X.clone()
    out = interpret.permutation_importance(_score, X, y, 3, torch.Generator().manual_seed(4))
    assert out.shape == (4, 3) and out.dtype == F64 and torch.equal(X, X_in)
    g = torch.Generator().manual_seed(4)
    for j in range(4):
        for r in range(3):
            Xp = X.clone()
            Xp[:, j] = X[torch.randperm(len(X), generator=g), j]
            assert out[j, r].item() == pytest.approx(1.0 - _score(Xp, y), abs=1e-15)
    assert (out[2:] == 0).all() and (out[0] > out[1]).all()


def test_permutation_importance_agrees_with_sklearn_on_average():
    from sklearn.base import BaseEstimator
    from sklearn.inspection import permutation_importance as sk_permutation_importance

    X, y = _tabular()

    class Rule(BaseEstimator):  # an estimator sklearn can call (not a classifier: no classes_ needed)
        def fit(self, *_):
            return self

        def predict(self, A):
            return (2 * A[:, 0] + 0.5 * A[:, 1] > 0).astype(np.int64)

    repeats = 200
    ours = interpret.permutation_importance(_score, X, y, repeats, torch.Generator().manual_seed(0))
    theirs = sk_permutation_importance(Rule(), X.numpy(), y.numpy(), scoring="accuracy",
                                       n_repeats=repeats, random_state=0).importances
    # Different shuffles: compare the means within 4 standard errors of their difference.
    se = np.sqrt(ours.var(1).numpy() / repeats + theirs.var(1) / repeats) + 1e-12
    assert (np.abs(ours.mean(1).numpy() - theirs.mean(1)) <= 4 * se).all()
    assert (theirs[2:] == 0).all()


# --- probes ---------------------------------------------------------------------------------------


def test_probe_scores_solve_the_normal_equations():
    g = torch.Generator().manual_seed(0)
    h, y = torch.randn(50, 6, generator=g), torch.randint(0, 3, (50,), generator=g)
    h_test = torch.randn(7, 6, generator=g)
    lam = 0.7
    scores = interpret.probe_scores(h, y, h_test, 3, lam)
    assert scores.shape == (7, 3) and scores.dtype == F64
    a = torch.cat([h.double(), torch.ones(50, 1, dtype=F64)], 1)
    w = torch.linalg.lstsq(torch.cat([a, torch.cat([lam ** 0.5 * torch.eye(6, dtype=F64),
                                                    torch.zeros(6, 1, dtype=F64)], 1)]),
                           torch.cat([F.one_hot(y, 3).double(), torch.zeros(6, 3, dtype=F64)])).solution
    torch.testing.assert_close(scores, torch.cat([h_test.double(), torch.ones(7, 1, dtype=F64)], 1) @ w,
                               rtol=1e-9, atol=1e-10)


def test_probe_separates_separable_classes():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 2, (200,), generator=g)
    h = torch.randn(200, 5, generator=g) + 4 * y[:, None].float()
    assert (interpret.probe_scores(h[:150], y[:150], h[150:], 2, 1e-3).argmax(1) == y[150:]).all()


def test_control_labels_one_label_per_type_from_the_label_distribution():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 2000, (20000,), generator=g)
    labels = (torch.rand(20000, generator=g) < 0.25).long()
    table = interpret.control_labels(tokens, labels, 2, torch.Generator().manual_seed(1))
    assert set(table) == set(tokens.tolist())
    share = sum(table.values()) / len(table)
    assert abs(share - labels.double().mean().item()) < 0.04
    again = interpret.control_labels(tokens, labels, 2, torch.Generator().manual_seed(1))
    assert again == table
    test_tokens = torch.tensor([tokens[0].item(), 5000, 5001, tokens[0].item()])
    out = interpret.apply_control(test_tokens, table, 2, torch.Generator().manual_seed(2))
    assert out[0] == out[3] == table[tokens[0].item()] and out.dtype == torch.long


def test_speaker_labels():
    text = "Romeo.\nO, she is fair.\n\nFirst Citizen.\nWe are accounted poor citizens, Romeo.\n"
    assert interpret.speaker_spans(text) == [(0, 6), (24, 38)]

    class Chars:  # one token per character
        def encode(self, s):
            return list(s.encode())

        def token_bytes(self, t):
            return bytes([t])

    ids, labels = interpret.speaker_token_labels(Chars(), text)
    assert len(ids) == len(labels) == len(text)
    assert labels[:6] == [1] * 6 and labels[6] == 0 and sum(labels) == 6 + 14


# --- the GPT ----------------------------------------------------------------------------------------


def _gpt(seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=3, n_head=2, n_embd=16)).to(F64).eval()


def test_residual_stream_and_logit_lens_match_the_forward():
    model = _gpt()
    ids = torch.randint(0, 50, (2, 10))
    states = interpret.residual_stream(model, ids)
    assert states.shape == (4, 2, 10, 16)
    torch.testing.assert_close(states[0], model.wte(ids) + model.wpe(torch.arange(10)))
    torch.testing.assert_close(interpret.logit_lens(model, states)[-1], model(ids)[0], rtol=1e-12, atol=1e-12)
    assert all(len(b._forward_hooks) == 0 and len(b._forward_pre_hooks) == 0 for b in model.blocks)


def test_patch_run_edge_cases():
    model = _gpt()
    g = torch.Generator().manual_seed(0)
    clean, corrupt = torch.randint(0, 50, (2, 8), generator=g), torch.randint(0, 50, (2, 8), generator=g)
    corrupt[:, :3] = clean[:, :3]
    base = model(corrupt)[0]
    out = interpret.patch_run(model, clean, corrupt, 1, 5)
    torch.testing.assert_close(out[:, :5], base[:, :5])           # earlier positions cannot see it
    assert not torch.allclose(out[:, 5:], base[:, 5:])
    torch.testing.assert_close(interpret.patch_run(model, clean, corrupt, 1, 1), base)  # same token there
    torch.testing.assert_close(model(corrupt)[0], base)          # hooks gone
    # The last block at the last position: the clean run's last logits exactly.
    last = interpret.patch_run(model, clean, corrupt, 2, 7)[:, -1]
    torch.testing.assert_close(last, model(clean)[0][:, -1])
    grid = interpret.patching_effects(model, clean, corrupt, lambda lg: lg[0, -1, 3].item())
    assert grid.shape == (3, 8)
    assert grid[2, 7].item() == pytest.approx(1.0)
    assert grid[:, :3].abs().max().item() < 1e-9


def test_induction_scores_find_a_planted_pattern():
    period, start = 5, 2
    T = start + 2 * period
    weights = torch.zeros(2, 1, 3, T, T)
    weights[..., torch.arange(T), torch.arange(T)] = 1.0                     # attend to self
    q = torch.arange(start + period, T)
    weights[1, :, 2] = 0.0
    weights[1, :, 2, q, q - period + 1] = 1.0                                 # layer 1, head 2: induction
    scores = interpret.induction_scores(weights, period, start)
    assert scores.shape == (2, 3) and scores[1, 2] == 1.0 and scores.sum() == 1.0
    ids = interpret.repeated_random_tokens(4, period, 50, torch.Generator().manual_seed(0), prefix=[7, 8])
    assert ids.shape == (4, T) and (ids[:, :2] == torch.tensor([7, 8])).all()
    assert torch.equal(ids[:, 2:7], ids[:, 7:])
    assert interpret.previous_token_scores(weights)[0, 0] == 0.0
