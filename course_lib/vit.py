"""A vision transformer (ViT, Dosovitskiy et al., 2020) for chapter 8: images as sequences of patches.

- :func:`patchify` cuts images ``(N, C, H, W)`` into non-overlapping ``p x p`` patches and flattens
  each one: ``(N, L, C*p*p)`` with ``L = (H/p) (W/p)`` patches in row-major order (left to right,
  then top to bottom), each patch listed channel by channel, row by row (the order of a
  convolution's ``weight.view(D, -1)``). A linear layer on these vectors is therefore the same map
  as a convolution with kernel ``p`` and stride ``p``: :func:`patch_embedding_as_conv` checks it.
- :class:`SelfAttention` is :class:`course_lib.gpt.CausalSelfAttention` without the causal mask
  (same ``qkv`` and ``proj`` parameters): every patch may look at every other, as in BERT's
  encoder. :func:`encoder_block` is :class:`course_lib.gpt.Block` with that attention: the same
  pre-LN block as the GPT's.
- :class:`ViT`: patch embedding + a learned class token + learned positions -> blocks -> LayerNorm
  -> a linear classifier on the class token (``pool="cls"``) or on the mean of the patch tokens
  (``pool="mean"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.gpt import Block, CausalSelfAttention, GPTConfig


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Non-overlapping ``patch x patch`` patches of ``images`` ``(N, C, H, W)`` as ``(N, L, C*patch*patch)``.

    Patch ``l = i * (W // patch) + j`` is the block of rows ``i*patch .. (i+1)*patch - 1`` and columns
    ``j*patch .. (j+1)*patch - 1`` (row-major); its vector lists channel 0's pixels row by row, then
    channel 1's, ... Raises ValueError when H or W is not a multiple of ``patch``.
    """
    n, c, h, w = images.shape
    if patch < 1 or h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    grid = images.reshape(n, c, h // patch, patch, w // patch, patch)   # (N, C, i, u, j, v)
    return grid.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // patch) * (w // patch), c * patch * patch)


def patch_embedding_as_conv(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            patch: int) -> torch.Tensor:
    """The same patch embedding computed by ``F.conv2d`` (kernel = stride = ``patch``):
    ``weight`` ``(D, C, patch, patch)`` -> tokens ``(N, L, D)`` in row-major order."""
    return F.conv2d(images, weight, bias, stride=patch).flatten(2).transpose(1, 2)


class SelfAttention(CausalSelfAttention):
    """Multi-head self-attention without a mask (an encoder's), with the GPT layer's parameters."""

    def forward(self, x: torch.Tensor, cache=None, record=None) -> torch.Tensor:  # noqa: ARG002 - Block's call
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)      # no is_causal
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


def encoder_block(config: GPTConfig) -> Block:
    """course_lib.gpt.Block (pre-LN, GELU MLP) whose attention sees every position."""
    block = Block(config)
    block.attn = SelfAttention(config)
    return block


@dataclass
class ViTConfig:
    """The shape of a small ViT for the 8x8 digits (defaults) or any ``channels x image_size^2`` images."""

    image_size: int = 8
    patch: int = 4
    channels: int = 1
    n_classes: int = 10
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0
    pool: str = "cls"  # "cls": classify the class token; "mean": the mean of the patch tokens

    def __post_init__(self) -> None:
        if self.image_size % self.patch:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch={self.patch}")
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch) ** 2


class ViT(nn.Module):
    """Images ``(N, C, H, W)`` -> class logits ``(N, n_classes)``."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        block_config = GPTConfig(vocab_size=1, block_size=config.n_patches + 1, n_layer=config.n_layer,
                                 n_head=config.n_head, n_embd=config.n_embd, dropout=config.dropout)
        self.patch_embed = nn.Linear(config.channels * config.patch ** 2, config.n_embd)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.n_embd))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.n_patches + 1, config.n_embd))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(encoder_block(block_config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.n_classes)
        self.apply(self._init_weights)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # As the GPT: N(0, 0.02) weights and zero biases (the residual projections are not scaled
        # down here: two blocks are shallow enough without it).
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(patchify(images, self.config.patch))           # (N, L, D)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = self.drop(torch.cat([cls, tokens], dim=1) + self.pos_embed)          # (N, L + 1, D)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        pooled = x[:, 0] if self.config.pool == "cls" else x[:, 1:].mean(dim=1)
        return self.head(pooled)
