"""Fine-tuning pretrained models for classification (chapter 12).

- Data: :func:`genre_texts`, passages of the plays labelled with the First Folio's genre
  (chapter 7's :data:`course_lib.embeddings.GENRES`), split *by whole play* (chapter 7's
  :data:`~course_lib.embeddings.TEST_PLAYS` are the test set), so no passage of a test play, nor
  any other passage of the same play, is ever trained on.
- Heads: :func:`last_token_logits` (a GPT reads a sequence left to right, so only its *last real
  token* has seen the whole passage), :class:`GPTClassifier`, :class:`BertClassifier` (mean
  pooling).
- What to train: :func:`freeze_layers` (the last blocks and the head train, the rest is frozen),
  :class:`LoRALinear` with :func:`add_lora` / :func:`merge_lora`, :func:`count_trainable`.
- Class imbalance: :func:`class_weights`, :func:`weighted_cross_entropy`, :func:`oversample`.
- Metrics: :func:`confusion_matrix` (rows: true class, columns: predicted) and
  :func:`classification_metrics` (accuracy, per-class precision / recall / F1, macro F1), with
  the convention that a ratio whose denominator is 0 is 0 (scikit-learn's ``zero_division=0``).
- Honest evaluation: :func:`split_validation` (choices are made on whole validation plays, never on
  the test plays), :func:`bow_baseline` (chapter 7's bag of words), :func:`wilson_interval` and
  :func:`bootstrap_by_group` (how sure a test accuracy is).
- Training: :func:`fit_classifier` and :func:`predict_logits`, which can start from cached hidden
  states at ``start_layer`` when the blocks below are frozen (computed once, not at every step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.bert import Bert, mean_pool
from course_lib.embeddings import GENRES, genre_passages
from course_lib.gpt import GPT

GENRE_NAMES = tuple(GENRES)  # ("comedy", "history", "tragedy"): labels 0, 1, 2


# ---------------------------------------------------------------------------------------------
# Data: which genre is a passage from?
# ---------------------------------------------------------------------------------------------


def genre_texts(
    passage_words: int = 30, max_per_play: int | None = None, seed: int = 0
) -> dict[str, tuple[list[str], torch.Tensor, list[str]]]:
    """Passages of ``passage_words`` consecutive words (case and punctuation kept, whitespace
    collapsed) of every play of :data:`GENRES`, labelled 0 comedy, 1 history, 2 tragedy.

    The split is by play: the plays in :data:`TEST_PLAYS` (3 comedies, 2 histories, 3 tragedies)
    are the test set, the 26 others the training set. Returns ``{"train": (texts, labels, plays),
    "test": (...)}``; with ``max_per_play``, a seeded random subset of each play's passages.
    """
    passages = genre_passages(passage_words, max_per_play, seed, split_words=str.split)
    return {split: ([" ".join(doc) for doc in docs], labels, plays)
            for split, (docs, labels, plays) in passages.items()}


def split_validation(
    data: dict[str, tuple[list[str], torch.Tensor, list[str]]], val_fraction: float = 0.2, seed: int = 0
) -> dict[str, tuple[list[str], torch.Tensor, list[str]]]:
    """Move whole plays of ``data["train"]`` into a validation split ``"val"`` (chapter 9's
    :func:`~course_lib.data_prep.grouped_split`, each passage a unit of size 1), so that choices
    made on it (learning rates, which recipe) never look at the test plays, and validation passages
    never share a play with the training ones. ``"test"`` is unchanged."""
    from course_lib.data_prep import grouped_split

    texts, labels, plays = data["train"]
    train, val = grouped_split(plays, [1] * len(plays), val_fraction=val_fraction, seed=seed)

    def subset(index: list[int]) -> tuple[list[str], torch.Tensor, list[str]]:
        rows = torch.tensor(index, dtype=torch.long)
        return [texts[i] for i in index], labels[rows], [plays[i] for i in index]

    return {"train": subset(train), "val": subset(val), "test": data["test"]}


def gpt_batch(
    tokenizer, texts: Sequence[str], max_tokens: int, pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(B, T)`` and attention mask for a GPT: each text's first ``max_tokens`` tokens,
    padded on the right with ``pad_id`` (the mask says which positions are real)."""
    rows = [tokenizer.encode(t)[:max_tokens] for t in texts]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------
# Classification heads
# ---------------------------------------------------------------------------------------------


