"""Behaviour of course_lib.activations, chapter 2's reference: every activation agrees with
PyTorch's built-in, every derivative with autograd, the sigmoid stays finite and accurate (forward
and backward) far into both tails, and the deep-net tools measure what they claim."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_lib import activations as act
from course_lib.data import load_digits
from course_lib.training import fit

F64 = torch.float64
F32 = torch.float32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def grid(lo: float, hi: float, n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.linspace(lo, hi, n, dtype=dtype)


TORCH_VERSIONS = {
    "identity": lambda x: x,
    "relu": F.relu,
    "leaky_relu": F.leaky_relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


# --- the activations ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(act.ACTIVATIONS))
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-13), (F32, 2e-6)])
def test_each_activation_matches_torch(name, dtype, tol):
    x = torch.cat([grid(-12, 12, 2001, dtype), torch.tensor([0.0, -1e-8, 1e-8], dtype=dtype)])
    fn = act.ACTIVATIONS[name].fn
    got, want = fn(x), TORCH_VERSIONS[name](x)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    # The layer factory builds torch's own module for the same function.
    torch.testing.assert_close(act.ACTIVATIONS[name].module()(x), want, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_stable_sigmoid_is_accurate_in_both_tails(dtype):
    x = grid(-740, 740, 14801, dtype)
    got, want = act.stable_sigmoid(x), torch.sigmoid(x)
    assert torch.isfinite(got).all()
    assert ((got >= 0) & (got <= 1)).all()
    tiny = torch.finfo(dtype).tiny
    normal = want > tiny  # below it torch's own result depends on the kernel (0 or subnormal)
    rel = ((got - want).abs() / want)[normal]
    assert rel.max().item() < (1e-6 if dtype == F32 else 1e-13)
    assert (got - want)[~normal].abs().max().item() <= tiny
    # In the far left tail sigmoid(x) = e^x to full relative precision.
    left = torch.tensor([-30.0, -60.0], dtype=dtype)
    torch.testing.assert_close(act.stable_sigmoid(left), torch.exp(left), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_stable_sigmoid_gradient_is_finite_and_right_everywhere(dtype):
    x = torch.tensor([-1e4, -1000.0, -100.0, -1.0, 0.0, 1.0, 100.0, 1000.0, 1e4], dtype=dtype)
    grad = act.autograd_derivative(act.stable_sigmoid, x)
    assert torch.isfinite(grad).all()
    s = torch.sigmoid(x)
    torch.testing.assert_close(grad, s * (1 - s), atol=1e-30, rtol=1e-6)
    assert grad[4].item() == pytest.approx(0.25)  # the clamps keep the slope right at 0
    # The textbook formula is finite forward but not backward: 0 * inf = nan.
    naive = act.autograd_derivative(lambda v: 1 / (1 + torch.exp(-v)), x)
    assert torch.isnan(naive[0])


def test_tanh_keeps_relative_precision_near_zero():
    x = torch.tensor([1e-12, -3e-9, 1e-5], dtype=F64)
    torch.testing.assert_close(act.tanh(x), torch.tanh(x), atol=0, rtol=1e-14)
    big = torch.tensor([-1e4, 1e4, -50.0, 50.0], dtype=F32)
    assert torch.equal(act.tanh(big), torch.tensor([-1.0, 1.0, -1.0, 1.0]))


def test_gelu_forms_differ_by_a_small_known_amount():
    x = grid(-8, 8, 160001, F64)
    gap = (act.gelu(x, "tanh") - act.gelu(x, "none")).abs().max().item()
    assert 4e-4 < gap < 5e-4
    with pytest.raises(ValueError, match="approximate"):
        act.gelu(x, "sigmoid")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_is_finite_for_huge_inputs(approximate):
    x = torch.tensor([-1e4, -100.0, 100.0, 1e4], dtype=F32)
    got = act.gelu(x, approximate)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, 100.0, 1e4]), atol=1e-6, rtol=1e-6)


def test_normal_cdf_and_pdf():
    x = torch.tensor([-1.0, 0.0, 1.959963984540054], dtype=F64)
    torch.testing.assert_close(act.normal_cdf(x), torch.special.ndtr(x), atol=1e-15, rtol=0)
    assert act.normal_pdf(torch.tensor(0.0, dtype=F64)).item() == pytest.approx(1 / math.sqrt(2 * math.pi))


# --- derivatives -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", act.DERIVATIVE_NAMES)
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-12), (F32, 2e-6)])
def test_derivative_matches_autograd_of_torch_builtin(name, dtype, tol):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(500, generator=g, dtype=dtype) * 4,
                   torch.tensor([0.0, -30.0, 30.0, -1e-3, 1e-3], dtype=dtype)])
    expected = act.autograd_derivative(TORCH_VERSIONS[name], x)
    got = act.activation_derivative(name, x)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


def test_derivative_conventions_at_the_kink():
    zero = torch.zeros(3, dtype=F64)
    assert torch.equal(act.activation_derivative("relu", zero), zero)
    torch.testing.assert_close(act.activation_derivative("leaky_relu", zero, negative_slope=0.2),
                               torch.full((3,), 0.2, dtype=F64))
    expected = act.autograd_derivative(lambda v: F.leaky_relu(v, 0.2), torch.tensor([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(act.activation_derivative("leaky_relu", torch.tensor([-1.0, 0.0, 1.0]), 0.2),
                               expected)
    with pytest.raises(ValueError, match="unknown activation"):
        act.activation_derivative("swish", zero)


def test_sigmoid_derivative_peaks_at_a_quarter():
    x = grid(-10, 10, 20001, F64)
    d = act.activation_derivative("sigmoid", x)
    assert d.max().item() == pytest.approx(0.25, abs=1e-12)
    assert act.activation_derivative("tanh", x).max().item() == pytest.approx(1.0, abs=1e-12)


# --- collapsing linear layers ------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[3, 5], [4, 7, 2, 6], [5, 5, 5, 5, 5, 5]])
def test_collapse_linear_equals_the_stack(sizes):
    g = torch.Generator().manual_seed(len(sizes))
    weights = [torch.randn(a, b, generator=g, dtype=F64) for a, b in zip(sizes, sizes[1:], strict=False)]
    biases = [torch.randn(b, generator=g, dtype=F64) for b in sizes[1:]]
    copies = [w.clone() for w in weights] + [b.clone() for b in biases]
    x = torch.randn(9, sizes[0], generator=g, dtype=F64)
    h = x
    for w, b in zip(weights, biases, strict=True):
        h = h @ w + b
    w_all, b_all = act.collapse_linear(weights, biases)
    assert w_all.shape == (sizes[0], sizes[-1]) and b_all.shape == (sizes[-1],)
    torch.testing.assert_close(x @ w_all + b_all, h, atol=1e-10, rtol=1e-10)
    assert all(torch.equal(a, b) for a, b in zip(weights + biases, copies, strict=True))


def test_collapse_linear_of_one_layer_is_a_copy():
    w, b = torch.randn(2, 3), torch.randn(3)
    w_all, b_all = act.collapse_linear([w], [b])
    assert torch.equal(w_all, w) and torch.equal(b_all, b)
    w_all += 1
    assert not torch.equal(w_all, w)


def test_collapse_linear_rejects_mismatched_lists():
    with pytest.raises(ValueError):
        act.collapse_linear([], [])
    with pytest.raises(ValueError):
        act.collapse_linear([torch.eye(2)], [])


# --- deep nets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("init,expected_std", [("he", math.sqrt(2 / 256)),
                                               ("xavier", math.sqrt(2 / (256 + 256)))])
def test_make_mlp_structure_and_init(init, expected_std):
    net = act.make_mlp(256, 256, 3, 10, activation="tanh", init=init, seed=1)
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["Linear", "Tanh"] * 3 + ["Linear"]
    hidden = net[2]
    assert hidden.weight.std().item() == pytest.approx(expected_std, rel=0.03)
    assert torch.count_nonzero(hidden.bias) == 0
    again = act.make_mlp(256, 256, 3, 10, activation="tanh", init=init, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), again.parameters(), strict=True))


def test_make_mlp_default_init_is_pytorchs_rule():
    net = act.make_mlp(100, 50, 1, 2, activation="relu", init="default", seed=0)
    bound = 1 / math.sqrt(100)
    assert net[0].weight.abs().max().item() <= bound
    assert net[0].weight.abs().max().item() > 0.9 * bound
    assert torch.count_nonzero(net[0].bias) > 0


def test_make_mlp_rejects_unknown_choices():
    with pytest.raises(ValueError, match="activation"):
        act.make_mlp(2, 4, 2, 2, activation="swish")
    with pytest.raises(ValueError, match="init"):
        act.make_mlp(2, 4, 2, 2, init="lecun")
    with pytest.raises(ValueError, match="depth"):
        act.make_mlp(2, 4, 0, 2)


def _manual_grad_norms(model, x, y):
    for p in model.parameters():
        p.grad = None
    F.cross_entropy(model(x), y).backward()
    return torch.stack([m.weight.grad.norm() for m in model.modules() if isinstance(m, nn.Linear)])


def test_layer_grad_norms_matches_autograd_and_ignores_stale_gradients():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
    net = act.make_mlp(5, 8, 4, 3, activation="tanh", init="xavier", seed=2)
    expected = _manual_grad_norms(net, x, y)
    before = [p.detach().clone() for p in net.parameters()]
    for p in net.parameters():
        p.grad = torch.full_like(p, 7.0)  # stale gradients must not leak into the result
    got = act.layer_grad_norms(net, x, y)
    assert got.shape == (5,) and got.dtype == F32 and got.device.type == "cpu"
    torch.testing.assert_close(got, expected, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(act.layer_grad_norms(net, x, y), got, atol=0, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_layer_grad_norms_finds_nested_linear_layers_in_order():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Sequential(nn.Linear(4, 6), nn.ReLU()), nn.Linear(6, 6, bias=False),
                        nn.ReLU(), nn.Linear(6, 2))
    x, y = torch.randn(10, 4), torch.randint(0, 2, (10,))
    got = act.layer_grad_norms(net, x, y)
    torch.testing.assert_close(got, _manual_grad_norms(net, x, y), atol=1e-7, rtol=1e-6)
    assert len(got) == 3


def test_deep_sigmoid_gradients_vanish_and_relu_gradients_do_not(digits):
    x, y = digits.train.x[:256], digits.train.y[:256]
    sigmoid = act.layer_grad_norms(act.make_mlp(64, 64, 10, 10, "sigmoid", "xavier"), x, y)
    relu = act.layer_grad_norms(act.make_mlp(64, 64, 10, 10, "relu", "he"), x, y)
    assert (sigmoid[0] / sigmoid[-1]).item() < 1e-4  # measured: about 7e-7
    assert 0.2 < (relu[0] / relu[-1]).item() < 5  # measured: about 1.8
    # Going back one sigmoid layer costs a roughly constant factor: a straight line on a log plot.
    per_layer = (sigmoid[1:-1] / sigmoid[2:]).log10()
    assert per_layer.max().item() < -0.3


def test_dead_relu_fraction_by_hand():
    net = nn.Sequential(nn.Linear(1, 3), nn.ReLU(), nn.Linear(3, 2), nn.ReLU())
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [1.0], [-1.0]]))
        net[0].bias.copy_(torch.tensor([10.0, -100.0, 0.0]))  # alive, dead, alive for x < 0
        net[2].weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]))
        net[2].bias.zero_()
    x = torch.tensor([[-2.0], [1.0], [3.0]])
    got = act.dead_relu_fraction(net, x)
    torch.testing.assert_close(got, torch.tensor([1 / 3, 1 / 2]))
    assert not got.requires_grad and got.device.type == "cpu"
    # The same units on inputs that wake unit 2 up but not unit 1.
    torch.testing.assert_close(act.dead_relu_fraction(net, torch.tensor([[-2.0]])),
                               torch.tensor([1 / 3, 1 / 2]))
    assert act.dead_relu_fraction(nn.Sequential(nn.Linear(2, 2)), torch.zeros(1, 2)).numel() == 0


def test_dead_relu_fraction_counts_only_relu_modules():
    net = act.make_mlp(4, 16, 3, 2, activation="leaky_relu", init="he")
    assert act.dead_relu_fraction(net, torch.randn(8, 4)).numel() == 0
    relu_net = act.make_mlp(4, 16, 3, 2, activation="relu", init="he")
    with torch.no_grad():
        relu_net[2].bias.fill_(-1e3)  # the second hidden layer is switched off entirely
    got = act.dead_relu_fraction(relu_net, torch.randn(32, 4))
    assert got.shape == (3,) and got[1].item() == 1.0 and got[2].item() == 1.0


def test_dead_relu_units_never_learn_and_leaky_ones_do(digits):
    """A unit that is off for every example gets exactly zero gradient, so SGD never moves it."""
    x, y = digits.train.x[:300], digits.train.y[:300]
    moved = {}
    for activation in ("relu", "leaky_relu"):
        net = act.make_mlp(64, 16, 1, 10, activation, "he", seed=0)
        with torch.no_grad():
            net[0].bias[:4] = -100.0  # units 0-3: pre-activation far below 0 for every digit
        before = net[0].weight.detach().clone()
        fit(net, (x, y), loss_fn=F.cross_entropy, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
            epochs=2, batch_size=32, device="cpu", progress=False)
        moved[activation] = (net[0].weight.detach() - before).abs().amax(dim=1)
        if activation == "relu":
            torch.testing.assert_close(act.dead_relu_fraction(net, x), torch.tensor([0.25]))
    assert torch.count_nonzero(moved["relu"][:4]) == 0
    assert (moved["relu"][4:] > 0).any()
    assert (moved["leaky_relu"][:4] > 0).all()


def test_a_high_learning_rate_kills_relu_units(digits):
    x, y = digits.train.x[:600], digits.train.y[:600]
    dead = {}
    for lr in (1e-3, 1e-1):
        net = act.make_mlp(64, 128, 2, 10, "relu", "he", seed=0)
        fit(net, (x, y), loss_fn=F.cross_entropy, optimizer=torch.optim.Adam(net.parameters(), lr=lr),
            epochs=2, batch_size=32, device="cpu", progress=False)
        dead[lr] = act.dead_relu_fraction(net, digits.train.x).mean().item()
    assert dead[1e-3] < 0.2  # measured: about 0.07
    assert dead[1e-1] > 0.4  # measured: about 0.68


def test_activations_table_follows_forbidden_patches():
    """Hidden tests forbid the reference functions; the table must not keep a way around that."""
    from course_lib.checks import ForbiddenCall, forbidden

    x = torch.tensor([0.0])
    assert act.ACTIVATIONS["sigmoid"].fn(x).item() == 0.5
    with forbidden("course_lib.activations.stable_sigmoid"), pytest.raises(ForbiddenCall):
        act.ACTIVATIONS["sigmoid"].fn(x)
    with forbidden("course_lib.activations.stable_sigmoid"), pytest.raises(ForbiddenCall):
        act.silu(x)  # silu is built on stable_sigmoid
    assert act.ACTIVATIONS["sigmoid"].fn(x).item() == 0.5
