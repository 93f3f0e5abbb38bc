"""Where inference time goes, and how servers spend less of it (chapter 17).

Generating ``n`` tokens from a prompt of ``T`` tokens is two different jobs:

- **prefill**: the whole prompt in one forward pass (``T`` positions at once: large matrix
  products, compute-bound), which fills the KV cache;
- **decode**: one forward pass per new token, each on a single position that reads every cached
  key and value (tiny matrix products: bound by memory traffic and per-call overhead).

This module holds the reference answers of the chapter's exercises and the machinery its demos
use: the KV cache's memory (:func:`kv_cache_bytes`), left padding with an attention mask
(:func:`left_pad`, :func:`forward_padded`, :func:`generate_padded`), a small continuous-batching
scheduler (:func:`simulate_batching`), speculative decoding (:func:`speculative_accept`,
:func:`speculative_generate`), latency percentiles (:func:`percentiles`), and export of the
course GPT's forward pass (:func:`export_program`, :func:`export_onnx`).

The KV cache is chapter 10's :class:`course_lib.gpt.KVCache`: reused here, not rewritten.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.gpt import GPT, GPTConfig, KVCache, causal_mask

# ---------------------------------------------------------------------------------------------
# The KV cache's memory
# ---------------------------------------------------------------------------------------------


def kv_cache_bytes(n_layer: int, n_kv_head: int, head_dim: int, seq_len: int, batch_size: int = 1,
                   bytes_per_value: int = 2) -> int:
    """Bytes of a KV cache: a key and a value vector of ``head_dim`` numbers per layer, per
    key/value head, per position, per sequence: ``2 * n_layer * n_kv_head * head_dim * seq_len *
    batch_size * bytes_per_value``. With grouped-query attention ``n_kv_head`` is smaller than the
    number of query heads (several query heads share one key/value head)."""
    return 2 * n_layer * n_kv_head * head_dim * seq_len * batch_size * bytes_per_value


def kv_bytes_per_token(config: GPTConfig, bytes_per_value: int = 2) -> int:
    """The cache's bytes for one more token of one sequence (the course GPT has n_head KV heads)."""
    return kv_cache_bytes(config.n_layer, config.n_head, config.head_dim, 1, 1, bytes_per_value)


# ---------------------------------------------------------------------------------------------
# Batching: left padding, a padding mask, positions per row
# ---------------------------------------------------------------------------------------------


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, mask, positions)`` for a batch of token lists of different lengths, padded on the
    **left** to the longest (so that every row's last real token is in the last column, where
    generation appends): ``ids`` int64 ``(B, T)`` with ``pad_id`` in front, ``mask`` bool, True at
    real tokens, ``positions`` int64, ``0, 1, ...`` along each row's real tokens and 0 on padding."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.bool)
    for row, tokens in enumerate(sequences):
        if len(tokens):
            ids[row, width - len(tokens):] = torch.as_tensor(list(tokens), dtype=torch.long)
            mask[row, width - len(tokens):] = True
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    return ids, mask, positions