def last_token_logits(
    hidden: torch.Tensor, attention_mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Logits ``(B, C)`` of a linear head ``weight`` ``(C, D)``, ``bias`` ``(C,)`` read at each
    row's *last real token*: the last position ``t`` where ``attention_mask[b, t] == 1`` (wherever
    the padding is). ``hidden`` is ``(B, T, D)``."""
    T = attention_mask.shape[1]
    positions = torch.arange(T, device=attention_mask.device)
    last = (attention_mask.bool() * (positions + 1)).argmax(dim=1)  # the largest real position
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return picked @ weight.T + bias


class GPTClassifier(nn.Module):
    """A pretrained :class:`~course_lib.gpt.GPT` with a linear head on its last real token. The
    language-model head is not used."""

    def __init__(self, gpt: GPT, n_classes: int) -> None:
        super().__init__()
        self.gpt = gpt
        self.head = nn.Linear(gpt.config.n_embd, n_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def hidden_at(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        """The input of block ``layer`` (causal: padding on the right never reaches real tokens)."""
        g = self.gpt
        x = g.drop(g.wte(ids) + g.wpe(torch.arange(ids.shape[1], device=ids.device)))
        for block in g.blocks[:layer]:
            x = block(x)
        return x

    def forward(
        self,
        ids: torch.Tensor,
        attention_mask: torch.Tensor,
        start_layer: int = 0,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.hidden_at(0, ids) if hidden is None else hidden
        for block in self.gpt.blocks[start_layer:]:
            x = block(x)
        return last_token_logits(self.gpt.ln_f(x), attention_mask, self.head.weight, self.head.bias)


class BertClassifier(nn.Module):
    """A :class:`~course_lib.bert.Bert` with a linear head on the mean of its real tokens' vectors."""

    def __init__(self, bert: Bert, n_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.bert = bert
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(bert.config.n_embd, n_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def hidden_at(self, layer: int, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert.hidden_at(layer, ids, attention_mask)

    def forward(
        self,
        ids: torch.Tensor,
        attention_mask: torch.Tensor,
        start_layer: int = 0,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.bert(ids, attention_mask, start_layer=start_layer, hidden=hidden)
        return self.head(self.drop(mean_pool(x, attention_mask)))


# ---------------------------------------------------------------------------------------------
# What to train: freezing, LoRA
# ---------------------------------------------------------------------------------------------


def count_trainable(module: nn.Module) -> int:
    """Number of parameters with ``requires_grad`` (each shared tensor counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def freeze_layers(classifier: nn.Module, n_trainable: int) -> int:
    """Freeze the backbone (``classifier.gpt`` or ``classifier.bert``) except its last
    ``n_trainable`` blocks and, for a GPT, its final LayerNorm ``ln_f``; the head stays trainable.
    ``n_trainable=0`` trains the head (and ``ln_f``) only. Returns the number of trainable
    parameters."""
    backbone = classifier.gpt if hasattr(classifier, "gpt") else classifier.bert
    for p in classifier.parameters():
        p.requires_grad_(False)
    n_blocks = len(backbone.blocks)
    for block in backbone.blocks[n_blocks - n_trainable :] if n_trainable > 0 else []:
        block.requires_grad_(True)
    if hasattr(backbone, "ln_f"):
        backbone.ln_f.requires_grad_(True)
    classifier.head.requires_grad_(True)
    return count_trainable(classifier)


class LoRALinear(nn.Module):
    """``y = base(x) + (alpha / r) * x A^T B^T`` with ``base`` frozen and only ``A`` ``(r, in)`` and
    ``B`` ``(out, r)`` trained (Hu et al., 2021). ``B`` starts at zero, so at the start the layer
    *is* the base layer; ``A`` starts random (Kaiming-uniform, as PEFT), else nothing would move."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"rank r must be >= 1, got {r}")
        self.base = base
        self.base.requires_grad_(False)
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.A = nn.Parameter(
            torch.empty(r, base.in_features, dtype=base.weight.dtype, device=base.weight.device)
        )
        self.B = nn.Parameter(
            torch.zeros(base.out_features, r, dtype=base.weight.dtype, device=base.weight.device)
        )
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * ((x @ self.A.T) @ self.B.T)

    def merged(self) -> nn.Linear:
        """A plain linear layer computing the same function: ``W + (alpha / r) B A``."""
        out = nn.Linear(
            self.base.in_features,
            self.base.out_features,
            bias=self.base.bias is not None,
            device=self.base.weight.device,
            dtype=self.base.weight.dtype,
        )
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.scaling * (self.B @ self.A))
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def add_lora(
    classifier: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    targets: Sequence[str] = ("query", "value"),
    blocks: Sequence[int] | None = None,
) -> int:
    """Freeze ``classifier`` except its head, and wrap the attention projections named in
    ``targets`` of the BERT blocks ``blocks`` (default: all) in :class:`LoRALinear`. Returns the
    number of trainable parameters (the LoRA matrices and the head)."""
    for p in classifier.parameters():
        p.requires_grad_(False)
    bert_blocks = classifier.bert.blocks
    for i in range(len(bert_blocks)) if blocks is None else blocks:
        attn = bert_blocks[i].attn
        for name in targets:
            setattr(attn, name, LoRALinear(getattr(attn, name), r, alpha))
    classifier.head.requires_grad_(True)
    return count_trainable(classifier)


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRALinear` inside ``model`` by its merged linear layer, in place:
    inference then costs exactly what the base model costs."""
    for name, child in list(model.named_children()):
        if isinstance(child, LoRALinear):
            setattr(model, name, child.merged().requires_grad_(False))
        else:
            merge_lora(child)
    return model


# ---------------------------------------------------------------------------------------------
# Class imbalance
# ---------------------------------------------------------------------------------------------


def class_weights(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """ "Balanced" weights ``N / (C * n_c)`` (float32): a class with half the average count weighs
    2. A class absent from ``labels`` gets 0 (it contributes no term anyway)."""
    counts = torch.bincount(labels, minlength=n_classes).to(torch.float32)
    w = labels.numel() / (n_classes * counts)
    return torch.where(counts > 0, w, torch.zeros_like(w))


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_i w[y_i] * CE_i / sum_i w[y_i]``: the *weighted mean*, as
    ``F.cross_entropy(logits, labels, weight=weights)``."""
    per_example = -torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)
    w = weights.to(logits.dtype)[labels]
    return (w * per_example).sum() / w.sum()


def oversample(labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices that repeat the examples of the smaller classes (drawn with replacement) until
    every present class has as many as the largest, in a shuffled order."""
    counts = torch.bincount(labels)
    target = int(counts.max())
    chosen = []
    for c in range(len(counts)):
        members = (labels == c).nonzero().squeeze(1)
        if len(members) == 0:
            continue
        extra = members[torch.randint(0, len(members), (target - len(members),), generator=generator)]
        chosen += [members, extra]
    out = torch.cat(chosen)
    return out[torch.randperm(len(out), generator=generator)]


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def confusion_matrix(y_true: torch.Tensor, y_pred: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``(C, C)`` int64 counts: entry ``[i, j]`` is how many examples of true class ``i`` were
    predicted as class ``j`` (rows: truth, columns: prediction; scikit-learn's convention)."""
    return torch.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).view(
        n_classes, n_classes
    )


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


def classification_metrics(
    y_true: torch.Tensor, y_pred: torch.Tensor, n_classes: int
) -> dict[str, torch.Tensor]:
    """Accuracy, per-class precision, recall and F1 (float64 tensors ``(C,)``), their macro average
    ``macro_f1`` (the plain mean of the per-class F1s) and the confusion matrix. Precision of
    class ``c``: of the examples predicted ``c``, the fraction truly ``c``; recall: of the examples
    truly ``c``, the fraction predicted ``c``; F1: their harmonic mean. 0 where a denominator is 0."""
    cm = confusion_matrix(y_true, y_pred, n_classes).to(torch.float64)
    tp = cm.diagonal()
    precision = _ratio(tp, cm.sum(0))
    recall = _ratio(tp, cm.sum(1))
    f1 = _ratio(2 * precision * recall, precision + recall)
    return {
        "accuracy": tp.sum() / cm.sum(),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "macro_f1": f1.mean(),
        "confusion": cm.to(torch.int64),
    }


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _rows(
    inputs: dict[str, torch.Tensor], index: torch.Tensor, device: torch.device
) -> dict[str, torch.Tensor]:
    return {k: v[index].to(device) for k, v in inputs.items()}


@torch.no_grad()
def predict_logits(
    model: nn.Module, inputs: dict[str, torch.Tensor], start_layer: int = 0, batch_size: int = 64
) -> torch.Tensor:
    """The model's logits ``(N, C)`` (eval mode, float32, CPU) on ``inputs``: ``ids``,
    ``attention_mask`` and, when ``start_layer > 0``, the cached ``hidden`` states."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n = len(inputs["ids"])
    out = []
    try:
        for i in range(0, n, batch_size):
            b = _rows(inputs, torch.arange(i, min(n, i + batch_size)), device)
            out.append(
                model(b["ids"], b["attention_mask"], start_layer=start_layer, hidden=b.get("hidden"))
                .float()
                .cpu()
            )
    finally:
        model.train(was_training)
    return torch.cat(out)


def fit_classifier(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    steps: int,
    lr: float,
    batch_size: int = 32,
    weights: torch.Tensor | None = None,
    head_lr: float | None = None,
    start_layer: int = 0,
    weight_decay: float = 0.01,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> list[float]:
    """AdamW on the parameters with ``requires_grad`` for ``steps`` mini-batches drawn by reshuffled
    epochs, linear warm-up over the first 10% of the steps then linear decay to 0 (the usual
    fine-tuning schedule). ``head_lr`` (default ``lr``) for ``model.head``: a new, randomly
    initialised head can take a larger rate than pretrained weights. ``weights``: class weights for
    :func:`weighted_cross_entropy`. Returns the loss of every step."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    head = [p for p in model.head.parameters() if p.requires_grad]
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": head, "lr": head_lr or lr}] + ([{"params": body, "lr": lr}] if body else [])
    for group in groups:
        group["base_lr"] = group["lr"]
    opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
    w = None if weights is None else weights.to(device)
    warmup = max(1, steps // 10)
    n = len(labels)
    order = torch.randperm(n, generator=generator)
    pos = 0
    losses = []
    model.train()
    for step in tqdm(range(steps), disable=not progress, desc="fine-tuning"):
        if pos + min(batch_size, n) > n:
            order, pos = torch.randperm(n, generator=generator), 0
        index = order[pos : pos + batch_size]
        pos += len(index)
        scale = (step + 1) / warmup if step < warmup else max(0.0, (steps - step) / max(1, steps - warmup))
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * scale
        b = _rows(inputs, index, device)
        logits = model(b["ids"], b["attention_mask"], start_layer=start_layer, hidden=b.get("hidden"))
        y = labels[index].to(device)
        loss = (
            F.cross_entropy(logits.float(), y) if w is None else weighted_cross_entropy(logits.float(), y, w)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------
# How sure is a test accuracy? Intervals
# ---------------------------------------------------------------------------------------------


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's score interval for a proportion ``successes / n`` (95% for ``z = 1.96``): unlike
    ``p +- z sqrt(p (1 - p) / n)`` it stays inside [0, 1] and is not empty at ``p = 0`` or 1. It
    treats the ``n`` trials as independent."""
    if n <= 0:
        raise ValueError(f"n must be >= 1, got {n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_by_group(
    correct: torch.Tensor, groups: Sequence, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of an accuracy whose examples come in correlated ``groups``
    (passages of one play): each replicate draws whole groups with replacement and pools their
    examples. Passages of one play are not independent, so this interval is wider, and more
    honest, than one that resamples passages."""
    names = sorted(set(groups))
    index = {name: i for i, name in enumerate(names)}
    group_of = torch.tensor([index[g] for g in groups])
    hits = torch.zeros(len(names), dtype=torch.float64).index_add_(0, group_of, correct.to(torch.float64))
    sizes = torch.bincount(group_of, minlength=len(names)).to(torch.float64)
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, len(names), (n_boot, len(names)), generator=g)
    acc = hits[draws].sum(1) / sizes[draws].sum(1)
    tail = (1 - level) / 2
    return float(torch.quantile(acc, tail)), float(torch.quantile(acc, 1 - tail))


# ---------------------------------------------------------------------------------------------
# The baseline: chapter 7's bag of words
# ---------------------------------------------------------------------------------------------


def bow_baseline(
    train_texts: Sequence[str],
    train_labels: torch.Tensor,
    eval_texts: Sequence[Sequence[str]],
    n_classes: int = 3,
    max_vocab: int = 2000,
    steps: int = 200,
    lr: float = 0.1,
    weight_decay: float = 1e-4,
) -> list[torch.Tensor]:
    """Chapter 7's classifier: a bag of words (lower-cased words, a vocabulary of at most
    ``max_vocab`` words built from the training texts only, ``log(1 + count)`` features scaled to
    unit length) and multinomial logistic regression (:func:`course_lib.embeddings.fit_bow_classifier`).
    It reads every word of a passage. Returns the predicted labels of each list of ``eval_texts``."""
    from itertools import chain

    from course_lib.embeddings import bag_of_words, build_vocab, fit_bow_classifier, tf_features, words

    train_docs = [words(t) for t in train_texts]
    vocab, _ = build_vocab(list(chain.from_iterable(train_docs)), max_vocab)
    w, b = fit_bow_classifier(tf_features(bag_of_words(train_docs, vocab)), train_labels, n_classes,
                              steps=steps, lr=lr, weight_decay=weight_decay)
    return [(tf_features(bag_of_words([words(t) for t in texts], vocab)) @ w + b).argmax(1)
            for texts in eval_texts]
