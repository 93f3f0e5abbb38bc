"""Word vectors and sequence models (chapter 7's reference).

- Words: :func:`words` (lower-case word tokens), :func:`build_vocab`, :func:`encode_words`,
  :func:`bag_of_words` (count vectors) and :func:`one_hot`.
- Skip-gram with negative sampling (word2vec): :func:`skipgram_pairs` (centre/context pairs within
  a window), :func:`subsample_keep_prob` (dropping frequent words), :func:`noise_distribution`
  (unigram counts to the power 3/4), :func:`sgns_loss` (the loss), :class:`SkipGram` (two
  embedding tables) and :func:`train_skipgram`.
- Using the vectors: :func:`cosine_top_k` (nearest neighbours by cosine similarity) and
  :func:`analogy` (``b - a + c``); :func:`cbow_loss` for word2vec's other model;
  :func:`char_ngrams` for FastText's sub-words.
- Recurrent networks: :func:`lstm_cell` (one step of an LSTM from explicit weights, PyTorch's gate
  order i, f, g, o), :func:`input_gradient_norms` (how much the last output depends on each
  earlier input: vanishing gradients), :class:`CharLSTM` (a character-level language model),
  :func:`train_char_lm` and :func:`sample_chars`.
- Text classification: :data:`GENRES` (the First Folio's comedies, histories and tragedies),
  :func:`genre_passages` (passages of whole plays, split by play) and :func:`fit_bow_classifier`
  (multinomial logistic regression on bag-of-words features).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

# ---------------------------------------------------------------------------------------------
# Words, vocabularies, bags of words
# ---------------------------------------------------------------------------------------------

WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)*")
UNK = "<unk>"


def words(text: str) -> list[str]:
    """Lower-case word tokens: letters with inner apostrophes (``"o'er"``, ``"'tis"`` -> ``"tis"``)."""
    return WORD_RE.findall(text.lower())


def build_vocab(tokens: Sequence[str], max_size: int, min_count: int = 1) -> tuple[list[str], Counter]:
    """The ``max_size`` most frequent tokens (ties by first appearance) seen at least ``min_count``
    times, with ``"<unk>"`` at index 0 for everything else; and the counts of all tokens."""
    counts = Counter(tokens)
    common = [w for w, n in counts.most_common() if n >= min_count][: max_size - 1]
    return [UNK, *common], counts


def encode_words(tokens: Sequence[str], vocab: Sequence[str]) -> torch.Tensor:
    """Token ids (int64); words not in ``vocab`` become 0 (``<unk>``)."""
    index = {w: i for i, w in enumerate(vocab)}
    return torch.tensor([index.get(w, 0) for w in tokens], dtype=torch.int64)


def one_hot(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``(..., vocab_size)`` float32 rows with a single 1."""
    return F.one_hot(ids, vocab_size).to(torch.float32)


def bag_of_words(docs: Sequence[Sequence[str]], vocab: Sequence[str]) -> torch.Tensor:
    """Count vectors ``(len(docs), len(vocab))`` float32: entry ``[d, j]`` counts ``vocab[j]`` in
    ``docs[d]``; words outside the vocabulary are counted under ``<unk>`` when it is in the
    vocabulary and dropped otherwise."""
    index = {w: i for i, w in enumerate(vocab)}
    unk = index.get(UNK)
    rows, cols = [], []
    for d, doc in enumerate(docs):
        ids = [index.get(w, unk) for w in doc]
        ids = [j for j in ids if j is not None]
        rows += [d] * len(ids)
        cols += ids
    out = torch.zeros(len(docs) * len(vocab), dtype=torch.float32)
    flat = torch.tensor(rows, dtype=torch.int64) * len(vocab) + torch.tensor(cols, dtype=torch.int64)
    out.index_add_(0, flat, torch.ones(len(flat), dtype=torch.float32))
    out = out.view(len(docs), len(vocab))
    return out


# ---------------------------------------------------------------------------------------------
# Skip-gram with negative sampling
# ---------------------------------------------------------------------------------------------


