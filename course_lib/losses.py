"""Loss functions written out by hand (chapter 3's reference), for every chapter that trains.

Each loss takes predictions first and targets second, like ``torch.nn.functional``, and matches
the PyTorch built-in it is named after (same formula, same reduction rules), while staying finite
for logits as large as ``+-1e4`` in float32:

- :func:`huber_loss` — quadratic for small residuals, linear for large ones (``F.huber_loss``).
- :func:`bce_with_logits` — binary cross-entropy on logits, with ``pos_weight``
  (``F.binary_cross_entropy_with_logits``).
- :func:`logsumexp`, :func:`log_softmax` — the stable building blocks of softmax models.
- :func:`cross_entropy` — softmax cross-entropy with ``label_smoothing`` and ``ignore_index``
  (``F.cross_entropy``); the language-model chapters train with it.
- :func:`soft_cross_entropy` — cross-entropy against a whole target distribution (label
  smoothing written out, knowledge distillation).
- :func:`entropy` and :func:`fit_categorical` — the maximum-likelihood view: the categorical
  distribution that maximises the likelihood of samples is their frequencies.
- :func:`fit_linear_model` — a linear model fitted by minimising any of these losses (demos).

Conventions: ``reduction`` is ``'mean'`` (the default), ``'sum'`` or ``'none'``; the class
dimension is the **last** one (``(N, C)`` logits with ``(N,)`` targets, or ``(B, T, V)`` with
``(B, T)``). For 2-D logits that is PyTorch's convention too; for more dimensions PyTorch puts the
classes in dimension 1 instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _reduce(per_element: torch.Tensor, reduction: str) -> torch.Tensor:
    _check_reduction(reduction)
    if reduction == "mean":
        return per_element.mean()
    if reduction == "sum":
        return per_element.sum()
    return per_element


def _same_shape(pred: torch.Tensor, target: torch.Tensor, what: str) -> None:
    # Broadcasting a (N, 1) prediction against a (N,) target silently builds an (N, N) matrix of
    # residuals: a classic bug that still trains, badly. Refuse it instead.
    if pred.shape != target.shape:
        raise ValueError(f"{what}: predictions of shape {tuple(pred.shape)} and targets of shape "
                         f"{tuple(target.shape)} differ; reshape one of them")


# ---------------------------------------------------------------------------------------------
# Regression
# ---------------------------------------------------------------------------------------------


def huber_loss(pred: torch.Tensor, target: torch.Tensor, delta: float = 1.0,
               reduction: str = "mean") -> torch.Tensor:
    """Huber loss of the residuals ``r = pred - target``.

    ``0.5 r^2`` where ``|r| <= delta`` and ``delta (|r| - 0.5 delta)`` beyond: the two pieces meet
    with the same value and slope at ``|r| = delta``, so the loss is smooth like MSE near 0 and
    grows only linearly, like MAE, for outliers. Matches ``F.huber_loss``; PyTorch's
    ``smooth_l1_loss`` with ``beta = delta`` is this divided by ``delta``.
    """
    _same_shape(pred, target, "huber_loss")
    if not delta > 0:
        raise ValueError(f"delta must be positive, got {delta}")
    residual = pred - target
    size = residual.abs()
    per_element = torch.where(size <= delta, 0.5 * residual**2, delta * (size - 0.5 * delta))
    return _reduce(per_element, reduction)


# ---------------------------------------------------------------------------------------------
# Binary classification
# ---------------------------------------------------------------------------------------------


def softplus_of_negative(logits: torch.Tensor) -> torch.Tensor:
    """``log(1 + exp(-z)) = -log sigmoid(z)`` without overflow, for any ``z``.

    Written as ``(|z| - z) / 2 + log1p(exp(-|z|))``: the exponent is never positive, and the
    first term is the exact ``max(-z, 0)``. In that form autograd's slope of ``|z|`` at 0 (which
    is 0) gives the right derivative ``-sigmoid(0) = -1/2`` there, where ``clamp(-z, min=0)``
    would give ``-1``.
    """
    size = logits.abs()
    return 0.5 * (size - logits) + torch.log1p(torch.exp(-size))


def bce_with_logits(logits: torch.Tensor, targets: torch.Tensor,
                    pos_weight: torch.Tensor | float | None = None,
                    reduction: str = "mean") -> torch.Tensor:
    """Binary cross-entropy of ``sigmoid(logits)`` against targets in [0, 1] (soft labels allowed).

    Per element ``-(w y log sigmoid(z) + (1 - y) log(1 - sigmoid(z)))`` with ``w = pos_weight``
    (1 when None; a tensor broadcasts over the last dimension, one weight per label). Using
    ``log sigmoid(z) = -softplus(-z)`` and ``log(1 - sigmoid(z)) = -z - softplus(-z)`` it becomes
    ``(1 - y) z + (1 + (w - 1) y) softplus(-z)``, finite for any logit. Matches
    ``F.binary_cross_entropy_with_logits``.
    """
    _same_shape(logits, targets, "bce_with_logits")
    targets = targets.to(logits.dtype)
    if pos_weight is None:
        weight = torch.ones((), dtype=logits.dtype, device=logits.device)
    else:
        weight = torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    per_element = (1 - targets) * logits + (1 + (weight - 1) * targets) * softplus_of_negative(logits)
    return _reduce(per_element, reduction)


# ---------------------------------------------------------------------------------------------
# Multi-class classification
# ---------------------------------------------------------------------------------------------


def logsumexp(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """``log(sum(exp(x)))`` along ``dim``, stable: ``m + log(sum(exp(x - m)))`` with ``m = max``.

    Every exponent is at most 0, so nothing overflows, and the largest term is exactly 1, so the
    log never sees 0. Entries of ``-inf`` (masked logits) contribute nothing; a row that is all
    ``-inf`` gives ``-inf``, like ``torch.logsumexp``.
    """
    top = x.amax(dim=dim, keepdim=True).detach()  # any constant works, so no gradient through it
    # A row of -inf (or one holding +inf) has a maximum we must not subtract (inf - inf = nan).
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    out = top + torch.log(torch.exp(x - top).sum(dim=dim, keepdim=True))
    return out if keepdim else out.squeeze(dim)


def log_softmax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Log-probabilities ``z - logsumexp(z)`` along ``dim``: finite wherever the logit is finite."""
    return logits - logsumexp(logits, dim=dim, keepdim=True)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0,
                  ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Softmax cross-entropy of integer class targets, as ``F.cross_entropy`` computes it.

    Args:
        logits: ``(..., C)`` scores, classes in the last dimension.
        targets: int64 class indices of shape ``logits.shape[:-1]``; positions equal to
            ``ignore_index`` (padding) contribute nothing and are not counted.
        label_smoothing: ``eps`` in [0, 1]: the target is ``(1 - eps) onehot + eps / C``, so the
            per-example loss is ``(1 - eps) (-log p_y) + eps mean_c(-log p_c)``.
        reduction: ``'mean'`` divides the sum by the number of targets **not** ignored (nan
            when every target is ignored, as in PyTorch); ``'sum'``; ``'none'`` gives one loss per
            position, 0 at ignored ones.
    """
    _check_reduction(reduction)
    if logits.ndim < 1 or targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    num_classes = logits.shape[-1]
    keep = targets != ignore_index
    if ((targets < 0) | (targets >= num_classes))[keep].any():
        raise ValueError(f"targets must be class indices in [0, {num_classes}) or ignore_index "
                         f"({ignore_index})")
    log_probs = log_softmax(logits, dim=-1)
    # Ignored positions need *some* valid index to gather; their loss is masked out below.
    safe_targets = torch.where(keep, targets, torch.zeros_like(targets))
    per_position = -log_probs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    if label_smoothing > 0:
        per_position = ((1 - label_smoothing) * per_position
                        - label_smoothing * log_probs.mean(dim=-1))
    per_position = torch.where(keep, per_position, torch.zeros_like(per_position))
    if reduction == "none":
        return per_position
    if reduction == "sum":
        return per_position.sum()
    return per_position.sum() / keep.sum()


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor,
                       reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy ``-sum_c q_c log p_c`` against a target distribution ``q`` over the last dim.

    Label smoothing is this with ``q = (1 - eps) onehot + eps / C``; distillation uses a teacher's
    probabilities as ``q``. Matches ``F.cross_entropy`` with probability targets.
    """
    _same_shape(logits, target_probs, "soft_cross_entropy")
    per_row = -(target_probs.to(logits.dtype) * log_softmax(logits, dim=-1)).sum(dim=-1)
    return _reduce(per_row, reduction)


