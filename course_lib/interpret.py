"""Looking inside a model (chapter 15's reference).

Attributions for an image classifier, each checked against Captum in tests/test_interpret.py:

- :func:`saliency`: ``|d logit_target / d x|`` (Simonyan et al. 2014).
- :func:`integrated_gradients`: the path integral of the gradient from a baseline to the input
  (Sundararajan et al. 2017), approximated by the **midpoint** Riemann rule; its attributions add
  up to ``f(x) - f(baseline)`` (completeness) up to the rule's error.
- :func:`grad_cam`: the channels of a convolutional layer weighted by their mean gradient
  (Selvaraju et al. 2017).

Feature importance by shuffling: :func:`permutation_importance` (Breiman 2001), the drop of a score
when one column is shuffled.

Inside the language model (the course GPT, :mod:`course_lib.gpt`), all through forward hooks, so
the model's code is not changed:

- :func:`residual_stream`: the hidden state after the embeddings and after every block;
  :func:`logit_lens` reads each of them with the model's own final LayerNorm and head.
- :func:`probe_scores`: a linear probe (ridge regression to one-hot labels, closed form), and
  :func:`control_labels`, Hewitt & Liang's control task (a random label per token *type*), which
  tells what a probe can do by memorising token identities alone.
- :func:`patch_run` and :func:`patching_effects`: activation patching (a block's output at one
  position copied from a clean run into a corrupted one).
- :func:`repeated_random_tokens` and :func:`induction_scores`: how much each head attends to the
  token after the previous occurrence of the current token (an induction head).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

# ---------------------------------------------------------------------------------------------
# Attributions for a classifier
# ---------------------------------------------------------------------------------------------


def _target_logit_grad(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``d model(x)[i, target[i]] / d x`` for every example ``i`` (examples are independent)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        picked = logits.gather(1, target.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(picked, x)
    return grad


def saliency(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``|d logit_target / d x|``, shape and dtype of ``x`` (Captum's ``Saliency``, ``abs=True``)."""
    return _target_logit_grad(model, x, target).abs()


def integrated_gradients(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                         baseline: torch.Tensor | None = None, steps: int = 50) -> torch.Tensor:
    """Integrated gradients of ``model(.)[i, target[i]]`` by the midpoint Riemann rule.

    ``IG(x) = (x - b) * (1/steps) * sum_k grad f(b + a_k (x - b))``, ``a_k = (k + 1/2) / steps``,
    ``k = 0 .. steps-1``; ``baseline`` ``b`` defaults to zeros. All ``steps`` points of all
    examples go through the model as one batch. Detached, shape and dtype of ``x``.
    Same as Captum's ``IntegratedGradients(..., method="riemann_middle")`` up to Captum's float32
    ``alphas``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x = x.detach()
    b = torch.zeros_like(x) if baseline is None else baseline.detach().to(x.dtype).expand_as(x)
    alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps
    shape = (steps,) + (1,) * x.ndim
    points = b.unsqueeze(0) + alphas.view(shape) * (x - b).unsqueeze(0)  # (steps, N, ...)
    grads = _target_logit_grad(model, points.flatten(0, 1), target.repeat(steps))
    return ((x - b) * grads.view(points.shape).mean(dim=0)).detach()


def grad_cam(model: nn.Module, layer: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Grad-CAM at ``layer`` (whose output is ``(N, C, H, W)``): ``relu(sum_c w_c A_c)`` with
    ``w_c`` the mean over ``H, W`` of ``d logit_target / d A_c``. Returns ``(N, H, W)``, detached.

    Same as Captum's ``LayerGradCam(model, layer).attribute(x, target, relu_attributions=True)``
    without its channel axis.
    """
    captured: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.enable_grad():
            logits = model(x.detach())
            acts = captured[0]
            (grads,) = torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), acts)
    finally:
        hook.remove()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * acts).sum(dim=1)).detach()


# ---------------------------------------------------------------------------------------------
# Permutation importance
# ---------------------------------------------------------------------------------------------


