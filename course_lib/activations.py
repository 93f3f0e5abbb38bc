"""Activation functions, their derivatives, and what they do to deep networks (chapter 2).

Reference implementations written from elementary tensor operations, so they can be compared with
PyTorch's built-ins, and tools to look inside deep nets:

- the activations :func:`relu`, :func:`leaky_relu`, :func:`stable_sigmoid`, :func:`tanh`,
  :func:`gelu` (exact ``erf`` form or the ``tanh`` approximation) and :func:`silu` — and
  :func:`identity`, no activation at all — listed by name in :data:`ACTIVATIONS`;
- :func:`activation_derivative`: each one's derivative in closed form, and
  :func:`autograd_derivative` to check a formula against autograd;
- :func:`collapse_linear`: the single linear map a stack of linear layers computes;
- :func:`make_mlp`: a deep fully connected net with a chosen activation and initialisation;
- :func:`layer_grad_norms` (vanishing gradients) and :func:`dead_relu_fraction` (dead units).

Conventions, stated so that any correct implementation agrees:

- Rows are examples and a linear layer computes ``x @ W + b`` with ``W`` of shape
  ``(n_in, n_out)`` (``nn.Linear`` stores ``W.T``).
- At the kinks the derivative is the one autograd uses: ``relu'(0) = 0`` and
  ``leaky_relu'(0) = negative_slope``.
- ``gelu`` is ``x * Phi(x)`` with ``Phi`` the standard normal CDF (``approximate="none"``), or
  ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` (``approximate="tanh"``), as in
  ``torch.nn.functional.gelu``. The two differ by at most about ``4.7e-4``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_TANH_CUBIC = 0.044715
DERIVATIVE_NAMES = ("identity", "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "gelu_tanh", "silu")

# ---------------------------------------------------------------------------------------------
# The activations
# ---------------------------------------------------------------------------------------------


def identity(x: torch.Tensor) -> torch.Tensor:
    """No activation at all: what a layer computes without a nonlinearity."""
    return x


def relu(x: torch.Tensor) -> torch.Tensor:
    """``max(0, x)`` elementwise."""
    return torch.clamp(x, min=0)


def leaky_relu(x: torch.Tensor, negative_slope: float = 0.01) -> torch.Tensor:
    """``x`` where ``x > 0``, else ``negative_slope * x``."""
    return torch.where(x > 0, x, negative_slope * x)


def stable_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """The logistic function ``1 / (1 + exp(-x))``, finite and accurate for every finite ``x``.

    Each branch only ever exponentiates a number <= 0, so nothing overflows, and neither branch
    subtracts nearly equal numbers, so both tails keep full relative precision. The clamps (not
    ``abs``) keep the autograd gradient finite everywhere, right at 0 included: the branch that
    ``torch.where`` discards sees a clamped, harmless input, so its zero gradient stays zero
    instead of becoming ``0 * inf = nan``.
    """
    right = 1.0 / (1.0 + torch.exp(-torch.clamp(x, min=0)))
    e = torch.exp(torch.clamp(x, max=0))
    left = e / (1.0 + e)
    return torch.where(x >= 0, right, left)


def tanh(x: torch.Tensor) -> torch.Tensor:
    """The hyperbolic tangent from ``exp``: ``sign(x) (1 - e^{-2|x|}) / (1 + e^{-2|x|})``.

    ``expm1`` keeps full precision near 0, where ``1 - e^{-2|x|}`` would cancel.
    """
    e = torch.expm1(-2.0 * x.abs())
    return torch.sign(x) * (-e / (2.0 + e))


def normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """``Phi(x)``, the probability that a standard normal variable is at most ``x``."""
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def normal_pdf(x: torch.Tensor) -> torch.Tensor:
    """``phi(x) = exp(-x^2 / 2) / sqrt(2 pi)``, the standard normal density."""
    return torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU: ``x * Phi(x)`` (``approximate="none"``) or its ``tanh`` approximation (``"tanh"``)."""
    if approximate == "none":
        return x * normal_cdf(x)
    if approximate == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(SQRT_2_OVER_PI * (x + GELU_TANH_CUBIC * x**3)))
    raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU (also called swish): ``x * sigmoid(x)``."""
    return x * stable_sigmoid(x)


# ---------------------------------------------------------------------------------------------
# Derivatives
# ---------------------------------------------------------------------------------------------


def activation_derivative(name: str, x: torch.Tensor, negative_slope: float = 0.01) -> torch.Tensor:
    """The derivative of the activation ``name`` at every element of ``x``, in closed form.

    ``name`` is one of :data:`DERIVATIVE_NAMES`; ``"gelu"`` is the exact (erf) form and
    ``"gelu_tanh"`` the tanh approximation. Same shape and dtype as ``x``.
    """
    if name == "identity":
        return torch.ones_like(x)
    if name == "relu":
        return (x > 0).to(x.dtype)
    if name == "leaky_relu":
        return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, negative_slope))
    if name == "sigmoid":
        s = stable_sigmoid(x)
        return s * (1 - s)
    if name == "tanh":
        return 1 - torch.tanh(x) ** 2
    if name == "gelu":
        return normal_cdf(x) + x * normal_pdf(x)
    if name == "gelu_tanh":
        inner = SQRT_2_OVER_PI * (x + GELU_TANH_CUBIC * x**3)
        t = torch.tanh(inner)
        d_inner = SQRT_2_OVER_PI * (1 + 3 * GELU_TANH_CUBIC * x**2)
        return 0.5 * (1 + t) + 0.5 * x * (1 - t**2) * d_inner
    if name == "silu":
        s = stable_sigmoid(x)
        return s * (1 + x * (1 - s))
    raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(DERIVATIVE_NAMES)}")


def autograd_derivative(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The elementwise derivative of ``fn`` at ``x``, computed by autograd.

    For an elementwise function, the gradient of ``fn(x).sum()`` holds ``fn'(x_i)`` at element
    ``i``: every output depends on its own input only.
    """
    leaf = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(leaf).sum(), leaf)
    return grad


