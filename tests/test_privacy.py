"""course_lib.privacy: membership inference, exposure, DP-SGD against Opacus, the accountant."""

import math

import pytest
import torch
from torch import nn

from course_lib import privacy as P


def _mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def test_membership_auc_counts_ties_half_and_matches_the_roc_area():
    assert P.membership_auc(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4])) == 1.0
    assert P.membership_auc(torch.tensor([0.5, 0.6]), torch.tensor([0.3, 0.4])) == 0.0
    assert P.membership_auc(torch.tensor([0.3]), torch.tensor([0.3])) == 0.5
    g = torch.Generator().manual_seed(0)
    m, n = torch.randint(0, 5, (40,), generator=g).double(), torch.randint(1, 6, (30,), generator=g).double()
    fpr, tpr = P.roc_curve(m, n)
    area = float(torch.trapezoid(tpr, fpr))  # trapezoids count a tie as half: the same number
    assert math.isclose(P.membership_auc(m, n), area, rel_tol=1e-12)
    assert fpr[-1] == 1 and tpr[-1] == 1 and fpr[0] == 0
    assert 0 <= P.tpr_at_fpr(m, n, 0.1) <= 1
    low, high = P.auc_interval(m, n, n_boot=200)
    assert low <= P.membership_auc(m, n) <= high


def test_exposure_ranks_ties_above_the_canary():
    c = torch.tensor([1.0, 2.0, 3.0])
    assert P.exposure(0.5, c) == 2.0  # rank 1 of 4
    assert P.exposure(2.0, c) == 2 - math.log2(3)  # 1 and the tie 2 rank above: rank 3 of 4
    assert P.exposure(9.0, c) == 0.0


def test_per_example_grads_equal_one_backward_per_example():
    model = _mlp()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    grads = P.per_example_grads(model, x, y)
    for i in range(6):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for got, p in zip(grads, model.parameters(), strict=True):
            torch.testing.assert_close(got[i], p.grad)


def test_clip_and_noise_clips_by_the_global_norm_and_draws_noise_in_order():
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(4, 3, 2, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g,
                                                                                 dtype=torch.float64)]
    grads[0][1] *= 0.0
    grads[1][1] *= 0.0  # a zero gradient stays zero
    norms = torch.sqrt(grads[0].reshape(4, -1).pow(2).sum(1) + grads[1].pow(2).sum(1))
    out = P.clip_and_noise(grads, 1.0, 0.0)
    scale = torch.clamp(1.0 / norms, max=1.0).nan_to_num(1.0)
    torch.testing.assert_close(out[1], (grads[1] * scale[:, None]).sum(0))
    noisy = P.clip_and_noise(grads, 1.0, 0.7, torch.Generator().manual_seed(5))
    ng = torch.Generator().manual_seed(5)
    z0 = torch.randn(3, 2, generator=ng, dtype=torch.float64)
    z1 = torch.randn(5, generator=ng, dtype=torch.float64)
    torch.testing.assert_close(noisy[0], out[0] + 0.7 * z0)
    torch.testing.assert_close(noisy[1], out[1] + 0.7 * z1)


@pytest.mark.parametrize("noise", [0.0, 1.3])
def test_dp_sgd_step_matches_opacus(noise):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
    ours, theirs = _mlp(dtype=torch.float32), _mlp(dtype=torch.float32)
    P.dp_sgd_step(ours, x, y, lr=0.5, max_norm=0.3, noise_multiplier=noise, expected_batch_size=8,
                  generator=torch.Generator().manual_seed(9))
    P.opacus_step(theirs, x, y, lr=0.5, max_norm=0.3, noise_multiplier=noise, expected_batch_size=8,
                  generator=torch.Generator().manual_seed(9))
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_training_and_the_accountant():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g)
    model = _mlp(dtype=torch.float32)
    run = P.train_dp_sgd(model, x, y, epochs=2, batch_size=16, lr=0.1, max_norm=1.0, noise_multiplier=1.0)
    assert run == {"steps": 8, "sample_rate": 0.25}
    assert P.epsilon_spent(0.0, 0.25, 8, 1e-5) == math.inf
    small, large = P.epsilon_spent(4.0, 0.25, 8, 1e-5), P.epsilon_spent(1.0, 0.25, 8, 1e-5)
    assert 0 < small < large
    assert len(P.poisson_batches(10, 0.5, 3, torch.Generator().manual_seed(0))) == 3


