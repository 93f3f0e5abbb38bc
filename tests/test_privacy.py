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
