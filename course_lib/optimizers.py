"""Optimizers, learning-rate schedules and gradient clipping (chapter 4's reference).

- 2-D loss landscapes (:data:`LANDSCAPES`: an ill-conditioned quadratic, the same quadratic
  rotated, Rosenbrock's valley) with analytic gradients, the classic optimizers
  (:data:`OPTIMIZERS`) with a learning rate that suits each landscape (:data:`GOOD_LRS`), paths
  across them (:func:`trajectory`), learning-rate sweeps (:func:`final_losses`) and a contour plot
  (:func:`plot_landscape`).
- :class:`SGD` (momentum, Nesterov, L2 weight decay) and :class:`Adam` (bias correction, L2 or
  decoupled weight decay = AdamW) as ``torch.optim.Optimizer`` subclasses whose updates match
  ``torch.optim.SGD``, ``torch.optim.Adam`` and ``torch.optim.AdamW``.
- Schedules as plain functions ``step -> lr``: :func:`step_lr`, :func:`exponential_lr`,
  :func:`warmup_cosine_lr`.
- :func:`clip_grad_norm_`, the global-norm clipping of ``torch.nn.utils.clip_grad_norm_``.
- :func:`optimizer_trajectory`: run any optimizer on a small seeded problem and record the
  parameters after every step, so two optimizers can be compared step by step
  (:func:`course_lib.checks.check_trajectory` reports the first step at which they part).

Conventions: ``step`` counts the optimizer updates already taken, so ``lr(step)`` is the learning
rate of update number ``step + 1``; this is what ``torch.optim.lr_scheduler.LambdaLR`` passes to
its function when ``scheduler.step()`` is called once after every ``optimizer.step()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch

Params = Iterable[torch.Tensor] | Iterable[dict]
MakeOptimizer = Callable[..., torch.optim.Optimizer]

# ---------------------------------------------------------------------------------------------
# 2-D landscapes
# ---------------------------------------------------------------------------------------------

# The quadratic's curvatures: 1 along one axis, 20 along the other (condition number 20).
CURVATURES = (1.0, 20.0)
_ANGLE = math.pi / 4
_ROTATION = torch.tensor([[math.cos(_ANGLE), -math.sin(_ANGLE)],
                          [math.sin(_ANGLE), math.cos(_ANGLE)]], dtype=torch.float64)


def _quadratic(p: torch.Tensor) -> torch.Tensor:
    return 0.5 * (CURVATURES[0] * p[..., 0] ** 2 + CURVATURES[1] * p[..., 1] ** 2)


def _quadratic_grad(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([CURVATURES[0] * p[..., 0], CURVATURES[1] * p[..., 1]], dim=-1)


def _rotated(p: torch.Tensor) -> torch.Tensor:
    # The same bowl turned by 45 degrees: its axes no longer line up with the coordinates.
    return p @ _ROTATION.to(p.dtype).T


def _rotated_quadratic(p: torch.Tensor) -> torch.Tensor:
    return _quadratic(_rotated(p))


def _rotated_quadratic_grad(p: torch.Tensor) -> torch.Tensor:
    return _quadratic_grad(_rotated(p)) @ _ROTATION.to(p.dtype)


def _rosenbrock(p: torch.Tensor) -> torch.Tensor:
    x, y = p[..., 0], p[..., 1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def _rosenbrock_grad(p: torch.Tensor) -> torch.Tensor:
    x, y = p[..., 0], p[..., 1]
    return torch.stack([-2 * (1 - x) - 400 * x * (y - x**2), 200 * (y - x**2)], dim=-1)


@dataclass(frozen=True)
class Landscape:
    """A loss surface over the plane: ``f`` and its ``gradient`` map points ``(..., 2)`` to
    values ``(...)`` and gradients ``(..., 2)``; paths start at ``start``; ``minimum`` is where
    ``f`` is 0, its lowest value."""

    name: str
    f: Callable[[torch.Tensor], torch.Tensor]
    gradient: Callable[[torch.Tensor], torch.Tensor]
    start: tuple[float, float]
    minimum: tuple[float, float]
    xlim: tuple[float, float]
    ylim: tuple[float, float]


LANDSCAPES: dict[str, Landscape] = {
    "quadratic": Landscape("quadratic", _quadratic, _quadratic_grad, start=(-4.5, 1.5),
                           minimum=(0.0, 0.0), xlim=(-5.0, 2.0), ylim=(-2.0, 2.0)),
    # The same start turned with the bowl, so that rotation-blind methods (GD, momentum) walk
    # exactly the same path, turned, and reach exactly the same losses.
    "rotated quadratic": Landscape("rotated quadratic", _rotated_quadratic,
                                   _rotated_quadratic_grad,
                                   start=tuple((_ROTATION.T @ torch.tensor(
                                       [-4.5, 1.5], dtype=torch.float64)).tolist()),
                                   minimum=(0.0, 0.0), xlim=(-5.0, 3.0), ylim=(-2.5, 5.0)),
    "rosenbrock": Landscape("rosenbrock", _rosenbrock, _rosenbrock_grad, start=(-1.2, 1.0),
                            minimum=(1.0, 1.0), xlim=(-2.0, 2.0), ylim=(-1.0, 3.0)),
}


def _landscape(landscape: Landscape | str) -> Landscape:
    if isinstance(landscape, Landscape):
        return landscape
    if landscape not in LANDSCAPES:
        raise KeyError(f"unknown landscape {landscape!r}; choose one of {', '.join(LANDSCAPES)}")
    return LANDSCAPES[landscape]


# The classic optimizers, as factories ``make(params, lr) -> torch.optim.Optimizer``.
OPTIMIZERS: dict[str, MakeOptimizer] = {
    "GD": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "momentum": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "Nesterov": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True),
    "Adagrad": lambda params, lr: torch.optim.Adagrad(params, lr=lr),
    "Adadelta": lambda params, lr: torch.optim.Adadelta(params, lr=lr),
    "RMSProp": lambda params, lr: torch.optim.RMSprop(params, lr=lr),
    "Adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
}


# A learning rate that works well for each optimizer on each landscape over a few hundred
# steps, read off the sweeps of chapter 4 (final loss against lr): not the edge of stability,
# where the best final loss often sits, but a value a little below it.
GOOD_LRS: dict[str, dict[str, float]] = {
    "quadratic": {"GD": 0.05, "momentum": 0.01, "Nesterov": 0.02, "Adagrad": 1.0,
                  "Adadelta": 10.0, "RMSProp": 0.03, "Adam": 0.3},
    "rotated quadratic": {"GD": 0.05, "momentum": 0.01, "Nesterov": 0.02, "Adagrad": 3.0,
                          "Adadelta": 10.0, "RMSProp": 0.03, "Adam": 0.3},
    "rosenbrock": {"GD": 0.002, "momentum": 0.001, "Nesterov": 0.001, "Adagrad": 0.5,
                   "Adadelta": 10.0, "RMSProp": 0.01, "Adam": 0.1},
}


def _make(optimizer: str | MakeOptimizer) -> MakeOptimizer:
    if callable(optimizer):
        return optimizer
    if optimizer not in OPTIMIZERS:
        raise KeyError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[optimizer]


def trajectory(optimizer: str | MakeOptimizer, landscape: Landscape | str, lr: float,
               steps: int, start: Sequence[float] | None = None,
               clip: Callable[[list[torch.Tensor]], object] | None = None) -> torch.Tensor:
    """The path of ``optimizer`` (a name in :data:`OPTIMIZERS` or ``make(params, lr)``) on a
    landscape: a float64 tensor ``(k + 1, 2)``, the start and the point after each of the ``k``
    steps. ``k = steps`` unless the path leaves the float range, where it stops at the first
    non-finite point. ``clip([point])``, when given, runs between the gradient and the step
    (e.g. ``lambda ps: clip_grad_norm_(ps, 10.0)``)."""
    land = _landscape(landscape)
    point = torch.tensor(land.start if start is None else start, dtype=torch.float64)
    point.requires_grad_(True)
    opt = _make(optimizer)([point], lr)
    path = [point.detach().clone()]
    for _ in range(steps):
        with torch.no_grad():
            # Optimizers only ever read .grad: how it got there (autograd or a formula) does not
            # matter, and the formula is several times faster than a backward pass.
            point.grad = land.gradient(point)
        if clip is not None:
            clip([point])
        opt.step()
        path.append(point.detach().clone())
        if not torch.isfinite(path[-1]).all():
            break
    return torch.stack(path)


def final_losses(optimizer: str | MakeOptimizer, landscape: Landscape | str,
                 lrs: Sequence[float], steps: int) -> torch.Tensor:
    """The loss after ``steps`` steps for each learning rate in ``lrs`` (``inf`` where the run
    diverged), float64 ``(len(lrs),)``.

    All runs share one optimizer, one parameter group per learning rate: the groups never
    interact, and one step then moves every run at once.
    """
    land = _landscape(landscape)
    points = [torch.tensor(land.start, dtype=torch.float64, requires_grad=True) for _ in lrs]
    groups = [{"params": [p], "lr": float(lr)} for p, lr in zip(points, lrs, strict=True)]
    opt = _make(optimizer)(groups, float(lrs[0]))
    for _ in range(steps):
        with torch.no_grad():
            grads = land.gradient(torch.stack(points))
        for p, g in zip(points, grads, strict=True):
            p.grad = g
        opt.step()
    with torch.no_grad():
        losses = land.f(torch.stack(points))
    return torch.where(torch.isfinite(losses), losses, torch.full_like(losses, math.inf))


def plot_landscape(landscape: Landscape | str, paths: dict[str, torch.Tensor] | None = None,
                   ax: plt.Axes | None = None, title: str | None = None,
                   resolution: int = 150) -> plt.Axes:
    """Contour lines of the landscape (log-spaced levels), its minimum as a star, and each path
    of ``paths`` (label -> ``(k, 2)`` points) as a line with its end marked."""
    land = _landscape(landscape)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4.5))
    xs = torch.linspace(*land.xlim, resolution, dtype=torch.float64)
    ys = torch.linspace(*land.ylim, resolution, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    values = land.f(torch.stack([gx, gy], dim=-1)).numpy()
    levels = np.logspace(-3, np.log10(values.max()), 25)
    ax.contour(gx.numpy(), gy.numpy(), values, levels=levels, cmap="Greys", linewidths=0.6,
               alpha=0.7)
    ax.plot(*land.minimum, marker="*", color="gold", markersize=14, markeredgecolor="k",
            zorder=5, label="minimum")
    for label, path in (paths or {}).items():
        pts = path.detach().cpu().double()
        pts = pts[torch.isfinite(pts).all(dim=1)]
        (line,) = ax.plot(pts[:, 0].numpy(), pts[:, 1].numpy(), marker=".", markersize=3,
                          linewidth=1.2, label=label)
        ax.plot(pts[-1, 0].item(), pts[-1, 1].item(), marker="o", color=line.get_color(),
                markersize=6, markeredgecolor="k")
    ax.set_xlim(*land.xlim)
    ax.set_ylim(*land.ylim)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(title or land.name)
    return ax


# ---------------------------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------------------------


def _loss_of(closure: Callable[[], torch.Tensor] | None) -> torch.Tensor | None:
    """The loss the optional ``closure`` of ``step`` returns, computed with gradients enabled
    (``step`` itself runs under ``torch.no_grad()``)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class SGD(torch.optim.Optimizer):
    """Stochastic gradient descent with momentum, Nesterov momentum and L2 weight decay.

    Matches ``torch.optim.SGD(params, lr, momentum, nesterov=..., weight_decay=...)`` (no
    dampening). For every parameter with a gradient, with ``g = grad + weight_decay * p``:

    - no momentum: ``p -= lr * g``;
    - momentum ``mu``: ``buf = g`` on the first step, ``buf = mu * buf + g`` afterwards, then
      ``p -= lr * buf``, or ``p -= lr * (g + mu * buf)`` with ``nesterov=True``.
    """

    def __init__(self, params: Params, lr: float, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr, momentum and weight_decay must be >= 0, got lr={lr}, "
                             f"momentum={momentum}, weight_decay={weight_decay}")
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": nesterov,
                                  "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = _loss_of(closure)
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:  # not used in this step: leave it and its state alone
                    continue
                g = p.grad + wd * p if wd else p.grad
                if mu:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = g.clone()
                    else:
                        state["momentum_buffer"].mul_(mu).add_(g)
                    buf = state["momentum_buffer"]
                    g = g + mu * buf if group["nesterov"] else buf
                p.sub_(lr * g)
        return loss


