"""Behaviour of course_lib.regularization, chapter 5's reference: dropout keeps the expected value,
the norms match PyTorch's layers step by step, the initializations have the variances they
promise and keep a deep signal alive, early stopping follows its patience/min_delta rules, and the
regularizers change training the way the chapter says they do."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_lib import regularization as reg
from course_lib.data import load_digits

F64 = torch.float64


# --- dropout ---------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.3, 0.7])
def test_dropout_keeps_the_expected_value_and_drops_at_rate_p(p):
    x = torch.full((1000, 1000), 2.0)
    out = reg.dropout(x, p, training=True, generator=torch.Generator().manual_seed(1))
    dropped = (out == 0).float().mean().item()
    # 1e6 Bernoulli draws: the standard error of the rate is at most 5e-4; allow 6 of them.
    assert dropped == pytest.approx(p, abs=3e-3)
    # Survivors are scaled by exactly 1 / (1 - p), so the mean stays 2 (standard error < 2e-3).
    survivors = out[out != 0]
    torch.testing.assert_close(survivors, torch.full_like(survivors, 2.0 / (1 - p)))
    assert out.mean().item() == pytest.approx(2.0, abs=0.015)


def test_dropout_eval_mode_and_edge_rates_and_gradient():
    x = torch.randn(50, 20, dtype=F64, requires_grad=True)
    assert torch.equal(reg.dropout(x, 0.5, training=False), x)
    assert torch.equal(reg.dropout(x, 0.0, training=True), x)
    assert torch.equal(reg.dropout(x, 1.0, training=True), torch.zeros_like(x))
    out = reg.dropout(x, 0.25, training=True, generator=torch.Generator().manual_seed(0))
    assert out.dtype == F64
    out.sum().backward()
    # The gradient is the mask divided by (1 - p): 0 where dropped, 4/3 where kept.
    expected = (out.detach() != 0).to(F64) / 0.75
    torch.testing.assert_close(x.grad, expected)
    with pytest.raises(ValueError):
        reg.dropout(x, 1.5)


def test_dropout_is_reproducible_with_a_seeded_generator():
    x = torch.randn(30, 40)
    a = reg.dropout(x, 0.4, generator=torch.Generator().manual_seed(7))
    b = reg.dropout(x, 0.4, generator=torch.Generator().manual_seed(7))
    c = reg.dropout(x, 0.4, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --- batch norm ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,layer", [((16, 5), nn.BatchNorm1d), ((8, 5, 7), nn.BatchNorm1d),
                                         ((4, 5, 3, 3), nn.BatchNorm2d)])
def test_batch_norm_matches_torch_in_training_and_eval_over_several_steps(shape, layer):
    g = torch.Generator().manual_seed(2)
    torch_bn = layer(5, momentum=0.3, eps=1e-3).to(F64)
    with torch.no_grad():
        torch_bn.weight.copy_(torch.randn(5, generator=g, dtype=F64))
        torch_bn.bias.copy_(torch.randn(5, generator=g, dtype=F64))
    gamma, beta = torch_bn.weight.detach().clone(), torch_bn.bias.detach().clone()
    mean, var = torch.zeros(5, dtype=F64), torch.ones(5, dtype=F64)
    for step in range(4):
        x = torch.randn(*shape, generator=g, dtype=F64) * (step + 1) + 3
        before = (mean.clone(), var.clone(), x.clone())
        out, mean_new, var_new = reg.batch_norm(x, gamma, beta, mean, var, True, momentum=0.3, eps=1e-3)
        torch.testing.assert_close(out, torch_bn(x), atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(mean_new, torch_bn.running_mean, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(var_new, torch_bn.running_var, atol=1e-12, rtol=1e-10)
        # Nothing it was given changed.
        for got, was in zip((mean, var, x), before, strict=True):
            assert torch.equal(got, was)
        mean, var = mean_new, var_new
    torch_bn.eval()
    x = torch.randn(*shape, generator=g, dtype=F64)
    out, mean_eval, var_eval = reg.batch_norm(x, gamma, beta, mean, var, False, momentum=0.3, eps=1e-3)
    torch.testing.assert_close(out, torch_bn(x), atol=1e-12, rtol=1e-10)
    assert torch.equal(mean_eval, mean) and torch.equal(var_eval, var)


def test_batch_norm_rejects_a_single_value_per_channel_in_training():
    with pytest.raises(ValueError):
        reg.batch_norm(torch.randn(1, 3), torch.ones(3), torch.zeros(3), torch.zeros(3),
                       torch.ones(3), True)


def test_batch_norm_module_matches_nn_batchnorm1d_and_passes_gradients():
    torch.manual_seed(0)
    ours, theirs = reg.BatchNorm(6, momentum=0.2), nn.BatchNorm1d(6, momentum=0.2)
    x = torch.randn(32, 6) * 4 - 1
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out1, out2 = ours(x1), theirs(x2)
    torch.testing.assert_close(out1, out2, atol=1e-5, rtol=1e-5)
    (out1 ** 3).sum().backward()
    (out2 ** 3).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


# --- layer norm and RMS norm -----------------------------------------------------------------


@pytest.mark.parametrize("shape,normalized", [((4, 10), 10), ((3, 5, 6), (5, 6)), ((2, 3, 8), [8])])
def test_layer_norm_matches_f_layer_norm(shape, normalized):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=g, dtype=F64) * 3 + 1
    dims = (normalized,) if isinstance(normalized, int) else tuple(normalized)
    w, b = torch.randn(dims, generator=g, dtype=F64), torch.randn(dims, generator=g, dtype=F64)
    torch.testing.assert_close(reg.layer_norm(x, normalized, w, b, eps=1e-4),
                               F.layer_norm(x, list(dims), w, b, eps=1e-4), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(reg.layer_norm(x, normalized), F.layer_norm(x, list(dims)),
                               atol=1e-12, rtol=1e-10)


def test_layer_norm_is_stable_when_the_mean_dwarfs_the_spread():
    # float32 values around 1e4 with spread 1: E[x^2] - E[x]^2 would lose every digit.
    x = 1e4 + torch.randn(6, 256, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(reg.layer_norm(x, 256), F.layer_norm(x, [256]), atol=2e-3, rtol=0)


def test_layer_norm_rejects_a_shape_that_is_not_the_trailing_one():
    with pytest.raises(ValueError):
        reg.layer_norm(torch.randn(4, 5), 4)


def test_rms_norm_and_module_match_torch():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 16, generator=g, dtype=F64) * 2 + 0.5
    w = torch.randn(16, generator=g, dtype=F64)
    torch.testing.assert_close(reg.rms_norm(x, 16, w, eps=1e-6), F.rms_norm(x, [16], w, eps=1e-6),
                               atol=1e-12, rtol=1e-10)
    ours, theirs = reg.RMSNorm(16, eps=1e-5).to(F64), nn.RMSNorm(16, eps=1e-5).to(F64)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-12, rtol=1e-10)
    # Unlike layer norm, the mean is not removed: a constant row keeps its sign and becomes +-1.
    torch.testing.assert_close(reg.rms_norm(torch.full((1, 4), -3.0), 4, eps=0.0),
                               torch.full((1, 4), -1.0))


# --- initialization --------------------------------------------------------------------------


@pytest.mark.parametrize("scheme,distribution", [("xavier", "normal"), ("xavier", "uniform"),
                                                 ("he", "normal"), ("he", "uniform")])
def test_init_weight_has_the_promised_statistics(scheme, distribution):
    fan_in, fan_out = 600, 400
    w = reg.init_weight(fan_in, fan_out, scheme, distribution, generator=torch.Generator().manual_seed(0))
    assert w.shape == (fan_out, fan_in) and w.dtype == torch.float32
    std = math.sqrt(2 / (fan_in + fan_out)) if scheme == "xavier" else math.sqrt(2 / fan_in)
    # 240,000 draws: the sample std is within 0.5% with overwhelming probability; allow 2%.
    assert w.std().item() == pytest.approx(std, rel=0.02)
    assert abs(w.mean().item()) < 0.01 * std
    peak = w.abs().max().item()
    if distribution == "uniform":
        assert math.sqrt(3) * std * 0.99 < peak <= math.sqrt(3) * std
    else:
        assert peak > 4 * std  # a normal tail: ~4.5 std is expected in 240,000 draws
    with pytest.raises(ValueError):
        reg.init_weight(4, 4, "lecun")
    with pytest.raises(ValueError):
        reg.init_weight(4, 4, "he", "laplace")


def test_he_keeps_a_relu_signal_alive_through_depth_and_small_init_kills_it():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 256, generator=g)
    he = [reg.init_weight(256, 256, "he", generator=g) for _ in range(30)]
    small = [torch.randn(256, 256, generator=g) * 0.01 for _ in range(30)]
    big = [torch.randn(256, 256, generator=g) for _ in range(30)]
    he_stats = reg.signal_through_depth(he, x, "relu")
    assert len(he_stats["act_std"]) == 30 and len(he_stats["grad_std"]) == 30
    # He init: the signal keeps its size within a factor of 3 after 30 layers.
    assert 1 / 3 < he_stats["act_std"][-1] / he_stats["act_std"][0] < 3
    assert 0.4 < he_stats["dead"][-1] < 0.6  # half the ReLUs are off for any input
    small_stats = reg.signal_through_depth(small, x, "relu")
    assert small_stats["act_std"][-1] < 1e-25  # 0.01 * sqrt(256 / 2): ~9x smaller per layer
    big_stats = reg.signal_through_depth(big, x, "relu")
    assert big_stats["act_std"][-1] > 1e20 or not math.isfinite(big_stats["act_std"][-1])
    kept = reg.signal_through_depth(he[:5], x, "relu", keep_layers=(1, 5))["kept"]
    assert sorted(kept) == [1, 5] and kept[5].shape == (128, 256)
    torch.testing.assert_close(kept[1], torch.relu(x @ he[0].T))
    xavier_tanh = reg.signal_through_depth(
        [reg.init_weight(256, 256, "xavier", generator=g) for _ in range(30)], x, "tanh")
    assert xavier_tanh["act_std"][-1] > 0.1  # tanh with Xavier shrinks only slowly


# --- early stopping --------------------------------------------------------------------------


@pytest.mark.parametrize("losses,patience,min_delta,expected", [
    ([1.0, 0.9, 0.91, 0.92, 0.89, 0.95, 0.96, 0.97], 3, 0.0, (7, 4)),
    ([1.0, 0.9, 0.91, 0.92, 0.89, 0.95, 0.96, 0.97], 3, 0.02, (4, 1)),
    ([1.0, 0.9, 0.8, 0.7], 2, 0.0, (None, 3)),
    ([0.5, 0.5, 0.5], 2, 0.0, (2, 0)),               # equal is not an improvement
    ([1.0, float("nan"), 0.5], 1, 0.0, (1, 0)),       # NaN is not an improvement
    ([3.0, 2.0, 2.5, 1.0, 1.2, 1.1, 0.99], 3, 0.0, (None, 6)),  # saved at the last moment
])
def test_stopping_epoch(losses, patience, min_delta, expected):
    assert reg.stopping_epoch(losses, patience, min_delta) == expected


def test_early_stopping_state_and_validation():
    early = reg.EarlyStopping(patience=2, min_delta=0.1)
    assert early.best == math.inf and early.best_epoch == -1
    assert early.step(1.0) is False and early.best == 1.0 and early.best_epoch == 0
    assert early.step(0.95) is False and early.bad_epochs == 1 and early.best == 1.0
    assert early.step(0.5) is False and early.bad_epochs == 0 and early.best_epoch == 2
    assert early.step(0.45) is False
    assert early.step(0.6) is True
    with pytest.raises(ValueError):
        reg.EarlyStopping(patience=0)
    with pytest.raises(ValueError):
        reg.EarlyStopping(patience=1, min_delta=-1)


# --- penalties, models, training -------------------------------------------------------------


def test_penalties_count_weights_but_not_biases():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(-2.0)
    # Weights: 3*2 + 2*1 = 8 entries of -2 (biases and the norm's scale are not penalised).
    assert reg.l2_penalty(model).item() == pytest.approx(8 * 4.0)
    assert reg.l1_penalty(model).item() == pytest.approx(8 * 2.0)


def test_make_mlp_layers():
    model = reg.make_mlp(64, [32, 16], 10, dropout_p=0.2, norm="batch")
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear", "BatchNorm1d", "ReLU",
                     "Dropout", "Linear"]
    assert model(torch.randn(5, 64)).shape == (5, 10)
    custom = reg.make_mlp(8, [4], 2, norm=lambda n: reg.BatchNorm(n), activation="tanh")
    assert [type(m).__name__ for m in custom] == ["Linear", "BatchNorm", "Tanh", "Linear"]
    with pytest.raises(ValueError):
        reg.make_mlp(4, [4], 2, norm="group")


def test_dropout_layer_follows_train_and_eval_and_uses_the_given_function():
    calls = []

    def traced(x, p, training=True):
        calls.append((p, training))
        return reg.dropout(x, p, training)

    layer = reg.Dropout(0.5, fn=traced)
    x = torch.ones(200, 50)
    assert (layer(x) == 0).any()
    layer.eval()
    assert torch.equal(layer(x), x)
    assert calls == [(0.5, True), (0.5, False)]


def test_init_linear_layers_sets_every_weight_and_zeroes_biases():
    model = reg.make_mlp(6, [5, 4], 3, norm="layer")
    reg.init_linear_layers_(model, lambda fan_in, fan_out: torch.full((fan_out, fan_in), 0.5))
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert len(linears) == 3
    for layer in linears:
        assert torch.equal(layer.weight, torch.full_like(layer.weight, 0.5))
        assert torch.count_nonzero(layer.bias) == 0
    with pytest.raises(ValueError):
        reg.init_linear_layers_(model, lambda fan_in, fan_out: torch.zeros(fan_in, fan_out))


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_train_regularized_learns_digits(digits):
    torch.manual_seed(0)
    model = reg.make_mlp(64, [64], 10)
    history = reg.train_regularized(model, (digits.train.x, digits.train.y),
                                    (digits.val.x, digits.val.y), epochs=4, lr=1e-2,
                                    batch_size=128, device="cpu")
    assert len(history.epochs["val_loss"]) == 4 and len(history.epochs["train_batch_loss"]) == 4
    assert history.last("val_accuracy") > 0.9
    assert history.epochs["train_loss"][-1] < history.epochs["train_loss"][0]
    # The first epoch's batches start from an untrained model: their mean loss is the higher one.
    assert history.epochs["train_batch_loss"][0] > history.epochs["train_loss"][0]


def test_train_regularized_stops_early_and_restores_the_best_weights(digits):
    torch.manual_seed(0)
    x, y = digits.train.x[:100], digits.train.y[:100]  # a tiny set, to overfit quickly
    model = reg.make_mlp(64, [128], 10)
    early = reg.EarlyStopping(patience=3)
    history = reg.train_regularized(model, (x, y), (digits.val.x, digits.val.y), epochs=200,
                                    lr=1e-2, batch_size=50, early_stopping=early, device="cpu")
    stopped = int(history.last("stopped"))
    assert stopped < 199 and stopped == early.best_epoch + 3
    restored = reg.evaluate(model, digits.val.x, digits.val.y, F.cross_entropy)["loss"]
    assert restored == pytest.approx(early.best, rel=1e-5)


def test_l1_makes_weights_sparse_and_weight_decay_shrinks_them(digits):
    data = (digits.train.x[:300], digits.train.y[:300]), (digits.val.x, digits.val.y)

    def trained(**kwargs):
        torch.manual_seed(0)
        model = reg.make_mlp(64, [32], 10)
        reg.train_regularized(model, *data, epochs=20, lr=1e-2, batch_size=100, device="cpu",
                              **kwargs)
        return model[0].weight.detach()

    # Measured: 0.2% of the plain first-layer weights are below 1e-3 against 18% with L1, and
    # decoupled weight decay leaves 0.67 of the plain weights' norm.
    plain, l1, decayed = trained(), trained(l1=1e-3), trained(weight_decay=2.0)
    tiny = 1e-3
    assert (l1.abs() < tiny).float().mean() > max(0.05, 10 * (plain.abs() < tiny).float().mean())
    assert decayed.norm() < 0.8 * plain.norm()


# --- augmentation ----------------------------------------------------------------------------


def test_random_affine_identity_shift_and_shapes():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 64)
    same = reg.random_affine(x, g, max_degrees=0, max_shift=0, max_scale=0)
    torch.testing.assert_close(same, x, atol=1e-6, rtol=0)
    out = reg.random_affine(x, g)
    assert out.shape == x.shape and out.dtype == x.dtype and not torch.allclose(out, x)
    assert out.min() >= 0 and out.max() <= 1 + 1e-6  # bilinear resampling stays in range
    images = torch.rand(3, 1, 8, 8)
    assert reg.random_affine(images, g).shape == (3, 1, 8, 8)


def test_random_affine_shift_moves_a_pixel_by_at_most_max_shift():
    # Bilinear resampling of a pure shift by s pixels (any fraction) spreads a lone pixel over its
    # neighbours with weights that sum to 1 and whose centre is s pixels away.
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 3, 4] = 1.0
    g = torch.Generator().manual_seed(0)
    moved = reg.random_affine(image, g, max_degrees=0, max_shift=1.0, max_scale=0)
    assert moved.sum().item() == pytest.approx(1.0, abs=1e-5)  # mass is kept away from edges
    centre = (moved[0, 0] * torch.arange(8.0)[:, None]).sum(), (moved[0, 0] * torch.arange(8.0)).sum()
    assert abs(centre[0].item() - 3) <= 1 + 1e-5 and abs(centre[1].item() - 4) <= 1 + 1e-5