@dataclass(frozen=True)
class Activation:
    """One activation: the name of its function in this module, of its derivative in
    :func:`activation_derivative`, and the ``nn.Module`` class that computes it in a network."""

    function_name: str
    derivative_name: str
    module: Callable[[], nn.Module]

    @property
    def fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The function, looked up when used (so that ``checks.forbidden`` reaches it here too)."""
        return globals()[self.function_name]


ACTIVATIONS: dict[str, Activation] = {
    "identity": Activation("identity", "identity", nn.Identity),
    "relu": Activation("relu", "relu", nn.ReLU),
    "leaky_relu": Activation("leaky_relu", "leaky_relu", nn.LeakyReLU),
    "sigmoid": Activation("stable_sigmoid", "sigmoid", nn.Sigmoid),
    "tanh": Activation("tanh", "tanh", nn.Tanh),
    "gelu": Activation("gelu", "gelu", nn.GELU),
    "silu": Activation("silu", "silu", nn.SiLU),
}


# ---------------------------------------------------------------------------------------------
# Deep nets
# ---------------------------------------------------------------------------------------------


def collapse_linear(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The single ``(W, b)`` with ``x @ W + b`` equal to the linear layers applied in turn.

    Layer ``i`` computes ``h @ weights[i] + biases[i]``. Each later layer multiplies what came
    before, the bias included: ``W = W_1 W_2 ... W_n`` and ``b = (...(b_1 W_2 + b_2) W_3 ...) + b_n``.
    """
    if len(weights) == 0 or len(weights) != len(biases):
        raise ValueError("need one bias per weight matrix, and at least one layer")
    w, b = weights[0].clone(), biases[0].clone()
    for w_next, b_next in zip(weights[1:], biases[1:], strict=True):
        w = w @ w_next
        b = b @ w_next + b_next
    return w, b


INITS = ("he", "xavier", "default")


def make_mlp(n_in: int, width: int, depth: int, n_out: int, activation: str = "relu",
             init: str = "default", seed: int = 0) -> nn.Sequential:
    """A fully connected net: ``depth`` hidden layers of ``width`` units, each followed by the
    activation (a name in :data:`ACTIVATIONS`), then a linear output layer of ``n_out`` logits.

    ``init``: ``"he"`` (weights of std ``sqrt(2 / fan_in)``, right for ReLU), ``"xavier"`` (std
    ``sqrt(2 / (fan_in + fan_out))``, for sigmoid and tanh) or ``"default"`` (PyTorch's); biases
    start at zero except with ``"default"``. Chapter 5 explains why the scale matters.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    if depth < 1:
        raise ValueError("depth must be >= 1")
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    sizes = [n_in] + [width] * depth
    for fan_in, fan_out in zip(sizes, sizes[1:], strict=False):
        layers += [nn.Linear(fan_in, fan_out), ACTIVATIONS[activation].module()]
    layers.append(nn.Linear(width, n_out))
    with torch.no_grad():
        for layer in layers:
            if not isinstance(layer, nn.Linear):
                continue
            fan_out, fan_in = layer.weight.shape
            if init == "default":
                bound = 1 / math.sqrt(fan_in)  # PyTorch's own rule, redrawn from our generator
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)
                continue
            std = math.sqrt(2 / fan_in) if init == "he" else math.sqrt(2 / (fan_in + fan_out))
            layer.weight.normal_(0.0, std, generator=generator)
            layer.bias.zero_()
    return nn.Sequential(*layers)


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    """The ``nn.Linear`` modules of ``model`` in registration order (input to output)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def layer_grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The norm of the loss gradient of each linear layer's weight, first layer first.

    The loss is the mean cross-entropy ``F.cross_entropy(model(x), y)``. Gradients left over in
    ``.grad`` are cleared first, so earlier backward passes cannot leak in. Returns a float32 CPU
    tensor of shape ``(number of nn.Linear layers,)`` holding ``||dL/dW_l||`` (Frobenius norm).
    """
    layers = linear_layers(model)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return torch.stack([layer.weight.grad.norm() for layer in layers]).detach().float().cpu()


@torch.no_grad()
def dead_relu_fraction(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """For each ``nn.ReLU`` of the flat ``nn.Sequential`` ``model``, the fraction of its units
    whose output is 0 for every row of ``x`` (dead on this data: they pass no gradient back).

    Returns a float32 CPU tensor of shape ``(number of nn.ReLU modules,)``.
    """
    fractions = []
    h = x
    for layer in model:
        h = layer(h)
        if isinstance(layer, nn.ReLU):
            fractions.append((h == 0).all(dim=0).float().mean())
    return torch.stack(fractions).cpu() if fractions else torch.zeros(0)