def forward_padded(model: GPT, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                   cache: KVCache | None = None) -> torch.Tensor:
    """The course GPT's logits ``(B, T, V)`` for a left-padded batch.

    ``mask`` ``(B, S)`` covers every key so far (the cached ones, then the ``T`` new ones);
    ``positions`` ``(B, T)`` are the new tokens' positions in their own sequences. A query sees
    the real keys at or before it, and always itself: a padding query has no real key before it,
    and a row of the softmax with every entry masked would be NaN (its output is never used).
    """
    B, T = ids.shape
    C, H = model.config.n_embd, model.config.n_head
    past = cache.length if cache is not None else 0
    if mask.shape != (B, past + T):
        raise ValueError(f"mask has shape {tuple(mask.shape)}; expected {(B, past + T)}")
    allowed = causal_mask(T, past + T, ids.device) & mask[:, None, :]
    diagonal = torch.arange(T, device=ids.device)
    allowed[:, diagonal, past + diagonal] = True
    x = model.wte(ids) + model.wpe(positions)
    for i, block in enumerate(model.blocks):
        q, k, v = block.attn.qkv(block.ln_1(x)).view(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.update(i, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        x = x + block.attn.proj(y.transpose(1, 2).reshape(B, T, C))
        x = x + block.mlp(block.ln_2(x))
    if cache is not None:
        cache.advance(T)
    return model.lm_head(model.ln_f(x))


@torch.no_grad()
def generate_padded(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int,
                    on_step: Callable[[int, torch.Tensor], None] | None = None,
                    temperature: float = 0.0, generator: torch.Generator | None = None
                    ) -> torch.Tensor:
    """Generate for a batch of prompts of different lengths at once (static batching): left
    padding, one prefill, then one batched decode step per token with the KV cache. Returns the
    new tokens ``(B, max_new_tokens)``; ``on_step(step, tokens)`` sees each step's ``(B,)`` tokens
    (a server streams them). Greedy at ``temperature=0``; the same tokens as generating each
    prompt alone (up to rounding), as long as prompt + new tokens fit in ``block_size``."""
    ids, mask, positions = left_pad(prompts, pad_id)
    device = next(model.parameters()).device
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    if ids.shape[1] + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt ({ids.shape[1]} tokens) + {max_new_tokens} new tokens exceed "
                         f"block_size={model.config.block_size}")
    was_training = model.training
    model.eval()
    cache = model.new_cache()
    out = []
    try:
        logits = forward_padded(model, ids, mask, positions, cache)[:, -1]
        for step in range(max_new_tokens):
            token = _pick(logits, temperature, generator)
            out.append(token)
            if on_step is not None:
                on_step(step, token)
            if step + 1 == max_new_tokens:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            logits = forward_padded(model, token[:, None], mask, positions, cache)[:, -1]
    finally:
        model.train(was_training)
    return torch.stack(out, dim=1) if out else torch.zeros(len(prompts), 0, dtype=torch.long)


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    # Drawn on the CPU: a CPU generator cannot drive a GPU draw.
    return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)


# ---------------------------------------------------------------------------------------------
# Continuous batching: a scheduler, simulated in decode steps
# ---------------------------------------------------------------------------------------------


@dataclass
class Request:
    """One generation request: it arrives at ``arrival`` (a step number), needs ``prefill``
    prompt tokens and ``new_tokens`` generated ones."""

    arrival: int
    prefill: int
    new_tokens: int
    start: int | None = None  # the step its prefill ran
    done: int | None = None  # the step its last token came out


@dataclass
class Schedule:
    """What a scheduler did: requests with their times, and per step how many slots were busy."""

    requests: list[Request]
    busy: list[int] = field(default_factory=list)
    steps: int = 0

    def latencies(self) -> list[int]:
        return [r.done - r.arrival for r in self.requests]

    def utilisation(self, slots: int) -> float:
        return sum(self.busy) / max(1, slots * self.steps)


def simulate_batching(requests: Sequence[Request], slots: int, continuous: bool,
                      max_steps: int = 100_000) -> Schedule:
    """Run a decode loop over ``requests`` with ``slots`` sequences per batch, one token per busy
    slot per step (a prefill counts as that step's work for its slot).

    Static batching (``continuous=False``) starts a batch only when every slot is free, so a
    batch lasts as long as its longest request while finished slots idle. Continuous batching
    (vLLM, Orca) refills a slot at the very next step after its request finishes.
    """
    todo = [Request(r.arrival, r.prefill, r.new_tokens) for r in requests]
    waiting = sorted(todo, key=lambda r: r.arrival)
    active: list[tuple[Request, int]] = []  # (request, tokens still to generate)
    schedule = Schedule(todo)
    step = 0
    while (waiting or active) and step < max_steps:
        if continuous or not active:
            while waiting and len(active) < slots and waiting[0].arrival <= step:
                request = waiting.pop(0)
                request.start = step
                active.append((request, request.new_tokens))
        schedule.busy.append(len(active))
        still = []
        for request, left in active:
            if left <= 1:
                request.done = step + 1
            else:
                still.append((request, left - 1))
        active = still
        step += 1
    schedule.steps = step
    return schedule


