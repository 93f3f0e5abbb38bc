"""Convolutional networks (chapter 6's reference).

- Convolution two ways: :func:`conv2d_sliding` (a window slides over the image: the definition)
  and :func:`conv2d_unfold` (im2col: every window becomes a column, then one matrix product —
  how fast libraries do it). :func:`im2col` builds the columns by hand with strided views, to show
  what ``torch.nn.functional.unfold`` does.
- Shapes: :func:`conv_output_size` and :func:`receptive_field` (with :func:`measure_receptive_field`
  to check it with autograd).
- :func:`max_pool2d`, pooling that pads with ``-inf`` as PyTorch does.
- :class:`ResidualBlock` (the basic block of ResNet) and :class:`DigitsCNN` (a small VGG-style
  network for the 8x8 digits); :func:`deep_conv_net` stacks residual or plain blocks to show why
  skip connections let deep networks train; :func:`block_gradient_norms` and
  :func:`feature_maps` look inside them. :class:`InceptionBlock` shows GoogLeNet's parallel
  branches, :func:`digits_mlp` is the MLP the CNN is compared with.
- :func:`train_classifier` trains either on the digits (AdamW, one-cycle learning rate, random
  one-pixel shifts as data augmentation: :func:`random_shift`).

Conventions are PyTorch's: images are ``(N, C, H, W)``, weights ``(C_out, C_in, kH, kW)``, and
"convolution" means cross-correlation (the kernel is not flipped).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.training import History, accuracy, evaluate, train_epochs

IntPair = int | tuple[int, int]


def pair(value: IntPair) -> tuple[int, int]:
    """``3 -> (3, 3)``; a pair is returned as a tuple of two ints."""
    if isinstance(value, int):
        return (value, value)
    first, second = value
    return (int(first), int(second))


def conv_output_size(size: int, kernel_size: int, stride: int = 1, padding: int = 0) -> int:
    """Output length of a convolution or pooling along one axis: ``floor((n + 2p - k) / s) + 1``.

    Windows that would stick out past the (padded) edge are dropped, hence the floor.
    """
    if kernel_size < 1 or stride < 1 or padding < 0:
        raise ValueError(f"need kernel_size >= 1, stride >= 1, padding >= 0; got "
                         f"{kernel_size}, {stride}, {padding}")
    if size + 2 * padding < kernel_size:
        raise ValueError(f"a kernel of {kernel_size} does not fit in {size} + 2 x {padding} padding")
    return (size + 2 * padding - kernel_size) // stride + 1


def _check_conv_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.ndim != 4 or weight.ndim != 4:
        raise ValueError(f"need x (N, C_in, H, W) and weight (C_out, C_in, kH, kW); got shapes "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[1]} channels but the weight expects {weight.shape[1]}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def conv2d_sliding(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   stride: IntPair = 1, padding: IntPair = 0) -> torch.Tensor:
    """2-D convolution by its definition: slide the kernel, one output position at a time.

    ``out[n, o, i, j] = bias[o] + sum_{c, u, v} weight[o, c, u, v] * xpad[n, c, i*sh + u, j*sw + v]``.
    Two Python loops over output positions: slow, but every step is visible. Same result as
    ``F.conv2d(x, weight, bias, stride, padding)``.
    """
    _check_conv_args(x, weight, bias)
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    c_out, _, kh, kw = weight.shape
    xpad = F.pad(x, (pw, pw, ph, ph))
    h_out = conv_output_size(x.shape[2], kh, sh, ph)
    w_out = conv_output_size(x.shape[3], kw, sw, pw)
    out = x.new_zeros(x.shape[0], c_out, h_out, w_out)
    for i in range(h_out):
        for j in range(w_out):
            window = xpad[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw]  # (N, C_in, kH, kW)
            # Multiply the window by every filter and sum over channels and kernel positions.
            out[:, :, i, j] = torch.einsum("ncuv,ocuv->no", window, weight)
    if bias is not None:
        out = out + bias.view(1, c_out, 1, 1)
    return out


def im2col(x: torch.Tensor, kernel_size: IntPair, stride: IntPair = 1,
           padding: IntPair = 0) -> torch.Tensor:
    """Every kernel-sized window of ``x`` as one column: ``(N, C*kH*kW, L)``, like ``F.unfold``.

    ``L = H_out * W_out`` windows in row-major order; each column lists channel 0's ``kH x kW``
    window row by row, then channel 1's, ... — the order of ``weight.view(C_out, -1)``.
    Built from strided views (``Tensor.unfold``), which copy nothing until the final reshape.
    """
    (kh, kw), (sh, sw), (ph, pw) = pair(kernel_size), pair(stride), pair(padding)
    n, c = x.shape[:2]
    windows = F.pad(x, (pw, pw, ph, ph)).unfold(2, kh, sh).unfold(3, kw, sw)  # (N, C, Ho, Wo, kH, kW)
    h_out, w_out = windows.shape[2], windows.shape[3]
    return windows.permute(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, h_out * w_out)


def conv2d_unfold(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  stride: IntPair = 1, padding: IntPair = 0) -> torch.Tensor:
    """2-D convolution as im2col + one matrix product; matches ``F.conv2d``.

    ``F.unfold`` turns the input into columns ``(N, C_in*kH*kW, L)``; the filters, flattened to
    rows ``(C_out, C_in*kH*kW)``, multiply all columns at once: ``(N, C_out, L)``, which is then
    folded back to ``(N, C_out, H_out, W_out)``.
    """
    _check_conv_args(x, weight, bias)
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    c_out, _, kh, kw = weight.shape
    h_out = conv_output_size(x.shape[2], kh, sh, ph)
    w_out = conv_output_size(x.shape[3], kw, sw, pw)
    columns = F.unfold(x, (kh, kw), padding=(ph, pw), stride=(sh, sw))
    out = weight.reshape(c_out, -1) @ columns  # (C_out, K) @ (N, K, L) -> (N, C_out, L)
    if bias is not None:
        out = out + bias.view(1, c_out, 1)
    return out.view(x.shape[0], c_out, h_out, w_out)


def max_pool2d(x: torch.Tensor, kernel_size: IntPair, stride: IntPair | None = None,
               padding: IntPair = 0) -> torch.Tensor:
    """Max pooling over ``kernel_size`` windows; matches ``F.max_pool2d`` (floor mode).

    ``stride`` defaults to ``kernel_size`` (windows that do not overlap). Padding adds ``-inf``,
    never zeros: a padded cell must never win the max (with zeros, an all-negative window would
    return 0). As in PyTorch, padding may be at most half the kernel size.
    """
    if not x.is_floating_point():
        raise TypeError(f"max_pool2d needs a floating-point tensor (it pads with -inf), got {x.dtype}")
    (kh, kw) = pair(kernel_size)
    (sh, sw) = pair(kernel_size if stride is None else stride)
    (ph, pw) = pair(padding)
    if ph > kh // 2 or pw > kw // 2:
        raise ValueError(f"padding {padding} must be at most half of kernel_size {kernel_size}")
    padded = F.pad(x, (pw, pw, ph, ph), value=-math.inf)
    windows = padded.unfold(-2, kh, sh).unfold(-2, kw, sw)  # (..., H_out, W_out, kH, kW)
    return windows.amax(dim=(-2, -1))


# ---------------------------------------------------------------------------------------------
# Receptive field
# ---------------------------------------------------------------------------------------------


def receptive_field(layers: Sequence[tuple[int, int]]) -> int:
    """Side length, in input pixels, of the window one output unit of a layer stack sees.

    ``layers``: ``(kernel_size, stride)`` per layer, input first (convolutions and poolings
    alike; padding does not change it). Each layer widens the field by ``kernel_size - 1`` steps
    of the *jump*, the input distance between neighbouring units of its input, and multiplies
    the jump by its stride: ``r += (k - 1) * jump; jump *= s``. No layers: 1.
    """
    field, jump = 1, 1
    for kernel_size, stride in layers:
        if kernel_size < 1 or stride < 1:
            raise ValueError(f"kernel_size and stride must be >= 1, got {(kernel_size, stride)}")
        field += (kernel_size - 1) * jump
        jump *= stride
    return field


def measure_receptive_field(layers: Sequence[tuple[int, int]]) -> int:
    """:func:`receptive_field` measured with autograd instead of computed.

    Builds the stack from single-channel convolutions with all-one weights (so no contributions
    cancel), feeds a large enough image, backpropagates from one output unit near the middle and
    returns the height of the block of input pixels whose gradient is not zero.
    """
    size = receptive_field(layers) * 2 + 2 * math.prod(s for _, s in layers) + 1
    image = torch.zeros(1, 1, size, size, dtype=torch.float64, requires_grad=True)
    out = image + 1.0  # all-one input: every path carries a positive value
    for kernel_size, stride in layers:
        ones = torch.ones(1, 1, kernel_size, kernel_size, dtype=torch.float64)
        out = F.conv2d(out, ones, stride=stride)
    middle = out.shape[-1] // 2
    out[0, 0, middle, middle].backward()
    rows = (image.grad[0, 0] != 0).any(dim=1).nonzero().flatten()
    return int(rows.max() - rows.min() + 1)


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """ResNet's basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    - ``conv1``: 3x3, ``in_channels -> out_channels``, stride ``stride``, padding 1, no bias
      (the BatchNorm after it has its own shift); ``bn1``: ``BatchNorm2d(out_channels)``.
    - ``conv2``: 3x3, ``out_channels -> out_channels``, stride 1, padding 1, no bias; ``bn2``.
    - ``shortcut``: ``nn.Identity()`` when the shapes already agree (``stride == 1`` and
      ``in_channels == out_channels``), else a projection
      ``nn.Sequential(Conv2d(in, out, 1, stride=stride, bias=False), BatchNorm2d(out))``.

    ``skip=False`` drops the shortcut (a "plain" block, for comparison): ``relu(bn2(...))``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, skip: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.skip = skip
        if not skip:
            self.shortcut = None
        elif stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return torch.relu(out)


