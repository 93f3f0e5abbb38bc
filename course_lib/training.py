"""A small, readable training loop for the early chapters.

It is what students write by hand in chapter 1, packaged so later chapters can focus on their
topic: mini-batches, the device, a ``tqdm.auto`` progress bar and a :class:`History` to plot.
:func:`train_epochs` is the loop itself, the only one of the early chapters: :func:`fit` here,
``cnn.train_classifier`` and ``regularization.train_regularized`` only choose what it does per
batch (augmentation, penalties, a learning-rate schedule) and what they measure between epochs.
The language-model chapters use their own trainer with mixed precision and checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from course_lib.device import get_device

Metric = Callable[[torch.Tensor, torch.Tensor], float]


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of rows whose arg-max class equals the target."""
    return (logits.argmax(dim=-1) == targets).float().mean().item()


@dataclass
class History:
    """Per-epoch records of a run: ``epochs['train_loss']``, ``epochs['val_loss']``, metrics, and
    the loss of every optimisation step in ``steps``."""

    epochs: dict[str, list[float]] = field(default_factory=dict)
    steps: list[float] = field(default_factory=list)

    def log(self, **values: float) -> None:
        for key, value in values.items():
            self.epochs.setdefault(key, []).append(float(value))

    def last(self, key: str) -> float:
        """The latest value recorded under ``key``."""
        if not self.epochs.get(key):
            raise KeyError(f"nothing recorded under {key!r}; recorded: {sorted(self.epochs)}")
        return self.epochs[key][-1]


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = True,
            generator: torch.Generator | None = None) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` mini-batches; the last one may be smaller."""
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
    for start in range(0, len(x), batch_size):
        index = order[start:start + batch_size]
        yield x[index], y[index]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable,
             metrics: dict[str, Metric] | None = None, batch_size: int = 1024,
             device: torch.device | None = None) -> dict[str, float]:
    """Mean loss (and metrics) of ``model`` over ``(x, y)``, in eval mode, without gradients."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    try:
        for xb, _ in batches(x, y, batch_size, shuffle=False):
            outputs.append(model(xb.to(device)))
    finally:
        model.train(was_training)
    logits = torch.cat(outputs)
    targets = y.to(device)
    result = {"loss": float(loss_fn(logits, targets))}
    for name, metric in (metrics or {}).items():
        result[name] = float(metric(logits, targets))
    return result


def train_epochs(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], *,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 optimizer: torch.optim.Optimizer, epochs: int, batch_size: int = 64,
                 augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                 penalties: Sequence[Callable[[nn.Module], torch.Tensor]] = (),
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                 step_losses: list[float] | None = None, device: torch.device | str | None = None,
                 seed: int = 0, progress: bool = True) -> Iterator[tuple[int, float]]:
    """The training loop of the early chapters, one epoch at a time.

    A generator: after each pass over ``train = (x, y)`` in shuffled mini-batches it yields
    ``(epoch, mean_loss)``, the epoch's number (from 0) and the mean loss of its batches, so the
    caller can evaluate and log between epochs, or stop early by leaving its ``for`` loop.
    :func:`fit`, ``cnn.train_classifier`` and ``regularization.train_regularized`` are all
    written with it. Nothing runs until the caller iterates.

    Moves the model and each batch to ``device`` (default: :func:`get_device`) and shows one
    progress bar over all steps with the latest loss. Per batch, in this order:

    - ``augment(x_batch, generator)`` transforms the inputs, on the CPU, drawing its randomness
      from the same seeded generator as the shuffling;
    - each of ``penalties(model)`` is added to the loss that is minimised (weight penalties); the
      recorded losses are ``loss_fn`` alone;
    - after the optimizer's step, ``scheduler.step()`` sets the next learning rate, and the
      step's loss is appended to ``step_losses`` (e.g. ``history.steps``) when given.
    """
    if epochs < 0:
        raise ValueError("epochs must be >= 0")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else get_device()
    model.to(device)
    x, y = train
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    bar = tqdm(total=epochs * steps_per_epoch, disable=not progress, desc="training", leave=False)
    try:
        for epoch in range(epochs):
            model.train()  # the caller's evaluation between epochs may have left it in eval mode
            total, count = 0.0, 0
            for xb, yb in batches(x, y, batch_size, shuffle=True, generator=generator):
                if augment is not None:
                    xb = augment(xb, generator)
                xb, yb = xb.to(device), yb.to(device)
                data_loss = loss_fn(model(xb), yb)
                loss = data_loss
                for penalty in penalties:
                    loss = loss + penalty(model)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                value = data_loss.item()
                if step_losses is not None:
                    step_losses.append(value)
                total += value * len(xb)
                count += len(xb)
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}")
            yield epoch, total / max(count, 1)
    finally:
        bar.close()  # also when the caller stops early


def fit(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], *,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        optimizer: torch.optim.Optimizer, epochs: int, batch_size: int = 64,
        val: tuple[torch.Tensor, torch.Tensor] | None = None,
        metrics: dict[str, Metric] | None = None, device: torch.device | str | None = None,
        seed: int = 0, progress: bool = True, history: History | None = None) -> History:
    """Train ``model`` with mini-batches for ``epochs`` passes over ``train = (x, y)``.

    Moves the model and data to ``device`` (default: :func:`get_device`), shows one progress bar
    over all steps with the running loss, and records train (and validation) loss and ``metrics``
    after every epoch. Pass a previous ``history`` to continue a run.
    """
    history = history or History()
    x, y = train
    training = train_epochs(model, train, loss_fn=loss_fn, optimizer=optimizer, epochs=epochs,
                            batch_size=batch_size, step_losses=history.steps, device=device,
                            seed=seed, progress=progress)
    for _, train_loss in training:
        history.log(train_loss=train_loss)
        if metrics:  # a full pass over the training set only when there are metrics to log
            for name, value in evaluate(model, x, y, loss_fn, metrics).items():
                if name != "loss":
                    history.log(**{f"train_{name}": value})
        if val is not None:
            for name, value in evaluate(model, *val, loss_fn, metrics).items():
                history.log(**{f"val_{name}": value})
    return history