# ---------------------------------------------------------------------------------------------
# Speculative decoding
# ---------------------------------------------------------------------------------------------


def speculative_accept(draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """The acceptance step of speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

    ``draft_tokens`` int64 ``(k,)`` were drawn from ``draft_probs`` ``(k, V)`` (the draft's
    distributions); ``target_probs`` ``(k + 1, V)`` are the target's distributions at the same
    k positions and one more. Draws ``u = torch.rand(k, generator=generator, dtype=float64)``
    first; token ``i`` is accepted when ``u[i] < p_i(x_i) / q_i(x_i)``. At the first rejection the
    replacement is drawn with ``torch.multinomial(max(p_i - q_i, 0), 1, generator=generator)`` and
    the rest is dropped; when all k are accepted, a bonus token is drawn from ``target_probs[k]``.
    Returns the int64 tokens kept, ``(n,)`` with ``1 <= n <= k + 1``: the same distribution as
    sampling the target alone, and with one-hot (greedy) distributions the target's greedy tokens.
    """
    k = draft_tokens.shape[0]
    u = torch.rand(k, generator=generator, dtype=torch.float64)
    rows = torch.arange(k)
    p = target_probs[rows, draft_tokens].double()
    q = draft_probs[rows, draft_tokens].double()
    kept = []
    for i in range(k):
        if u[i] * q[i] < p[i]:
            kept.append(draft_tokens[i].reshape(1))
            continue
        residual = (target_probs[i].double() - draft_probs[i].double()).clamp(min=0)
        kept.append(torch.multinomial(residual, 1, generator=generator))
        return torch.cat(kept).long()
    kept.append(torch.multinomial(target_probs[k].double(), 1, generator=generator))
    return torch.cat(kept).long()


def truncated_draft(model: GPT, n_layer: int) -> GPT:
    """A draft model that is the first ``n_layer`` blocks of ``model`` with its embeddings, final
    LayerNorm and head (shared, not copied): no training, a fraction of the cost per token."""
    config = GPTConfig(**{**model.config.to_dict(), "n_layer": n_layer})
    draft = GPT(config).to(next(model.parameters()).device, next(model.parameters()).dtype)
    draft.wte, draft.wpe, draft.ln_f = model.wte, model.wpe, model.ln_f
    draft.lm_head = model.lm_head
    draft.blocks = nn.ModuleList(list(model.blocks)[:n_layer])
    return draft.eval()


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Distributions of ``(..., V)`` logits: one-hot arg-max at temperature 0."""
    if temperature == 0:
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).double()
    return torch.softmax(logits.double() / temperature, dim=-1)


@dataclass
class SpecStats:
    """Counts of a speculative run: rounds (target passes), draft tokens proposed and accepted."""

    rounds: int = 0
    proposed: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / max(1, self.proposed)


class LookupDraft:
    """Prompt-lookup decoding's draft: no model at all. It finds the latest earlier occurrence of
    the last ``ngram`` tokens (then ``ngram - 1``, ... 1) in the text so far and proposes the
    tokens that followed it, copying on as far as needed. Its distributions are one-hot (a
    deterministic draft is a valid draft: ``q(x) = 1``), it costs next to nothing, and it agrees
    with the target wherever the text repeats itself (code, quotes, lists, edits of a document)."""

    def __init__(self, vocab_size: int, ngram: int = 3) -> None:
        self.vocab_size, self.ngram = vocab_size, ngram

    def propose(self, out: list[int], k: int) -> list[int]:
        seq = list(out)
        source = self._match(out)
        for j in range(k):
            seq.append(seq[source + j] if source is not None else seq[-1])
        return seq[len(out):]

    def _match(self, out: list[int]) -> int | None:
        """The index of the token after the latest earlier occurrence of the longest suffix."""
        for n in range(min(self.ngram, len(out) - 1), 0, -1):
            pattern = out[-n:]
            for start in range(len(out) - n - 1, -1, -1):
                if out[start:start + n] == pattern:
                    return start + n
        return None


class OracleDraft:
    """A draft for experiments: it knows the target's greedy continuation ``reference`` (the
    prompt included) and proposes the right token with probability ``agree``, else another one.
    It costs nothing, so the time it saves is the most any draft agreeing that often could save."""

    def __init__(self, reference: Sequence[int], agree: float, vocab_size: int,
                 generator: torch.Generator | None = None) -> None:
        self.reference, self.agree, self.vocab_size = list(reference), agree, vocab_size
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    def propose(self, out: list[int], k: int) -> list[int]:
        tokens = []
        for j in range(len(out), len(out) + k):
            right = self.reference[min(j, len(self.reference) - 1)]
            hit = float(torch.rand((), generator=self.generator)) < self.agree
            tokens.append(right if hit else (right + 1) % self.vocab_size)
        return tokens


def _propose_with_model(draft: GPT, cache: KVCache, out: list[int], k: int, temperature: float,
                        generator: torch.Generator | None, device: torch.device
                        ) -> tuple[list[int], torch.Tensor]:
    """k tokens from a draft GPT, one at a time; it first catches up on the tokens its cache
    lacks (the prompt, at first). Returns the tokens and their distributions ``(k, V)``."""
    feed = torch.tensor([out[cache.length:]], device=device)
    tokens, q_rows = [], []
    for _ in range(k):
        # On the CPU: the generator is a CPU one, and accept() works on small CPU tensors.
        q = _probs(draft(feed, cache=cache, last_only=True)[0][0, -1], temperature).cpu()
        token = int(torch.multinomial(q, 1, generator=generator)) if temperature else int(q.argmax())
        tokens.append(token)
        q_rows.append(q)
        feed = torch.tensor([[token]], device=device)
    return tokens, torch.stack(q_rows)


@torch.no_grad()
def speculative_generate(target: GPT, draft: GPT | LookupDraft | OracleDraft, prompt: torch.Tensor,
                         max_new_tokens: int,
                         k: int = 4, temperature: float = 0.0, generator: torch.Generator | None = None,
                         accept: Callable[..., torch.Tensor] = speculative_accept
                         ) -> tuple[torch.Tensor, SpecStats]:
    """Generate ``max_new_tokens`` after ``prompt`` ``(1, T)`` with speculative decoding: the
    draft (a smaller GPT, or anything with ``propose(tokens, k)``: :class:`LookupDraft`,
    :class:`OracleDraft`) proposes ``k`` tokens, the target scores all
    of them in **one** pass, and ``accept`` keeps a prefix plus one token of its own. The models
    keep KV caches; after a rejection a cache is rolled back by setting its length (stale entries
    are overwritten later). Prompt, output and ``k + 1`` more must fit in ``block_size``.
    Returns ``(prompt + new tokens (1, T + max_new_tokens), stats)``."""
    if prompt.shape[1] + max_new_tokens + k + 1 > target.config.block_size:
        raise ValueError("prompt + max_new_tokens + k + 1 must fit in block_size")
    device = prompt.device
    t_cache = target.new_cache()
    d_cache = draft.new_cache() if isinstance(draft, GPT) else None
    out, stats = prompt[0].tolist(), SpecStats()
    while len(out) - prompt.shape[1] < max_new_tokens:
        n = len(out)
        if d_cache is not None:
            tokens, q_rows = _propose_with_model(draft, d_cache, out, k, temperature, generator, device)
        else:
            tokens = draft.propose(out, k)
            q_rows = F.one_hot(torch.tensor(tokens), target.config.vocab_size).double()
        # One target pass over what its cache lacks and the k proposals: the last k + 1 rows are
        # its distributions for the k proposed positions and the one after them.
        block = torch.tensor([out[t_cache.length:] + tokens], device=device)
        p_rows = _probs(target(block, cache=t_cache)[0][0, -(k + 1):], temperature).cpu()
        kept = accept(torch.tensor(tokens), q_rows, p_rows, generator)
        m = len(kept)
        stats.rounds += 1
        stats.proposed += k
        stats.accepted += m - 1  # the last kept token is the target's own (replacement or bonus)
        out.extend(int(t) for t in kept)
        # Valid cache entries: out[:n] and the accepted proposals that each model has processed.
        t_cache.length = n + m - 1
        if d_cache is not None:
            d_cache.length = n + min(m - 1, k - 1)
    return torch.tensor([out[: prompt.shape[1] + max_new_tokens]], device=device), stats


# ---------------------------------------------------------------------------------------------
# Latency statistics
# ---------------------------------------------------------------------------------------------


def percentiles(values: Sequence[float], qs: Sequence[float]) -> list[float]:
    """The ``q``-th percentiles (``0 <= q <= 100``) of ``values`` by linear interpolation between
    order statistics (NumPy's default): sorted ``x``, ``h = (n - 1) q / 100``,
    ``x[floor h] + (h - floor h) (x[floor h + 1] - x[floor h])``."""
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ValueError("percentiles of no values")
    out = []
    for q in qs:
        h = (len(xs) - 1) * q / 100
        lo = math.floor(h)
        hi = min(lo + 1, len(xs) - 1)
        out.append(xs[lo] + (h - lo) * (xs[hi] - xs[lo]))
    return out


def synchronize() -> None:
    """Wait for the GPU's queued work (a no-op without one): GPU calls return before they finish,
    and a timer read without waiting measures only the launch."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], repeat: int, warmup: int = 1) -> list[float]:
    """Seconds per call of ``fn`` for ``repeat`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return times


# ---------------------------------------------------------------------------------------------
# Export: torch.export and ONNX
# ---------------------------------------------------------------------------------------------


class LogitsOnly(nn.Module):
    """The GPT's forward as ``ids -> logits``: exporters want tensors out, not ``(logits, None)``."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)[0]


def export_program(model: GPT, example: torch.Tensor, dynamic_length: bool = True):
    """``torch.export`` of the forward pass: a graph of ATen operations with the weights, no Python.
    With ``dynamic_length`` the sequence length is a symbol (1 to ``block_size``)."""
    wrapper = LogitsOnly(model).eval()
    shapes = None
    if dynamic_length:
        length = torch.export.Dim("length", min=1, max=model.config.block_size)
        shapes = {"idx": {1: length}}
    return torch.export.export(wrapper, (example,), dynamic_shapes=shapes)


def export_onnx(model: GPT | torch.export.ExportedProgram, example: torch.Tensor, path: str | Path,
                dynamic_length: bool = True) -> Path:
    """The forward pass as an ONNX file (``torch.onnx.export(..., dynamo=True)``: through
    ``torch.export``, then translated to ONNX operators by onnxscript); input ``idx``, output
    ``logits``. Given a program from :func:`export_program`, only the translation is left to do."""
    if isinstance(model, torch.export.ExportedProgram):
        target, shapes = model, None
    else:
        target, shapes = LogitsOnly(model).eval(), None
        if dynamic_length:
            shapes = {"idx": {1: torch.export.Dim("length", min=1, max=model.config.block_size)}}
    path = Path(path)
    # The exporter logs every optional operator library it does not find (torchvision's, ...) and
    # a deprecation inside torch itself: notes for torch's developers, not for the reader.
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(target, (example,), str(path), dynamo=True, input_names=["idx"],
                              output_names=["logits"], dynamic_shapes=shapes, verbose=False)
    finally:
        logger.setLevel(level)
    return path


def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session for ``path`` (``threads`` intra-op threads, default: all)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: the optimiser's notes are not for students
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
