"""Regularization, initialization and normalization (chapter 5's reference).

What a network needs to generalise and to train when it is deep:

- :func:`dropout` and :class:`Dropout` — inverted dropout (scale the survivors at training time,
  identity in eval).
- :func:`batch_norm` and :class:`BatchNorm` — batch statistics while training, running statistics
  in eval, with PyTorch's momentum convention and its unbiased running-variance update.
- :func:`layer_norm`, :func:`rms_norm` and :class:`RMSNorm` — per-example normalization (the
  transformer chapters import :class:`RMSNorm`).
- :func:`init_weight` — Xavier (Glorot) and He (Kaiming) initialization; :func:`signal_through_depth`
  measures what initialization does to activations and gradients through many layers.
- :class:`EarlyStopping` — patience and ``min_delta`` on a validation loss.
- :func:`l1_penalty`, :func:`l2_penalty`, :func:`make_mlp`, :func:`init_linear_layers_`,
  :func:`train_regularized` — penalties, models and a training loop with the knobs this chapter
  turns (weight decay, L1, L2, augmentation, early stopping with the best weights restored).
- :func:`random_affine` — data augmentation for small images: random rotation, scale and shift.

Shapes follow PyTorch: a weight of a linear layer is ``(fan_out, fan_in)`` like ``nn.Linear.weight``;
batch normalization takes ``(N, C)`` or ``(N, C, *)`` and normalizes each channel ``C``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.training import History, accuracy, evaluate, train_epochs

# ---------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------


def dropout(x: torch.Tensor, p: float, training: bool = True,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Inverted dropout: zero each element with probability ``p`` and divide the rest by ``1 - p``.

    Dividing at training time keeps the expected value of every element equal to ``x``, so at
    evaluation time (``training=False``) the layer is the identity and needs no rescaling. The
    mask is drawn with ``torch.rand(x.shape, generator=generator)`` on the generator's device (the
    CPU for a CPU generator) and moved to ``x``'s device, so a seeded generator gives the same mask
    everywhere. ``p = 1`` drops everything (zeros, not ``0/0``).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return torch.zeros_like(x)
    uniform = torch.rand(x.shape, generator=generator,
                         device=generator.device if generator is not None else x.device)
    keep = (uniform >= p).to(device=x.device, dtype=x.dtype)
    return x * keep / (1.0 - p)


class Dropout(nn.Module):
    """A dropout layer built on a dropout function (:func:`dropout` by default, or your own with
    the same signature); it follows ``model.train()`` / ``model.eval()``."""

    def __init__(self, p: float, fn: Callable[..., torch.Tensor] | None = None):
        super().__init__()
        self.p = p
        self.fn = fn or dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.p, training=self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# ---------------------------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------------------------


def _channel_view(stat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Shape a per-channel vector ``(C,)`` to broadcast against ``x`` of shape ``(N, C, *)``."""
    return stat.view(1, -1, *([1] * (x.ndim - 2)))


