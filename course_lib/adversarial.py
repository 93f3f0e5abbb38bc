"""Adversarial examples: L-infinity attacks on a classifier (chapter 15; chapter 16 trains against them).

An adversarial example is an input changed by a small, deliberately chosen perturbation that
changes the model's answer. Both attacks here maximise the cross-entropy of the true label
inside the L-infinity ball ``{x' : max |x' - x| <= eps}`` (every pixel moves by at most ``eps``):

- :func:`fgsm` (fast gradient sign method, Goodfellow et al. 2015): one step of size ``eps`` in
  the direction of the sign of the loss gradient — the best step of that size if the loss were
  linear in the input.
- :func:`pgd` (projected gradient descent, Madry et al. 2018): many smaller signed steps, each
  followed by a projection back into the ball, from a random start inside it. Stronger than FGSM,
  because the loss is not linear.

Conventions shared by both (and relied on by chapters 15 and 16):

- The model is used as given: the caller puts it in eval mode (dropout and batch norm would
  otherwise change between the attack and the evaluation). Its parameters receive no gradient
  (``torch.autograd.grad`` is taken with respect to the input only), so an attack in the middle
  of a training step does not disturb the step's ``.grad``.
- The loss is the cross-entropy summed over the batch, so each example's gradient is its own
  (a mean would divide it by ``N``: the same sign, but tiny numbers for large batches).
- The result is detached, has the shape, dtype and device of ``x``, lies within ``eps`` of ``x``
  in every element (up to one rounding of ``x +- eps``) and, with ``clamp=(lo, hi)``, inside the
  valid input range too (the clamp is applied after the projection, so both hold).

:func:`correct_under_attack` and :func:`accuracy_under_attack` evaluate a model on attacked
inputs for a list of ``eps`` values: the accuracy-against-eps curve.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Clamp = tuple[float, float] | None
Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor, float], torch.Tensor]


def _check_args(x: torch.Tensor, y: torch.Tensor, eps: float) -> None:
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must hold one class index per example: shape ({x.shape[0]},), "
                         f"got {tuple(y.shape)}")


def loss_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient of the summed cross-entropy ``sum_i CE(model(x)_i, y_i)`` with respect to ``x``.

    Only the input's gradient is computed: the model's parameters get no ``.grad``. The result
    is detached, with the shape and dtype of ``x``.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():  # attacks also run inside no_grad evaluation code
        loss = F.cross_entropy(model(x), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad.detach()


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, clamp: Clamp) -> torch.Tensor:
    """Back into the L-infinity ball of radius ``eps`` around ``x``, then into ``clamp``."""
    x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps)
    if clamp is not None:
        x_adv = x_adv.clamp(clamp[0], clamp[1])
    return x_adv


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
         clamp: Clamp = None) -> torch.Tensor:
    """Fast gradient sign method: ``x + eps * sign(grad_x CE(model(x), y))``, then clamped.

    Args:
        model: a classifier returning logits ``(N, C)``; used as given (put it in eval mode).
        x: inputs ``(N, ...)``, floating point.
        y: true class indices ``(N,)``.
        eps: the L-infinity budget, ``>= 0`` (``0`` returns a copy of ``x``).
        clamp: ``(lo, hi)`` valid input range, or ``None`` for none.

    Returns:
        The adversarial inputs, detached, same shape/dtype/device as ``x``. A pixel whose
        gradient is exactly 0 does not move (``sign(0) = 0``).
    """
    _check_args(x, y, eps)
    x = x.detach()
    x_adv = x + eps * loss_gradient(model, x, y).sign()
    if clamp is not None:
        x_adv = x_adv.clamp(clamp[0], clamp[1])
    return x_adv.detach()


def _random_start(x: torch.Tensor, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    """``x`` plus noise uniform on ``[-eps, eps)`` per element, drawn on the generator's device."""
    device = generator.device if generator is not None else x.device
    noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)
    return x + (2 * noise - 1) * eps


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float,
        steps: int, *, random_start: bool = True, generator: torch.Generator | None = None,
        clamp: Clamp = None) -> torch.Tensor:
    """Projected gradient descent (ascent on the loss) in the L-infinity ball around ``x``.

    Start at ``x`` (or, with ``random_start``, at ``x`` plus uniform noise on ``[-eps, eps)``
    drawn with ``torch.rand(x.shape, generator=generator)``, projected into ``clamp``), then
    ``steps`` times: ``x_adv += step_size * sign(grad)``, project back into the ball
    ``[x - eps, x + eps]`` and into ``clamp``.

    With ``random_start=False``, ``steps=1`` and ``step_size=eps`` this is :func:`fgsm`.
    Returns the last iterate (not the best one seen), detached, same shape/dtype/device as ``x``.
    """
    _check_args(x, y, eps)
    if steps < 0 or step_size < 0:
        raise ValueError(f"steps and step_size must be >= 0, got {steps} and {step_size}")
    x = x.detach()
    x_adv = _random_start(x, eps, generator) if random_start else x.clone()
    x_adv = _project(x_adv, x, eps, clamp)
    for _ in range(steps):
        x_adv = x_adv + step_size * loss_gradient(model, x_adv, y).sign()
        x_adv = _project(x_adv, x, eps, clamp)
    return x_adv.detach()


def pgd_attack(steps: int = 10, step_ratio: float = 2.5, *, random_start: bool = True,
               seed: int = 0, clamp: Clamp = None) -> Attack:
    """:func:`pgd` as an ``attack(model, x, y, eps)`` for :func:`accuracy_under_attack`.

    The step size scales with the budget: ``step_size = step_ratio * eps / steps`` (Madry et al.'s
    rule of thumb: enough to cross the ball 2.5 times). Each call seeds its own generator with
    ``seed``, so the curve is repeatable.
    """
    def attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return pgd(model, x, y, eps, step_ratio * eps / steps, steps, random_start=random_start,
                   generator=generator, clamp=clamp)
    return attack


def fgsm_attack(*, clamp: Clamp = None) -> Attack:
    """:func:`fgsm` as an ``attack(model, x, y, eps)`` for :func:`accuracy_under_attack`."""
    def attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        return fgsm(model, x, y, eps, clamp=clamp)
    return attack


def correct_under_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack,
                         eps: float, batch_size: int | None = None) -> torch.Tensor:
    """Whether each example is still classified correctly after ``attack(model, x, y, eps)``.

    ``eps = 0`` skips the attack (clean accuracy). Works in batches of ``batch_size`` (all at
    once when ``None``). Returns a bool tensor ``(N,)`` on ``x``'s device: its mean is the
    accuracy, its sum the count a Wilson interval needs.
    """
    size = len(x) if batch_size is None else batch_size
    parts = []
    for start in range(0, len(x), max(size, 1)):
        xb, yb = x[start:start + size], y[start:start + size]
        x_adv = xb if eps == 0 else attack(model, xb, yb, eps)
        with torch.no_grad():
            parts.append(model(x_adv).argmax(dim=-1) == yb)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool, device=x.device)


def accuracy_under_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack,
                          eps_values: Sequence[float], batch_size: int | None = None) -> list[float]:
    """Accuracy on ``attack``-ed inputs for each ``eps`` in ``eps_values`` (``0``: clean).

    ``attack(model, x, y, eps)`` is e.g. :func:`fgsm_attack` or :func:`pgd_attack`, or any
    callable of that form. The model is used as given (eval mode is the caller's job).
    """
    return [correct_under_attack(model, x, y, attack, eps, batch_size).float().mean().item()
            for eps in eps_values]