class DigitsCNN(nn.Module):
    """A small VGG-style CNN for the 8x8 digits: ``(B, 1, 8, 8) -> (B, 10)`` logits.

    ``conv 3x3 (1 -> w) -> ReLU -> conv 3x3 (w -> w) -> ReLU -> max-pool 2 -> conv 3x3 (w -> 2w) ->
    ReLU -> max-pool 2 -> flatten (2w x 2 x 2, channel-major) -> linear (8w -> 10)``, every
    convolution with padding 1 and a bias. Parameters: ``27 w^2 + 93 w + 10``.
    """

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                   # 8x8 -> 4x4
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                   # 4x4 -> 2x2
        )
        self.classifier = nn.Linear(2 * width * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def digits_cnn_param_count(width: int) -> int:
    """Parameters of :class:`DigitsCNN` of that width, counted layer by layer."""
    conv1 = 1 * width * 9 + width
    conv2 = width * width * 9 + width
    conv3 = width * 2 * width * 9 + 2 * width
    linear = 2 * width * 4 * 10 + 10
    return conv1 + conv2 + conv3 + linear


def digits_mlp(hidden: int) -> nn.Sequential:
    """The MLP to compare with: ``(B, 1, 8, 8) -> flatten -> Linear(64, hidden) -> ReLU ->
    Linear(hidden, 10)``, ``75 * hidden + 10`` parameters."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable numbers in ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def as_images(x: torch.Tensor, side: int = 8) -> torch.Tensor:
    """Flat digits ``(N, side*side)`` as one-channel images ``(N, 1, side, side)``."""
    return x.reshape(-1, 1, side, side)


def deep_conv_net(depth: int, width: int = 16, residual: bool = True,
                  num_classes: int = 10) -> nn.Sequential:
    """A stem convolution, ``depth`` blocks (two 3x3 convolutions each) and a linear head.

    The blocks are :class:`ResidualBlock` with the skip connection (``residual=True``) or
    without it (a plain network of ``2 * depth + 1`` convolutions); everything else is equal,
    so the two differ only by the ``+ x``. Global average pooling before the head makes it work
    for any image size. The blocks are ``net[3:3 + depth]``.
    """
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        *[ResidualBlock(width, width, skip=residual) for _ in range(depth)],
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes),
    )


def block_gradient_norms(net: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Gradient norm of every block's first convolution after one backward pass of the
    cross-entropy on ``(x, y)`` (the net in training mode, gradients cleared before and after).

    With a plain deep stack the norms typically shrink towards the input; the skip connections
    of a residual stack hand every block a direct path from the loss.
    """
    blocks = [m for m in net if isinstance(m, ResidualBlock)]
    net.train()
    net.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()
    norms = [block.conv1.weight.grad.norm().item() for block in blocks]
    net.zero_grad(set_to_none=True)
    return norms


@torch.no_grad()
def feature_maps(model: nn.Module, x: torch.Tensor,
                 kinds: tuple[type[nn.Module], ...] = (nn.ReLU, nn.MaxPool2d)
                 ) -> list[tuple[str, torch.Tensor]]:
    """The outputs of every sub-module of the given ``kinds`` for input ``x``, in order, as
    ``(name, tensor)`` pairs — e.g. what each ReLU and pooling layer of a CNN hands on."""
    captured: list[tuple[str, torch.Tensor]] = []
    hooks = [module.register_forward_hook(
        lambda _m, _inp, out, name=name: captured.append((name, out.detach())))
        for name, module in model.named_modules() if isinstance(module, kinds)]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return captured


class InceptionBlock(nn.Module):
    """GoogLeNet's Inception module: four branches side by side, outputs stacked on channels.

    ``1x1 conv -> c1`` | ``1x1 conv -> c3_reduce, 3x3 conv -> c3`` |
    ``1x1 conv -> c5_reduce, 5x5 conv -> c5`` | ``3x3 max-pool (stride 1), 1x1 conv -> pool_proj``,
    each convolution followed by a ReLU and padded so that every branch keeps the height and
    width. The 1x1 "reduce" convolutions shrink the channels before the expensive 3x3 and 5x5
    kernels. Output channels: ``c1 + c3 + c5 + pool_proj``.
    """

    def __init__(self, in_channels: int, c1: int, c3_reduce: int, c3: int, c5_reduce: int, c5: int,
                 pool_proj: int):
        super().__init__()

        def conv(c_in: int, c_out: int, k: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, k, padding=k // 2), nn.ReLU()]

        self.branch1 = nn.Sequential(*conv(in_channels, c1, 1))
        self.branch3 = nn.Sequential(*conv(in_channels, c3_reduce, 1), *conv(c3_reduce, c3, 3))
        self.branch5 = nn.Sequential(*conv(in_channels, c5_reduce, 1), *conv(c5_reduce, c5, 5))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1),
                                         *conv(in_channels, pool_proj, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)],
                         dim=1)