def batch_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
               running_mean: torch.Tensor, running_var: torch.Tensor, training: bool,
               momentum: float = 0.1, eps: float = 1e-5
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch normalization of ``x`` of shape ``(N, C)`` or ``(N, C, *)``, per channel ``C``.

    Returns ``(out, new_running_mean, new_running_var)`` and changes none of its inputs.

    - Training: normalize with the mean and the *biased* variance of the batch (over every axis
      but ``C``), then ``gamma * x_hat + beta``. The running statistics move towards the batch's:
      ``new = (1 - momentum) * running + momentum * batch``, with the *unbiased* variance
      (``n / (n - 1)`` times the biased one, ``n`` values per channel) — exactly ``nn.BatchNorm1d``.
    - Eval: normalize with the running statistics, which come back unchanged.
    """
    if x.ndim < 2 or x.shape[1] != gamma.numel():
        raise ValueError(f"expected x of shape (N, {gamma.numel()}, ...), got {tuple(x.shape)}")
    if training:
        dims = [0, *range(2, x.ndim)]
        count = x.numel() // x.shape[1]
        if count < 2:
            raise ValueError("batch normalization needs more than one value per channel to train")
        mean = x.mean(dim=dims)
        var = ((x - _channel_view(mean, x)) ** 2).mean(dim=dims)
        unbiased = var * count / (count - 1)
        new_mean = (1 - momentum) * running_mean + momentum * mean.detach()
        new_var = (1 - momentum) * running_var + momentum * unbiased.detach()
    else:
        mean, var = running_mean, running_var
        new_mean, new_var = running_mean.clone(), running_var.clone()
    x_hat = (x - _channel_view(mean, x)) / torch.sqrt(_channel_view(var, x) + eps)
    return _channel_view(gamma, x) * x_hat + _channel_view(beta, x), new_mean, new_var


class BatchNorm(nn.Module):
    """A batch-normalization layer built on :func:`batch_norm` (like ``nn.BatchNorm1d``).

    ``norm_fn`` is the function that does the arithmetic: :func:`batch_norm` by default, or your
    own with the same signature.
    """

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5,
                 norm_fn: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.norm_fn = norm_fn or batch_norm
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, new_mean, new_var = self.norm_fn(x, self.weight, self.bias, self.running_mean,
                                              self.running_var, self.training,
                                              momentum=self.momentum, eps=self.eps)
        if self.training:
            with torch.no_grad():  # buffers are state, not part of the graph
                self.running_mean.copy_(new_mean)
                self.running_var.copy_(new_var)
        return out


def _normalized_dims(x: torch.Tensor, normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if tuple(x.shape[x.ndim - len(shape):]) != shape:
        raise ValueError(f"normalized_shape {shape} must match the last dimensions of x "
                         f"{tuple(x.shape)}")
    return tuple(range(x.ndim - len(shape), x.ndim))


def layer_norm(x: torch.Tensor, normalized_shape: int | Sequence[int],
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5) -> torch.Tensor:
    """Layer normalization over the last ``len(normalized_shape)`` dimensions (``F.layer_norm``).

    Each example is normalized with its own mean and biased variance, so the result does not
    depend on the batch. The variance is the mean of squared deviations from the mean, never
    ``E[x^2] - E[x]^2``, which cancels catastrophically when the mean is large against the spread.
    """
    dims = _normalized_dims(x, normalized_shape)
    mean = x.mean(dim=dims, keepdim=True)
    centred = x - mean
    var = (centred ** 2).mean(dim=dims, keepdim=True)
    out = centred / torch.sqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def rms_norm(x: torch.Tensor, normalized_shape: int | Sequence[int],
             weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Root-mean-square normalization (as in LLaMA): ``x / sqrt(mean(x^2) + eps) * weight``.

    Like :func:`layer_norm` without subtracting the mean and without a bias: cheaper, and in
    transformers just as good. Matches ``F.rms_norm`` given the same ``eps``.
    """
    dims = _normalized_dims(x, normalized_shape)
    out = x * torch.rsqrt((x * x).mean(dim=dims, keepdim=True) + eps)
    return out * weight if weight is not None else out


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension of size ``dim``, with a learned scale initialised to 1."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight.shape[0], self.weight, self.eps)


# ---------------------------------------------------------------------------------------------
# Initialization
# ---------------------------------------------------------------------------------------------

INIT_SCHEMES = ("xavier", "he")


def init_std(fan_in: int, fan_out: int, scheme: str) -> float:
    """The standard deviation a scheme asks for: Xavier ``sqrt(2 / (fan_in + fan_out))``,
    He ``sqrt(2 / fan_in)``."""
    if scheme == "xavier":
        return math.sqrt(2.0 / (fan_in + fan_out))
    if scheme == "he":
        return math.sqrt(2.0 / fan_in)
    raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(INIT_SCHEMES)}")