# ---------------------------------------------------------------------------------------------
# Maximum likelihood
# ---------------------------------------------------------------------------------------------


def entropy(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Entropy ``-sum p log p`` in nats along ``dim``, with ``0 log 0 = 0`` (divide by ln 2 for bits)."""
    return -torch.special.xlogy(probs, probs).sum(dim=dim)


def fit_categorical(samples: torch.Tensor, num_classes: int, alpha: float = 0.0) -> torch.Tensor:
    """The categorical distribution that best explains ``samples``: a float64 ``(num_classes,)``.

    With ``alpha = 0`` it is the maximum-likelihood estimate, the frequencies ``n_c / N``; it also
    minimises the average cross-entropy (negative log-likelihood) of the samples. ``alpha > 0``
    adds ``alpha`` pseudo-counts to every class (additive, or Laplace, smoothing):
    ``(n_c + alpha) / (N + C alpha)``, so that classes never seen keep a non-zero probability.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    flat = samples.reshape(-1).to(torch.int64)
    if flat.numel() and (flat.min() < 0 or flat.max() >= num_classes):
        raise ValueError(f"samples must be class indices in [0, {num_classes})")
    counts = torch.bincount(flat, minlength=num_classes).to(torch.float64)
    total = counts.sum() + num_classes * alpha
    if total == 0:
        raise ValueError("no samples and alpha = 0: the distribution is undefined")
    return (counts + alpha) / total


# ---------------------------------------------------------------------------------------------
# Fitting a linear model with any loss (for the demos)
# ---------------------------------------------------------------------------------------------


def fit_linear_model(x: torch.Tensor, y: torch.Tensor,
                     loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     steps: int = 400, lr: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit ``y ~ x @ weight + bias`` by minimising ``loss_fn(pred, y)`` with full-batch Adam.

    ``x``: ``(N, d)``, ``y``: ``(N,)``. Starts from zero and lets the learning rate fall linearly
    to 0, so that even a loss with a kink (MAE) settles on its minimiser instead of circling it.
    Returns detached ``(weight (d,), bias ())`` in ``x``'s dtype and device.
    """
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"x must be (N, d) and y (N,); got {tuple(x.shape)} and {tuple(y.shape)}")
    weight = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
    bias = torch.zeros((), dtype=x.dtype, device=x.device, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    for _ in range(steps):
        loss = loss_fn(x @ weight + bias, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return weight.detach(), bias.detach()
