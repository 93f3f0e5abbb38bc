"""Attention and the transformer, piece by piece (chapter 8).

:mod:`course_lib.gpt` holds the GPT the later chapters train; this module holds what chapter 8
needs besides it, written to be read:

- :func:`scaled_dot_product_attention` with causal and boolean (e.g. padding) masks, and
  :func:`attention_probabilities`, the weights it mixes the values with;
- :func:`padding_mask`: which positions of a padded batch hold real tokens;
- :func:`multi_head_attention` from explicit weight matrices ``W_q, W_k, W_v, W_o`` (PyTorch's
  ``nn.Linear`` convention: ``y = x W^T + b``), causal (a decoder, GPT) or bidirectional (an
  encoder, BERT);
- positions: :func:`sinusoidal_positions` (the original transformer's) and rotary embeddings,
  :func:`rope_frequencies` and :func:`apply_rope` (RoFormer's, rotating the pairs
  ``(x[2i], x[2i+1])``);
- :func:`transformer_block`: one pre-LayerNorm block from a :class:`course_lib.gpt.Block`'s
  ``state_dict``, computed by that very ``Block`` (one piece of code serves both).

Boolean masks follow ``F.scaled_dot_product_attention``: **True where a query may attend**.
"""

from __future__ import annotations

import math

import torch
from torch.func import functional_call

from course_lib.gpt import Block, GPTConfig, causal_mask

