"""Instruction tuning and evaluation (chapter 13).

- Data: :func:`parse_speeches` and :func:`make_examples` build instruction/response pairs from the
  Shakespeare corpus with *templates* (no human-written answers): "Who speaks this line?" -> the
  speaker, "Continue this line." -> the next line of the speech, "What is the last word of this
  line?" -> that word. Pairs come from whole plays, so a split made with
  :func:`course_lib.lm_data.split_by_work` keeps the evaluation plays unseen.
- The chat template (:func:`format_prompt`) uses **existing** tokens of the shipped BPE tokenizer:
  ``<|endoftext|>`` (id 2047, the separator between works in pretraining) opens a conversation and
  closes every response, and the turns are headed ``INSTRUCTION.`` and ``RESPONSE.`` in the very
  layout of a play's speech headers, which the pretrained model already knows. No row is added to
  the embedding table, so no token starts untrained.
- Supervised fine-tuning: :func:`sft_labels` (the prompt loss mask), :func:`collate`,
  :func:`sft_loss` and :func:`finetune` on a :class:`course_lib.gpt.GPT`.
- Evaluation: :func:`response_perplexity`, :func:`generate_answer` (one prompt) and
  :func:`generate_answers` (many, greedy, batched), :func:`exact_match` with
  :func:`normalize_answer`, and :func:`corpus_bleu` (Papineni et al., 2002) written out.
- Uncertainty: every metric is a function of per-example rows summed over the evaluation set
  (:func:`exact_match_rows`, :func:`bleu_rows`, :func:`response_nll_rows`), so a bootstrap
  resample is a weighted sum (:func:`bootstrap_weights`, :func:`bootstrap_replicates`) and a 95%
  interval its percentiles (:func:`percentile_interval`); a difference of two systems on the same
  examples resamples both with the same weights (a paired bootstrap).

Chapter 13's hyper-parameter search (k-fold cross-validation, grid and random search) lives in
:mod:`course_lib.model_selection`.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from course_lib.lm_data import END_OF_TEXT, play_of, work_texts
from course_lib.lm_train import lr_at
from course_lib.pretraining import next_token_loss

IGNORE_INDEX = -100

# ---------------------------------------------------------------------------------------------
# 1. Instruction/response pairs from the corpus, by template
# ---------------------------------------------------------------------------------------------

TASKS = {
    "speaker": "Who speaks this line?",
    "next_line": "Continue this line.",
    "last_word": "What is the last word of this line?",
}

# A speech header: one to four capitalised words ending with a full stop ("FIRST CITIZEN.",
# "Sampson.", "Ber." in the editions that abbreviate), or in capitals without it ("THESEUS").
_HEADER = re.compile(r"^([A-Z][A-Za-z'&-]*(?: [A-Z][A-Za-z'&-]*){0,3})(\.?)$")
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")
_NOT_SPEAKERS = {"ACT", "SCENE", "EPILOGUE", "PROLOGUE", "THE END", "FINIS", "PERSONS REPRESENTED"}


@dataclass(frozen=True)
class Speech:
    """One speech of a play: who speaks, and its lines."""

    speaker: str
    lines: tuple[str, ...]


@dataclass(frozen=True)
class Example:
    """One instruction/response pair: ``instruction`` and ``text`` make the prompt."""

    task: str
    instruction: str
    text: str
    response: str
    work: str

    @property
    def prompt(self) -> str:
        return format_prompt(self.instruction, self.text)

    @property
    def play(self) -> str:
        return play_of(self.work)


def parse_speeches(text: str) -> list[Speech]:
    """The speeches of a cleaned play: blocks that start with a header line (``NAME.``) followed
    by at least one line of text. Speakers are given in capitals.

    A block without a header that follows a speech continues it: the speech goes on after a stage
    direction the cleaning removed (Macbeth's "Is this a dagger which I see before me"), and a header
    alone in its block opens a speech whose lines follow. An act or scene heading, or a header that
    names no speaker (``PROLOGUE``, ``FINIS``), ends the speech before it: nothing is carried across
    a scene."""
    speeches: list[Speech] = []
    continues = False  # whether a block without a header belongs to the last speech
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.strip().split("\n") if line.strip()]
        if not lines:
            continue
        match = _HEADER.match(lines[0])
        header = bool(match and (match.group(2) or match.group(1).isupper()))
        if header or lines[0].upper().startswith(("ACT ", "SCENE ")):
            speaker = match.group(1).upper() if header else ""
            continues = header and speaker not in _NOT_SPEAKERS and not speaker.startswith(("ACT ", "SCENE "))
            if continues:  # a header alone on its line: the speech is in the blocks that follow
                speeches.append(Speech(speaker, tuple(lines[1:])))
        elif continues:
            speeches[-1] = Speech(speeches[-1].speaker, speeches[-1].lines + tuple(lines))
    return [speech for speech in speeches if speech.lines]


def last_word(line: str) -> str:
    """The last word of a line, without punctuation ("" when it has none)."""
    found = _WORD.findall(line)
    return found[-1] if found else ""


@cache
def _work_speeches(work: str) -> tuple[Speech, ...]:
    """The speeches of one work, parsed once per process (several draws read the same plays)."""
    return tuple(parse_speeches(work_texts([work])[0]))


def make_examples(works: Sequence[str], per_task: int, tasks: Mapping[str, str] = TASKS, seed: int = 0,
                  min_chars: int = 20, max_chars: int = 70, exclude: Collection[str] = ()) -> list[Example]:
    """Up to ``per_task`` examples of each task from the named works, drawn with a seeded
    ``random.Random`` and interleaved task by task. Lines shorter than ``min_chars`` or longer than
    ``max_chars`` are skipped (short lines say too little, long ones make long sequences), and so
    are the lines in ``exclude`` (e.g. :func:`example_lines` of a training set: no pair then
    shows the model a line it was fine-tuned on, as prompt or as answer)."""
    exclude = frozenset(exclude)
    pools: dict[str, list[Example]] = {task: [] for task in tasks}
    for work in works:
        for speech in _work_speeches(work):
            usable = [min_chars <= len(line) <= max_chars and line not in exclude for line in speech.lines]
            for i, line in enumerate(speech.lines):
                if not usable[i]:
                    continue
                if "speaker" in tasks:
                    pools["speaker"].append(Example("speaker", tasks["speaker"], line, speech.speaker, work))
                if "last_word" in tasks and last_word(line):
                    pools["last_word"].append(Example("last_word", tasks["last_word"], line, last_word(line),
                                                      work))
                if "next_line" in tasks and i + 1 < len(speech.lines) and usable[i + 1]:
                    pools["next_line"].append(Example("next_line", tasks["next_line"], line,
                                                      speech.lines[i + 1], work))
    rng = random.Random(seed)
    chosen = {task: rng.sample(pool, min(per_task, len(pool))) for task, pool in pools.items()}
    out = []
    for i in range(max((len(v) for v in chosen.values()), default=0)):
        out.extend(chosen[task][i] for task in tasks if i < len(chosen[task]))
    return out


def example_lines(examples: Sequence[Example]) -> set[str]:
    """Every line of the corpus that ``examples`` show: each prompt's line, and the answer line of
    ``next_line`` pairs (the other answers are names and words, not lines)."""
    return {e.text for e in examples} | {e.response for e in examples if e.task == "next_line"}


# ---------------------------------------------------------------------------------------------
# 2. The chat template and encoding
# ---------------------------------------------------------------------------------------------


def format_prompt(instruction: str, text: str = "") -> str:
    """The chat template's prompt: everything before the response.

    ``<|endoftext|>INSTRUCTION.\\n{instruction}\\n{text}\\nRESPONSE.\\n`` — the response follows
    and ends with ``<|endoftext|>``.
    """
    body = f"{instruction}\n{text}" if text else instruction
    return f"{END_OF_TEXT}INSTRUCTION.\n{body}\nRESPONSE.\n"


def encode_example(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """``(ids, prompt_len)``: the prompt's tokens, then the response's and the end-of-text token.
    The prompt and the response are encoded separately, so the boundary falls between tokens."""
    eos = tokenizer.special_tokens[END_OF_TEXT]
    prompt_ids = tokenizer.encode(prompt, allowed_special={END_OF_TEXT})
    return prompt_ids + tokenizer.encode(response) + [eos], len(prompt_ids)


def sft_labels(ids: torch.Tensor, prompt_lens: torch.Tensor, lengths: torch.Tensor,
               ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The prompt loss mask: labels shaped like ``ids`` ``(B, T)``, *not* shifted.

    ``labels[b, t] = ids[b, t]`` for ``prompt_lens[b] <= t < lengths[b]`` (the response and its
    end-of-text token) and ``ignore_index`` elsewhere (the prompt and the padding). The shift is
    the loss's job (:func:`course_lib.pretraining.next_token_loss`): logits at ``t - 1`` predict
    ``labels[:, t]``.
    """
    positions = torch.arange(ids.shape[1], device=ids.device)
    keep = (positions >= prompt_lens.to(ids.device)[:, None]) & (positions < lengths.to(ids.device)[:, None])
    return torch.where(keep, ids.long(), torch.full_like(ids, ignore_index, dtype=torch.long))


def collate(encoded: Sequence[tuple[Sequence[int], int]], pad_id: int,
            max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``(ids, prompt_len)`` pairs to one batch: ``(ids (B, T), labels (B, T))``.

    Sequences longer than ``max_len`` lose tokens from the *start* of the prompt (the response is
    what is learned). The pad id may equal the end-of-text id: the labels come from the lengths,
    never from comparing ids with the pad id.
    """
    rows, prompt_lens, lengths = [], [], []
    for ids, prompt_len in encoded:
        ids = list(ids)
        if max_len is not None and len(ids) > max_len:
            cut = len(ids) - max_len
            ids, prompt_len = ids[cut:], max(prompt_len - cut, 1)
        rows.append(ids)
        prompt_lens.append(prompt_len)
        lengths.append(len(ids))
    width = max(lengths)
    batch = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, ids in enumerate(rows):
        batch[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return batch, sft_labels(batch, torch.tensor(prompt_lens), torch.tensor(lengths))


def sft_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over the response tokens (labels from :func:`sft_labels`)."""
    logits, _ = model(ids)
    return next_token_loss(logits.float(), labels)


def set_trainable(model, top_blocks: int | None = None) -> int:
    """Train everything (``None``) or only the top ``top_blocks`` transformer blocks and the final
    LayerNorm (the tied embedding/head matrix frozen). Returns the number of trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(top_blocks is None)
    if top_blocks is not None:
        for module in [*model.blocks[len(model.blocks) - top_blocks:], model.ln_f]:
            for p in module.parameters():
                p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def finetune(model, encoded: Sequence[tuple[Sequence[int], int]], pad_id: int, steps: int, batch_size: int,
             lr: float, generator: torch.Generator, warmup_steps: int = 0, max_len: int | None = None,
             progress: bool = False) -> list[float]:
    """Supervised fine-tuning: ``steps`` AdamW steps (no weight decay, gradient clipping at 1) on
    random batches of ``encoded`` examples, warm-up then cosine to ``lr / 10``. Returns the losses."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="fine-tuning", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr, lr / 10, warmup_steps, steps)
        pick = torch.randint(0, len(encoded), (batch_size,), generator=generator).tolist()
        ids, labels = collate([encoded[i] for i in pick], pad_id, max_len)
        loss = sft_loss(model, ids.to(device), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------
# 3. Evaluation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def response_nll_rows(model, encoded: Sequence[tuple[Sequence[int], int]], pad_id: int,
                      batch_size: int = 16) -> torch.Tensor:
    """Per example, float64 ``(N, 2)``: the summed negative log-likelihood (nats) of its response
    tokens (end-of-text included), given the prompt, and how many tokens that is."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = []
    try:
        for start in range(0, len(encoded), batch_size):
            ids, labels = collate(encoded[start:start + batch_size], pad_id)
            ids, labels = ids.to(device), labels.to(device)
            logits, _ = model(ids)
            targets = labels[:, 1:]
            nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                  reduction="none")
            counted = targets != IGNORE_INDEX
            rows.append(torch.stack([nll.double().sum(1), counted.double().sum(1)], 1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(rows) if rows else torch.zeros(0, 2, dtype=torch.float64)


def perplexity_from_sums(sums: torch.Tensor) -> torch.Tensor:
    """``exp(total nll / total tokens)`` from summed :func:`response_nll_rows` (any leading dims)."""
    return torch.exp(sums[..., 0] / sums[..., 1].clamp_min(1))


def response_perplexity(model, encoded: Sequence[tuple[Sequence[int], int]], pad_id: int,
                        batch_size: int = 16) -> float:
    """``exp`` of the mean loss over every response token (end-of-text included) of ``encoded``:
    how surprised the model is by the answers, given the prompts."""
    return float(perplexity_from_sums(response_nll_rows(model, encoded, pad_id, batch_size).sum(0)))


def _answer_text(tokenizer, new: Sequence[int], eos: int, stop_at_newline: bool) -> tuple[str, bool]:
    """The answer that generated tokens ``new`` make, and whether it is finished: tokens up to
    ``<|endoftext|>``; with ``stop_at_newline``, only the first non-empty line."""
    kept: list[int] = []
    text = ""
    for token in new:
        if token == eos:
            return text.strip(), True
        kept.append(token)
        text = tokenizer.decode(kept)
        if stop_at_newline and "\n" in text.lstrip("\n"):
            return text.lstrip("\n").split("\n")[0].strip(), True
    return text.strip(), False


@torch.no_grad()
def generate_answer(model, tokenizer, prompt: str, max_new_tokens: int = 24, temperature: float = 0.0,
                    generator: torch.Generator | None = None, stop_at_newline: bool = True) -> str:
    """The model's answer to a prompt: greedy (``temperature=0``) or sampled tokens, with the
    key/value cache, until ``<|endoftext|>``, a newline (with ``stop_at_newline``) or
    ``max_new_tokens``."""
    from course_lib.gpt import sample_next_token

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    eos = tokenizer.special_tokens[END_OF_TEXT]
    ids = tokenizer.encode(prompt, allowed_special={END_OF_TEXT})
    ids = ids[-(model.config.block_size - max_new_tokens):]
    cache = model.new_cache()
    logits = model(torch.tensor([ids], device=device), cache=cache, last_only=True)[0][:, -1]
    new: list[int] = []
    try:
        for _ in range(max_new_tokens):
            new.append(int(sample_next_token(logits.float(), temperature, generator=generator)[0, 0]))
            if _answer_text(tokenizer, new, eos, stop_at_newline)[1]:
                break
            logits = model(torch.tensor([new[-1:]], device=device), cache=cache, last_only=True)[0][:, -1]
    finally:
        model.train(was_training)
    return _answer_text(tokenizer, new, eos, stop_at_newline)[0]


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 24, batch_size: int = 64,
                     stop_at_newline: bool = True) -> list[str]:
    """Greedy answers to many prompts at once: what :func:`generate_answer` gives at
    ``temperature=0`` for each (up to rounding: a batched matrix product may round differently).

    Prompts with the same number of tokens go into one batch, so no row needs padding (the model
    has no padding mask) and one key/value cache serves the batch; a batch stops when every row
    has finished its answer.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    eos = tokenizer.special_tokens[END_OF_TEXT]
    keep = model.config.block_size - max_new_tokens
    encoded = [tokenizer.encode(p, allowed_special={END_OF_TEXT})[-keep:] for p in prompts]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    answers = [""] * len(prompts)
    try:
        for members in by_length.values():
            for start in range(0, len(members), batch_size):
                rows = members[start:start + batch_size]
                batch = torch.tensor([encoded[i] for i in rows], device=device)
                new = _greedy_batch(model, batch, max_new_tokens,
                                    lambda tokens: _answer_text(tokenizer, tokens, eos, stop_at_newline)[1])
                for i, tokens in zip(rows, new, strict=True):
                    answers[i] = _answer_text(tokenizer, tokens, eos, stop_at_newline)[0]
    finally:
        model.train(was_training)
    return answers


def _greedy_batch(model, ids: torch.Tensor, max_new_tokens: int, finished: Callable[[list[int]], bool]
                  ) -> list[list[int]]:
    """Greedy tokens for a batch of equally long prompts ``ids`` ``(B, T)``, with the cache, until
    ``finished(tokens)`` holds for every row or ``max_new_tokens`` are made."""
    cache = model.new_cache()
    logits = model(ids, cache=cache, last_only=True)[0][:, -1]
    new: list[list[int]] = [[] for _ in range(ids.shape[0])]
    done = [False] * ids.shape[0]
    for _ in range(max_new_tokens):
        tokens = logits.float().argmax(dim=-1)
        for row, token in enumerate(tokens.tolist()):
            if not done[row]:
                new[row].append(token)
                done[row] = finished(new[row])
        if all(done):
            break
        logits = model(tokens[:, None], cache=cache, last_only=True)[0][:, -1]
    return new


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed: "Ay, my LORD!" -> "ay my lord"."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference after :func:`normalize_answer`."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return 0.0
    return sum(normalize_answer(p) == normalize_answer(r)
               for p, r in zip(predictions, references, strict=True)) / len(predictions)


def exact_match_rows(predictions: Sequence[str], references: Sequence[str]) -> torch.Tensor:
    """Per example, float64 ``(N, 2)``: ``[1 if it matches after normalisation else 0, 1]``.
    Summed, ``sums[0] / sums[1]`` is :func:`exact_match`."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    hits = [float(normalize_answer(p) == normalize_answer(r))
            for p, r in zip(predictions, references, strict=True)]
    return torch.tensor([[h, 1.0] for h in hits], dtype=torch.float64).reshape(-1, 2)


def share_from_sums(sums: torch.Tensor) -> torch.Tensor:
    """``sums[..., 0] / sums[..., 1]``: exact match from summed :func:`exact_match_rows`."""
    return sums[..., 0] / sums[..., 1].clamp_min(1)


def majority_answer(answers: Sequence[str]) -> str:
    """The most frequent answer after :func:`normalize_answer` (the first seen among equals), as
    first written: the constant a model that ignores its prompt would do best to give."""
    counts = Counter(normalize_answer(a) for a in answers)
    best = max(counts.values())
    return next(a for a in answers if counts[normalize_answer(a)] == best)


def bleu_tokens(text: str) -> list[str]:
    """BLEU's words: lower-case words (with inner apostrophes) and punctuation marks."""
    return re.findall(r"\w+(?:'\w+)*|[^\w\s]", text.lower())


def ngram_counts(tokens: Sequence[str], n: int) -> Counter:
    """How often each n-gram (a tuple of ``n`` tokens) occurs in ``tokens``."""
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu_statistics(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[str]],
                    max_n: int = 4) -> dict:
    """Corpus totals behind BLEU: clipped matches and hypothesis n-grams for n = 1..max_n, the
    hypothesis length ``c`` and the reference length ``r``."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    matches, totals = [0] * max_n, [0] * max_n
    for hyp, ref in zip(hypotheses, references, strict=True):
        for n in range(1, max_n + 1):
            hyp_counts, ref_counts = ngram_counts(hyp, n), ngram_counts(ref, n)
            matches[n - 1] += sum(min(c, ref_counts[g]) for g, c in hyp_counts.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    return {"matches": matches, "totals": totals, "hyp_len": sum(len(h) for h in hypotheses),
            "ref_len": sum(len(r) for r in references)}


def bleu_rows(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[str]], max_n: int = 4
              ) -> torch.Tensor:
    """Per pair, float64 ``(N, 2 max_n + 2)``: clipped matches for n = 1..max_n, hypothesis
    n-grams for n = 1..max_n, hypothesis length, reference length. Summed over pairs, they are
    :func:`bleu_statistics`, and :func:`bleu_from_sums` of the sums is :func:`corpus_bleu`."""
    rows = []
    for hyp, ref in zip(hypotheses, references, strict=True):
        stats = bleu_statistics([hyp], [ref], max_n)
        rows.append([*stats["matches"], *stats["totals"], stats["hyp_len"], stats["ref_len"]])
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 2 * max_n + 2)


def bleu_from_sums(sums: torch.Tensor, max_n: int = 4) -> torch.Tensor:
    """Corpus BLEU from summed :func:`bleu_rows` (any leading dims: one BLEU per row of sums),
    with :func:`corpus_bleu`'s smoothing, brevity penalty and zero cases."""
    matches, totals = sums[..., :max_n], sums[..., max_n:2 * max_n]
    c, r = sums[..., 2 * max_n], sums[..., 2 * max_n + 1]
    smoothed = torch.cat([matches[..., :1], matches[..., 1:] + 1], -1)
    log_p = (smoothed.clamp_min(1e-300).log() - torch.cat([totals[..., :1], totals[..., 1:] + 1], -1)
             .clamp_min(1).log()).mean(-1)
    bp = torch.where(c > r, torch.ones_like(c), torch.exp(1 - r / c.clamp_min(1)))
    return torch.where((c == 0) | (matches[..., 0] == 0), torch.zeros_like(c), bp * torch.exp(log_p))


def corpus_bleu(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[str]],
                max_n: int = 4) -> float:
    """Corpus BLEU in [0, 1], one reference per hypothesis, uniform weights ``1 / max_n``.

    ``p_n`` = clipped n-gram matches summed over the corpus / hypothesis n-grams summed over the
    corpus (clipping: an n-gram counts at most as often as it occurs in its reference). Smoothing
    (Lin and Och, 2004): for ``n >= 2``, ``p_n = (matches + 1) / (total + 1)``; ``p_1`` is not
    smoothed and BLEU is 0 when it is 0. Brevity penalty: ``c`` = total hypothesis length, ``r`` =
    total reference length, ``BP = 1`` if ``c > r`` else ``exp(1 - r / c)`` (0 when ``c = 0``).
    BLEU = ``BP * exp(mean_n log p_n)`` — a geometric mean.
    """
    stats = bleu_statistics(hypotheses, references, max_n)
    c, r = stats["hyp_len"], stats["ref_len"]
    if c == 0 or stats["matches"][0] == 0:
        return 0.0
    log_p = 0.0
    for n in range(max_n):
        m, t = stats["matches"][n], stats["totals"][n]
        log_p += math.log(m / t) if n == 0 else math.log((m + 1) / (t + 1))
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return bp * math.exp(log_p / max_n)


