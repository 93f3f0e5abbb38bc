"""Behaviour of course_lib.optimizers, chapter 4's reference: the optimizers match PyTorch's step by
step, the schedules and clipping match their definitions and PyTorch, and the landscape helpers
compute what the chapter's plots claim."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pytest
import torch
from torch import nn

from course_lib import optimizers as opt
from course_lib.checks import check_trajectory

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# --- landscapes --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(opt.LANDSCAPES))
def test_landscape_gradient_matches_autograd_and_minimum_is_zero(name):
    land = opt.LANDSCAPES[name]
    g = torch.Generator().manual_seed(0)
    points = (torch.rand(50, 2, generator=g, dtype=F64) * 4 - 2).requires_grad_(True)
    land.f(points).sum().backward()
    torch.testing.assert_close(land.gradient(points.detach()), points.grad, atol=1e-10, rtol=1e-12)
    minimum = torch.tensor(land.minimum, dtype=F64)
    assert land.f(minimum).item() == pytest.approx(0.0, abs=1e-15)
    assert land.gradient(minimum).abs().max().item() == pytest.approx(0.0, abs=1e-12)
    assert land.f(torch.zeros(3, 4, 2, dtype=F64)).shape == (3, 4)
    assert land.gradient(torch.zeros(3, 4, 2, dtype=F64)).shape == (3, 4, 2)


def test_gradient_descent_stability_limit_on_the_quadratic():
    # Stable below 2 / lambda_max = 0.1, divergent above it.
    stable = opt.trajectory("GD", "quadratic", 0.09, 400)
    assert len(stable) == 401
    assert opt.LANDSCAPES["quadratic"].f(stable[-1]).item() < 1e-12
    unstable = opt.trajectory("GD", "quadratic", 0.11, 400)
    assert opt.LANDSCAPES["quadratic"].f(unstable[-1]).item() > 1e3 or len(unstable) < 401
    runaway = opt.trajectory("GD", "quadratic", 0.5, 5000)
    assert len(runaway) < 5001 and not torch.isfinite(runaway[-1]).all()


def test_rotation_leaves_gradient_descent_and_momentum_unchanged():
    # The rotated landscape starts at the rotated start, so rotation-blind methods see the same
    # losses; Adam, which works per coordinate, does not.
    quad, rotated = opt.LANDSCAPES["quadratic"], opt.LANDSCAPES["rotated quadratic"]
    assert rotated.f(torch.tensor(rotated.start, dtype=F64)).item() == pytest.approx(
        quad.f(torch.tensor(quad.start, dtype=F64)).item(), rel=1e-12)
    for name in ("GD", "momentum", "Nesterov"):
        a = quad.f(opt.trajectory(name, quad, 0.02, 100))
        b = rotated.f(opt.trajectory(name, rotated, 0.02, 100))
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    a = quad.f(opt.trajectory("Adam", quad, 0.3, 100))
    b = rotated.f(opt.trajectory("Adam", rotated, 0.3, 100))
    assert (a - b).abs().max().item() > 1e-3


def test_trajectory_accepts_a_factory_and_a_clip_function():
    start = (-1.8, -0.5)  # the steep outer wall of the valley: gradient norm ~2800
    wild = opt.trajectory("momentum", "rosenbrock", 1e-3, 300, start=start)
    assert len(wild) < 301  # overflows within a few steps
    calls = []

    def clip(params):
        calls.append(1)
        return opt.clip_grad_norm_(params, 10.0)

    tamed = opt.trajectory(lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9), "rosenbrock",
                           1e-3, 300, start=start, clip=clip)
    assert len(tamed) == 301 and len(calls) == 300
    assert opt.LANDSCAPES["rosenbrock"].f(tamed[-1]).item() < 0.05
    with pytest.raises(KeyError, match="unknown optimizer"):
        opt.trajectory("LBFGS", "quadratic", 0.1, 3)
    with pytest.raises(KeyError, match="unknown landscape"):
        opt.trajectory("GD", "himmelblau", 0.1, 3)


@pytest.mark.parametrize("name", ["GD", "Adagrad", "Adadelta", "Adam"])
def test_final_losses_equals_one_run_per_learning_rate(name):
    # One optimizer with a parameter group per learning rate: the groups must not interact.
    lrs = [1e-3, 0.05, 0.3, 50.0]
    land = opt.LANDSCAPES["rosenbrock"]
    together = opt.final_losses(name, land, lrs, 40)
    for lr, loss in zip(lrs, together.tolist(), strict=True):
        path = opt.trajectory(name, land, lr, 40)
        alone = land.f(path[-1]).item() if len(path) == 41 else math.inf
        if math.isfinite(alone) and math.isfinite(loss):
            assert loss == pytest.approx(alone, rel=1e-9, abs=1e-300)
        else:  # diverged: reported as inf, never nan
            assert loss == math.inf


@pytest.mark.parametrize("landscape", list(opt.LANDSCAPES))
def test_good_learning_rates_make_every_optimizer_progress(landscape):
    land = opt.LANDSCAPES[landscape]
    start = land.f(torch.tensor(land.start, dtype=F64)).item()
    assert set(opt.GOOD_LRS[landscape]) == set(opt.OPTIMIZERS)
    for name, lr in opt.GOOD_LRS[landscape].items():
        path = opt.trajectory(name, land, lr, 300)
        assert len(path) == 301, f"{name} diverged on {landscape} at its good lr {lr}"
        assert land.f(path[-1]).item() < 0.1 * start, (name, landscape)


def test_plot_landscape_draws_paths_and_skips_non_finite_points():
    paths = {"GD": opt.trajectory("GD", "quadratic", 0.05, 20),
             "diverged": opt.trajectory("GD", "quadratic", 0.5, 5000)}
    ax = opt.plot_landscape("quadratic", paths, title="t")
    labels = [line.get_label() for line in ax.get_lines()]
    assert "GD" in labels and "diverged" in labels and "minimum" in labels
    assert ax.get_title() == "t"
    plt.close(ax.figure)


# --- optimizers against PyTorch ----------------------------------------------------------------

SCHEDULE = dict(lr_factor=lambda s: 1.0 / (1.0 + 0.2 * s))
IDLE = dict(idle_until={0: 5, 3: 12})
RELOAD = dict(reload_at=13)
EVERYTHING = dict(lr_factor=lambda s: 0.5 ** (s // 7), idle_until={1: 9}, reload_at=15)

SGD_SETTINGS = [dict(lr=0.1), dict(lr=0.1, weight_decay=0.1), dict(lr=0.1, momentum=0.9),
                dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.05)]


@pytest.mark.parametrize("hyper", SGD_SETTINGS, ids=str)
@pytest.mark.parametrize("options", [{}, SCHEDULE, IDLE, RELOAD, EVERYTHING],
                         ids=["plain", "schedule", "idle", "reload", "everything"])
def test_sgd_matches_torch_step_by_step(hyper, options):
    expected = opt.optimizer_trajectory(lambda ps: torch.optim.SGD(ps, **hyper), 30, **options)
    got = opt.optimizer_trajectory(lambda ps: opt.SGD(ps, **hyper), 30, **options)
    check_trajectory(got, expected, atol=1e-12, rtol=1e-12, name="SGD")
    assert (expected[-1] - expected[0]).abs().max() > 1e-2  # the problem really moves


def test_sgd_matches_torch_with_groups_in_float32():
    def groups(ps):
        return [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.02, "momentum": 0.5, "nesterov": True}]

    expected = opt.optimizer_trajectory(lambda ps: torch.optim.SGD(groups(ps), lr=0.1, momentum=0.9),
                                        50, dtype=torch.float32)
    got = opt.optimizer_trajectory(lambda ps: opt.SGD(groups(ps), lr=0.1, momentum=0.9), 50,
                                   dtype=torch.float32)
    assert got.dtype == torch.float32
    check_trajectory(got, expected, atol=1e-5, rtol=1e-5, name="SGD float32")


ADAM_SETTINGS = [dict(lr=0.01), dict(lr=0.01, weight_decay=0.1),
                 dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
                 dict(lr=0.05, betas=(0.5, 0.9), eps=0.1), dict(lr=0.01, betas=(0.0, 0.99))]


@pytest.mark.parametrize("hyper", ADAM_SETTINGS, ids=str)
@pytest.mark.parametrize("options", [{}, SCHEDULE, IDLE, RELOAD, EVERYTHING, dict(loss_scale=1e-9)],
                         ids=["plain", "schedule", "idle", "reload", "everything", "tiny-gradients"])
def test_adam_matches_torch_step_by_step(hyper, options):
    expected = opt.optimizer_trajectory(lambda ps: torch.optim.Adam(ps, **hyper), 30, **options)
    got = opt.optimizer_trajectory(lambda ps: opt.Adam(ps, **hyper), 30, **options)
    check_trajectory(got, expected, atol=1e-12, rtol=1e-12, name="Adam")


def test_decoupled_adam_is_adamw_in_float32():
    def make(cls, **extra):
        return lambda ps: cls([{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.3}],
                              lr=0.01, weight_decay=0.05, **extra)

    expected = opt.optimizer_trajectory(make(torch.optim.AdamW), 50, dtype=torch.float32, **EVERYTHING)
    got = opt.optimizer_trajectory(make(opt.Adam, decoupled_weight_decay=True), 50, dtype=torch.float32,
                                   **EVERYTHING)
    check_trajectory(got, expected, atol=1e-5, rtol=1e-5, name="AdamW float32")


def test_l2_and_decoupled_weight_decay_really_differ():
    l2 = opt.optimizer_trajectory(lambda ps: opt.Adam(ps, lr=0.01, weight_decay=0.5), 30)
    decoupled = opt.optimizer_trajectory(
        lambda ps: opt.Adam(ps, lr=0.01, weight_decay=0.5, decoupled_weight_decay=True), 30)
    assert (l2 - decoupled).abs().max().item() > 1e-3


def test_each_parameter_counts_its_own_adam_steps():
    late = torch.zeros(2, requires_grad=True)
    early = torch.zeros(2, requires_grad=True)
    adam = opt.Adam([early, late], lr=0.1)
    for _ in range(5):
        early.grad = torch.ones(2)
        adam.step()
    assert adam.state[early]["step"] == 5 and late not in adam.state
    late.grad = torch.ones(2)
    adam.step()
    assert adam.state[late]["step"] == 1
    # Its first step is a bias-corrected one: exactly lr against the gradient's sign.
    torch.testing.assert_close(late.detach(), torch.full((2,), -0.1), atol=1e-6, rtol=0)


def test_step_returns_the_closure_loss():
    for cls in (opt.SGD, opt.Adam):
        p = torch.tensor([2.0], requires_grad=True)
        optimizer = cls([p], lr=0.1)

        def closure(p=p, optimizer=optimizer):
            optimizer.zero_grad()
            loss = (p**2).sum()
            loss.backward()
            return loss

        assert optimizer.step(closure).item() == pytest.approx(4.0)
        assert optimizer.step() is None


@pytest.mark.parametrize("make", [
    lambda p: opt.SGD(p, lr=-0.1), lambda p: opt.SGD(p, lr=0.1, momentum=-0.5),
    lambda p: opt.SGD(p, lr=0.1, nesterov=True), lambda p: opt.SGD(p, lr=0.1, weight_decay=-1),
    lambda p: opt.Adam(p, lr=-1e-3), lambda p: opt.Adam(p, betas=(0.9, 1.0)),
    lambda p: opt.Adam(p, eps=-1.0), lambda p: opt.Adam(p, weight_decay=-0.1)])
def test_invalid_hyperparameters_raise(make):
    with pytest.raises(ValueError):
        make([torch.zeros(1, requires_grad=True)])


# --- schedules ---------------------------------------------------------------------------------


def _torch_lrs(make_scheduler, steps):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    scheduler = make_scheduler(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_step_and_exponential_schedules_match_torch():
    steps = 60
    expected = _torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, 7, gamma=0.3), steps)
    assert [opt.step_lr(s, 0.5, 7, 0.3) for s in range(steps)] == pytest.approx(expected, rel=1e-12)
    expected = _torch_lrs(lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.95), steps)
    assert [opt.exponential_lr(s, 0.5, 0.95) for s in range(steps)] == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError):
        opt.step_lr(3, 0.5, 0)
    with pytest.raises(ValueError):
        opt.exponential_lr(-1, 0.5, 0.9)


def test_warmup_cosine_endpoints():
    lr = opt.warmup_cosine_lr
    base, warmup, total, floor = 1.0, 4, 14, 0.1
    assert lr(0, base, warmup, total, floor) == pytest.approx(0.2, abs=1e-15)  # never 0
    assert lr(3, base, warmup, total, floor) == pytest.approx(0.8, abs=1e-15)
    assert lr(warmup, base, warmup, total, floor) == base  # exactly, no flat step before it
    assert lr(9, base, warmup, total, floor) == pytest.approx(0.55, abs=1e-15)
    assert lr(total, base, warmup, total, floor) == floor  # exactly
    assert lr(total + 100, base, warmup, total, floor) == floor
    assert lr(0, 3e-4, 0, 10) == 3e-4  # no warmup
    values = [lr(s, base, warmup, total, floor) for s in range(total + 5)]
    assert all(isinstance(v, float) for v in values)
    assert all(a < b for a, b in zip(values[:warmup], values[1:warmup + 1], strict=True))
    assert all(a > b for a, b in zip(values[warmup:total], values[warmup + 1:total + 1], strict=True))


def test_warmup_cosine_without_warmup_is_torch_cosine_annealing():
    expected = _torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=40, eta_min=0.05),
                          41)
    got = [opt.warmup_cosine_lr(s, 0.5, 0, 40, 0.05) for s in range(41)]
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_warmup_cosine_through_lambda_lr():
    def schedule(s):
        return opt.warmup_cosine_lr(s, 1.0, 5, 30)

    got = _torch_lrs(lambda o: torch.optim.lr_scheduler.LambdaLR(o, schedule), 35)
    assert got == pytest.approx([0.5 * schedule(s) for s in range(35)], rel=1e-12)


@pytest.mark.parametrize("args", [(-1, 1.0, 0, 10), (0, 1.0, 10, 10), (0, 1.0, 11, 10),
                                  (0, 1.0, -1, 10)])
def test_warmup_cosine_rejects_invalid_settings(args):
    with pytest.raises(ValueError):
        opt.warmup_cosine_lr(*args)


# --- clipping ----------------------------------------------------------------------------------


def _twin_leaves(shapes, dtype, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(s, generator=g, dtype=dtype) * scale for s in shapes]
    twins = []
    for _ in range(2):
        leaves = [torch.zeros(s, dtype=dtype, requires_grad=True) for s in shapes]
        for leaf, grad in zip(leaves, grads, strict=True):
            leaf.grad = grad.clone()
        twins.append(leaves)
    return twins


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("dtype,scale,max_norm", [(F64, 1.0, 0.5), (torch.float32, 1e3, 1.0),
                                                  (torch.float32, 1e-4, 1e-5), (F64, 1e-3, 1.0)])
def test_clip_grad_norm_matches_torch(norm_type, dtype, scale, max_norm):
    mine, theirs = _twin_leaves([(8, 5), (5,), (5, 3)], dtype, scale)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type=norm_type)
    total = opt.clip_grad_norm_(mine, max_norm, norm_type=norm_type)
    tol = 1e-12 if dtype == F64 else 1e-5
    torch.testing.assert_close(total, expected, rtol=tol, atol=0)
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=tol, atol=0)


def test_clip_grad_norm_leaves_small_gradients_exactly_alone():
    leaves, _ = _twin_leaves([(4,), (2, 2)], F64, 0.1)
    before = [leaf.grad.clone() for leaf in leaves]
    opt.clip_grad_norm_(leaves, 10.0)
    assert all(torch.equal(leaf.grad, b) for leaf, b in zip(leaves, before, strict=True))


def test_clip_grad_norm_takes_a_generator_a_tensor_and_nothing():
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    twin = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    twin.load_state_dict(net.state_dict())
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
    for model in (net, twin):
        (model(x) ** 2).sum().mul(10).backward()
    expected = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.3)
    total = opt.clip_grad_norm_(net.parameters(), 0.3)
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=0)
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9)
    single = torch.zeros(3, dtype=F64, requires_grad=True)
    single.grad = torch.tensor([2.0, -2.0, 1.0], dtype=F64)
    assert opt.clip_grad_norm_(single, 1.5).item() == pytest.approx(3.0)
    torch.testing.assert_close(single.grad, torch.tensor([2.0, -2.0, 1.0], dtype=F64) * 1.5 / (3 + 1e-6))
    no_grad = torch.zeros(2, requires_grad=True)
    assert opt.clip_grad_norm_([no_grad], 1.0).item() == 0.0 and no_grad.grad is None


# --- the comparison harness --------------------------------------------------------------------


def test_optimizer_trajectory_options_do_what_they_say():
    # Idle parameters do not move (plain SGD, no weight decay, reads only .grad).
    path = opt.optimizer_trajectory(lambda ps: torch.optim.SGD(ps, lr=0.1), 10, idle_until={0: 4})
    sizes = [p.numel() for p in opt.toy_problem()[0]]
    w1 = path[:, :sizes[0]]
    assert torch.equal(w1[4], w1[0]) and not torch.equal(w1[5], w1[4])
    # A zero lr factor freezes everything; the loss scale scales plain SGD's steps.
    frozen = opt.optimizer_trajectory(lambda ps: torch.optim.SGD(ps, lr=0.1), 5, lr_factor=lambda s: 0.0)
    assert torch.equal(frozen[-1], frozen[0])
    small = opt.optimizer_trajectory(lambda ps: torch.optim.SGD(ps, lr=0.1), 1, loss_scale=1e-3)
    big = opt.optimizer_trajectory(lambda ps: torch.optim.SGD(ps, lr=0.1), 1)
    torch.testing.assert_close((small[1] - small[0]) * 1e3, big[1] - big[0], rtol=1e-9, atol=1e-15)
    # Reloading a torch optimizer from its state_dict changes nothing.
    plain = opt.optimizer_trajectory(lambda ps: torch.optim.Adam(ps, lr=0.01), 20)
    reloaded = opt.optimizer_trajectory(lambda ps: torch.optim.Adam(ps, lr=0.01), 20, reload_at=9)
    assert torch.equal(plain, reloaded)