# ---------------------------------------------------------------------------------------------
# Scaled dot-product attention and masks
# ---------------------------------------------------------------------------------------------


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None,
                            is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale + mask)``: the weights ``(..., Tq, Tk)`` of every query over the keys.

    ``q`` is ``(..., Tq, d)``, ``k`` ``(..., Tk, d)``; ``scale`` defaults to ``1 / sqrt(d)``.
    ``mask`` is boolean, broadcastable to ``(..., Tq, Tk)``, True where a query may attend;
    ``is_causal`` also hides the keys after each query (query ``i`` sees keys ``0..i``; it needs
    ``Tq == Tk``, as ``F.scaled_dot_product_attention`` aligns its causal mask top-left).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    allowed = mask
    if is_causal:
        if q.shape[-2] != k.shape[-2]:
            raise ValueError(f"is_causal needs as many queries as keys, got {q.shape[-2]} and {k.shape[-2]}")
        causal = causal_mask(q.shape[-2], k.shape[-2], q.device)
        allowed = causal if allowed is None else allowed & causal
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1)


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 mask: torch.Tensor | None = None, is_causal: bool = False,
                                 scale: float | None = None) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + mask) v``, ``(..., Tq, d_v)``: what
    ``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)`` computes
    (without dropout). See :func:`attention_probabilities` for the mask conventions."""
    return attention_probabilities(q, k, mask, is_causal, scale) @ v


def padding_mask(lengths: torch.Tensor | list[int], max_len: int | None = None) -> torch.Tensor:
    """Boolean ``(B, max_len)``: True at the first ``lengths[b]`` positions of row ``b`` (the real
    tokens), False on the padding after them. As an attention mask over *keys* it becomes
    ``padding_mask(...)[:, None, None, :]`` ``(B, 1, 1, T)`` (every head, every query)."""
    lengths = torch.as_tensor(lengths)
    max_len = int(lengths.max()) if max_len is None else max_len
    return torch.arange(max_len, device=lengths.device) < lengths[:, None]


# ---------------------------------------------------------------------------------------------
# Multi-head attention from explicit weights
# ---------------------------------------------------------------------------------------------


def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """``(B, T, C)`` -> ``(B, n_head, T, C // n_head)``: head ``h`` owns channels
    ``h * hd .. (h + 1) * hd - 1``, as in ``nn.MultiheadAttention`` and :mod:`course_lib.gpt`."""
    B, T, C = x.shape
    return x.view(B, T, n_head, C // n_head).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(B, n_head, T, hd)`` -> ``(B, T, n_head * hd)``: the heads side by side again."""
    B, H, T, hd = x.shape
    return x.transpose(1, 2).reshape(B, T, H * hd)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x @ w.T
    return y if b is None else y + b


def multi_head_attention(x: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor,
                         w_o: torch.Tensor, n_head: int, b_q: torch.Tensor | None = None,
                         b_k: torch.Tensor | None = None, b_v: torch.Tensor | None = None,
                         b_o: torch.Tensor | None = None, is_causal: bool = False,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head self-attention of ``x`` ``(B, T, C)`` -> ``(B, T, C)``.

    ``q = x W_q^T + b_q`` (likewise k, v), each split into ``n_head`` heads of ``C // n_head``
    channels; every head attends on its own (scaled by ``1 / sqrt(C // n_head)``); the heads are
    put side by side and mixed by ``W_o``: ``out = concat(heads) W_o^T + b_o``. ``mask``: boolean,
    broadcastable to ``(B, n_head, T, T)``, True where a query may attend.
    """
    q, k, v = (split_heads(_linear(x, w, b), n_head) for w, b in ((w_q, b_q), (w_k, b_k), (w_v, b_v)))
    heads = scaled_dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)
    return _linear(merge_heads(heads), w_o, b_o)


def gpt_attention_weights(w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor,
                          b_q: torch.Tensor, b_k: torch.Tensor, b_v: torch.Tensor,
                          b_o: torch.Tensor) -> dict[str, torch.Tensor]:
    """A :class:`course_lib.gpt.CausalSelfAttention` ``state_dict`` holding these weights: its
    ``qkv`` layer is the three projections stacked, ``proj`` is ``W_o``."""
    return {"qkv.weight": torch.cat([w_q, w_k, w_v]), "qkv.bias": torch.cat([b_q, b_k, b_v]),
            "proj.weight": w_o, "proj.bias": b_o}


# ---------------------------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------------------------


def sinusoidal_positions(n_positions: int, d_model: int, base: float = 10000.0,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The original transformer's position codes ``(n_positions, d_model)`` (``d_model`` even):
    ``PE[p, 2i] = sin(p / base^(2i/d))``, ``PE[p, 2i+1] = cos(p / base^(2i/d))``. Each pair of
    channels is a clock turning at its own speed, from one turn every ``2 pi`` positions to one
    every ``2 pi * base``."""
    if d_model % 2:
        raise ValueError(f"d_model must be even, got {d_model}")
    angles = torch.arange(n_positions, dtype=torch.float64)[:, None] * rope_frequencies(d_model, base)
    pe = torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(n_positions, d_model)
    return pe.to(dtype)


def rope_frequencies(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """``theta_i = base^(-2i / head_dim)`` for ``i = 0 .. head_dim/2 - 1`` (float64): the angle,
    in radians per position, by which pair ``i`` turns."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    return base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def apply_rope(x: torch.Tensor, positions: torch.Tensor | None = None, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of ``x`` ``(..., T, d)`` (``d`` even), same shape and dtype.

    The channels pair up as ``(x[2i], x[2i+1])``; at position ``p`` pair ``i`` is rotated by the
    angle ``p * theta_i`` (:func:`rope_frequencies`)::

        out[2i]   = x[2i] cos(p theta_i) - x[2i+1] sin(p theta_i)
        out[2i+1] = x[2i] sin(p theta_i) + x[2i+1] cos(p theta_i)

    ``positions``: ``(T,)`` integers, default ``0 .. T-1``. Rotating q by ``m theta`` and k by
    ``n theta`` leaves ``q . k`` depending on ``m - n`` only: relative positions for free.
    """
    T, d = x.shape[-2], x.shape[-1]
    if positions is None:
        positions = torch.arange(T, device=x.device)
    angles = positions.to(torch.float64)[:, None] * rope_frequencies(d, base).to(x.device)  # (T, d/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    pairs = x.unflatten(-1, (d // 2, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2)


# ---------------------------------------------------------------------------------------------
# The transformer block
# ---------------------------------------------------------------------------------------------


def transformer_block(x: torch.Tensor, state: dict[str, torch.Tensor], n_head: int) -> torch.Tensor:
    """One pre-LayerNorm GPT block on ``x`` ``(B, T, C)`` with the weights ``state`` (a
    :class:`course_lib.gpt.Block`'s ``state_dict``)::

        x = x + attn(ln_1(x))      # causal multi-head self-attention
        x = x + mlp(ln_2(x))       # C -> 4C -> GELU (tanh) -> C

    Computed by ``course_lib.gpt.Block`` itself with the weights swapped in, so the chapter's
    reference and the model the course trains are the same code.
    """
    C = x.shape[-1]
    config = GPTConfig(vocab_size=1, block_size=max(1, x.shape[-2]), n_layer=1, n_head=n_head, n_embd=C,
                       bias="ln_1.bias" in state, attention="math")
    with torch.device("meta"):
        block = Block(config).eval()
    return functional_call(block, dict(state), (x,), strict=True)