def init_weight(fan_in: int, fan_out: int, scheme: str = "he", distribution: str = "normal",
                generator: torch.Generator | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A weight matrix of shape ``(fan_out, fan_in)`` (like ``nn.Linear.weight``), mean 0.

    ``scheme``: ``"xavier"`` (variance ``2 / (fan_in + fan_out)``, for tanh and linear layers) or
    ``"he"`` (variance ``2 / fan_in``, for ReLU). ``distribution``: ``"normal"`` with that standard
    deviation, or ``"uniform"`` on ``[-a, a]`` with ``a = sqrt(3) * std`` (a uniform distribution
    on ``[-a, a]`` has variance ``a^2 / 3``).
    """
    std = init_std(fan_in, fan_out, scheme)
    if distribution == "normal":
        return torch.randn(fan_out, fan_in, generator=generator, dtype=dtype) * std
    if distribution == "uniform":
        bound = math.sqrt(3.0) * std
        return (torch.rand(fan_out, fan_in, generator=generator, dtype=dtype) * 2 - 1) * bound
    raise ValueError(f"unknown distribution {distribution!r}; choose 'normal' or 'uniform'")


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "linear": lambda z: z,
}


def signal_through_depth(weights: Sequence[torch.Tensor], x: torch.Tensor, activation: str = "relu",
                         keep_layers: Sequence[int] = ()) -> dict[str, Any]:
    """Push ``x`` through ``h <- act(h @ W.T)`` for every ``W`` in ``weights`` (no biases) and
    measure each layer.

    Returns lists with one entry per layer: ``'act_std'`` (the standard deviation of the layer's
    output), ``'act_mean'``, ``'grad_std'`` (the standard deviation of the gradient of
    ``sum(output * r)`` — a fixed random direction ``r`` — with respect to that layer's weight:
    what the optimizer would get), and ``'dead'`` (the fraction of exactly-zero outputs); and
    ``'kept'``: the outputs of the layers numbered (from 1) in ``keep_layers``, on the CPU.
    An exploding signal shows up as ``inf`` or ``nan``.
    """
    act = ACTIVATIONS[activation]
    leaves = [w.detach().clone().requires_grad_(True) for w in weights]
    h = x
    stats: dict[str, Any] = {"act_std": [], "act_mean": [], "dead": [], "kept": {}}
    for number, w in enumerate(leaves, start=1):
        h = act(h @ w.T)
        out = h.detach()
        stats["act_std"].append(out.std().item())
        stats["act_mean"].append(out.mean().item())
        stats["dead"].append((out == 0).float().mean().item())
        if number in keep_layers:
            stats["kept"][number] = out.cpu()
    direction = torch.randn(h.shape, generator=torch.Generator().manual_seed(0), dtype=h.dtype)
    (h * direction.to(h.device)).sum().backward()
    stats["grad_std"] = [w.grad.std().item() for w in leaves]
    return stats


# ---------------------------------------------------------------------------------------------
# Early stopping
# ---------------------------------------------------------------------------------------------


class EarlyStopping:
    """Stop training when the validation loss has not improved for ``patience`` epochs.

    Call :meth:`step` once per epoch with the validation loss; epochs are numbered 0, 1, 2, ...
    in the order of the calls. A loss *improves* when it is below ``best - min_delta`` (strictly);
    then ``best`` and ``best_epoch`` are updated and ``bad_epochs`` goes back to 0. Any other
    loss (equal, worse, better by ``min_delta`` or less, or NaN) adds 1 to ``bad_epochs``.
    :meth:`step` returns ``True`` (stop) once ``bad_epochs >= patience``.
    """

    def __init__(self, patience: int, min_delta: float = 0.0):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta}")
        self.patience, self.min_delta = patience, min_delta
        self.best = math.inf
        self.best_epoch = -1
        self.bad_epochs = 0
        self.epoch = -1

    def step(self, val_loss: float) -> bool:
        """Record one epoch's validation loss; ``True`` when training should stop."""
        self.epoch += 1
        val_loss = float(val_loss)
        if val_loss < self.best - self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = val_loss, self.epoch, 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience


def stopping_epoch(losses: Sequence[float], patience: int, min_delta: float = 0.0,
                   stopper: Callable[..., object] = EarlyStopping) -> tuple[int | None, int]:
    """Feed ``losses`` to a fresh ``stopper(patience, min_delta)`` one epoch at a time.

    Returns ``(stop, best)``: the epoch at which it said stop (``None`` if it never did) and the
    epoch of the best loss seen up to then.
    """
    early = stopper(patience, min_delta)
    for epoch, loss in enumerate(losses):
        if early.step(loss):
            return epoch, early.best_epoch
    return None, early.best_epoch


# ---------------------------------------------------------------------------------------------
# Penalties, models and training with regularization
# ---------------------------------------------------------------------------------------------


def _weights(model: nn.Module) -> list[torch.Tensor]:
    """The weight matrices (and convolution kernels) of ``model``: biases and norm scales are
    conventionally not penalised — they do not make a model more complex."""
    return [p for name, p in model.named_parameters() if p.ndim >= 2 and name.endswith("weight")]


def l2_penalty(model: nn.Module) -> torch.Tensor:
    """``sum of w^2`` over the model's weight matrices (biases excluded)."""
    return sum((w ** 2).sum() for w in _weights(model))


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """``sum of |w|`` over the model's weight matrices (biases excluded)."""
    return sum(w.abs().sum() for w in _weights(model))


def make_mlp(n_in: int, hidden: Sequence[int], n_out: int, *, dropout_p: float = 0.0,
             norm: str | Callable[[int], nn.Module] | None = None, activation: str = "relu",
             dropout_fn: Callable[..., torch.Tensor] | None = None) -> nn.Sequential:
    """``Linear -> [norm] -> activation -> [Dropout]`` per hidden layer, then a linear output.

    ``norm``: ``None``, ``"batch"`` (``nn.BatchNorm1d``), ``"layer"`` (``nn.LayerNorm``), or a
    function of the width that makes the layer (e.g. ``lambda n: BatchNorm(n, norm_fn=mine)``).
    ``activation``: ``"relu"`` or ``"tanh"``. Dropout layers are :class:`Dropout` with
    ``dropout_fn`` (default :func:`dropout`). Weights keep PyTorch's default initialization
    (see :func:`init_linear_layers_` to change it).
    """
    named_norms = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}
    if norm is None or callable(norm):
        make_norm = norm
    elif norm in named_norms:
        make_norm = named_norms[norm]
    else:
        raise ValueError(f"unknown norm {norm!r}; choose None, 'batch', 'layer' or a function")
    acts = {"relu": nn.ReLU, "tanh": nn.Tanh}
    layers: list[nn.Module] = []
    width = n_in
    for size in hidden:
        layers.append(nn.Linear(width, size))
        if make_norm is not None:
            layers.append(make_norm(size))
        layers.append(acts[activation]())
        if dropout_p > 0:
            layers.append(Dropout(dropout_p, dropout_fn))
        width = size
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


