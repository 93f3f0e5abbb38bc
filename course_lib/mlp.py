"""A two-layer MLP with backpropagation written by hand (chapter 1's reference).

The network is ``x -> Linear(W1, b1) -> ReLU -> Linear(W2, b2) -> logits`` with a softmax
cross-entropy loss averaged over the batch. Parameters live in a plain dict so every gradient is
visible: ``{'W1': (n_in, n_hidden), 'b1': (n_hidden,), 'W2': (n_hidden, n_out), 'b2': (n_out,)}``.
``x @ W`` (not ``W @ x``): rows are examples.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Params = dict[str, torch.Tensor]


def init_mlp(n_in: int, n_hidden: int, n_out: int, seed: int = 0,
             dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Params:
    """He-initialised weights (right for ReLU), zero biases."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(n_in, n_hidden, generator=g, dtype=dtype) * math.sqrt(2.0 / n_in)
    w2 = torch.randn(n_hidden, n_out, generator=g, dtype=dtype) * math.sqrt(2.0 / n_hidden)
    params = {"W1": w1, "b1": torch.zeros(n_hidden, dtype=dtype),
              "W2": w2, "b2": torch.zeros(n_out, dtype=dtype)}
    return {k: v.to(device) for k, v in params.items()}


def mlp_forward(x: torch.Tensor, params: Params) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits ``(batch, n_out)`` and the cache backprop needs: ``{'x', 'h_pre', 'h'}``."""
    h_pre = x @ params["W1"] + params["b1"]
    h = torch.clamp(h_pre, min=0)
    logits = h @ params["W2"] + params["b2"]
    return logits, {"x": x, "h_pre": h_pre, "h": h}


def softmax_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of integer targets ``y`` and its gradient with respect to ``logits``.

    Stable for any logits: subtracting the row maximum leaves the softmax unchanged and keeps
    ``exp`` from overflowing. The gradient of the mean loss is ``(softmax - one_hot) / batch``.
    """
    shifted = logits - logits.max(dim=1, keepdim=True).values
    log_probs = shifted - torch.log(torch.exp(shifted).sum(dim=1, keepdim=True))
    n = logits.shape[0]
    rows = torch.arange(n, device=logits.device)
    loss = -log_probs[rows, y].mean()
    dlogits = torch.exp(log_probs.detach())
    dlogits[rows, y] -= 1
    return loss, dlogits / n


def mlp_backward(dlogits: torch.Tensor, cache: dict[str, torch.Tensor], params: Params) -> Params:
    """Gradients of the loss for every parameter, given ``dL/dlogits`` and the forward cache."""
    dW2 = cache["h"].T @ dlogits
    db2 = dlogits.sum(dim=0)
    dh = dlogits @ params["W2"].T
    dh_pre = dh * (cache["h_pre"] > 0).to(dh.dtype)
    dW1 = cache["x"].T @ dh_pre
    db1 = dh_pre.sum(dim=0)
    return {"W1": dW1, "b1": db1, "W2": dW2, "b2": db2}


def numerical_gradient(f: Callable[[torch.Tensor], float | torch.Tensor], x: torch.Tensor,
                       eps: float = 1e-6) -> torch.Tensor:
    """Central-difference estimate of the gradient of the scalar function ``f`` at ``x``.

    ``(f(x + eps e_i) - f(x - eps e_i)) / (2 eps)`` for each element ``i``; error O(eps^2). Works
    on a float64 copy so the difference is not lost to rounding; ``x`` is left unchanged.
    """
    # A contiguous copy: view(-1) below must be a view of x itself, whatever x's strides.
    x = x.detach().to(torch.float64).clone(memory_format=torch.contiguous_format)
    grad = torch.zeros_like(x)
    flat, gflat = x.view(-1), grad.view(-1)
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + eps
        plus = float(f(x))
        flat[i] = old - eps
        minus = float(f(x))
        flat[i] = old
        gflat[i] = (plus - minus) / (2 * eps)
    return grad


def relative_error(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-12) -> float:
    """``max |a - b| / max(|a| + |b|)``: the number a gradient check reports (about 1e-7 is good)."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    return ((a - b).abs().max() / torch.clamp((a.abs() + b.abs()).max(), min=floor)).item()


def sgd_step(params: Params, grads: Params, lr: float) -> None:
    """In place: ``p -= lr * grad`` for every parameter."""
    for name, value in params.items():
        value -= lr * grads[name]


def accuracy_of(params: Params, x: torch.Tensor, y: torch.Tensor) -> float:
    """Classification accuracy of the MLP ``params`` on ``(x, y)``."""
    logits, _ = mlp_forward(x, params)
    return (logits.argmax(dim=1) == y).float().mean().item()


def train_mlp(x: torch.Tensor, y: torch.Tensor, n_hidden: int = 64, lr: float = 0.5,
              epochs: int = 30, batch_size: int = 64, seed: int = 0) -> tuple[Params, list[float]]:
    """Mini-batch SGD with the hand-written backward pass; returns parameters and per-step losses."""
    n_out = int(y.max().item()) + 1
    params = init_mlp(x.shape[1], n_hidden, n_out, seed=seed, dtype=x.dtype, device=x.device)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g).to(x.device)
        for start in range(0, len(x), batch_size):
            index = order[start:start + batch_size]
            logits, cache = mlp_forward(x[index], params)
            loss, dlogits = softmax_cross_entropy(logits, y[index])
            sgd_step(params, mlp_backward(dlogits, cache, params), lr)
            losses.append(loss.item())
    return params, losses
