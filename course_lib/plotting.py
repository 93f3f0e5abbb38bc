"""Plots the chapters share: loss curves, decision boundaries, image grids.

Each function draws on a given matplotlib ``ax`` (or makes a new figure) and returns the axes,
so notebooks can combine them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from course_lib.training import History


def _axes(ax: plt.Axes | None, figsize: tuple[float, float] = (6, 4)) -> plt.Axes:
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def plot_history(history: History | dict[str, Sequence[float]], keys: Sequence[str] | None = None,
                 ax: plt.Axes | None = None, logy: bool = False, title: str | None = None) -> plt.Axes:
    """Plot per-epoch curves (default: every key ending in ``loss``) against the epoch number."""
    curves = history.epochs if isinstance(history, History) else dict(history)
    keys = list(keys) if keys is not None else [k for k in curves if k.endswith("loss")]
    if not keys:
        raise ValueError(f"nothing to plot; available curves: {sorted(curves)}")
    ax = _axes(ax)
    for key in keys:
        values = curves[key]
        ax.plot(range(1, len(values) + 1), values, marker="o" if len(values) < 30 else None, label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("value")
    if logy:
        ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    return ax


def plot_steps(history: History, smooth: int = 20, ax: plt.Axes | None = None) -> plt.Axes:
    """Plot the loss of every optimisation step, raw and as a moving average over ``smooth`` steps."""
    ax = _axes(ax)
    steps = np.asarray(history.steps, dtype=float)
    ax.plot(steps, alpha=0.3, label="step loss")
    if len(steps) >= smooth > 1:
        kernel = np.ones(smooth) / smooth
        ax.plot(np.arange(smooth - 1, len(steps)), np.convolve(steps, kernel, mode="valid"),
                label=f"mean of {smooth}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return ax


def plot_decision_boundary(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                           y: torch.Tensor, ax: plt.Axes | None = None, resolution: int = 200,
                           margin: float = 0.5, title: str | None = None) -> plt.Axes:
    """Shade the class ``predict`` assigns over a grid around 2-D points ``x`` and scatter them.

    ``predict`` maps a float tensor of shape ``(m, 2)`` to logits ``(m, classes)`` or class ids
    ``(m,)``; it is called once, under ``torch.no_grad()``, on the CPU tensor of grid points.
    A single column ``(m, 1)`` is read like ``(m,)`` (rounded: class ids, or the probability of
    class 1), never arg-maxed, which would call every point class 0.
    """
    x = x.detach().cpu().float()
    y = y.detach().cpu()
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"decision boundaries need 2-D points, got shape {tuple(x.shape)}")
    lo = x.min(dim=0).values - margin
    hi = x.max(dim=0).values + margin
    gx, gy = torch.meshgrid(torch.linspace(lo[0], hi[0], resolution),
                            torch.linspace(lo[1], hi[1], resolution), indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    with torch.no_grad():
        out = predict(grid)
    out = out.detach().cpu()
    if out.ndim == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.ndim == 2:
        classes = out.argmax(dim=-1)
    else:  # class ids (any integer or bool dtype) or rounded scores
        classes = out.round().long() if out.is_floating_point() else out.long()
    ax = _axes(ax, (5, 5))
    n_classes = int(max(classes.max().item(), y.max().item())) + 1
    cmap = plt.get_cmap("coolwarm" if n_classes == 2 else "viridis", n_classes)
    ax.contourf(gx.numpy(), gy.numpy(), classes.reshape(resolution, resolution).numpy(),
                levels=np.arange(n_classes + 1) - 0.5, cmap=cmap, alpha=0.35)
    ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), c=y.numpy(), cmap=cmap, s=12,
               edgecolors="k", linewidths=0.3, vmin=-0.5, vmax=n_classes - 0.5)
    ax.set_xlim(lo[0].item(), hi[0].item())
    ax.set_ylim(lo[1].item(), hi[1].item())
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    return ax


def show_images(images: torch.Tensor | np.ndarray, labels: Sequence | None = None, ncols: int = 10,
                image_shape: tuple[int, int] | None = None, cmap: str = "gray_r",
                size: float = 1.0) -> plt.Figure:
    """Show a grid of images. ``images``: ``(n, h, w)``, ``(n, 1, h, w)`` or flat ``(n, h*w)``
    with ``image_shape``. ``labels`` (optional) are written above each image."""
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.ndim == 2:
        if image_shape is None:
            side = int(round(np.sqrt(arr.shape[1])))
            if side * side != arr.shape[1]:
                raise ValueError("flat images need image_shape=(h, w)")
            image_shape = (side, side)
        arr = arr.reshape(len(arr), *image_shape)
    elif arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    elif arr.ndim != 3:
        raise ValueError(f"cannot show images of shape {arr.shape}")
    n = len(arr)
    if n == 0:
        raise ValueError("no images to show")
    ncols = max(1, min(ncols, n))
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows * 1.15), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(arr[i], cmap=cmap)
            if labels is not None:
                ax.set_title(str(labels[i]), fontsize=8)
    fig.tight_layout()
    return fig