def permutation_importance(score: Callable[[torch.Tensor, torch.Tensor], float], X: torch.Tensor,
                           y: torch.Tensor, n_repeats: int, generator: torch.Generator) -> torch.Tensor:
    """``(F, n_repeats)`` float64: ``score(X, y) - score(X with column j shuffled, y)``.

    For ``j = 0 .. F-1`` (outer) and ``r = 0 .. n_repeats-1`` (inner), one
    ``torch.randperm(N, generator=generator)`` reorders column ``j`` of a copy of ``X`` (rows of
    the other columns stay in place). ``X`` is not modified. A feature the model ignores scores
    exactly 0; sklearn's ``permutation_importance`` does the same with numpy's shuffles.
    """
    base = float(score(X, y))
    n, n_features = X.shape
    out = torch.empty(n_features, n_repeats, dtype=torch.float64)
    for j in range(n_features):
        for r in range(n_repeats):
            perm = torch.randperm(n, generator=generator)
            shuffled = X.clone()
            shuffled[:, j] = X[perm, j]
            out[j, r] = base - float(score(shuffled, y))
    return out


# ---------------------------------------------------------------------------------------------
# Inside the GPT: the residual stream, the logit lens, probes
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def residual_stream(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The residual stream of the course GPT: ``(n_layer + 1, B, T, n_embd)``.

    Row 0 is the input of the first block (token + position embeddings), row ``l`` the output of
    block ``l - 1``; the last row is what the final LayerNorm reads. Taken with forward hooks.
    """
    states: list[torch.Tensor] = []
    hooks = [model.blocks[0].register_forward_pre_hook(lambda _m, args: states.append(args[0]))]
    hooks += [block.register_forward_hook(lambda _m, _i, out: states.append(out)) for block in model.blocks]
    try:
        model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(states)


@torch.no_grad()
def logit_lens(model: nn.Module, states: torch.Tensor) -> torch.Tensor:
    """Each residual state read as if it were the last: ``lm_head(ln_f(state))`` (nostalgebraist
    2020). ``states`` ``(..., n_embd)`` -> logits ``(..., vocab)``."""
    return model.lm_head(model.ln_f(states))


def probe_scores(h_train: torch.Tensor, y_train: torch.Tensor, h_test: torch.Tensor, num_classes: int,
                 lam: float) -> torch.Tensor:
    """A linear probe fit in closed form: ridge regression of one-hot labels on ``[h, 1]``.

    ``W = (A^T A + lam D)^-1 A^T Y`` with ``A = [h_train, 1]`` ``(N, D+1)``, ``Y`` the one-hot
    ``(N, num_classes)`` labels and ``D = diag(1, ..., 1, 0)`` (the bias is not penalised).
    Returns the test scores ``[h_test, 1] @ W``, ``(N_test, num_classes)`` float64; the predicted
    class is their argmax. Everything in float64.
    """
    a = torch.cat([h_train.double(), h_train.new_ones(len(h_train), 1, dtype=torch.float64)], dim=1)
    targets = torch.nn.functional.one_hot(y_train.long(), num_classes).double()
    penalty = torch.ones(a.shape[1], dtype=torch.float64, device=a.device)
    penalty[-1] = 0.0
    w = torch.linalg.solve(a.T @ a + lam * torch.diag(penalty), a.T @ targets)
    a_test = torch.cat([h_test.double(), h_test.new_ones(len(h_test), 1, dtype=torch.float64)], dim=1)
    return a_test @ w


def control_labels(token_ids: torch.Tensor, labels: torch.Tensor, num_classes: int,
                   generator: torch.Generator) -> dict[int, int]:
    """Hewitt & Liang's control task: one random label per token *type*, drawn (with
    ``torch.multinomial(..., generator=generator)``, in sorted order of the types) from the
    empirical distribution of ``labels``. Returns ``{token id: control label}``; apply it with
    :func:`apply_control`. A probe that does well on it has memorised token identities."""
    types = torch.unique(token_ids)
    freq = torch.bincount(labels.long(), minlength=num_classes).double()
    drawn = torch.multinomial(freq / freq.sum(), len(types), replacement=True, generator=generator)
    return dict(zip(types.tolist(), drawn.tolist(), strict=True))


def apply_control(token_ids: torch.Tensor, table: dict[int, int], num_classes: int,
                  generator: torch.Generator) -> torch.Tensor:
    """Control labels of ``token_ids`` from ``table``; a type not in it (seen only at test time)
    gets a uniform random label (one draw per new type, in sorted order)."""
    new = sorted(set(token_ids.tolist()) - set(table))
    extra = torch.randint(0, num_classes, (len(new),), generator=generator).tolist()
    full = {**table, **dict(zip(new, extra, strict=True))}
    return torch.tensor([full[t] for t in token_ids.tolist()], dtype=torch.long)


_SPEAKER = re.compile(r"^[A-Z][A-Za-z' -]{0,30}\.$")


def speaker_spans(text: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the speaker headings of a cleaned play: a line after a
    blank line (or at the start) that is a short capitalised name ending in a full stop, like
    ``Romeo.`` or ``First Citizen.``."""
    spans, start, previous_blank = [], 0, True
    for line in text.split("\n"):
        if previous_blank and _SPEAKER.match(line):
            spans.append((start, start + len(line)))
        previous_blank = line.strip() == ""
        start += len(line) + 1
    return spans