def test_wilson_interval():
    low, high = P.wilson_interval(0, 20)
    assert low == 0 and 0.1 < high < 0.2
    low, high = P.wilson_interval(10, 20)
    assert math.isclose(low + high, 1.0)
    with pytest.raises(ValueError):
        P.wilson_interval(0, 0)


def test_logit_confidence_is_the_log_odds_of_the_true_class_and_stays_finite():
    model = _mlp(3)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (9,), generator=g)
    p = torch.softmax(model(x), 1).gather(1, y[:, None]).squeeze(1).detach()
    torch.testing.assert_close(P.logit_confidence(model, x, y), torch.log(p) - torch.log1p(-p))
    saturated = nn.Linear(1, 3, bias=False)
    with torch.no_grad():
        saturated.weight.copy_(torch.tensor([[200.0], [0.0], [0.0]]))
    out = P.logit_confidence(saturated, torch.ones(1, 1), torch.tensor([0]))
    assert torch.isfinite(out).all() and math.isclose(float(out), 200 - math.log(2), rel_tol=1e-6)


def test_shadow_assignment_puts_every_candidate_in_half_the_shadows():
    inside = P.shadow_assignment(50, 8, torch.Generator().manual_seed(0))
    assert inside.shape == (8, 50) and inside.dtype == torch.bool
    assert (inside.sum(0) == 4).all()
    assert len({tuple(col.tolist()) for col in inside.T}) > 10  # random, not one pattern for all
    with pytest.raises(ValueError, match="even"):
        P.shadow_assignment(10, 3, torch.Generator())


def test_lira_scores_are_the_gaussian_likelihood_ratio_and_beat_an_uncalibrated_threshold():
    g = torch.Generator().manual_seed(5)
    n, k = 400, 16
    difficulty = torch.randn(n, generator=g, dtype=torch.float64) * 3  # per-example: hides membership
    inside = P.shadow_assignment(n, k, g)
    shadows = difficulty + inside.double() * 1.0 + torch.randn(k, n, generator=g, dtype=torch.float64) * 0.5
    member = torch.arange(n) < n // 2
    target = difficulty + member.double() + torch.randn(n, generator=g, dtype=torch.float64) * 0.5
    scores = P.lira_scores(target, shadows, inside)
    # by hand for one candidate, with torch.distributions
    mu_in = shadows[:, 7][inside[:, 7]].mean()
    mu_out = shadows[:, 7][~inside[:, 7]].mean()
    var_in = ((shadows - torch.where(inside, shadows, 0).sum(0) / inside.sum(0)) ** 2)[inside].sum() / (
        inside.sum() - n)
    var_out = ((shadows - torch.where(~inside, shadows, 0).sum(0) / (~inside).sum(0)) ** 2)[~inside].sum() / (
        (~inside).sum() - n)
    want = (torch.distributions.Normal(mu_in, var_in.sqrt()).log_prob(target[7])
            - torch.distributions.Normal(mu_out, var_out.sqrt()).log_prob(target[7]))
    torch.testing.assert_close(scores[7], want)
    # "member when the statistic is high" alone is swamped by the difficulty; the ratio is not
    plain = P.membership_auc(-target[member], -target[~member])
    lira = P.membership_auc(-scores[member], -scores[~member])
    assert plain < 0.65 < 0.8 < lira


def test_dp_tpr_bound_is_the_hypothesis_testing_region():
    fpr = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(P.dp_tpr_bound(fpr, 0.0, 0.0), fpr)  # ε = 0: no better than guessing
    assert (P.dp_tpr_bound(fpr, math.inf, 1e-5) == 1).all()
    at = torch.tensor([0.1, 0.5], dtype=torch.float64)
    torch.testing.assert_close(P.dp_tpr_bound(at, 1.0, 0.0), torch.tensor([math.e * 0.1, 1 - 0.5 / math.e],
                                                                          dtype=torch.float64))
    bound = P.dp_tpr_bound(fpr, 2.0, 1e-5)
    assert (bound.diff() >= 0).all() and (bound >= fpr).all() and bound[-1] == 1


def test_lira_scores_refuse_too_few_shadows_to_measure_a_spread():
    inside = P.shadow_assignment(5, 2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="4 or more shadows"):
        P.lira_scores(torch.zeros(5), torch.zeros(2, 5), inside)
