"""Model selection: cross-validation and hyper-parameter search (chapter 13).

1. :func:`kfold_splits` — ``k`` train/validation index pairs: every example validates once.
2. The search space: a grid of values per hyper-parameter (:func:`log_grid` spaces them on a log
   scale), or ranges to draw from (:func:`sample_config`: log-uniform, uniform or integer).
3. :func:`grid_search` tries every combination, :func:`random_search` a budget of random draws,
   each scoring a configuration with an ``objective`` (a loss: lower is better). With the same
   budget, random search tries as many values of *each* hyper-parameter as it has trials, where a
   grid tries only a few: what wins when one hyper-parameter matters much more than the others.
4. A small task to search on: softmax regression on the digits, scored by its mean validation
   loss over the folds (:func:`softmax_regression_cv`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from itertools import product

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# 1. Cross-validation folds
# ---------------------------------------------------------------------------------------------


def kfold_splits(n: int, k: int, generator: torch.Generator | None = None
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``k`` pairs ``(train_idx, val_idx)`` (int64) over ``n`` examples.

    The order is ``torch.randperm(n, generator=generator)`` (``torch.arange(n)`` without a
    generator), cut into ``k`` consecutive folds whose sizes differ by at most one: the first
    ``n % k`` folds hold ``n // k + 1`` examples, the others ``n // k``. Fold ``i`` validates;
    ``train_idx`` is the other folds joined in fold order.
    """
    if not 2 <= k <= n:
        raise ValueError(f"need 2 <= k <= n, got k={k}, n={n}")
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    folds = list(torch.split(order, sizes))
    return [(torch.cat([f for j, f in enumerate(folds) if j != i]), folds[i].clone()) for i in range(k)]


# ---------------------------------------------------------------------------------------------
# 2.-3. Search spaces and searches
# ---------------------------------------------------------------------------------------------


def sample_config(space: Mapping[str, tuple], generator: torch.Generator) -> dict:
    """One configuration drawn from ``space``: ``name -> (low, high, kind)``.

    For each parameter, in the order of ``space``, one ``u = torch.rand((), generator=generator,
    dtype=torch.float64)``; then ``"log"``: ``exp(log low + u (log high - log low))`` (log-uniform),
    ``"linear"``: ``low + u (high - low)``, ``"int"``: ``low + floor(u (high - low + 1))`` (an int).
    """
    config = {}
    for name, (low, high, kind) in space.items():
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        if kind == "log":
            config[name] = math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
        elif kind == "linear":
            config[name] = low + u * (high - low)
        elif kind == "int":
            config[name] = int(low + math.floor(u * (high - low + 1)))
        else:
            raise ValueError(f"unknown kind {kind!r} for {name!r}: use 'log', 'linear' or 'int'")
    return config


def _best(trials: list[tuple[dict, float]]) -> dict:
    best_config, best_loss = trials[0]
    for config, loss in trials[1:]:
        if loss < best_loss or (math.isnan(best_loss) and not math.isnan(loss)):
            best_config, best_loss = config, loss
    return best_config


def random_search(objective: Callable[[dict], float], space: Mapping[str, tuple], n_trials: int,
                  generator: torch.Generator) -> tuple[dict, list[tuple[dict, float]]]:
    """``n_trials`` configurations from :func:`sample_config`, each scored once by ``objective``
    (a loss: lower is better). Returns ``(best_config, trials)``, ``trials`` the list of
    ``(config, loss)`` in the order drawn; ties go to the earliest trial."""
    trials = []
    for _ in range(n_trials):
        config = sample_config(space, generator)
        trials.append((config, float(objective(config))))
    return _best(trials), trials


def grid_search(objective: Callable[[dict], float], grid: Mapping[str, Sequence]
                ) -> tuple[dict, list[tuple[dict, float]]]:
    """Every combination of the values in ``grid`` (``name -> values``), like :func:`random_search`."""
    names = list(grid)
    trials = []
    for values in product(*(grid[name] for name in names)):
        config = dict(zip(names, values, strict=True))
        trials.append((config, float(objective(config))))
    return _best(trials), trials


def log_grid(low: float, high: float, n: int) -> list[float]:
    """``n`` values evenly spaced on a log scale from ``low`` to ``high``."""
    return [math.exp(math.log(low) + i * (math.log(high) - math.log(low)) / (n - 1)) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# 4. A task to search on
# ---------------------------------------------------------------------------------------------


def train_softmax_regression(x: torch.Tensor, y: torch.Tensor, lr: float, weight_decay: float, steps: int,
                             num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch gradient descent from zero weights, with an
    L2 penalty ``weight_decay / 2 * ||W||^2``: ``(W (d, classes), b (classes,))``."""
    w = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, requires_grad=True)
    b = torch.zeros(num_classes, dtype=x.dtype, requires_grad=True)
    for _ in range(steps):
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * weight_decay * (w * w).sum()
        gw, gb = torch.autograd.grad(loss, (w, b))
        with torch.no_grad():
            w -= lr * gw
            b -= lr * gb
    return w.detach(), b.detach()


def softmax_regression_loss(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> float:
    """Cross-entropy of a fitted model on ``(x, y)``; ``inf`` when the fit diverged."""
    loss = F.cross_entropy(x @ w + b, y).item()
    return loss if math.isfinite(loss) else math.inf


def softmax_regression_cv(x: torch.Tensor, y: torch.Tensor, config: Mapping[str, float],
                          folds: Sequence[tuple[torch.Tensor, torch.Tensor]], steps: int) -> float:
    """Mean validation cross-entropy over ``folds`` of a model trained on each fold's training part
    with ``config["lr"]`` and ``config["weight_decay"]``."""
    losses = []
    for train_idx, val_idx in folds:
        w, b = train_softmax_regression(x[train_idx], y[train_idx], config["lr"], config["weight_decay"],
                                        steps)
        losses.append(softmax_regression_loss(x[val_idx], y[val_idx], w, b))
    return sum(losses) / len(losses)