def skipgram_pairs(ids: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (centre, context) pair of positions at distance 1..``window`` in the 1-D id sequence,
    as two int64 tensors of equal length (both directions, ``2 * sum(n - d)`` pairs)."""
    centres, contexts = [], []
    for d in range(1, window + 1):
        centres += [ids[:-d], ids[d:]]
        contexts += [ids[d:], ids[:-d]]
    return torch.cat(centres), torch.cat(contexts)


def subsample_keep_prob(counts: torch.Tensor, threshold: float = 1e-4) -> torch.Tensor:
    """word2vec's subsampling: keep a word of frequency ``f`` with probability
    ``min(1, sqrt(threshold / f) + threshold / f)`` — frequent words ("the", "and") are dropped
    most of the time, so a window holds more content words."""
    freq = counts.to(torch.float64) / counts.sum()
    ratio = threshold / freq.clamp_min(1e-30)
    return (ratio.sqrt() + ratio).clamp(max=1.0).to(torch.float32)


def noise_distribution(counts: torch.Tensor, power: float = 0.75) -> torch.Tensor:
    """Negatives are drawn with probability proportional to ``count ** power`` (3/4: rare words
    a little more often than their frequency)."""
    weights = counts.to(torch.float64).clamp_min(0) ** power
    return (weights / weights.sum()).to(torch.float32)


def sgns_loss(center: torch.Tensor, context: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Skip-gram negative-sampling loss, averaged over the batch.

    ``center`` (B, D): input vectors v_c; ``context`` (B, D): output vectors u_o of the true
    context words; ``negatives`` (B, K, D): output vectors u_k of K noise words per pair::

        loss = mean_b [ -log sigmoid(u_o . v_c) - sum_k log sigmoid(-u_k . v_c) ]

    computed with ``logsigmoid`` so that large dot products stay finite.
    """
    positive = (center * context).sum(-1)                                  # (B,)
    negative = torch.einsum("bkd,bd->bk", negatives, center)               # (B, K)
    return -(F.logsigmoid(positive) + F.logsigmoid(-negative).sum(-1)).mean()


def cbow_loss(context: torch.Tensor, center: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """CBOW with negative sampling: the *mean* of the context input vectors (B, C, D) predicts the
    centre word's output vector (B, D) against K noise words (B, K, D)."""
    return sgns_loss(context.mean(1), center, negatives)


class SkipGram(nn.Module):
    """Two tables: ``inp`` (a word as a centre, v) and ``out`` (a word as a context, u); sparse
    gradients, so a step updates only the rows a batch used."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.inp = nn.Embedding(vocab_size, dim, sparse=True)
        self.out = nn.Embedding(vocab_size, dim, sparse=True)
        nn.init.uniform_(self.inp.weight, -0.5 / dim, 0.5 / dim)
        nn.init.zeros_(self.out.weight)

    def forward(self, center: torch.Tensor, context: torch.Tensor, negatives: torch.Tensor):
        """The three embedding batches ``sgns_loss`` takes."""
        return self.inp(center), self.out(context), self.out(negatives)


def train_skipgram(ids: torch.Tensor, vocab_size: int, *, dim: int = 64, window: int = 3,
                   negatives: int = 5, steps: int = 2000, batch_size: int = 1024, lr: float = 0.01,
                   loss_fn: Callable = sgns_loss, keep_prob: torch.Tensor | None = None,
                   seed: int = 0, device: str | torch.device = "cpu",
                   progress: bool = True) -> tuple[SkipGram, list[float]]:
    """Train :class:`SkipGram` on the id sequence ``ids`` with SparseAdam; returns the model (on
    the CPU) and the loss of every step. With ``keep_prob`` (per word id) frequent words are
    subsampled once before the pairs are made."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.bincount(ids, minlength=vocab_size)
    if keep_prob is not None:
        ids = ids[torch.rand(len(ids), generator=g) < keep_prob[ids]]
    centres, contexts = skipgram_pairs(ids, window)
    noise = noise_distribution(counts)
    noise[0] = 0  # never use <unk> as a negative
    noise = noise / noise.sum()
    torch.manual_seed(seed)
    model = SkipGram(vocab_size, dim).to(device)
    opt = torch.optim.SparseAdam(list(model.parameters()), lr=lr)
    losses = []
    for _ in tqdm(range(steps), desc="skip-gram", disable=not progress, mininterval=0.5):
        batch = torch.randint(0, len(centres), (batch_size,), generator=g)
        neg = torch.multinomial(noise, batch_size * negatives, replacement=True, generator=g)
        c, o, n = (t.to(device) for t in (centres[batch], contexts[batch],
                                          neg.view(batch_size, negatives)))
        loss = loss_fn(*model(c, o, n))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.cpu(), losses


def cosine_top_k(embeddings: torch.Tensor, query: torch.Tensor, k: int,
                 exclude: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` rows of ``embeddings`` (V, D) most cosine-similar to ``query`` (D,), best first,
    leaving out the row indices in ``exclude``: (indices int64 (k,), similarities (k,)).
    A zero row has similarity 0 to everything."""
    norms = embeddings.norm(dim=1).clamp_min(1e-12)
    sims = embeddings @ query / (norms * query.norm().clamp_min(1e-12))
    if len(exclude):
        sims = sims.clone()
        sims[torch.as_tensor(list(exclude), dtype=torch.int64)] = -math.inf
    values, indices = torch.topk(sims, k)
    return indices, values


def analogy(embeddings: torch.Tensor, a: int, b: int, c: int, k: int = 5):
    """``a`` is to ``b`` as ``c`` is to ...: the nearest rows to ``b - a + c`` (unit vectors),
    leaving out the three question words."""
    unit = embeddings / embeddings.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return cosine_top_k(embeddings, unit[b] - unit[a] + unit[c], k, exclude=(a, b, c))


def char_ngrams(word: str, n_min: int = 3, n_max: int = 5) -> list[str]:
    """FastText's sub-words: the character n-grams of ``<word>`` (with boundary marks), and the
    whole ``<word>`` itself."""
    marked = f"<{word}>"
    grams = [marked[i:i + n] for n in range(n_min, n_max + 1) for i in range(len(marked) - n + 1)]
    return [*grams, marked] if marked not in grams else grams


# ---------------------------------------------------------------------------------------------
# Recurrent networks
# ---------------------------------------------------------------------------------------------


def lstm_cell(x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
              b_ih: torch.Tensor | None = None,
              b_hh: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step, as ``nn.LSTMCell``: x (B, I), h and c (B, H), w_ih (4H, I), w_hh (4H, H),
    biases (4H,) or None; gates stacked in PyTorch's order i, f, g, o. Returns (h', c')."""
    gates = x @ w_ih.T + h @ w_hh.T
    if b_ih is not None:
        gates = gates + b_ih
    if b_hh is not None:
        gates = gates + b_hh
    i, f, g, o = gates.chunk(4, dim=-1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_new = torch.sigmoid(o) * torch.tanh(c_new)
    return h_new, c_new


def input_gradient_norms(kind: str = "rnn", length: int = 50, hidden: int = 32, scale: float = 1.0,
                         seed: int = 0) -> torch.Tensor:
    """How strongly the last hidden state depends on each input: ``||d (v . h_T) / d x_t||`` for
    t = 1..T, for a randomly initialised ``kind`` ("rnn": tanh RNN, or "lstm") whose recurrent
    weights are scaled by ``scale`` (1.0: PyTorch's default initialisation). Float64, shape (T,)."""
    torch.manual_seed(seed)
    cls = {"rnn": nn.RNN, "lstm": nn.LSTM}[kind]
    net = cls(hidden, hidden, batch_first=True).double()
    with torch.no_grad():
        net.weight_hh_l0.mul_(scale)
    x = torch.randn(1, length, hidden, dtype=torch.float64, requires_grad=True)
    out, _ = net(x)
    v = torch.randn(hidden, dtype=torch.float64)
    (grad,) = torch.autograd.grad(out[0, -1] @ v, x)
    return grad[0].norm(dim=-1)


class CharLSTM(nn.Module):
    """A character-level language model: embedding -> LSTM -> linear logits over characters."""

    def __init__(self, vocab_size: int, embed: int = 32, hidden: int = 128, layers: int = 1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, ids: torch.Tensor, state=None):
        """ids (B, T) -> logits (B, T, V), and the final (h, c)."""
        out, state = self.lstm(self.embed(ids), state)
        return self.head(out), state


def train_char_lm(model: CharLSTM, data: torch.Tensor, *, steps: int, batch_size: int = 32,
                  seq_len: int = 64, lr: float = 3e-3, seed: int = 0, device: str | torch.device = "cpu",
                  progress: bool = True) -> list[float]:
    """Train on random windows of the 1-D id tensor ``data`` (next-character cross-entropy, Adam,
    gradient clipping at 1); returns the loss of every step (nats per character)."""
    g = torch.Generator().manual_seed(seed)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    offsets = torch.arange(seq_len + 1)
    losses = []
    for _ in tqdm(range(steps), desc="char LSTM", disable=not progress, mininterval=0.5):
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size, 1), generator=g)
        window = data[starts + offsets].to(device)
        logits, _ = model(window[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def sample_chars(model: CharLSTM, prompt_ids: Sequence[int], length: int, temperature: float = 0.8,
                 seed: int = 0) -> list[int]:
    """Continue ``prompt_ids`` by ``length`` characters, sampling from softmax(logits / T)."""
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    model.eval()
    ids = list(prompt_ids)
    logits, state = model(torch.tensor([ids], device=device))
    for _ in range(length):
        probs = torch.softmax(logits[0, -1].float().cpu() / temperature, dim=-1)
        nxt = int(torch.multinomial(probs, 1, generator=g))
        ids.append(nxt)
        logits, state = model(torch.tensor([[nxt]], device=device), state)
    return ids


# ---------------------------------------------------------------------------------------------
# Text classification: which genre is a passage from?
# ---------------------------------------------------------------------------------------------

# The First Folio's three categories (1623). Cymbeline, Troilus and Pericles, whose genre is
# disputed, and the poems are left out.
GENRES = {
    "comedy": ("tempest_gut", "two_gentlemen_of_verona_gut", "merry_wives_of_windsor_gut",
               "measure_for_measure_gut", "comedy_of_errors_gut", "much_ado_about_nothing_gut",
               "loves_labours_lost_gut", "midsummer_nights_dream_gut", "merchant_of_venice_gut",
               "as_you_like_it_gut", "taming_of_the_shrew_gut", "alls_well_that_ends_well_gut",
               "twelfth_night_gut", "winters_tale_gut"),
    "history": ("john_gut", "richard_ii_gut", "henry_iv_part_1_gut", "henry_iv_part_2_gut",
                "henry_v_gut", "henry_vi_part_1_gut", "henry_vi_part_2_gut", "henry_vi_part_3_gut",
                "richard_iii_gut", "henry_viii_gut"),
    "tragedy": ("coriolanus_gut", "tragedy_of_titus_andronicus_gut", "romeo_and_juliet_gut",
                "timon_of_athens_gut", "julius_caesar_gut", "macbeth_gut", "hamlet_gut", "lear_gut",
                "othello_gut", "antony_and_cleopatra_gut"),
}
# Whole plays held out for testing: no passage of a test play is ever trained on.
TEST_PLAYS = ("twelfth_night_gut", "much_ado_about_nothing_gut", "tempest_gut",
              "henry_v_gut", "richard_iii_gut", "macbeth_gut", "othello_gut", "julius_caesar_gut")


def genre_passages(passage_words: int = 60, max_per_play: int | None = None, seed: int = 0,
                   split_words=words):
    """Passages of ``passage_words`` consecutive words from every play of :data:`GENRES`, labelled
    0 comedy, 1 history, 2 tragedy, split *by play* (:data:`TEST_PLAYS` are the test set).

    Returns ``{"train": (docs, labels, plays), "test": (...)}`` where ``docs`` is a list of word
    lists, ``labels`` an int64 tensor and ``plays`` the play of each passage. With
    ``max_per_play`` a seeded random subset of each play's passages is kept. ``split_words`` cuts
    a play into words: :func:`words` (lower case, no punctuation) by default, ``str.split`` to keep
    the text as written (chapter 12's transformers read it so)."""
    from course_lib.lm_data import work_texts

    g = torch.Generator().manual_seed(seed)
    out: dict[str, tuple[list, list, list]] = {"train": ([], [], []), "test": ([], [], [])}
    for label, genre in enumerate(GENRES):
        for play in GENRES[genre]:
            tokens = split_words(work_texts([play])[0])
            chunks = [tokens[i:i + passage_words]
                      for i in range(0, len(tokens) - passage_words + 1, passage_words)]
            if max_per_play is not None and len(chunks) > max_per_play:
                keep = torch.randperm(len(chunks), generator=g)[:max_per_play].sort().values
                chunks = [chunks[int(i)] for i in keep]
            docs, labels, plays = out["test" if play in TEST_PLAYS else "train"]
            docs += chunks
            labels += [label] * len(chunks)
            plays += [play] * len(chunks)
    return {k: (d, torch.tensor(y, dtype=torch.int64), p) for k, (d, y, p) in out.items()}


def tf_features(counts: torch.Tensor) -> torch.Tensor:
    """Bag-of-words counts -> ``log(1 + count)``, each row scaled to unit length."""
    x = torch.log1p(counts)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def fit_bow_classifier(features: torch.Tensor, labels: torch.Tensor, n_classes: int, steps: int = 200,
                       lr: float = 0.1, weight_decay: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression: ``logits = features @ W + b`` with W (V, C) and b (C,),
    trained by full-batch Adam on the cross-entropy (plus ``weight_decay * ||W||^2 / 2``) from
    zeros. Returns (W, b), detached, in the features' dtype."""
    w = torch.zeros(features.shape[1], n_classes, dtype=features.dtype, requires_grad=True)
    b = torch.zeros(n_classes, dtype=features.dtype, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(features @ w + b, labels) + 0.5 * weight_decay * (w * w).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return w.detach(), b.detach()


def accuracy_of(w: torch.Tensor, b: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max logit is the label."""
    return float(((features @ w + b).argmax(1) == labels).to(torch.float64).mean())


def synthetic_bow_task(generator: torch.Generator, n_train: int = 400, n_test: int = 400,
                       vocab_size: int = 200, n_classes: int = 3, doc_words: int = 30, signal: float = 0.6,
                       class_probs: Sequence[float] | None = None, dtype: torch.dtype = torch.float32):
    """A bag-of-words classification task with a known answer, for tests: each class draws its
    words from its own Zipf-like distribution (a shared base tilted by ``exp(signal * noise)``),
    documents are ``doc_words`` draws, features are :func:`tf_features` of the counts.
    Returns (x_train, y_train, x_test, y_test)."""
    g = generator
    base = 1.0 / torch.arange(1, vocab_size + 1, dtype=torch.float64)
    tilt = torch.exp(signal * torch.randn(n_classes, vocab_size, generator=g, dtype=torch.float64))
    word_probs = base * tilt
    word_probs = word_probs / word_probs.sum(1, keepdim=True)
    prior = torch.full((n_classes,), 1.0 / n_classes, dtype=torch.float64) if class_probs is None else \
        torch.tensor(class_probs, dtype=torch.float64)

    def draw(n: int):
        y = torch.multinomial(prior, n, replacement=True, generator=g)
        draws = torch.stack([torch.multinomial(word_probs[int(c)], doc_words, replacement=True, generator=g)
                             for c in y])
        counts = torch.zeros(n, vocab_size, dtype=torch.float64).scatter_add_(
            1, draws, torch.ones_like(draws, dtype=torch.float64))
        return tf_features(counts).to(dtype), y

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    return x_train, y_train, x_test, y_test
