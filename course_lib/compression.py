"""Model compression and acceleration (chapter 14): pruning, distillation, quantization, QAT.

- **Measuring**: :func:`saved_bytes` (the size of a state dict written to disk), :func:`latency_ms`
  (median wall time after a warm-up), :func:`window_losses` (the mean next-token loss of each
  consecutive window of held-out tokens, for perplexities with bootstrap intervals).
- **Pruning**: :func:`global_magnitude_masks` (one threshold for every tensor) and
  :func:`layer_magnitude_masks` (one per tensor), :func:`torch_global_masks` (the same through
  ``torch.nn.utils.prune``), :func:`apply_masks`; structured: :func:`prune_mlp_neurons` (a smaller
  GPT, neurons removed for real) and :func:`head_importance` / :func:`mask_heads` (attention heads).
- **Distillation**: :func:`distillation_loss` (Hinton et al., 2015: KL(teacher || student) at
  temperature T, times T^2, mixed with the hard-label cross-entropy) and :func:`train_student`.
- **Quantization**, written out: :func:`quantize_int8_per_channel` / :func:`dequantize_int8`,
  :func:`fake_quant` (symmetric or asymmetric, per tensor / channel / group, any bit width),
  :func:`quantize_int4_grouped` / :func:`dequantize_int4_grouped` with two 4-bit codes packed per
  byte (:func:`pack_int4`, :func:`unpack_int4`), :func:`binarize`; :class:`WeightOnlyLinear` and
  :func:`quantize_weights` (a GPT whose linear layers store int8 or packed int4),
  :func:`dynamic_int8` (PyTorch's maintained int8 kernels on the CPU).
- **Quantization-aware training**: :func:`fake_quantize` (forward: quantize and dequantize;
  backward: the straight-through estimator), :func:`attach_fake_quant` and :func:`qat_finetune`.
"""

from __future__ import annotations

import copy
import io
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from course_lib.gpt import GPT
from course_lib.lm_data import iter_blocks, sample_batch

# ---------------------------------------------------------------------------------------------
# Measuring: size on disk, latency, held-out loss
# ---------------------------------------------------------------------------------------------


def saved_bytes(state: dict | nn.Module) -> int:
    """Bytes of ``torch.save`` of a state dict (or a module's): the size the file would have on
    disk. Tensors that share storage (a tied embedding and head) are written once."""
    if isinstance(state, nn.Module):
        state = state.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer().nbytes