@torch.no_grad()
def init_linear_layers_(model: nn.Module, weight_fn: Callable[[int, int], torch.Tensor]) -> nn.Module:
    """In place: every ``nn.Linear`` of ``model`` gets ``weight_fn(fan_in, fan_out)`` (shape
    ``(fan_out, fan_in)``) as its weight and a zero bias. Returns ``model``."""
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            weight = weight_fn(layer.in_features, layer.out_features)
            if tuple(weight.shape) != tuple(layer.weight.shape):
                raise ValueError(f"weight_fn gave shape {tuple(weight.shape)} for a layer "
                                 f"{layer.in_features} -> {layer.out_features}; expected "
                                 f"{tuple(layer.weight.shape)} (fan_out, fan_in)")
            layer.weight.copy_(weight)
            if layer.bias is not None:
                layer.bias.zero_()
    return model


def train_regularized(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor],
                      val: tuple[torch.Tensor, torch.Tensor], *, epochs: int, lr: float = 1e-3,
                      batch_size: int = 64, optimizer: str = "adamw", weight_decay: float = 0.0,
                      l1: float = 0.0, l2: float = 0.0,
                      augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                      early_stopping: object | None = None, restore_best: bool = True,
                      device: torch.device | str | None = None, seed: int = 0,
                      progress: bool = False) -> History:
    """Train a classifier with cross-entropy and the regularizers of this chapter.

    - ``optimizer``: ``"adamw"`` (decoupled ``weight_decay``), ``"adam"`` (``weight_decay`` added
      to the gradient, i.e. L2 inside Adam) or ``"sgd"`` (momentum 0.9).
    - ``l1``, ``l2``: coefficients of :func:`l1_penalty` and :func:`l2_penalty` added to the
      training loss (not to the reported losses, which are plain cross-entropy).
    - ``augment(x_batch, generator)``: transforms each training batch (on the CPU) before use.
    - ``early_stopping``: an object with ``step(val_loss) -> bool`` and ``best_epoch`` (such as
      :class:`EarlyStopping`); training stops when it says so, and with ``restore_best`` the
      weights of its best epoch are put back. ``history.epochs['stopped']`` records the epoch.

    Records ``train_loss``, ``train_accuracy``, ``val_loss`` and ``val_accuracy`` after every
    epoch, all measured in eval mode on the un-augmented data, and ``train_batch_loss``: the mean
    cross-entropy of the epoch's mini-batches as the optimizer saw them (training mode, augmented,
    without the penalties).
    """
    kinds = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
    if optimizer not in kinds:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(kinds)}")
    extra = {"momentum": 0.9} if optimizer == "sgd" else {}
    opt = kinds[optimizer](model.parameters(), lr=lr, weight_decay=weight_decay, **extra)
    penalties = []  # added to the loss the optimizer minimises, one after the other
    if l1:
        penalties.append(lambda m: l1 * l1_penalty(m))
    if l2:
        penalties.append(lambda m: l2 * l2_penalty(m))
    history = History()
    best_state = None
    metrics = {"accuracy": accuracy}
    training = train_epochs(model, train, loss_fn=F.cross_entropy, optimizer=opt, epochs=epochs,
                            batch_size=batch_size, augment=augment, penalties=penalties,
                            device=device, seed=seed, progress=progress)
    for epoch, batch_loss in training:
        history.log(train_batch_loss=batch_loss)
        for split, (x, y) in (("train", train), ("val", val)):
            result = evaluate(model, x, y, F.cross_entropy, metrics)
            history.log(**{f"{split}_{name}": value for name, value in result.items()})
        if early_stopping is not None:
            stop = early_stopping.step(history.last("val_loss"))
            if early_stopping.best_epoch == epoch:
                best_state = copy.deepcopy(model.state_dict())
            if stop:
                history.log(stopped=epoch)
                break
    if early_stopping is not None and restore_best and best_state is not None:
        model.load_state_dict(best_state)
    return history


