"""Privacy attacks and differential privacy (chapter 16).

- Membership inference: the loss-threshold attack (Yeom et al., 2018) guesses "member" when a
  model's loss on an example is low. :func:`membership_auc` is its area under the ROC curve over
  every threshold (ties count one half), :func:`roc_curve` the curve itself.
- A stronger attack, LiRA (Carlini et al., 2022): *shadow models* trained the same way on random
  halves of the candidates give, for each example, the distribution of :func:`logit_confidence`
  when it was trained on and when it was not; :func:`lira_scores` is the likelihood ratio of the
  target's value under the two. :func:`dp_tpr_bound` is the most any attack can reach under
  (ε, δ)-DP.
- Memorisation: a *canary* (a made-up secret) is put into the training data and its
  :func:`exposure` (Carlini et al., 2019) measured against random candidates of the same form.
- DP-SGD (Abadi et al., 2016): :func:`per_example_grads` with ``torch.func`` (``vmap`` of
  ``grad``), :func:`clip_and_noise` (each example's gradient clipped to a global L2 norm
  ``max_norm``, summed, Gaussian noise of standard deviation ``noise_multiplier * max_norm``
  added), :func:`dp_sgd_step` and :func:`train_dp_sgd` with Poisson sampling, so that Opacus's RDP
  accountant (:func:`epsilon_spent`) applies to the run as it was made.
- :func:`wilson_interval` for rates measured on few trials.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------
# Membership inference and memorisation
# ---------------------------------------------------------------------------------------------


def membership_auc(member_losses: torch.Tensor, nonmember_losses: torch.Tensor) -> float:
    """AUC of the loss-threshold membership attack: the probability that a random member has a
    lower loss than a random non-member, ties counting one half (the Mann-Whitney statistic)."""
    m = member_losses.double().reshape(-1, 1)
    n = nonmember_losses.double().reshape(1, -1)
    wins = (m < n).double().mean() + 0.5 * (m == n).double().mean()
    return float(wins)


def roc_curve(member_losses: torch.Tensor, nonmember_losses: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fpr, tpr)`` of the attack "member if loss <= t" for every threshold ``t`` at a distinct
    loss, from (0, 0) to (1, 1), float64."""
    losses = torch.cat([member_losses.double(), nonmember_losses.double()])
    thresholds = torch.unique(losses)
    tpr = (member_losses.double()[None, :] <= thresholds[:, None]).double().mean(1)
    fpr = (nonmember_losses.double()[None, :] <= thresholds[:, None]).double().mean(1)
    zero = torch.zeros(1, dtype=torch.float64)
    return torch.cat([zero, fpr]), torch.cat([zero, tpr])


def tpr_at_fpr(member_losses: torch.Tensor, nonmember_losses: torch.Tensor, max_fpr: float) -> float:
    """The highest true-positive rate the attack reaches with a false-positive rate <= ``max_fpr``
    (what matters for an attacker who must be right when they say "member")."""
    fpr, tpr = roc_curve(member_losses, nonmember_losses)
    return float(tpr[fpr <= max_fpr].max())


