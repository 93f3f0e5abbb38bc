"""Behaviour of course_lib.mlp, chapter 1's reference: every hand-written gradient agrees with
autograd, the loss with PyTorch's, and the training loop really learns the digits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_lib import mlp
from course_lib.data import load_digits

F64 = torch.float64


def random_problem(batch: int = 7, n_in: int = 5, n_hidden: int = 6, n_out: int = 4, seed: int = 0,
                   dtype: torch.dtype = F64):
    """Random inputs, labels and (non-trivial) parameters, with biases that are not zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n_in, generator=g, dtype=dtype)
    y = torch.randint(0, n_out, (batch,), generator=g)
    params = {
        "W1": torch.randn(n_in, n_hidden, generator=g, dtype=dtype),
        "b1": torch.randn(n_hidden, generator=g, dtype=dtype),
        "W2": torch.randn(n_hidden, n_out, generator=g, dtype=dtype),
        "b2": torch.randn(n_out, generator=g, dtype=dtype),
    }
    return x, y, params


def autograd_grads(x, y, params):
    """Gradients of the mean cross-entropy of the MLP, computed by autograd with torch.relu."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    h = torch.relu(x @ leaves["W1"] + leaves["b1"])
    logits = h @ leaves["W2"] + leaves["b2"]
    F.cross_entropy(logits, y).backward()
    return {k: v.grad for k, v in leaves.items()}


# --- init ------------------------------------------------------------------------------------


def test_init_mlp_shapes_dtype_and_scale():
    p = mlp.init_mlp(64, 128, 10, seed=3, dtype=F64)
    assert {k: tuple(v.shape) for k, v in p.items()} == {
        "W1": (64, 128), "b1": (128,), "W2": (128, 10), "b2": (10,)}
    assert all(v.dtype == F64 for v in p.values())
    assert torch.count_nonzero(p["b1"]) == 0 and torch.count_nonzero(p["b2"]) == 0
    # He initialisation: std sqrt(2 / fan_in).
    assert p["W1"].std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.05)
    again = mlp.init_mlp(64, 128, 10, seed=3, dtype=F64)
    assert all(torch.equal(p[k], again[k]) for k in p)


# --- forward ---------------------------------------------------------------------------------


def test_forward_matches_nn_sequential_with_the_same_weights():
    x, _, params = random_problem(batch=9, n_in=5, n_hidden=8, n_out=3, dtype=torch.float32)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        # nn.Linear stores (out, in) and computes x @ weight.T: our W is its transpose.
        net[0].weight.copy_(params["W1"].T)
        net[0].bias.copy_(params["b1"])
        net[2].weight.copy_(params["W2"].T)
        net[2].bias.copy_(params["b2"])
        expected = net(x)
        hidden = net[1](net[0](x))
    logits, cache = mlp.mlp_forward(x, params)
    assert logits.shape == (9, 3)
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=1e-5)
    assert set(cache) >= {"x", "h_pre", "h"}
    assert torch.equal(cache["x"], x)
    torch.testing.assert_close(cache["h_pre"], x @ params["W1"] + params["b1"])
    torch.testing.assert_close(cache["h"], hidden, atol=1e-6, rtol=1e-5)
    assert (cache["h"] >= 0).all()


# --- loss ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_softmax_cross_entropy_matches_torch_loss_and_autograd(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(11, 7, generator=g, dtype=F64) * 3
    y = torch.randint(0, 7, (11,), generator=g)
    loss, dlogits = mlp.softmax_cross_entropy(logits, y)
    leaf = logits.clone().requires_grad_(True)
    expected = F.cross_entropy(leaf, y)
    expected.backward()
    assert loss.ndim == 0
    torch.testing.assert_close(loss, expected.detach(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(dlogits, leaf.grad, atol=1e-12, rtol=1e-12)
    # Each row of the gradient sums to zero: softmax sums to 1, the one-hot too.
    torch.testing.assert_close(dlogits.sum(dim=1), torch.zeros(11, dtype=F64), atol=1e-15, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_softmax_cross_entropy_is_stable_for_huge_logits(dtype):
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4 + 5], [1e4, 1e4, -1e4]], dtype=dtype)
    y = torch.tensor([1, 2, 0])
    loss, dlogits = mlp.softmax_cross_entropy(logits, y)
    assert torch.isfinite(loss) and torch.isfinite(dlogits).all()
    leaf = logits.clone().requires_grad_(True)
    expected = F.cross_entropy(leaf, y)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), atol=1e-3, rtol=1e-6)
    torch.testing.assert_close(dlogits, leaf.grad, atol=1e-7, rtol=1e-6)


def test_softmax_cross_entropy_leaves_logits_alone():
    logits = torch.randn(4, 3, dtype=F64)
    before = logits.clone()
    mlp.softmax_cross_entropy(logits, torch.tensor([0, 1, 2, 0]))
    assert torch.equal(logits, before)


# --- backward --------------------------------------------------------------------------------


@pytest.mark.parametrize("batch,seed", [(1, 0), (7, 1), (32, 2)])
def test_mlp_backward_matches_autograd_in_float64(batch, seed):
    x, y, params = random_problem(batch=batch, seed=seed)
    logits, cache = mlp.mlp_forward(x, params)
    _, dlogits = mlp.softmax_cross_entropy(logits, y)
    grads = mlp.mlp_backward(dlogits, cache, params)
    expected = autograd_grads(x, y, params)
    assert set(grads) == set(params)
    for name in params:
        assert grads[name].shape == params[name].shape, name
        torch.testing.assert_close(grads[name], expected[name], atol=1e-10, rtol=1e-10)


def test_mlp_backward_with_dead_relu_units():
    x, y, params = random_problem(batch=10, n_hidden=6, seed=5)
    params["b1"][[1, 4]] = -1e3  # these two units never fire: no gradient reaches W1[:, j], b1[j]
    logits, cache = mlp.mlp_forward(x, params)
    _, dlogits = mlp.softmax_cross_entropy(logits, y)
    grads = mlp.mlp_backward(dlogits, cache, params)
    expected = autograd_grads(x, y, params)
    for name in params:
        torch.testing.assert_close(grads[name], expected[name], atol=1e-10, rtol=1e-10)
    assert torch.count_nonzero(grads["W1"][:, [1, 4]]) == 0
    assert torch.count_nonzero(grads["b1"][[1, 4]]) == 0
    assert torch.count_nonzero(grads["W2"][[1, 4], :]) == 0


# --- numerical gradient ------------------------------------------------------------------------


def test_numerical_gradient_of_a_quadratic():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=g, dtype=F64)
    x = torch.randn(4, generator=g, dtype=F64)
    before = x.clone()
    grad = mlp.numerical_gradient(lambda v: v @ a @ v, x)
    torch.testing.assert_close(grad, (a + a.T) @ before, atol=1e-7, rtol=1e-7)
    assert torch.equal(x, before)


def test_numerical_gradient_is_central_not_forward():
    x = torch.tensor([[0.5, -1.0], [2.0, 0.1]], dtype=F64)
    grad = mlp.numerical_gradient(lambda v: (v**3).sum(), x, eps=1e-3)
    # Central differences of x^3 are exact up to eps^2; forward ones are off by 3 x eps.
    torch.testing.assert_close(grad, 3 * x**2, atol=2e-6, rtol=0)
    assert grad.shape == x.shape


def test_numerical_gradient_of_a_non_contiguous_point():
    x = torch.tensor([[0.5, -1.0, 3.0], [2.0, 0.1, -0.7]], dtype=F64).T  # a transposed view
    assert not x.is_contiguous()
    grad = mlp.numerical_gradient(lambda v: (v[:, 0] * v[:, 1] ** 2).sum(), x, eps=1e-4)
    torch.testing.assert_close(grad[:, 0], x[:, 1] ** 2, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad[:, 1], 2 * x[:, 0] * x[:, 1], atol=1e-6, rtol=0)


def test_numerical_gradient_matches_mlp_backward():
    x, y, params = random_problem(batch=6, n_in=4, n_hidden=5, n_out=3, seed=9)
    logits, cache = mlp.mlp_forward(x, params)
    _, dlogits = mlp.softmax_cross_entropy(logits, y)
    grads = mlp.mlp_backward(dlogits, cache, params)
    for name in params:
        def loss_of(value, name=name):
            return mlp.softmax_cross_entropy(mlp.mlp_forward(x, {**params, name: value})[0], y)[0]
        numeric = mlp.numerical_gradient(loss_of, params[name])
        assert mlp.relative_error(numeric, grads[name]) < 1e-7, name


def test_relative_error():
    a = torch.tensor([1.0, 2.0])
    assert mlp.relative_error(a, a) == 0
    assert mlp.relative_error(a, a + 0.01) == pytest.approx(0.01 / 4.01)
    assert mlp.relative_error(torch.zeros(2), torch.zeros(2)) == 0


# --- SGD and training ---------------------------------------------------------------------------


def test_sgd_step_updates_in_place():
    params = {"w": torch.ones(3)}
    ref = params["w"]
    mlp.sgd_step(params, {"w": torch.tensor([1.0, 2.0, 3.0])}, lr=0.5)
    assert ref is params["w"]
    torch.testing.assert_close(ref, torch.tensor([0.5, 0.0, -0.5]))


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_train_mlp_learns_the_digits(digits):
    params, losses = mlp.train_mlp(digits.train.x, digits.train.y, n_hidden=64, lr=0.5,
                                   epochs=10, batch_size=64, seed=0)
    steps_per_epoch = math.ceil(len(digits.train) / 64)
    assert len(losses) == 10 * steps_per_epoch
    assert all(isinstance(v, float) for v in losses)
    # The loss falls from about ln(10) to a small fraction of it.
    assert losses[0] == pytest.approx(math.log(10), rel=0.25)
    assert sum(losses[-20:]) / 20 < 0.25 * sum(losses[:20]) / 20
    assert mlp.accuracy_of(params, digits.val.x, digits.val.y) >= 0.92
    assert params["W1"].shape == (64, 64) and params["W2"].shape == (64, 10)


def test_train_mlp_is_repeatable(digits):
    x, y = digits.train.x[:200], digits.train.y[:200]
    p1, l1 = mlp.train_mlp(x, y, n_hidden=16, lr=0.3, epochs=2, batch_size=50, seed=4)
    p2, l2 = mlp.train_mlp(x, y, n_hidden=16, lr=0.3, epochs=2, batch_size=50, seed=4)
    assert l1 == l2 and all(torch.equal(p1[k], p2[k]) for k in p1)


def test_accuracy_of():
    params = {"W1": torch.eye(2), "b1": torch.zeros(2), "W2": torch.eye(2), "b2": torch.zeros(2)}
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    assert mlp.accuracy_of(params, x, torch.tensor([0, 1, 1, 1])) == pytest.approx(0.75)