# ---------------------------------------------------------------------------------------------
# Training on the digits
# ---------------------------------------------------------------------------------------------


def random_shift(x: torch.Tensor, max_shift: int = 1,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Move every image ``(N, C, H, W)`` by its own random whole-pixel offset in
    ``[-max_shift, max_shift]`` along each axis; pixels that move in from the edge are 0.

    A digit moved by a pixel is still the same digit: training on such copies teaches the
    network that position does not matter (data augmentation).
    """
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift, max_shift, max_shift, max_shift))
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator).to(x.device)
    rows = offsets[0][:, None] + torch.arange(h, device=x.device)  # (N, H): which padded rows
    cols = offsets[1][:, None] + torch.arange(w, device=x.device)  # (N, W)
    index = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indices on axes 0, 2, 3 with a slice between them put the channel axis last.
    return padded[index, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def train_classifier(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], *, epochs: int,
                     lr: float, batch_size: int = 64, weight_decay: float = 0.0,
                     max_shift: int = 0, val: tuple[torch.Tensor, torch.Tensor] | None = None,
                     seed: int = 0, device: torch.device | str | None = None,
                     progress: bool = True) -> History:
    """Train an image classifier with AdamW, a one-cycle learning rate and optional random shifts.

    The learning rate warms up to ``lr`` over the first 30% of the steps and then anneals to
    almost 0 (``OneCycleLR``): fast progress early, and small careful steps at the end. Every
    training batch is moved by up to ``max_shift`` pixels (:func:`random_shift`). Logs the
    training loss per step and epoch and, with ``val``, the validation loss and accuracy.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = (len(train[0]) + batch_size - 1) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr,
                                                   total_steps=epochs * steps_per_epoch)
    history = History()
    training = train_epochs(model, train, loss_fn=F.cross_entropy, optimizer=optimizer,
                            epochs=epochs, batch_size=batch_size,
                            augment=lambda images, generator: random_shift(images, max_shift, generator),
                            scheduler=schedule, step_losses=history.steps, device=device,
                            seed=seed, progress=progress)
    for _, train_loss in training:
        history.log(train_loss=train_loss)
        if val is not None:
            scores = evaluate(model, *val, F.cross_entropy, {"acc": accuracy})
            history.log(val_loss=scores["loss"], val_acc=scores["acc"])
    return history


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of ``model`` on ``(x, y)`` in eval mode, on the model's device."""
    return evaluate(model, x, y, F.cross_entropy, {"acc": accuracy})["acc"]