def auc_interval(member_losses: torch.Tensor, nonmember_losses: torch.Tensor, n_boot: int = 500,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`membership_auc` (members and non-members resampled
    separately, with replacement)."""
    g = torch.Generator().manual_seed(seed)
    reps = []
    for _ in range(n_boot):
        m = member_losses[torch.randint(0, len(member_losses), (len(member_losses),), generator=g)]
        n = nonmember_losses[torch.randint(0, len(nonmember_losses), (len(nonmember_losses),), generator=g)]
        reps.append(membership_auc(m, n))
    low, high = torch.quantile(torch.tensor(reps, dtype=torch.float64),
                               torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(low), float(high)


@torch.no_grad()
def per_example_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each example, float64 on the CPU, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        return F.cross_entropy(model(x.to(device)), y.to(device), reduction="none").double().cpu()
    finally:
        model.train(was_training)


@torch.no_grad()
def logit_confidence(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LiRA's statistic of each example: ``log p_y - log(1 - p_y)`` of its true class, float64 on the
    CPU, in eval mode. Computed from the logits as ``z_y - logsumexp_{j != y} z_j``, which stays
    finite when ``p_y`` rounds to 1 (a loss of 0 in float32 says nothing; this still ranks)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        z = model(x.to(device)).double().cpu()
    finally:
        model.train(was_training)
    true = z.gather(1, y.reshape(-1, 1)).squeeze(1)
    others = z.scatter(1, y.reshape(-1, 1), -math.inf)
    return true - torch.logsumexp(others, dim=1)


def shadow_assignment(n: int, shadows: int, generator: torch.Generator) -> torch.Tensor:
    """``(shadows, n)`` bool: which of ``n`` candidates each shadow model trains on. Every candidate
    is in exactly ``shadows // 2`` shadows' training sets, chosen at random (``shadows`` must be
    even and >= 2), so every candidate has shadows with it and without it."""
    if shadows < 2 or shadows % 2:
        raise ValueError(f"shadows must be even and >= 2, got {shadows}")
    return (torch.rand(n, shadows, generator=generator).argsort(dim=1) < shadows // 2).T.contiguous()


def lira_scores(target_stat: torch.Tensor, shadow_stats: torch.Tensor, shadow_in: torch.Tensor
                ) -> torch.Tensor:
    """The likelihood-ratio attack (LiRA, Carlini et al., 2022): for each candidate, the log of
    ``N(target; mu_in, var_in) / N(target; mu_out, var_out)``. High means member.

    ``target_stat`` ``(n,)`` is the attacked model's :func:`logit_confidence`, ``shadow_stats``
    ``(k, n)`` the shadows', ``shadow_in`` ``(k, n)`` the :func:`shadow_assignment`. The means are
    per candidate (how hard *this* example is, with and without it in training); each variance is
    pooled over the candidates, the "global variance" variant that stays stable with few shadows."""
    stats, inside = shadow_stats.double(), shadow_in.bool()
    fewest = min(int(inside.sum(0).min()), int((~inside).sum(0).min()))
    if fewest < 2:
        raise ValueError(f"LiRA needs every candidate in at least 2 shadows and out of at least 2 (a spread "
                         f"needs two values); one has {fewest}: train 4 or more shadows")

    def fit(mask):
        weight = mask.double()
        mean = (stats * weight).sum(0) / weight.sum(0)
        var = ((stats - mean) ** 2 * weight).sum() / (weight.sum() - weight.shape[1])
        return mean, var

    (mu_in, var_in), (mu_out, var_out) = fit(inside), fit(~inside)
    t = target_stat.double()
    return (-0.5 * (t - mu_in) ** 2 / var_in - 0.5 * torch.log(var_in)
            + 0.5 * (t - mu_out) ** 2 / var_out + 0.5 * torch.log(var_out))


def dp_tpr_bound(fpr: torch.Tensor, epsilon: float, delta: float) -> torch.Tensor:
    """The highest true-positive rate any membership attack can have at false-positive rate ``fpr``
    against an (ε, δ)-DP training algorithm (Kairouz et al., 2015):
    ``min(1, e^ε fpr + δ, 1 - e^-ε (1 - δ - fpr))``."""
    fpr = torch.as_tensor(fpr, dtype=torch.float64)
    if math.isinf(epsilon):
        return torch.ones_like(fpr)
    first = math.exp(epsilon) * fpr + delta
    second = 1 - math.exp(-epsilon) * (1 - delta - fpr)
    return torch.clamp(torch.minimum(first, second), max=1.0)


def train_full_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float,
                     weight_decay: float = 0.0) -> list[float]:
    """Full-batch AdamW on cross-entropy for ``epochs`` steps (no early stopping: with few examples
    and many steps the model memorises them, which is what an attack needs). Returns the losses."""
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    losses = []
    for _ in range(epochs):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def exposure(canary_loss: float, candidate_losses: torch.Tensor) -> float:
    """Exposure of a canary (Carlini et al., 2019), estimated on sampled candidates:
    ``log2(n + 1) - log2(rank)``, where ``rank = 1 +`` the number of the ``n`` candidates whose
    loss is lower than *or equal to* the canary's (ties ranked above it: the cautious choice).
    0 when every candidate beats the canary; ``log2(n + 1)`` when the canary beats them all."""
    rank = 1 + int((candidate_losses.double() <= float(canary_loss)).sum())
    return math.log2(len(candidate_losses) + 1) - math.log2(rank)


# ---------------------------------------------------------------------------------------------
# DP-SGD
# ---------------------------------------------------------------------------------------------


def per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
                      ) -> list[torch.Tensor]:
    """The gradient of each example's loss, one tensor ``(B, *p.shape)`` per trainable parameter
    in ``model.parameters()`` order: ``torch.func.vmap`` of ``torch.func.grad`` over the batch
    (one example at a time, as a batch of one). The model must have no batch-dependent layer
    (no BatchNorm): DP-SGD needs each example's gradient to depend on that example only."""
    from torch.func import functional_call, grad, vmap

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def loss_of(p, xi, yi):
        out = functional_call(model, ({**p}, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    grads = vmap(grad(loss_of), in_dims=(None, 0, 0))(params, x, y)
    return [grads[n] for n in names]


def clip_and_noise(per_example_grads: Sequence[torch.Tensor], max_norm: float, noise_multiplier: float,
                   generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """The noisy sum of clipped per-example gradients, one tensor per parameter.

    ``per_example_grads[k]`` is ``(B, *shape_k)``. Example ``i``'s norm is taken over *all*
    parameters, ``||g_i|| = sqrt(sum_k ||g_i^k||^2)``, and its gradient scaled by
    ``min(1, max_norm / ||g_i||)``. Then, parameter by parameter in list order,
    ``sum_i clipped g_i^k + noise_multiplier * max_norm * torch.randn(shape_k, generator=generator)``
    (drawn in the gradients' dtype and device; no draw when ``noise_multiplier`` is 0).
    """
    norms = torch.sqrt(sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in per_example_grads))
    factor = torch.clamp(max_norm / norms, max=1.0)  # norm 0: inf, clamped to 1
    out = []
    for g in per_example_grads:
        total = (g * factor.reshape(-1, *([1] * (g.dim() - 1))).to(g.dtype)).sum(0)
        if noise_multiplier:
            total = total + noise_multiplier * max_norm * torch.randn(
                g.shape[1:], generator=generator, dtype=g.dtype, device=g.device)
        out.append(total)
    return out


def dp_sgd_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float, max_norm: float,
                noise_multiplier: float, expected_batch_size: float, generator: torch.Generator | None = None,
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
                clip_fn: Callable[..., list[torch.Tensor]] = clip_and_noise) -> None:
    """One DP-SGD step in place: per-example gradients, ``clip_fn`` (:func:`clip_and_noise`, or
    a notebook's own), divided by the *expected* batch size (Opacus's ``loss_reduction="mean"``),
    then plain SGD. An empty batch still takes a step of pure noise (Poisson sampling may draw
    no example)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if len(x):
        grads = clip_fn(per_example_grads(model, x, y, loss_fn), max_norm, noise_multiplier, generator)
    elif noise_multiplier:
        grads = [noise_multiplier * max_norm * torch.randn(p.shape, generator=generator, dtype=p.dtype,
                                                           device=p.device) for p in params]
    else:
        return
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.sub_(lr * g / expected_batch_size)


def poisson_batches(n: int, sample_rate: float, steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Index tensors of ``steps`` batches, each example in each batch independently with
    probability ``sample_rate`` (the sampling the RDP accountant assumes)."""
    return [torch.nonzero(torch.rand(n, generator=generator) < sample_rate).flatten() for _ in range(steps)]


def train_dp_sgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int,
                 lr: float, max_norm: float, noise_multiplier: float, seed: int = 0,
                 clip_fn: Callable[..., list[torch.Tensor]] = clip_and_noise) -> dict:
    """DP-SGD with Poisson sampling at rate ``batch_size / len(x)`` for ``epochs * len(x) //
    batch_size`` steps. Returns ``{"steps", "sample_rate"}`` for :func:`epsilon_spent`."""
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    noise_g = torch.Generator(device=device).manual_seed(seed + 1)
    sample_rate = batch_size / len(x)
    steps = max(1, epochs * len(x) // batch_size)
    model.train()
    for idx in poisson_batches(len(x), sample_rate, steps, g):
        dp_sgd_step(model, x[idx].to(device), y[idx].to(device), lr=lr, max_norm=max_norm,
                    noise_multiplier=noise_multiplier, expected_batch_size=batch_size, generator=noise_g,
                    clip_fn=clip_fn)
    model.eval()
    return {"steps": steps, "sample_rate": sample_rate}


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε of ``steps`` Poisson-sampled Gaussian-mechanism steps at ``(ε, δ)``-DP, from Opacus's RDP
    accountant (``inf`` without noise)."""
    if noise_multiplier <= 0:
        return math.inf
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return float(accountant.get_epsilon(delta=delta))


def opacus_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float, max_norm: float,
                noise_multiplier: float, expected_batch_size: int, generator: torch.Generator | None = None
                ) -> None:
    """The same step as :func:`dp_sgd_step` done by Opacus (``GradSampleModule`` + ``DPOptimizer``
    over plain SGD), for comparison. ``model`` is updated in place."""
    import warnings

    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about secure_mode=False: we want reproducible noise
        wrapped = GradSampleModule(model)
        optimizer = DPOptimizer(torch.optim.SGD(wrapped.parameters(), lr=lr),
                                noise_multiplier=noise_multiplier, max_grad_norm=max_norm,
                                expected_batch_size=expected_batch_size, generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(wrapped(x), y).backward()
        optimizer.step()
        wrapped.to_standard_module()  # hooks removed: the model is plain again


# ---------------------------------------------------------------------------------------------
# Rates on few trials
# ---------------------------------------------------------------------------------------------


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's score interval for ``successes / n`` (95% at ``z = 1.96``), inside [0, 1]."""
    if n <= 0:
        raise ValueError(f"n must be >= 1, got {n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
