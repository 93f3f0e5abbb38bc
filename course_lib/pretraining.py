"""Pretraining objectives and one training step, written out (chapter 10).

- :func:`next_token_loss` — the GPT objective: position ``t`` predicts token ``t + 1``.
- :func:`mlm_mask` — the BERT objective's inputs and labels, with the 80/10/10 rule.
- :func:`train_step_with_accumulation` — one optimiser step over several micro-batches.
- :func:`nucleus_probs` — the distribution that top-p (nucleus) sampling draws from.

The training loop the course runs is :class:`course_lib.lm_train.Trainer`; these are the pieces
it is made of, small enough to check one by one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.gpt import top_p_filter

IGNORE_INDEX = -100  # PyTorch's default ignore_index, and the label of unmasked MLM positions


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor,
                    ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of ``logits[:, t]`` (``(B, T, V)``) predicting ``ids[:, t + 1]`` (``(B, T)``).

    The last position has no next token and the first token is never a target; targets equal to
    ``ignore_index`` (padding) are left out of the sum *and* of the count.
    """
    vocab = logits.shape[-1]
    predictions = logits[:, :-1, :].reshape(-1, vocab)
    targets = ids[:, 1:].reshape(-1)
    return F.cross_entropy(predictions, targets, ignore_index=ignore_index)


def mlm_mask(ids: torch.Tensor, mask_prob: float, special_ids: Sequence[int], mask_id: int, vocab_size: int,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: ``(inputs, labels)``, both shaped like ``ids`` (int64).

    Each token that is not special is selected with probability ``mask_prob``. A selected token's
    label is its id (the model must predict it) and its input becomes ``mask_id`` with probability
    0.8, a token drawn uniformly from ``[0, vocab_size)`` with probability 0.1, and stays itself
    with probability 0.1. Tokens not selected keep their input and get the label -100.

    The random draws, in this order, all from ``generator``: ``torch.rand`` for the selection,
    ``torch.rand`` for the 80/10/10 choice, ``torch.randint`` for the random tokens.
    """
    ids = ids.long()
    special = torch.isin(ids, torch.as_tensor(list(special_ids), dtype=torch.long, device=ids.device))
    selected = (torch.rand(ids.shape, generator=generator) < mask_prob).to(ids.device) & ~special
    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
    choice = torch.rand(ids.shape, generator=generator).to(ids.device)
    random_tokens = torch.randint(0, vocab_size, ids.shape, generator=generator).to(ids.device)
    inputs = ids.clone()
    inputs[selected & (choice < 0.8)] = mask_id
    use_random = selected & (choice >= 0.8) & (choice < 0.9)
    inputs[use_random] = random_tokens[use_random]
    return inputs, labels


def train_step_with_accumulation(model: nn.Module, optimizer: torch.optim.Optimizer,
                                 loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
                                 micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                                 grad_clip: float = 0.0) -> float:
    """One optimiser step on the gradient of the mean loss over equal-sized micro-batches.

    Clear the gradients, add up the gradients of ``loss_fn(model, x, y) / n`` over the ``n``
    micro-batches, clip the total gradient norm to ``grad_clip`` (0: no clipping) once, step, and
    clear the gradients. Returns the mean loss (a float). With a mean ``loss_fn`` this is the step
    one batch holding all the micro-batches would take, with the memory of one micro-batch.
    """
    optimizer.zero_grad(set_to_none=True)
    n = len(micro_batches)
    total = 0.0
    for x, y in micro_batches:
        loss = loss_fn(model, x, y) / n
        loss.backward()
        total += loss.item()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def nucleus_probs(logits: torch.Tensor, p: float, temperature: float = 1.0) -> torch.Tensor:
    """The distribution top-p sampling draws from, ``(..., V)``: the logits divided by
    ``temperature``, filtered by :func:`course_lib.gpt.top_p_filter` (keep the most likely tokens
    until their probabilities first reach ``p``), and renormalised by a softmax."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(top_p_filter(logits / temperature, p), dim=-1)