def latency_ms(fn: Callable[[], object], repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` calls (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


@torch.no_grad()
def window_losses(model: nn.Module, tokens: np.ndarray, block_size: int, batch_size: int = 16,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """float64 ``(n_windows,)``: the mean next-token loss of every consecutive window of
    ``block_size`` tokens (eval mode). ``exp`` of their mean is the perplexity; resampling the
    windows gives its bootstrap interval."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for x, y in iter_blocks(tokens, batch_size, block_size, device):
            logits = model(x)[0].float()
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
            out.append(loss.view(y.shape).mean(1).double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def bootstrap_mean_interval(values: torch.Tensor, n_boot: int = 1000, seed: int = 0,
                            transform: Callable[[torch.Tensor], torch.Tensor] = lambda m: m,
                            level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``transform(mean(values))`` (e.g. ``torch.exp`` for a
    perplexity from window losses). Pass the *difference* of two systems' values on the same
    windows for a paired interval."""
    g = torch.Generator().manual_seed(seed)
    n = len(values)
    draws = torch.randint(0, n, (n_boot, n), generator=g)
    replicates = transform(values.double()[draws].mean(1))
    qs = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(replicates, qs)
    return float(low), float(high)


# ---------------------------------------------------------------------------------------------
# Pruning
# ---------------------------------------------------------------------------------------------


def global_magnitude_masks(weights: Sequence[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Keep-masks (bool, one per tensor, same shape and device) for one global magnitude threshold.

    With ``N`` weights in all and ``k = int(sparsity * N)``: no weight is pruned when ``k == 0``;
    otherwise ``t`` is the ``k``-th smallest ``|w|`` over all tensors together and a weight is kept
    iff ``|w| > t`` — every weight tied with the threshold is pruned (so ties may prune more than
    ``k``). The inputs are not modified.
    """
    flat = torch.cat([w.detach().abs().flatten().to(torch.float64) for w in weights])
    k = int(sparsity * flat.numel())
    if k == 0:
        return [torch.ones_like(w, dtype=torch.bool) for w in weights]
    threshold = torch.kthvalue(flat.cpu(), k).values.item()
    return [w.detach().abs().to(torch.float64) > threshold for w in weights]


def layer_magnitude_masks(weights: Sequence[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """The same rule applied to each tensor on its own: every layer loses the same fraction."""
    return [global_magnitude_masks([w], sparsity)[0] for w in weights]


def torch_global_masks(modules: Sequence[tuple[nn.Module, str]], sparsity: float) -> list[torch.Tensor]:
    """The masks ``torch.nn.utils.prune.global_unstructured`` (L1) chooses for the same tensors,
    computed on copies (the modules are left as they are). It prunes exactly ``round(sparsity * N)``
    weights, so it differs from :func:`global_magnitude_masks` only where ``|w|`` ties."""
    copies = [(copy.deepcopy(module), name) for module, name in modules]
    torch_prune.global_unstructured(copies, pruning_method=torch_prune.L1Unstructured, amount=sparsity)
    return [getattr(module, name + "_mask").bool() for module, name in copies]


@torch.no_grad()
def apply_masks(weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> None:
    """Zero the pruned weights in place."""
    for w, m in zip(weights, masks, strict=True):
        w.mul_(m.to(w.dtype))


def sparsity_of(weights: Sequence[torch.Tensor]) -> float:
    """The fraction of exact zeros."""
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / max(total, 1)


def gpt_linear_weights(model: GPT) -> list[tuple[str, nn.Linear]]:
    """The transformer blocks' linear layers (attention qkv and output, MLP in and out), by name.
    The tied embedding/head matrix and the LayerNorms are left out, as pruning and weight-only
    quantization usually do."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith("blocks.")]


def cnn_weights(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every convolution and linear layer of a CNN."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, (nn.Conv2d, nn.Linear))]


def prune_model(model: nn.Module, layers: Sequence[tuple[str, nn.Module]], sparsity: float,
                scope: str = "global") -> nn.Module:
    """A copy of ``model`` with the named layers' weights magnitude-pruned (``scope`` "global" or
    "layer")."""
    pruned = copy.deepcopy(model)
    modules = dict(pruned.named_modules())
    weights = [modules[name].weight for name, _ in layers]
    rule = global_magnitude_masks if scope == "global" else layer_magnitude_masks
    apply_masks(weights, rule(weights, sparsity))
    return pruned


@torch.no_grad()
def prune_mlp_neurons(model: GPT, fraction: float) -> GPT:
    """A copy of the GPT whose MLPs keep only the ``1 - fraction`` hidden neurons of largest
    ``||fc row|| * ||proj column||`` in each block: the matrices really shrink, so it is smaller
    and faster with ordinary dense kernels."""
    small = copy.deepcopy(model)
    for block in small.blocks:
        fc, proj = block.mlp.fc, block.mlp.proj
        score = fc.weight.norm(dim=1) * proj.weight.norm(dim=0)
        keep = max(1, round((1 - fraction) * score.numel()))
        idx = torch.topk(score, keep).indices.sort().values
        new_fc = nn.Linear(fc.in_features, keep, bias=fc.bias is not None).to(fc.weight)
        new_proj = nn.Linear(keep, proj.out_features, bias=proj.bias is not None).to(proj.weight)
        new_fc.weight.copy_(fc.weight[idx])
        if fc.bias is not None:
            new_fc.bias.copy_(fc.bias[idx])
        new_proj.weight.copy_(proj.weight[:, idx])
        if proj.bias is not None:
            new_proj.bias.copy_(proj.bias)
        block.mlp.fc, block.mlp.proj = new_fc, new_proj
    return small


def _head_gate_hooks(model: GPT, gates: torch.Tensor) -> list:
    """Forward pre-hooks that multiply each head's slice of the attention output (the input of
    ``attn.proj``) by ``gates[layer, head]``."""
    handles = []
    n_head = model.config.n_head
    for layer, block in enumerate(model.blocks):
        def hook(module, args, layer=layer):
            (y,) = args
            shape = y.shape
            gated = y.view(*shape[:-1], n_head, shape[-1] // n_head) * gates[layer].to(y.dtype)[:, None]
            return (gated.view(shape),)
        handles.append(block.attn.proj.register_forward_pre_hook(hook))
    return handles


def head_importance(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(n_layer, n_head)``: ``|dL/dg|`` for a gate ``g = 1`` on each head's output (Michel et
    al., 2019): the first-order change of the loss on ``(x, y)`` if the head were removed. One
    forward and backward pass for every head at once."""
    c = model.config
    gates = torch.ones(c.n_layer, c.n_head, device=x.device, requires_grad=True)
    handles = _head_gate_hooks(model, gates)
    was_training = model.training
    model.eval()
    try:
        loss = model(x, y)[1]
        (grad,) = torch.autograd.grad(loss, gates)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return grad.abs().detach()


@torch.no_grad()
def mask_heads(model: GPT, heads: Sequence[tuple[int, int]]) -> GPT:
    """A copy of the GPT with the given ``(layer, head)`` pairs removed: their columns of the
    attention output projection are zeroed, so they add nothing to the residual stream."""
    masked = copy.deepcopy(model)
    hd = model.config.head_dim
    for layer, head in heads:
        masked.blocks[layer].attn.proj.weight[:, head * hd:(head + 1) * hd] = 0
    return masked


# ---------------------------------------------------------------------------------------------
# Knowledge distillation
# ---------------------------------------------------------------------------------------------


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      temperature: float = 2.0, alpha: float = 0.5) -> torch.Tensor:
    """``alpha * T^2 * KL(p_teacher || p_student) + (1 - alpha) * CE(student, targets)``.

    ``p = softmax(logits / T)`` for both models; the KL is summed over the vocabulary and averaged
    over the ``N`` rows; the cross-entropy uses the student's logits at temperature 1, averaged over
    the rows. The teacher is a constant (no gradient reaches ``teacher_logits``). The factor ``T^2``
    keeps the soft term's gradients the same size whatever ``T`` (they scale as ``1 / T^2``).
    """
    t = float(temperature)
    log_q = F.log_softmax(student_logits / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().to(student_logits.dtype) / t, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    hard = F.cross_entropy(student_logits, targets)
    return alpha * t * t * kl + (1 - alpha) * hard


def train_student(student: GPT, tokens: np.ndarray, *, steps: int, batch_size: int, block_size: int,
                  lr: float, teacher: GPT | None = None, temperature: float = 2.0, alpha: float = 0.5,
                  seed: int = 0, device: torch.device | str = "cpu",
                  loss_fn: Callable[..., torch.Tensor] = distillation_loss) -> list[float]:
    """Train ``student`` for ``steps`` AdamW steps on batches drawn with ``seed``: on hard labels
    (the next tokens) when ``teacher`` is None, else with ``loss_fn`` on the teacher's logits for
    the same batch. The same seed gives the same batches either way. Returns the training losses."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01)
    student.train()
    if teacher is not None:
        teacher.eval()
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:  # a short warm-up, then a cosine decay to lr / 10
            group["lr"] = lr * min(1.0, (step + 1) / 10) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        x, y = sample_batch(tokens, batch_size, block_size, generator, device)
        logits = student(x)[0]
        if teacher is None:
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        else:
            with torch.no_grad():
                teacher_logits = teacher(x)[0]
            loss = loss_fn(logits.flatten(0, 1), teacher_logits.flatten(0, 1), y.flatten(),
                           temperature, alpha)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    student.eval()
    return losses


# ---------------------------------------------------------------------------------------------
# Quantization, written out
# ---------------------------------------------------------------------------------------------


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel (row) of a float32 ``(out, in)`` matrix.

    ``scale[r] = max|w[r]| / 127`` (1.0 for an all-zero row), ``q = clamp(round(w / scale), -127,
    127)`` with ``torch.round`` (halves to even). Returns ``(q int8 (out, in), scale float32 (out,))``;
    ``w`` is not modified.
    """
    amax = w.detach().abs().amax(dim=1).float()
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.clamp(torch.round(w.detach().float() / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``q * scale`` row by row."""
    return q.to(torch.float32) * scale.to(torch.float32)[:, None]


def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes (uint8 values 0..15, an even number of columns) per byte: column ``2j`` in
    the low nibble, ``2j + 1`` in the high one. ``(rows, cols)`` -> uint8 ``(rows, cols // 2)``."""
    u = u.to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: uint8 ``(rows, cols)`` codes 0..15."""
    low, high = packed & 15, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)


def quantize_int4_grouped(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 per group of ``group_size`` consecutive weights of each row, packed.

    ``w`` float32 ``(out, in)``, ``in`` divisible by ``group_size`` (even). Per group
    ``scale = max|w| / 7`` (1.0 for an all-zero group), ``q = clamp(round(w / scale), -7, 7)``
    (halves to even), stored as ``u = q + 8`` (1..15) and packed two per byte (:func:`pack_int4`).
    Returns ``(packed uint8 (out, in // 2), scales float32 (out, in // group_size))``.
    """
    out_f, in_f = w.shape
    groups = w.detach().float().reshape(out_f, in_f // group_size, group_size)
    amax = groups.abs().amax(dim=-1)
    scales = torch.where(amax > 0, amax / 7, torch.ones_like(amax))
    q = torch.clamp(torch.round(groups / scales[..., None]), -7, 7).reshape(out_f, in_f)
    return pack_int4((q + 8).to(torch.uint8)), scales


def dequantize_int4_grouped(packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 ``(out, in)`` weights from :func:`quantize_int4_grouped`'s output."""
    q = unpack_int4(packed).to(torch.float32) - 8
    out_f, in_f = q.shape
    return (q.reshape(out_f, in_f // group_size, group_size) * scales[..., None].float()).reshape(out_f, in_f)


def fake_quant(w: torch.Tensor, bits: int, granularity: str = "channel", group_size: int = 64,
               symmetric: bool = True) -> torch.Tensor:
    """Quantize then dequantize ``w`` (2-D) with ``bits`` bits: the values a quantized model
    computes with. ``granularity``: "tensor" (one scale), "channel" (one per row) or "group"
    (one per ``group_size`` consecutive weights of a row). Symmetric: codes ``-(2^(b-1) - 1) ..
    2^(b-1) - 1`` and zero maps to zero; asymmetric: codes ``0 .. 2^b - 1`` spanning ``[min, max]``
    with a zero point, which wastes no code on a lopsided range."""
    out_f, in_f = w.shape
    x = w.detach().float()
    if granularity == "tensor":
        x = x.reshape(1, 1, -1)
    elif granularity == "channel":
        x = x.reshape(out_f, 1, in_f)
    else:
        x = x.reshape(out_f, in_f // group_size, group_size)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = x.abs().amax(-1, keepdim=True)
        scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
        deq = torch.clamp(torch.round(x / scale), -qmax, qmax) * scale
    else:
        levels = 2 ** bits - 1
        low, high = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
        scale = torch.where(high > low, (high - low) / levels, torch.ones_like(high))
        zero = torch.round(-low / scale)
        deq = (torch.clamp(torch.round(x / scale) + zero, 0, levels) - zero) * scale
    return deq.reshape(out_f, in_f).to(w.dtype)


def binarize(w: torch.Tensor) -> torch.Tensor:
    """One bit per weight (XNOR-Net): ``sign(w)`` times the mean ``|w|`` of its row (zeros to +)."""
    alpha = w.abs().mean(dim=1, keepdim=True)
    return torch.where(w >= 0, alpha, -alpha)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``||approx - exact|| / ||exact||`` (Frobenius)."""
    return float((approx.float() - exact.float()).norm() / exact.float().norm())


def bits_per_weight(bits: int, granularity: str, in_features: int, group_size: int = 64,
                    symmetric: bool = True) -> float:
    """Storage per weight including the float32 scales (and zero points when asymmetric)."""
    per_scale = 32 if symmetric else 32 + bits
    weights_per_scale = {"tensor": math.inf, "channel": in_features, "group": group_size}[granularity]
    return bits + per_scale / weights_per_scale


class WeightOnlyLinear(nn.Module):
    """A linear layer that stores int8 per-channel or packed int4 grouped weights and dequantizes
    them to float32 at every call: smaller on disk and in memory, but not faster (the matmul is
    still float32, plus the dequantization)."""

    def __init__(self, linear: nn.Linear, kind: str = "int8", group_size: int | None = 64):
        super().__init__()
        # group_size None: one group per row (per-channel int4)
        self.kind, self.group_size = kind, group_size or linear.in_features
        w = linear.weight.detach().cpu()
        if kind == "int8":
            q, scale = quantize_int8_per_channel(w)
        else:
            q, scale = quantize_int4_grouped(w, self.group_size)
        device = linear.weight.device
        self.register_buffer("q", q.to(device))
        self.register_buffer("scale", scale.to(device))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def weight_float(self) -> torch.Tensor:
        if self.kind == "int8":
            return dequantize_int8(self.q, self.scale)
        return dequantize_int4_grouped(self.q, self.scale, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight_float().to(x.dtype), bias)


def _replace(model: nn.Module, names: Sequence[str], make: Callable[[nn.Module], nn.Module]) -> None:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(getattr(parent, child)))


def quantize_weights(model: GPT, kind: str = "int8", group_size: int | None = 64) -> GPT:
    """A copy of the GPT whose block linear layers are :class:`WeightOnlyLinear` (``kind`` "int8"
    or "int4", ``group_size`` None for one int4 group per row); embeddings, head and LayerNorms
    stay float32."""
    quantized = copy.deepcopy(model)
    names = [name for name, _ in gpt_linear_weights(quantized)]
    _replace(quantized, names, lambda m: WeightOnlyLinear(m, kind, group_size))
    return quantized


def dynamic_int8(model: nn.Module) -> nn.Module:
    """PyTorch's dynamic int8 quantization of every ``nn.Linear`` (CPU only): int8 weights, the
    activations quantized on the fly per batch, int8 matrix products (fbgemm/qnnpack kernels)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).cpu(), {nn.Linear},
                                                      dtype=torch.qint8)


# ---------------------------------------------------------------------------------------------
# Quantization-aware training
# ---------------------------------------------------------------------------------------------


def fake_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Forward: symmetric per-row quantization to ``bits`` bits and back (``qmax = 2^(bits-1) - 1``,
    ``scale = max|w[r]| / qmax``, 1.0 for an all-zero row, ``round`` halves to even, codes clamped
    to ``[-qmax, qmax]``), in ``w``'s dtype. Backward: the straight-through estimator — the
    gradient reaches ``w`` unchanged, as if the rounding were the identity."""
    qmax = 2 ** (bits - 1) - 1
    amax = w.detach().abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = torch.clamp(torch.round(w.detach() / scale), -qmax, qmax) * scale
    return w + (q - w).detach()


class FakeQuant(nn.Module):
    """A parametrization: the layer computes with ``fake_fn(weight, bits)`` while training
    updates the float weight behind it."""

    def __init__(self, bits: int, fake_fn: Callable[[torch.Tensor, int], torch.Tensor] = fake_quantize):
        super().__init__()
        self.bits = bits
        self.fake_fn = fake_fn

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.fake_fn(w, self.bits)


def attach_fake_quant(model: GPT, bits: int,
                      fake_fn: Callable[[torch.Tensor, int], torch.Tensor] = fake_quantize) -> GPT:
    """A copy of the GPT whose block linear layers compute with fake-quantized weights."""
    qat = copy.deepcopy(model)
    for _, module in gpt_linear_weights(qat):
        parametrize.register_parametrization(module, "weight", FakeQuant(bits, fake_fn))
    return qat


def bake_fake_quant(model: GPT) -> GPT:
    """Remove the parametrizations, keeping the quantized values as the weights (in place)."""
    for _, module in gpt_linear_weights(model):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


def ptq_model(model: GPT, bits: int) -> GPT:
    """Post-training quantization: a copy with every block linear weight replaced by its per-row
    ``bits``-bit quantization (the same quantizer as :func:`fake_quantize`), no training."""
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        for _, module in gpt_linear_weights(quantized):
            module.weight.copy_(fake_quantize(module.weight, bits))
    return quantized


def qat_finetune(model: GPT, tokens: np.ndarray, *, bits: int, steps: int, batch_size: int, block_size: int,
                 lr: float, seed: int = 0, device: torch.device | str = "cpu",
                 fake_fn: Callable[[torch.Tensor, int], torch.Tensor] = fake_quantize
                 ) -> tuple[GPT, list[float]]:
    """Quantization-aware fine-tuning: ``steps`` AdamW steps on the next-token loss with the block
    weights fake-quantized to ``bits`` bits, then the quantized values baked in. Returns the
    quantized copy and the training losses; ``model`` is unchanged."""
    qat = attach_fake_quant(model, bits, fake_fn).to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in qat.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    qat.eval()  # no dropout: we adapt to the quantizer, not regularise
    losses = []
    for _ in range(steps):
        x, y = sample_batch(tokens, batch_size, block_size, generator, device)
        loss = qat(x, y)[1]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(qat.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return bake_fake_quant(qat), losses


def codes_mismatch(got: torch.Tensor, want: torch.Tensor, ratio: torch.Tensor,
                   tol: float = 1e-3) -> str | None:
    """Why integer codes ``got`` differ from the reference ``want`` (None when they agree).

    ``ratio`` is the reference's ``w / scale`` before rounding. Where it lies within ``tol`` of a
    half-integer, another correct formula (``w * (qmax / amax)`` instead of ``w / scale``) may
    round the other way: a difference of one code is accepted there, and nowhere else."""
    if tuple(got.shape) != tuple(want.shape):
        return f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    diff = (got.to(torch.int64) - want.to(torch.int64)).abs()
    near_half = ((ratio.double() - ratio.double().floor()) - 0.5).abs() < tol
    bad = (diff > 1) | ((diff == 1) & ~near_half)
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        return (f"{int(bad.sum())} code(s) differ, e.g. at flat index {i}: got {int(got.flatten()[i])}, "
                f"expected {int(want.flatten()[i])} (w / scale = {float(ratio.flatten()[i]):.4f})")
    return None