def speaker_token_labels(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and, per token, 1 when the token's first byte lies inside a speaker
    heading (:func:`speaker_spans`), else 0. Byte-level tokens: offsets are counted in UTF-8 bytes."""
    ids = tokenizer.encode(text)
    inside = bytearray()
    marks = [0] * len(text)
    for begin, end in speaker_spans(text):
        marks[begin:end] = [1] * (end - begin)
    for char, mark in zip(text, marks, strict=True):
        inside += bytes([mark]) * len(char.encode("utf-8"))
    labels, offset = [], 0
    for token in ids:
        labels.append(int(inside[offset]) if offset < len(inside) else 0)
        offset += len(tokenizer.token_bytes(token))
    return ids, labels


# ---------------------------------------------------------------------------------------------
# Activation patching
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def patch_run(model: nn.Module, clean_ids: torch.Tensor, corrupt_ids: torch.Tensor, layer: int,
              position: int) -> torch.Tensor:
    """Logits ``(B, T, vocab)`` of the corrupted run with block ``layer``'s output at
    ``position`` replaced by the clean run's (same shapes; the hooks are removed afterwards)."""
    block = model.blocks[layer]
    saved: list[torch.Tensor] = []
    hook = block.register_forward_hook(lambda _m, _i, out: saved.append(out))
    try:
        model(clean_ids)
    finally:
        hook.remove()

    def patch(_m, _i, out):
        out = out.clone()
        out[:, position] = saved[0][:, position]
        return out

    hook = block.register_forward_hook(patch)
    try:
        logits, _ = model(corrupt_ids)
    finally:
        hook.remove()
    return logits


@torch.no_grad()
def patching_effects(model: nn.Module, clean_ids: torch.Tensor, corrupt_ids: torch.Tensor,
                     metric: Callable[[torch.Tensor], float],
                     layers: Sequence[int] | None = None) -> torch.Tensor:
    """``metric(patched logits)`` for every block ``layer`` (rows) and position (columns),
    normalised so that 0 is the corrupted run's metric and 1 the clean run's."""
    layers = range(len(model.blocks)) if layers is None else layers
    clean, corrupt = metric(model(clean_ids)[0]), metric(model(corrupt_ids)[0])
    grid = torch.tensor([[metric(patch_run(model, clean_ids, corrupt_ids, layer, pos))
                          for pos in range(clean_ids.shape[1])] for layer in layers], dtype=torch.float64)
    return (grid - corrupt) / (clean - corrupt)


# ---------------------------------------------------------------------------------------------
# Induction heads
# ---------------------------------------------------------------------------------------------


def repeated_random_tokens(batch: int, period: int, vocab: int, generator: torch.Generator,
                           prefix: Sequence[int] = ()) -> torch.Tensor:
    """``(batch, len(prefix) + 2 * period)`` int64: ``prefix``, then ``period`` random ids from
    ``[0, vocab)``, then the same ``period`` ids again. Only the repeat makes the second half
    predictable."""
    first = torch.randint(0, vocab, (batch, period), generator=generator)
    head = torch.tensor(list(prefix), dtype=torch.long).expand(batch, len(prefix))
    return torch.cat([head, first, first], dim=1)


def induction_scores(weights: torch.Tensor, period: int, start: int = 0) -> torch.Tensor:
    """Mean attention from each query ``t`` of the repeat to key ``t - period + 1`` (the token
    that followed this token's previous occurrence), per layer and head: ``weights`` is
    ``(L, B, H, T, T)`` (``GPT.attention_weights``) for :func:`repeated_random_tokens` with a
    prefix of ``start`` tokens; returns ``(L, H)``."""
    queries = torch.arange(start + period, start + 2 * period, device=weights.device)
    picked = weights[..., queries, queries - period + 1]  # (L, B, H, period)
    return picked.mean(dim=(1, 3))


def previous_token_scores(weights: torch.Tensor) -> torch.Tensor:
    """Mean attention from each query ``t >= 1`` to key ``t - 1``, per layer and head: ``(L, H)``."""
    t = torch.arange(1, weights.shape[-1], device=weights.device)
    return weights[..., t, t - 1].mean(dim=(1, 3))
