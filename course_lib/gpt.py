"""A GPT, written to be read top to bottom (chapters 8-13) and to run fast on a GPU.

The architecture is GPT-2's:

- token embedding + learned position embedding -> ``n_layer`` blocks -> final LayerNorm -> a
  linear head that *shares its weight matrix with the token embedding* (weight tying: the same
  vectors read tokens in and score them out; it saves ``vocab_size * n_embd`` parameters);
- each block is pre-LayerNorm: ``x = x + attn(ln_1(x))`` then ``x = x + mlp(ln_2(x))``. Normalising
  the input of each sub-layer, not its output, keeps the residual stream an untouched sum, which
  is what makes deep stacks train without warm-up tricks;
- causal self-attention with ``n_head`` heads, the three projections fused into one ``d -> 3d``
  linear layer (one large matrix product is faster than three small ones);
- an MLP ``d -> 4d -> d`` with the tanh approximation of GELU, as GPT-2.

Attention has two paths that compute the same function: ``"sdpa"`` calls
``F.scaled_dot_product_attention``, which picks a fused kernel (FlashAttention on recent GPUs) that
never stores the ``T x T`` score matrix; ``"math"`` writes the formula out,
``softmax(q k^T / sqrt(d_head) + mask) v``, for teaching and for looking at the attention weights.

Generation can keep a *KV cache*: the keys and values of tokens already processed do not change
when a token is appended (attention is causal), so each new token costs one position's work
instead of re-running the whole prefix.

Compute: :func:`flops_per_token` estimates training FLOPs per token; :func:`mfu` turns a measured
tokens/s into model FLOPs utilisation against the GPU's dense bf16 peak from
:data:`PEAK_BF16_FLOPS`. A GPU not in the table (and the CPU) gets ``None``: no made-up MFU.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

ATTENTION_IMPLS = ("sdpa", "math")


@dataclass
class GPTConfig:
    """The shape of a GPT. The defaults are GPT-2 small (124M) with its vocabulary padded from
    50,257 to 50,304 (a multiple of 128: matrix sizes that tile evenly run faster on GPUs)."""

    vocab_size: int = 50304
    block_size: int = 1024  # the longest context, set by the position-embedding table
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in the linear layers and LayerNorms, as GPT-2
    attention: str = "sdpa"  # "sdpa" (fused kernels) or "math" (the formula written out)

    def __post_init__(self) -> None:
        if min(self.vocab_size, self.block_size, self.n_layer, self.n_head, self.n_embd) < 1:
            raise ValueError(f"every size must be >= 1: {self}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    """``vocab_size`` rounded up to a multiple of ``multiple``; the extra rows are never targets."""
    return -(-vocab_size // multiple) * multiple


# The two model shapes the benchmarks and targets refer to.
GPT2_124M = GPTConfig()
CHAR_10M = GPTConfig(vocab_size=128, block_size=256, n_layer=6, n_head=6, n_embd=384)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


def causal_mask(n_queries: int, n_keys: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean ``(n_queries, n_keys)`` mask, True where a query may attend.

    The queries are the *last* ``n_queries`` positions of the ``n_keys`` (the earlier keys come
    from a cache), so query ``i`` sits at position ``n_keys - n_queries + i`` and sees keys up to
    and including that position.
    """
    return torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).tril(diagonal=n_keys - n_queries)


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                   dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention written out. ``q`` is ``(..., Tq, hd)``, ``k, v`` are
    ``(..., Tk, hd)``; returns the output ``(..., Tq, hd)`` and the weights ``(..., Tq, Tk)``.

    Dividing the scores by ``sqrt(hd)`` keeps their variance near 1 whatever the head size, so the
    softmax does not saturate into a one-hot (whose gradient vanishes).
    """
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    # Under autocast the scores are bf16/fp16: take the softmax in fp32, as fused kernels do.
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    weights = weights.to(q.dtype)
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v, weights


class KVCache:
    """Keys and values of every layer for the tokens processed so far.

    Buffers are allocated once for ``max_len`` positions and filled in place: appending by
    ``torch.cat`` would copy the whole cache at every generated token.
    """

    def __init__(self, n_layer: int, max_len: int) -> None:
        self.n_layer = n_layer
        self.max_len = max_len
        self.length = 0  # positions already stored (the same for every layer)
        self.keys: torch.Tensor | None = None  # (n_layer, B, H, max_len, hd), made on first use
        self.values: torch.Tensor | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer ``layer``'s new ``(B, H, T, hd)`` keys and values after the cached ones;
        return all keys and values so far. :meth:`advance` moves past them once every layer has
        stored its own."""
        if self.keys is None:
            # Zeros, not torch.empty: the static decoder multiplies the not-yet-written positions
            # by an attention weight of 0, and 0 * (a NaN left in uninitialised memory) is NaN.
            shape = (self.n_layer, k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.keys = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.values = torch.zeros(shape, dtype=v.dtype, device=v.device)
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} were asked for")
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> KVCache:
        """Forget the stored positions but keep the buffers (a compiled decoder keeps its graph)."""
        self.length = 0
        return self


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: each position mixes the values of itself and earlier
    positions, weighted by how well its query matches their keys, in ``n_head`` subspaces."""

    def __init__(self, config: GPTConfig, layer_index: int = 0) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.layer_index = layer_index  # which slot of a KV cache is this layer's
        self.dropout = config.dropout
        self.impl = config.attention
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.proj.is_residual_projection = True  # scaled down at init (see GPT._init_weights)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                record: list[torch.Tensor] | None = None) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, 3C) -> three (B, H, T, hd): heads become a batch dimension.
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
        dropout_p = self.dropout if self.training else 0.0
        if self.impl == "math" or record is not None:
            y, weights = attention_math(q, k, v, causal=True, dropout_p=dropout_p)
            if record is not None:
                record.append(weights.detach())
        elif q.shape[2] == k.shape[2]:  # no cached prefix: the plain causal case, fastest kernels
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif q.shape[2] == 1:  # one new token after a cached prefix: it may see every key
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:  # several new tokens after a cached prefix: is_causal would align the mask wrongly
            mask = causal_mask(q.shape[2], k.shape[2], q.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(B, T, C)  # heads back side by side
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network ``d -> 4d -> GELU -> d``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """One pre-LayerNorm transformer block: attention, then MLP, each added to the residual."""

    def __init__(self, config: GPTConfig, layer_index: int = 0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_index)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                record: list[torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, record)
        return x + self.mlp(self.ln_2(x))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class GPT(nn.Module):
    """A GPT-2 style decoder-only transformer. ``model(idx, targets)`` returns ``(logits, loss)``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: one matrix, two uses
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2's initialisation: N(0, 0.02) weights, zero biases. Each block *adds* two outputs
        to the residual stream, so its variance grows with depth; the two projections that write
        into it get their std divided by ``sqrt(2 * n_layer)`` to keep the sum's scale fixed."""
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "is_residual_projection", False):
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # -- sizes ---------------------------------------------------------------------------------
    def num_params(self, exclude_position_embedding: bool = False) -> int:
        """Number of parameters, the tied embedding/head matrix counted once."""
        total = sum(p.numel() for p in self.parameters())
        return total - (self.wpe.weight.numel() if exclude_position_embedding else 0)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token at context ``seq_len`` (default ``block_size``); see
        :func:`flops_per_token`."""
        c = self.config
        return flops_per_token(self.num_params(exclude_position_embedding=True), c.n_layer, c.n_embd,
                               seq_len or c.block_size)

    # -- forward -------------------------------------------------------------------------------
    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None,
                      record: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The final-LayerNorm output ``(B, T, n_embd)`` for token ids ``idx`` ``(B, T)``.

        With a ``cache``, ``idx`` holds only the *new* tokens; their positions continue after the
        cached ones. With a ``record`` list, every layer's attention weights are appended to it.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size="
                             f"{self.config.block_size}; crop the context to the last "
                             f"{self.config.block_size} tokens")
        positions = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))
        for block in self.blocks:
            x = block(x, cache, record)
        if cache is not None:
            cache.advance(T)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | None = None, last_only: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``(B, T, vocab)`` (``(B, 1, vocab)`` with ``last_only``) and, when ``targets``
        ``(B, T)`` are given, the mean next-token cross-entropy; targets of -1 are ignored."""
        x = self.hidden_states(idx, cache)
        if last_only:
            x = x[:, -1:, :]  # generation needs one row of logits, not T: skip the rest of the head
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            # bf16/fp16 logits (autocast) are scored in fp32; fp32 and fp64 models keep their dtype.
            scores = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
            loss = F.cross_entropy(scores.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def attention_weights(self, idx: torch.Tensor) -> torch.Tensor:
        """Attention weights of every layer and head, ``(n_layer, B, n_head, T, T)`` (eval mode)."""
        was_training = self.training
        self.eval()
        record: list[torch.Tensor] = []
        try:
            self.hidden_states(idx, record=record)
        finally:
            self.train(was_training)
        return torch.stack(record)

    # -- generation ----------------------------------------------------------------------------
    def new_cache(self) -> KVCache:
        return KVCache(self.config.n_layer, self.config.block_size)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None, compiled: bool = False) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` ``(B, T)`` and return ``(B, T + n)``.

        ``temperature=0`` is greedy decoding. ``top_k`` keeps the k most likely tokens, ``top_p``
        the smallest set whose probability reaches p (see :func:`sample_next_token`).

        Without the cache, every step runs the model on the last ``block_size`` tokens. With it,
        each step runs on the one new token. Once the context fills the position table, the
        cache restarts from the last ``block_size // 2`` tokens (learned positions cannot slide
        one by one without recomputing every key), so each refill is amortised over
        ``block_size // 2`` cheap steps. Within ``block_size`` tokens both ways produce the same
        logits up to rounding.

        ``compiled=True`` (with the cache) runs each one-token step through
        :func:`decode_step_static` compiled by ``torch.compile(mode="reduce-overhead")``: on a
        GPU it replays as one CUDA graph instead of hundreds of small kernel launches, which is
        what a small model's decoding time is made of. The first call compiles (a minute).
        """
        was_training = self.training
        self.eval()
        block = self.config.block_size
        cache: KVCache | None = None
        step_fn = _compiled_decode_step() if compiled else None
        # Eager decoding shows attention a new sequence length at every token. cuDNN's attention
        # kernel builds an execution plan per shape (~50 ms each on an H100, which made eager
        # decoding 50x slower than it should be); the other fused kernels need no plan.
        kernels = contextlib.nullcontext() if compiled or idx.device.type != "cuda" else sdpa_kernel(
            [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
        with kernels:
            try:
                for _ in range(max_new_tokens):
                    if not use_cache:
                        logits = self(idx[:, -block:], last_only=True)[0][:, -1]
                    elif cache is None or cache.length >= block:
                        keep = block if cache is None else max(1, block // 2)
                        cache = self.new_cache() if cache is None else cache.reset()
                        logits = self(idx[:, -keep:], cache=cache, last_only=True)[0][:, -1]
                        if step_fn is not None:
                            torch._dynamo.mark_static_address(cache.keys)
                            torch._dynamo.mark_static_address(cache.values)
                    elif step_fn is not None:
                        position = torch.full((1,), cache.length, dtype=torch.long, device=idx.device)
                        logits = step_fn(self, idx[:, -1:], position, cache.keys, cache.values)
                        cache.advance(1)
                    else:
                        logits = self(idx[:, -1:], cache=cache, last_only=True)[0][:, -1]
                    next_token = sample_next_token(logits, temperature, top_k, top_p, generator)
                    idx = torch.cat([idx, next_token], dim=1)
            finally:
                self.train(was_training)
        return idx


def decode_step_static(model: GPT, token: torch.Tensor, position: torch.Tensor, keys: torch.Tensor,
                       values: torch.Tensor) -> torch.Tensor:
    """One decoding step with shapes that never change, for ``torch.compile`` and CUDA graphs.

    ``token`` ``(B, 1)`` sits at ``position`` (a one-element tensor); ``keys``/``values`` are a
    :class:`KVCache`'s full buffers ``(n_layer, B, H, block_size, hd)`` holding the earlier
    positions. The new key and value are written in place at ``position`` and attention runs over
    the *whole* buffer with a mask hiding the positions not written yet: the masked positions
    cost a little arithmetic, but no shape depends on how far decoding has got, so one compiled
    graph serves every step. Returns the next-token logits ``(B, vocab)``. The same arithmetic as
    the model's forward pass, step by step.
    """
    B = token.shape[0]
    C, H = model.config.n_embd, model.config.n_head
    visible = (torch.arange(keys.shape[3], device=token.device) <= position).view(1, 1, 1, -1)
    x = model.wte(token) + model.wpe(position).view(1, 1, C)
    for i, block in enumerate(model.blocks):
        q, k, v = block.attn.qkv(block.ln_1(x)).view(B, 1, 3, H, C // H).permute(2, 0, 3, 1, 4)
        keys[i].index_copy_(2, position, k.to(keys.dtype))
        values[i].index_copy_(2, position, v.to(values.dtype))
        y = F.scaled_dot_product_attention(q, keys[i].to(q.dtype), values[i].to(q.dtype), attn_mask=visible)
        x = x + block.attn.proj(y.transpose(1, 2).reshape(B, 1, C))
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(model.ln_f(x))[:, -1]


_COMPILED_STEP = None


def _compiled_decode_step():
    global _COMPILED_STEP
    if _COMPILED_STEP is None:
        _COMPILED_STEP = torch.compile(decode_step_static, mode="reduce-overhead", fullgraph=True)
    return _COMPILED_STEP


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits with everything below the k-th largest of each row set to -inf (ties are kept)."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep, in each row, the most likely tokens whose probabilities first sum
    to at least ``p``; the others get -inf. The most likely token is always kept."""
    if not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # probability mass of the tokens ranked higher
    drop_sorted = before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``logits`` ``(B, V)``, shape ``(B, 1)``.

    Temperature divides the logits: below 1 sharpens the distribution, above 1 flattens it, 0
    means arg-max. Then top-k and top-p cut the unlikely tail, and we sample from what is left.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


def _next_token(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``logits`` ``(B, V)``: the arg-max at temperature 0, else a draw
    from the softmax of ``logits / temperature`` cut to the ``top_k`` largest (one
    ``torch.multinomial`` call with ``generator``)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


@torch.no_grad()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True) -> torch.Tensor:
    """Chapter 10's ``generate``, written out: ``idx`` ``(B, T)`` followed by ``max_new_tokens``
    new tokens, ``(B, T + max_new_tokens)``. The same tokens as :meth:`GPT.generate` without top-p.

    Without the cache every new token runs the model on the last ``block_size`` tokens. With it,
    the prompt (its last ``block_size`` tokens) is run once into a fresh :class:`KVCache`
    (*prefill*), and each later call feeds only the token just chosen: its position follows the
    cached ones and attention reads the cached keys and values. When the cache is full
    (``cache.length == block_size``), a fresh cache is prefilled with the last ``block_size // 2``
    tokens. The model is in eval mode while generating and gets its mode back afterwards.
    """
    was_training = model.training
    model.eval()
    block = model.config.block_size
    cache = None
    try:
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = model(idx[:, -block:])[0][:, -1]
            elif cache is None or cache.length == block:
                keep = block if cache is None else block // 2
                cache = model.new_cache()
                logits = model(idx[:, -keep:], cache=cache)[0][:, -1]
            else:
                logits = model(idx[:, -1:], cache=cache)[0][:, -1]
            idx = torch.cat([idx, _next_token(logits, temperature, top_k, generator)], dim=1)
    finally:
        model.train(was_training)
    return idx


# ---------------------------------------------------------------------------------------------
# Compute: FLOPs per token and model FLOPs utilisation
# ---------------------------------------------------------------------------------------------


def flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Training FLOPs per token: ``6 N + 12 L d T``.

    ``6 N``: each parameter does a multiply-add (2 FLOPs) in the forward pass and twice that in
    the backward pass; ``N`` excludes the position table (a lookup, no arithmetic) but includes
    the tied embedding, which does the head's matrix product. ``12 L d T``: the attention scores
    and the weighted sum of values, forward and backward, per layer, against ``T`` keys. We count
    the full ``T x T`` square, as the usual MFU convention (PaLM's) does, although a causal kernel
    skips the masked half. LayerNorms, GELUs and the softmax are left out (a few percent).
    """
    return 6.0 * n_params + 12.0 * n_layer * n_embd * seq_len


# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s from NVIDIA's datasheets, matched against
# ``torch.cuda.get_device_name()`` in this order (the first match wins: "H100 NVL" before "H100").
PEAK_BF16_FLOPS: list[tuple[str, str, float]] = [
    (r"H100.*NVL", "H100 NVL", 835e12),
    (r"H100.*PCIe", "H100 PCIe", 756e12),
    (r"H100", "H100 SXM", 989e12),
    (r"GH200", "GH200", 989e12),
    (r"H200.*NVL", "H200 NVL", 835e12),
    (r"H200", "H200 SXM", 989e12),
    (r"B200", "B200", 2250e12),
    (r"A100", "A100", 312e12),
    (r"\bA10\b", "A10", 125e12),
    (r"L40S", "L40S", 362e12),
    (r"\bL4\b", "L4", 121e12),
]


def peak_bf16_flops(device: torch.device | str | None = None, device_name: str | None = None) -> float | None:
    """The dense bf16 peak of the GPU, or ``None`` for the CPU and for GPUs not in the table."""
    if device_name is None:
        device = torch.device(device) if device is not None else None
        if device is None or device.type != "cuda":
            return None
        device_name = torch.cuda.get_device_name(device)
    for pattern, _, peak in PEAK_BF16_FLOPS:
        if re.search(pattern, device_name):
            return peak
    return None


def mfu(tokens_per_s: float, flops_each_token: float, peak_flops: float | None,
        n_gpus: int = 1) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over ``n_gpus`` peaks; ``None`` without a peak."""
    if peak_flops is None:
        return None
    return tokens_per_s * flops_each_token / (peak_flops * n_gpus)