# ---------------------------------------------------------------------------------------------
# Data augmentation
# ---------------------------------------------------------------------------------------------


def random_affine(x: torch.Tensor, generator: torch.Generator | None = None,
                  max_degrees: float = 10.0, max_shift: float = 0.5, max_scale: float = 0.1,
                  image_shape: tuple[int, int] = (8, 8)) -> torch.Tensor:
    """Randomly rotate, scale and shift a batch of small grey images.

    ``x``: flat images ``(N, H*W)`` (reshaped with ``image_shape``) or ``(N, 1, H, W)``; the
    result has the same shape, dtype and device. Each image gets its own rotation in
    ``[-max_degrees, max_degrees]``, scale in ``[1 - max_scale, 1 + max_scale]`` and shift of up
    to ``max_shift`` pixels along each axis, resampled bilinearly with zeros (background) outside.
    The label of a slightly turned or moved digit is still the same digit: that is what makes it
    a free extra training example.
    """
    flat = x.ndim == 2
    images = x.view(-1, 1, *image_shape) if flat else x
    n, _, height, width = images.shape

    def uniform(limit: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * limit

    angle = uniform(math.radians(max_degrees))
    scale = 1 + uniform(max_scale)
    # affine_grid works in normalized coordinates where the image spans [-1, 1]: a shift of
    # one pixel is 2 / size. The matrix maps output coordinates to input coordinates.
    shift_x, shift_y = uniform(max_shift) * 2 / width, uniform(max_shift) * 2 / height
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift_x], dim=1),
                         torch.stack([sin, cos, shift_y], dim=1)], dim=1)
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(x.shape)
