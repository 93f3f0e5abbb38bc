"""Behaviour of course_lib.losses, chapter 3's reference: every loss agrees with the PyTorch
built-in it is named after (values and gradients), stays finite for logits of +-1e4, and the
maximum-likelihood helpers give the textbook answers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from course_lib import losses

F64 = torch.float64


def randn(*shape, seed=0, dtype=F64, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


def grad_of(fn, x):
    """The gradient of the scalar fn(x) with respect to x (x itself is left alone)."""
    leaf = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(leaf), leaf)
    return grad


# --- Huber --------------------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [0.1, 1.0, 3.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_huber_matches_torch_values_and_gradient(delta, reduction):
    pred, target = randn(4, 6, seed=1, scale=3), randn(4, 6, seed=2)
    ours = losses.huber_loss(pred, target, delta=delta, reduction=reduction)
    theirs = F.huber_loss(pred, target, delta=delta, reduction=reduction)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)
    if reduction != "none":
        torch.testing.assert_close(
            grad_of(lambda p: losses.huber_loss(p, target, delta, reduction), pred),
            grad_of(lambda p: F.huber_loss(p, target, delta=delta, reduction=reduction), pred),
            atol=1e-12, rtol=1e-12)


def test_huber_pieces_meet_at_delta_and_slope_is_clipped():
    r = torch.tensor([-5.0, -2.0, -1.0, 0.0, 1.0, 2.0, 5.0], dtype=F64)
    values = losses.huber_loss(r, torch.zeros_like(r), delta=2.0, reduction="none")
    torch.testing.assert_close(values, torch.tensor([8.0, 2.0, 0.5, 0.0, 0.5, 2.0, 8.0], dtype=F64))
    slope = grad_of(lambda p: losses.huber_loss(p, torch.zeros_like(p), 2.0, "sum"), r)
    torch.testing.assert_close(slope, r.clamp(-2.0, 2.0))


def test_huber_limits_are_mse_and_scaled_mae():
    pred, target = randn(50, seed=3, scale=2), randn(50, seed=4)
    torch.testing.assert_close(losses.huber_loss(pred, target, delta=1e6),
                               0.5 * F.mse_loss(pred, target))
    tiny = 1e-6
    torch.testing.assert_close(losses.huber_loss(pred, target, delta=tiny) / tiny,
                               F.l1_loss(pred, target), atol=1e-6, rtol=1e-6)


def test_huber_rejects_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        losses.huber_loss(torch.zeros(3, 1), torch.zeros(3))
    with pytest.raises(ValueError, match="delta"):
        losses.huber_loss(torch.zeros(3), torch.zeros(3), delta=0.0)
    with pytest.raises(ValueError, match="reduction"):
        losses.huber_loss(torch.zeros(3), torch.zeros(3), reduction="average")


# --- binary cross-entropy -------------------------------------------------------------------------


@pytest.mark.parametrize("pos_weight", [None, 2.5, "per-label"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_matches_torch_with_soft_labels(pos_weight, reduction):
    logits, targets = randn(5, 4, seed=5, scale=5), torch.rand(5, 4, dtype=F64)
    weight = torch.tensor([0.5, 1.0, 2.0, 7.0], dtype=F64) if pos_weight == "per-label" else pos_weight
    torch_weight = None if weight is None else torch.as_tensor(weight, dtype=F64)
    ours = losses.bce_with_logits(logits, targets, pos_weight=weight, reduction=reduction)
    theirs = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=torch_weight,
                                                reduction=reduction)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_bce_is_finite_and_accurate_for_huge_logits(dtype):
    logits = torch.tensor([1e4, -1e4, 1e4, -1e4, 88.0, -104.0, 0.0], dtype=dtype)
    targets = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0], dtype=dtype)
    per = losses.bce_with_logits(logits, targets, reduction="none")
    torch.testing.assert_close(per, torch.tensor([0.0, 0.0, 1e4, 1e4, 88.0, 104.0, math.log(2)],
                                                 dtype=dtype), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(
        grad_of(lambda z: losses.bce_with_logits(z, targets, reduction="sum"), logits),
        torch.sigmoid(logits) - targets, atol=1e-6, rtol=1e-6)


def test_bce_gradient_is_sigmoid_minus_target_even_at_zero():
    # clamp(-z, min=0) would give autograd a slope of -1 at z = 0 where -sigmoid(0) = -1/2 is right.
    logits = torch.tensor([0.0, 0.0, 1.5, -2.0], dtype=F64)
    targets = torch.tensor([1.0, 0.0, 0.3, 1.0], dtype=F64)
    torch.testing.assert_close(
        grad_of(lambda z: losses.bce_with_logits(z, targets, reduction="sum"), logits),
        torch.sigmoid(logits) - targets, atol=1e-15, rtol=0)


def test_softplus_of_negative_is_minus_log_sigmoid():
    z = torch.linspace(-50, 50, 101, dtype=F64)
    torch.testing.assert_close(losses.softplus_of_negative(z), -F.logsigmoid(z), atol=1e-14, rtol=1e-14)


# --- log-sum-exp and log-softmax ---------------------------------------------------------------


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_logsumexp_and_log_softmax_match_torch(dim):
    x = randn(3, 4, 5, seed=6, scale=4)
    torch.testing.assert_close(losses.logsumexp(x, dim=dim), torch.logsumexp(x, dim=dim))
    torch.testing.assert_close(losses.logsumexp(x, dim=dim, keepdim=True),
                               torch.logsumexp(x, dim=dim, keepdim=True))
    torch.testing.assert_close(losses.log_softmax(x, dim=dim), torch.log_softmax(x, dim=dim))
    upstream = randn(3, 4, 5, seed=7)
    leaf = x.clone().requires_grad_(True)
    (ours,) = torch.autograd.grad(losses.log_softmax(leaf, dim=dim), leaf, upstream)
    (theirs,) = torch.autograd.grad(torch.log_softmax(leaf, dim=dim), leaf, upstream)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_log_softmax_survives_huge_and_masked_logits(dtype):
    inf = float("inf")
    x = torch.tensor([[1e4, 0.0, -1e4], [-1e4, -1e4 + 3, -1e4], [2.0, -inf, 0.5]], dtype=dtype)
    out = losses.log_softmax(x)
    torch.testing.assert_close(out, torch.log_softmax(x, dim=-1), atol=1e-3, rtol=1e-6)
    assert torch.isfinite(out[:2]).all() and out[2, 1] == -inf and torch.isfinite(out[2, [0, 2]]).all()


def test_logsumexp_of_rows_of_minus_inf_and_inf():
    inf = float("inf")
    x = torch.tensor([[-inf, -inf], [inf, 0.0], [-inf, 2.0]])
    torch.testing.assert_close(losses.logsumexp(x), torch.logsumexp(x, dim=-1))


# --- cross-entropy -------------------------------------------------------------------------------


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.35, 1.0])
@pytest.mark.parametrize("ignore_index", [-100, 0, 3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch(smoothing, ignore_index, reduction):
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(40, 6, generator=gen, dtype=F64) * 3
    targets = torch.randint(0, 6, (40,), generator=gen)
    targets[torch.rand(40, generator=gen) < 0.3] = ignore_index
    targets[0] = 1  # at least one kept
    kwargs = dict(label_smoothing=smoothing, ignore_index=ignore_index, reduction=reduction)
    torch.testing.assert_close(losses.cross_entropy(logits, targets, **kwargs),
                               F.cross_entropy(logits, targets, **kwargs), atol=1e-12, rtol=1e-12)
    if reduction != "none":
        torch.testing.assert_close(grad_of(lambda z: losses.cross_entropy(z, targets, **kwargs), logits),
                                   grad_of(lambda z: F.cross_entropy(z, targets, **kwargs), logits),
                                   atol=1e-12, rtol=1e-12)


def test_cross_entropy_mean_divides_by_kept_targets_only():
    logits = randn(6, 3, seed=9)
    targets = torch.tensor([0, -100, 2, -100, -100, 1])
    kept = torch.tensor([0, 2, 5])
    torch.testing.assert_close(losses.cross_entropy(logits, targets),
                               F.cross_entropy(logits[kept], targets[kept]))
    per = losses.cross_entropy(logits, targets, reduction="none")
    assert (per[[1, 3, 4]] == 0).all()


def test_cross_entropy_with_class_last_sequences_like_a_language_model():
    logits = randn(2, 7, 11, seed=10, scale=2)  # (batch, time, vocabulary)
    targets = torch.randint(0, 11, (2, 7), generator=torch.Generator().manual_seed(10))
    targets[1, 4:] = -100  # padding
    expected = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), label_smoothing=0.1)
    torch.testing.assert_close(losses.cross_entropy(logits, targets, label_smoothing=0.1), expected)
    assert losses.cross_entropy(logits, targets, reduction="none").shape == (2, 7)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_cross_entropy_is_finite_for_logits_of_1e4(dtype):
    gen = torch.Generator().manual_seed(11)
    logits = ((torch.rand(16, 5, generator=gen, dtype=dtype) * 2 - 1) * 1e4)
    targets = torch.randint(0, 5, (16,), generator=gen)
    for smoothing in (0.0, 0.1):
        ours = losses.cross_entropy(logits, targets, label_smoothing=smoothing)
        assert torch.isfinite(ours)
        torch.testing.assert_close(ours, F.cross_entropy(logits, targets, label_smoothing=smoothing),
                                   atol=1e-2, rtol=1e-6)


def test_cross_entropy_when_every_target_is_ignored_is_nan_like_torch():
    logits, targets = randn(3, 4, seed=12), torch.full((3,), -100)
    assert torch.isnan(losses.cross_entropy(logits, targets))
    assert torch.isnan(F.cross_entropy(logits, targets))
    assert losses.cross_entropy(logits, targets, reduction="sum") == 0


def test_cross_entropy_rejects_bad_targets():
    with pytest.raises(ValueError, match="class indices"):
        losses.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="class indices"):
        losses.cross_entropy(torch.zeros(2, 3), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="shape"):
        losses.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]), label_smoothing=1.5)


def test_label_smoothing_is_cross_entropy_against_the_mixed_target():
    logits, eps, classes = randn(9, 5, seed=13, scale=2), 0.2, 5
    targets = torch.randint(0, classes, (9,), generator=torch.Generator().manual_seed(13))
    mixed = (1 - eps) * F.one_hot(targets, classes).to(F64) + eps / classes
    torch.testing.assert_close(losses.cross_entropy(logits, targets, label_smoothing=eps),
                               losses.soft_cross_entropy(logits, mixed))
    torch.testing.assert_close(losses.soft_cross_entropy(logits, mixed), F.cross_entropy(logits, mixed))


def test_label_smoothing_optimum_gap():
    # With logits (g, 0, ..., 0) the smoothed loss is lowest at g* = log(1 + C (1 - eps) / eps).
    eps, classes = 0.1, 10
    gaps = torch.linspace(0, 10, 10001, dtype=F64)
    logits = torch.zeros(len(gaps), classes, dtype=F64)
    logits[:, 0] = gaps
    per = losses.cross_entropy(logits, torch.zeros(len(gaps), dtype=torch.int64), label_smoothing=eps,
                               reduction="none")
    assert gaps[per.argmin()].item() == pytest.approx(math.log(1 + classes * (1 - eps) / eps), abs=1e-3)


# --- maximum likelihood ----------------------------------------------------------------------------


def test_entropy_in_nats_with_zero_probabilities():
    torch.testing.assert_close(losses.entropy(torch.tensor([0.5, 0.5, 0.0], dtype=F64)),
                               torch.tensor(math.log(2), dtype=F64))
    torch.testing.assert_close(losses.entropy(torch.full((2, 8), 1 / 8, dtype=F64)),
                               torch.full((2,), math.log(8), dtype=F64))
    assert losses.entropy(torch.tensor([1.0, 0.0])) == 0


def test_fit_categorical_counts_and_smoothing():
    samples = torch.tensor([[0, 2], [2, 0], [2, 2]])
    probs = losses.fit_categorical(samples, 4)
    assert probs.dtype == F64 and probs.shape == (4,)
    torch.testing.assert_close(probs, torch.tensor([2 / 6, 0.0, 4 / 6, 0.0], dtype=F64))
    torch.testing.assert_close(losses.fit_categorical(samples, 4, alpha=1.0),
                               torch.tensor([3 / 10, 1 / 10, 5 / 10, 1 / 10], dtype=F64))
    torch.testing.assert_close(losses.fit_categorical(torch.zeros(0, dtype=torch.int64), 4, alpha=2.0),
                               torch.full((4,), 0.25, dtype=F64))


def test_fit_categorical_is_the_maximum_likelihood_and_its_loss_is_the_entropy():
    gen = torch.Generator().manual_seed(14)
    samples = torch.multinomial(torch.tensor([0.5, 0.3, 0.15, 0.05]), 2000, replacement=True, generator=gen)
    probs = losses.fit_categorical(samples, 4)
    nll = -torch.log(probs[samples]).mean()
    torch.testing.assert_close(nll, losses.entropy(probs), atol=1e-12, rtol=1e-12)
    for _ in range(50):
        other = torch.softmax(torch.log(probs) + 0.1 * torch.randn(4, generator=gen, dtype=F64), dim=0)
        assert -torch.log(other[samples]).mean() > nll
    # ... and gradient descent on the cross-entropy of free logits finds the same distribution.
    theta = torch.zeros(4, dtype=F64, requires_grad=True)
    for _ in range(500):
        (grad,) = torch.autograd.grad(losses.cross_entropy(theta.expand(len(samples), -1), samples), theta)
        with torch.no_grad():
            theta -= 2.0 * grad
    torch.testing.assert_close(torch.softmax(theta.detach(), dim=0), probs, atol=1e-4, rtol=0)


def test_fit_categorical_rejects_bad_input():
    with pytest.raises(ValueError, match="class indices"):
        losses.fit_categorical(torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="alpha"):
        losses.fit_categorical(torch.tensor([0]), 3, alpha=-1.0)
    with pytest.raises(ValueError, match="undefined"):
        losses.fit_categorical(torch.zeros(0, dtype=torch.int64), 3)


# --- fitting a linear model -------------------------------------------------------------------------


def test_fit_linear_model_with_mse_is_least_squares():
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(200, 3, generator=gen, dtype=F64)
    y = x @ torch.tensor([1.5, -2.0, 0.5], dtype=F64) + 0.7 + 0.1 * torch.randn(200, generator=gen, dtype=F64)
    weight, bias = losses.fit_linear_model(x, y, F.mse_loss, steps=600, lr=0.1)
    solution = torch.linalg.lstsq(torch.cat([x, torch.ones(200, 1, dtype=F64)], dim=1), y[:, None]).solution
    torch.testing.assert_close(weight, solution[:3, 0], atol=2e-3, rtol=0)
    torch.testing.assert_close(bias, solution[3, 0], atol=2e-3, rtol=0)
    assert not weight.requires_grad and weight.dtype == F64


def test_fit_linear_model_with_mae_and_huber_resists_outliers():
    gen = torch.Generator().manual_seed(16)
    x = torch.randn(300, 1, generator=gen)
    y = 2.0 * x[:, 0] + 1.0 + 0.05 * torch.randn(300, generator=gen)
    y[:30] += 40.0  # 10% gross errors, all on one side
    slope_mse, bias_mse = losses.fit_linear_model(x, y, F.mse_loss, steps=600, lr=0.1)
    for loss_fn in (F.l1_loss, lambda p, t: losses.huber_loss(p, t, delta=0.5)):
        slope, bias = losses.fit_linear_model(x, y, loss_fn, steps=600, lr=0.1)
        assert slope.item() == pytest.approx(2.0, abs=0.1) and bias.item() == pytest.approx(1.0, abs=0.15)
    assert bias_mse.item() > 4.0  # the outliers drag the least-squares line up by about 4


def test_fit_linear_model_rejects_bad_shapes():
    with pytest.raises(ValueError):
        losses.fit_linear_model(torch.zeros(5), torch.zeros(5), F.mse_loss)
    with pytest.raises(ValueError):
        losses.fit_linear_model(torch.zeros(5, 2), torch.zeros(5, 1), F.mse_loss)
