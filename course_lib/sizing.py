"""How big is a model? Parameters, training memory and training compute (chapter 0).

These are the reference answers for chapter 0's exercises and the numbers later chapters use to
plan runs. Conventions (stated so any correct implementation agrees):

- A GPT block is the GPT-2 block: pre-LayerNorm (weight and bias), attention with a fused
  ``d -> 3d`` projection and a ``d -> d`` output projection, an MLP ``d -> 4d -> d``; every linear
  layer has a bias; learned position embeddings; a final LayerNorm; the output head shares the
  token-embedding matrix when ``tied`` (else it is a ``d -> vocab`` matrix without bias).
- Training memory counts weights, gradients and optimizer state only (not activations), all
  stored in one precision.
- Training compute is the usual ``6 * N * D`` FLOPs: 2 for the forward multiply-add, 4 for the
  backward pass, per parameter and per token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

BYTES_PER_VALUE = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
# Values of optimizer state kept per parameter.
OPTIMIZER_STATES = {"sgd": 0, "momentum": 1, "rmsprop": 1, "adagrad": 1, "adam": 2, "adamw": 2}


def mlp_param_count(layer_sizes: Sequence[int], bias: bool = True) -> int:
    """Parameters of a fully connected net with the given layer widths, e.g. ``[64, 128, 10]``."""
    sizes = [int(s) for s in layer_sizes]
    if len(sizes) < 2 or any(s <= 0 for s in sizes):
        raise ValueError("layer_sizes needs at least two positive widths")
    return sum(n_in * n_out + (n_out if bias else 0) for n_in, n_out in zip(sizes, sizes[1:], strict=False))


def gpt_param_count(vocab_size: int, block_size: int, n_layer: int, d_model: int,
                    tied: bool = True) -> int:
    """Parameters of a GPT-2 style model (see the module docstring for the exact architecture).

    GPT-2 small (vocab 50257, block 1024, 12 layers, width 768, tied) has 124,439,808.
    """
    if min(vocab_size, block_size, d_model) < 1 or n_layer < 0:
        raise ValueError("vocab_size, block_size and d_model must be positive, n_layer >= 0")
    d = d_model
    embeddings = vocab_size * d + block_size * d
    per_block = (2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (2 * d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    head = 0 if tied else vocab_size * d
    return embeddings + n_layer * per_block + 2 * d + head


def bytes_per_value(precision: str | torch.dtype) -> int:
    """Bytes one number takes in ``precision`` (``'fp32'``, ``'bf16'``, … or a torch dtype)."""
    if isinstance(precision, torch.dtype):
        return torch.empty((), dtype=precision).element_size()
    try:
        return BYTES_PER_VALUE[precision.lower()]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}; use one of {sorted(BYTES_PER_VALUE)}") from None


def training_memory_bytes(n_params: int, precision: str | torch.dtype = "fp32",
                          optimizer: str = "adam") -> dict[str, int]:
    """Bytes for weights, gradients and optimizer state when all are kept in ``precision``.

    Returns ``{'weights', 'gradients', 'optimizer', 'total'}``. Adam keeps two values per
    parameter (first and second moment), SGD with momentum one, plain SGD none.
    """
    try:
        states = OPTIMIZER_STATES[optimizer.lower()]
    except KeyError:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {sorted(OPTIMIZER_STATES)}") from None
    size = bytes_per_value(precision)
    weights = n_params * size
    gradients = n_params * size
    state = states * n_params * size
    return {"weights": weights, "gradients": gradients, "optimizer": state,
            "total": weights + gradients + state}


def training_flops(n_params: int, n_tokens: int) -> float:
    """Training compute in FLOPs by the ``6 * N * D`` rule."""
    return 6.0 * n_params * n_tokens


def training_days(n_params: int, n_tokens: int, peak_flops_per_s: float, mfu: float = 0.4,
                  n_gpus: int = 1) -> float:
    """Wall-clock days to train on ``n_gpus`` GPUs of ``peak_flops_per_s`` each, at a model
    FLOPs utilisation ``mfu`` (the fraction of peak that real training achieves)."""
    if not 0 < mfu <= 1:
        raise ValueError("mfu is a fraction in (0, 1]")
    seconds = training_flops(n_params, n_tokens) / (peak_flops_per_s * mfu * n_gpus)
    return seconds / 86_400


def pairwise_sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between every row of ``a`` (n, d) and of ``b`` (m, d): (n, m).

    Broadcasting, no Python loops: ``|a|^2 + |b|^2 - 2 a b^T`` loses precision when points are far
    from the origin and close to each other, so we difference directly instead.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected shapes (n, d) and (m, d), got {tuple(a.shape)} and {tuple(b.shape)}")
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(dim=-1)


# ---------------------------------------------------------------------------------------------
# Chapter 11: mixed precision, sharding (ZeRO / FSDP) and activations
# ---------------------------------------------------------------------------------------------

# Mixed precision keeps a 16-bit working copy of the weights and 16-bit gradients, plus an fp32
# "master" copy of the weights that the optimizer updates, and fp32 optimizer state (Rajbhandari
# et al., 2020, "ZeRO": 2 + 2 + 12 = 16 bytes per parameter with Adam).
MIXED_PRECISIONS = ("bf16", "fp16")


def memory_per_gpu(n_params: int, precision: str = "bf16", optimizer: str = "adam",
                   world_size: int = 1, zero_stage: int = 0) -> dict[str, int]:
    """Training memory on each of ``world_size`` GPUs, without activations, in bytes.

    ``precision``: ``'fp32'`` (weights, gradients and optimizer state in fp32, no master copy) or
    ``'bf16'``/``'fp16'`` mixed precision (16-bit weights and gradients, an fp32 master copy of
    the weights, fp32 optimizer state). ``zero_stage`` (ZeRO; FSDP's ``fully_shard`` is stage 3):
    0 replicates everything (plain data parallelism), 1 shards the master weights and optimizer
    state over the ``world_size`` GPUs, 2 also the gradients, 3 also the weights. A sharded value
    holds ``ceil(n_params / world_size)`` parameters per GPU (the flat buffer is padded).

    Returns ``{'weights', 'gradients', 'master', 'optimizer', 'total'}`` (ints).
    """
    if n_params < 0 or world_size < 1 or zero_stage not in (0, 1, 2, 3):
        raise ValueError("n_params >= 0, world_size >= 1 and zero_stage in 0..3 are required")
    try:
        states = OPTIMIZER_STATES[optimizer.lower()]
    except KeyError:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {sorted(OPTIMIZER_STATES)}") from None
    precision = precision.lower()
    if precision not in ("fp32", *MIXED_PRECISIONS):
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'fp16', got {precision!r}")
    mixed = precision in MIXED_PRECISIONS
    shard = -(-n_params // world_size)
    size = 2 if mixed else 4

    def count(stage_that_shards: int) -> int:
        return shard if zero_stage >= stage_that_shards else n_params

    weights = count(3) * size
    gradients = count(2) * size
    master = count(1) * 4 if mixed else 0
    state = count(1) * 4 * states
    return {"weights": weights, "gradients": gradients, "master": master, "optimizer": state,
            "total": weights + gradients + master + state}


def activation_memory_bytes(batch_size: int, seq_len: int, d_model: int, n_layer: int,
                            n_head: int, recompute: bool = False, attention_scores: bool = True) -> int:
    """Activations a GPT keeps for the backward pass, in bytes, with 16-bit activations.

    Korthikanti et al. (2022, "Reducing activation recomputation in large transformer models"):
    one transformer layer saves ``s b h (34 + 5 a s / h)`` bytes (``s`` sequence length, ``b``
    batch, ``h`` width, ``a`` heads): ``34 s b h`` for the inputs of its matrix products,
    LayerNorms, GELU and dropout masks, and ``5 a s^2 b`` for the attention scores, their softmax
    and its dropout mask. A fused attention kernel (FlashAttention) stores none of the ``s x s``
    matrices (``attention_scores=False``). With full activation checkpointing (``recompute``) a
    layer keeps only its 16-bit input, ``2 s b h``, and recomputes the rest during backward.
    Embeddings and the output head are left out.
    """
    if min(batch_size, seq_len, d_model, n_head) < 1 or n_layer < 0:
        raise ValueError("sizes must be positive (n_layer >= 0)")
    s, b, h, a = seq_len, batch_size, d_model, n_head
    if recompute:
        return n_layer * 2 * s * b * h
    per_layer = 34 * s * b * h + (5 * a * s * s * b if attention_scores else 0)
    return n_layer * per_layer
