"""Training across processes (chapter 11): the parallelisms as small code.

Every function here runs inside one rank of a ``torch.distributed`` process group; the ranks are
started by :mod:`course_lib.launch` (:func:`~course_lib.launch.run_workers` forks them from a
notebook, :func:`~course_lib.launch.torchrun` starts a script as on a cluster).

Reference implementations of the chapter's exercises and demos: :func:`average_gradients` (data
parallelism by hand), :func:`tp_shard`, :func:`column_parallel_linear` and
:func:`row_parallel_linear` (Megatron-style tensor parallelism, with the differentiable
collectives :func:`all_reduce_sum` and :func:`copy_to_parallel`), :func:`gpipe_step` (a pipeline
over ranks with send/recv), and :class:`RankSlicedBatches` (so that a data-parallel run sees
exactly the batches of a single-process run, for comparing the two).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# ---------------------------------------------------------------------------------------------
# Data parallelism
# ---------------------------------------------------------------------------------------------


def average_gradients(model: nn.Module) -> None:
    """Replace every parameter's ``.grad`` by its mean over the ranks of the default group, in
    place (what DDP does during backward). Parameters without a gradient are skipped."""
    world = dist.get_world_size()
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world


class RankSlicedBatches:
    """A batch source (``get_batch`` as in :class:`course_lib.lm_data.LMData`) that makes a
    data-parallel run see exactly the data of a single-process one.

    Call ``n`` of a split draws one *global* batch of ``batch_size * world_size`` windows with a
    generator seeded by ``(seed, split, n)`` and hands out rank ``rank``'s contiguous slice. With
    ``world_size=1`` and a batch twice as large, a single process sees the union of what two
    ranks see; the trainer's own generator is ignored.
    """

    def __init__(self, data: Any, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        self.data, self.rank, self.world_size, self.seed = data, rank, world_size, seed
        self.calls = {"train": 0, "val": 0}
        self.tokenizer = getattr(data, "tokenizer", None)

    def get_batch(self, split: str, batch_size: int, block_size: int,
                  generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        n = self.calls[split]
        self.calls[split] += 1
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + n * 2 + (split == "val"))
        x, y = self.data.get_batch(split, batch_size * self.world_size, block_size, g, device)
        rows = slice(self.rank * batch_size, (self.rank + 1) * batch_size)
        return x[rows], y[rows]


# ---------------------------------------------------------------------------------------------
# Tensor parallelism (Megatron-LM, Shoeybi et al. 2019)
# ---------------------------------------------------------------------------------------------


class _AllReduceSum(torch.autograd.Function):
    """Forward: the sum over ranks. Backward: the gradient unchanged (Megatron's ``g``): every rank
    computes the same loss from the same summed output, so each partial sum's gradient is the
    output's gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _CopyToParallel(torch.autograd.Function):
    """Forward: the input unchanged. Backward: the sum over ranks of the gradients (Megatron's
    ``f``): each rank used the replicated input for its own shard of the work."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over all ranks, differentiable (backward: identity). Not in place."""
    return _AllReduceSum.apply(x)


def copy_to_parallel(x: torch.Tensor) -> torch.Tensor:
    """``x`` unchanged, but its gradient is summed over the ranks in backward."""
    return _CopyToParallel.apply(x)


def tp_shard(weight: torch.Tensor, bias: torch.Tensor | None, rank: int, world_size: int,
             style: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rank ``rank``'s shard of an ``nn.Linear``'s ``weight`` ``(out, in)`` and ``bias`` ``(out,)``.

    ``'column'``: the rows (output features) ``rank*k .. (rank+1)*k - 1`` of the weight and of the
    bias, ``k = out / world_size``. ``'row'``: the columns (input features) ``rank*k ..`` with
    ``k = in / world_size``; the bias is not split (it is added once, to the sum) and is returned
    whole. Copies (``.clone()``), so that shards are independent parameters.
    """
    if style not in ("column", "row"):
        raise ValueError(f"style must be 'column' or 'row', got {style!r}")
    dim = 0 if style == "column" else 1
    if weight.shape[dim] % world_size:
        raise ValueError(f"{weight.shape[dim]} features do not split into {world_size} equal shards")
    k = weight.shape[dim] // world_size
    part = slice(rank * k, (rank + 1) * k)
    w = weight[part].clone() if style == "column" else weight[:, part].clone()
    if bias is None:
        return w, None
    return w, (bias[part].clone() if style == "column" else bias.clone())


def column_parallel_linear(x: torch.Tensor, weight_shard: torch.Tensor,
                           bias_shard: torch.Tensor | None) -> torch.Tensor:
    """This rank's slice of the output features of ``x @ W^T + b``: ``(..., out / world)``.
    ``x`` is the same on every rank; its gradient is summed over the ranks."""
    return nn.functional.linear(copy_to_parallel(x), weight_shard, bias_shard)


def row_parallel_linear(x_shard: torch.Tensor, weight_shard: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """The full output ``x @ W^T + b`` on every rank from this rank's slice of the input features
    ``x_shard`` ``(..., in / world)`` and of the weight's columns: partial products, summed over the
    ranks, plus the (whole, replicated) bias once."""
    y = all_reduce_sum(x_shard @ weight_shard.T)
    return y + bias if bias is not None else y


def tensor_parallel_mlp(x: torch.Tensor, fc: nn.Linear, proj: nn.Linear, rank: int, world_size: int,
                        shard: Callable = tp_shard, row_linear: Callable = row_parallel_linear
                        ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Megatron's MLP ``proj(gelu(fc(x)))`` split over the ranks: ``fc`` column-parallel, GELU on
    each rank's slice of the hidden features (no communication), ``proj`` row-parallel (one
    all-reduce). Returns the output and this rank's shards ``[w_fc, b_fc, w_proj, b_proj]`` (leaf
    tensors that require grad, for reading their gradients). ``shard`` and ``row_linear`` replace
    :func:`tp_shard` and :func:`row_parallel_linear` (to check other implementations)."""
    w1, b1 = shard(fc.weight.detach(), fc.bias.detach(), rank, world_size, "column")
    w2, b2 = shard(proj.weight.detach(), proj.bias.detach(), rank, world_size, "row")
    shards = [t.requires_grad_() for t in (w1, b1, w2, b2)]
    hidden = nn.functional.gelu(column_parallel_linear(x, w1, b1))
    return row_linear(hidden, w2, b2), shards


# ---------------------------------------------------------------------------------------------
# Pipeline parallelism (GPipe, Huang et al. 2019)
# ---------------------------------------------------------------------------------------------


def gpipe_step(stage: nn.Module, micro_batches: Sequence[torch.Tensor] | None,
               targets: Sequence[torch.Tensor] | None, loss_fn: Callable, activation_shape: Sequence[int],
               n_micro: int) -> float | None:
    """One GPipe training step on this rank's ``stage`` (rank ``r`` holds the ``r``-th consecutive
    piece of the model): all forward passes of the ``n_micro`` micro-batches, then all backward
    passes in reverse, accumulating the gradients of the stage's parameters.

    Activations travel forward with ``send``/``recv`` (shape ``activation_shape``, float32), and
    their gradients travel back. Rank 0 gets the ``micro_batches``; the last rank the ``targets``
    and computes ``loss_fn(output, target) / n_micro`` (the mean over micro-batches, as one big
    batch would). Returns that mean loss on the last rank, None elsewhere.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    first, last = rank == 0, rank == world - 1
    inputs, outputs = [], []
    total = 0.0
    for i in range(n_micro):  # the forward "wave"
        if first:
            x = micro_batches[i]
        else:
            x = torch.empty(*activation_shape)
            dist.recv(x, src=rank - 1)
            x.requires_grad_()
        y = stage(x)
        if last:
            y = loss_fn(y, targets[i]) / n_micro
            total += y.item()
        else:
            dist.send(y.detach().contiguous(), dst=rank + 1)
        inputs.append(x)
        outputs.append(y)
    for i in reversed(range(n_micro)):  # the backward wave
        if last:
            outputs[i].backward()
        else:
            grad = torch.empty(*activation_shape)
            dist.recv(grad, src=rank + 1)
            outputs[i].backward(grad)
        if not first:
            dist.send(inputs[i].grad.contiguous(), dst=rank - 1)
    return total if last else None


def pipeline_bubble_fraction(n_stages: int, n_micro: int) -> float:
    """Fraction of a GPipe step each device sits idle: ``(p - 1) / (m + p - 1)``."""
    if n_stages < 1 or n_micro < 1:
        raise ValueError("n_stages and n_micro must be >= 1")
    return (n_stages - 1) / (n_micro + n_stages - 1)


def gpipe_schedule(n_stages: int, n_micro: int) -> list[list[str | None]]:
    """The GPipe timetable: ``table[stage][tick]`` is ``'F3'`` (forward of micro-batch 3), ``'B3'``
    or None (idle, the bubble), one tick per stage-micro-batch pass, backward as long as forward."""
    ticks = 2 * (n_micro + n_stages - 1)
    table: list[list[str | None]] = [[None] * ticks for _ in range(n_stages)]
    for s in range(n_stages):
        for i in range(n_micro):
            table[s][s + i] = f"F{i}"
            table[s][n_micro + n_stages - 1 + (n_stages - 1 - s) + i] = f"B{n_micro - 1 - i}"
    return table


def bytes_of(tensors: Sequence[torch.Tensor]) -> int:
    """Total bytes of the tensors' elements."""
    return sum(t.numel() * t.element_size() for t in tensors)


def human_bytes(n: float) -> str:
    """``1.5 GB``-style text (powers of 1000: GPU makers' GB)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # unreachable