# ---------------------------------------------------------------------------------------------
# 4. How sure are we? The bootstrap
# ---------------------------------------------------------------------------------------------


def bootstrap_weights(n: int, n_boot: int, generator: torch.Generator) -> torch.Tensor:
    """float64 ``(n_boot, n)``: how often each of ``n`` examples is drawn in each of ``n_boot``
    resamples of ``n`` draws with replacement. The same weights applied to two systems' rows make
    a *paired* bootstrap (both scored on the same resampled examples)."""
    draws = torch.randint(0, n, (n_boot, n), generator=generator)
    return torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(n_boot, n, dtype=torch.float64))


def bootstrap_replicates(rows: torch.Tensor, statistic: Callable[[torch.Tensor], torch.Tensor],
                         weights: torch.Tensor) -> torch.Tensor:
    """The metric on each resample: ``statistic(weights @ rows)``, shape ``(n_boot,)``. ``rows``
    are per-example rows (:func:`exact_match_rows`, :func:`bleu_rows`, :func:`response_nll_rows`)
    and ``statistic`` turns their sums into the metric (:func:`share_from_sums`,
    :func:`bleu_from_sums`, :func:`perplexity_from_sums`)."""
    return statistic(weights @ rows.double())


def percentile_interval(replicates: torch.Tensor, level: float = 0.95) -> tuple[float, float]:
    """The percentile bootstrap interval: the ``(1 - level) / 2`` and ``(1 + level) / 2``
    quantiles of the replicates."""
    low, high = torch.quantile(replicates.double(), torch.tensor([(1 - level) / 2, (1 + level) / 2],
                                                                dtype=torch.float64))
    return float(low), float(high)