class Adam(torch.optim.Optimizer):
    """Adam with bias correction, and weight decay either as an L2 term added to the gradient
    (``torch.optim.Adam``) or decoupled from it (``decoupled_weight_decay=True``: AdamW,
    ``torch.optim.AdamW``).

    For every parameter with a gradient ``g``, with its own step count ``t`` (1 on its first
    update): L2: ``g = g + wd * p``; decoupled: ``p *= 1 - lr * wd`` first. Then
    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
    ``p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``.
    """

    def __init__(self, params: Params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0,
                 decoupled_weight_decay: bool = False) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got lr={lr}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps,
                                  "weight_decay": weight_decay,
                                  "decoupled_weight_decay": decoupled_weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = _loss_of(closure)
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = (group["lr"], group["betas"], group["eps"],
                                           group["weight_decay"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    # Each parameter counts its own steps: one that joins late (its gradient was
                    # None so far) starts its bias correction from 1.
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                g = p.grad
                if wd and group["decoupled_weight_decay"]:
                    p.mul_(1 - lr * wd)
                elif wd:
                    g = g + wd * p
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_((1 - beta1) * g)
                v.mul_(beta2).add_((1 - beta2) * g * g)
                m_hat = m / (1 - beta1**t)
                v_hat = v / (1 - beta2**t)
                p.sub_(lr * m_hat / (v_hat.sqrt() + eps))
        return loss


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules: step -> lr
# ---------------------------------------------------------------------------------------------


def _check_step(step: int) -> None:
    if step < 0:
        raise ValueError(f"step counts the updates already taken and cannot be negative, got {step}")


def step_lr(step: int, base_lr: float, step_size: int, gamma: float = 0.1) -> float:
    """``base_lr * gamma ** (step // step_size)``: multiply by ``gamma`` every ``step_size`` steps
    (``torch.optim.lr_scheduler.StepLR``)."""
    _check_step(step)
    if step_size < 1:
        raise ValueError(f"step_size must be >= 1, got {step_size}")
    return base_lr * gamma ** (step // step_size)


def exponential_lr(step: int, base_lr: float, gamma: float) -> float:
    """``base_lr * gamma ** step`` (``torch.optim.lr_scheduler.ExponentialLR``)."""
    _check_step(step)
    return base_lr * gamma**step


def warmup_cosine_lr(step: int, base_lr: float, warmup_steps: int, total_steps: int,
                     min_lr: float = 0.0) -> float:
    """Linear warmup, then cosine decay to ``min_lr``; ``step`` = updates already taken.

    - ``step < warmup_steps``: ``base_lr * (step + 1) / (warmup_steps + 1)`` — a straight line
      from 0 (at step -1) to ``base_lr`` (at step ``warmup_steps``); no update gets lr 0.
    - ``warmup_steps <= step <= total_steps``: with ``progress = (step - warmup_steps) /
      (total_steps - warmup_steps)`` from 0 to 1,
      ``min_lr + (base_lr - min_lr) * (1 + cos(pi * progress)) / 2``: exactly ``base_lr`` at
      ``step == warmup_steps`` and exactly ``min_lr`` at ``step == total_steps``.
    - ``step > total_steps``: ``min_lr``.

    Raises:
        ValueError: for ``step < 0`` or unless ``0 <= warmup_steps < total_steps``.
    """
    _check_step(step)
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"need 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps},"
                         f" total_steps={total_steps}")
    if step < warmup_steps:
        return base_lr * (step + 1) / (warmup_steps + 1)
    if step >= total_steps:
        return float(min_lr)
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# Gradient clipping
# ---------------------------------------------------------------------------------------------


def clip_grad_norm_(parameters: torch.Tensor | Iterable[torch.Tensor], max_norm: float,
                    norm_type: float = 2.0) -> torch.Tensor:
    """Scale all gradients together so that their joint norm is at most ``max_norm``; in place.

    The total norm is that of all gradients concatenated into one vector (parameters whose
    ``.grad`` is None are skipped). When it exceeds ``max_norm`` every gradient is multiplied by
    ``max_norm / (total_norm + 1e-6)``, so the direction of the update is kept. Returns the
    total norm *before* clipping as a 0-d tensor (0 when there is no gradient), like
    ``torch.nn.utils.clip_grad_norm_``. ``norm_type`` may be any p >= 1 or ``math.inf``.
    """
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    if norm_type == math.inf:
        total = torch.stack([g.detach().abs().max() for g in grads]).max()
    else:
        total = sum((g.detach().abs() ** norm_type).sum() for g in grads) ** (1.0 / norm_type)
    coef = max_norm / (total.item() + 1e-6)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total


# ---------------------------------------------------------------------------------------------
# Comparing optimizers step by step
# ---------------------------------------------------------------------------------------------


def toy_problem(seed: int = 0, dtype: torch.dtype = torch.float64, n: int = 24, n_in: int = 4,
                n_hidden: int = 6, n_out: int = 3
                ) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], torch.Tensor]]:
    """A small smooth regression problem: parameters ``[W1, b1, W2, b2]`` of a tanh MLP and
    ``loss(params)``, the mean squared error on fixed random data. Seeded, so two optimizers can
    start from exactly the same point."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g, dtype=dtype)
    y = torch.randn(n, n_out, generator=g, dtype=dtype)
    params = [torch.randn(n_in, n_hidden, generator=g, dtype=dtype) / math.sqrt(n_in),
              0.1 * torch.randn(n_hidden, generator=g, dtype=dtype),
              torch.randn(n_hidden, n_out, generator=g, dtype=dtype) / math.sqrt(n_hidden),
              0.1 * torch.randn(n_out, generator=g, dtype=dtype)]

    def loss(ps: list[torch.Tensor]) -> torch.Tensor:
        w1, b1, w2, b2 = ps
        return ((torch.tanh(x @ w1 + b1) @ w2 + b2 - y) ** 2).mean()

    return params, loss


def optimizer_trajectory(make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
                         steps: int, *, seed: int = 0, dtype: torch.dtype = torch.float64,
                         lr_factor: Callable[[int], float] | None = None,
                         idle_until: dict[int, int] | None = None,
                         reload_at: int | None = None, loss_scale: float = 1.0) -> torch.Tensor:
    """Run ``make_optimizer(params)`` for ``steps`` steps on :func:`toy_problem` and return every
    parameter after every step: ``(steps + 1, n_params)`` in ``dtype`` (row 0 is the start).

    ``make_optimizer`` gets the list ``[W1, b1, W2, b2]`` and may build parameter groups from it.
    Options that exercise what a real training run does to an optimizer:

    - ``lr_factor(step)``: before each step, set every group's lr to its initial lr times this
      (a schedule that changes the lr between steps);
    - ``idle_until={i: k}``: parameter ``i`` has no gradient (``.grad`` is None) for steps
      ``0..k-1`` and joins later;
    - ``reload_at=k``: before step ``k``, build a new optimizer and load the old one's
      ``state_dict()`` (resuming from a checkpoint);
    - ``loss_scale``: multiply the loss (so every gradient) by this, e.g. 1e-9 for tiny gradients.
    """
    start, loss_fn = toy_problem(seed, dtype)
    params = [p.clone().requires_grad_(True) for p in start]
    opt = make_optimizer(params)
    initial_lrs = [group["lr"] for group in opt.param_groups]
    snapshots = [torch.cat([p.detach().reshape(-1) for p in params]).clone()]
    for step in range(steps):
        if reload_at is not None and step == reload_at:
            saved = opt.state_dict()
            opt = make_optimizer(params)
            opt.load_state_dict(saved)
        if lr_factor is not None:
            for group, lr in zip(opt.param_groups, initial_lrs, strict=True):
                group["lr"] = lr * lr_factor(step)
        opt.zero_grad(set_to_none=True)
        (loss_fn(params) * loss_scale).backward()
        for index, until in (idle_until or {}).items():
            if step < until:
                params[index].grad = None
        opt.step()
        snapshots.append(torch.cat([p.detach().reshape(-1) for p in params]).clone())
    return torch.stack(snapshots)
