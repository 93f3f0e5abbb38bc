"""Retrieval and retrieval-augmented generation (chapter 18).

- Passages: :func:`play_lines` reads a cleaned play into its spoken lines (play, scene, speaker,
  text), and :func:`make_passages` cuts each scene into windows of consecutive lines that overlap
  (:func:`chunk_spans`): a passage never crosses a scene boundary, and a line near a window's
  edge is also inside its neighbour, so a quote is never cut in two.
- Sparse retrieval: Okapi BM25 (:func:`bm25_idf`, :func:`bm25_scores`) in the exact variant of
  ``rank_bm25.BM25Okapi`` (the maintained implementation the chapter checks against), and an
  inverted index (:class:`BM25Index`, a scipy sparse matrix) that scores only the query's terms.
- Dense retrieval: exact cosine search over unit-length MiniLM embeddings (:func:`cosine_search`)
  and FAISS indexes, flat and IVF (:func:`faiss_flat`, :func:`faiss_ivf`, :func:`faiss_search`).
- Fusion: reciprocal rank fusion (:func:`rrf_scores`, :func:`fuse`; Cormack, Clarke and Buettcher,
  2009) and the rule-based query rewrites fused in "RAG-Fusion" (:func:`rewrite_queries`).
- Evaluation: questions made by code from the corpus with known answers (:func:`make_questions`:
  "who says this line?", the line given whole or with a third of its words missing), the
  passages that answer them, :func:`ranking_metrics` (recall@k, reciprocal rank, nDCG@k per
  question) and bootstrap intervals (:func:`mean_interval`).
- Answers: extractive (:func:`extractive_speaker`) and from the course GPT, which chooses among
  candidate speakers by the likelihood of ``NAME.`` followed by the quote, with a retrieved passage
  before it or none (:func:`gpt_choose_speaker`).
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from itertools import groupby

import numpy as np
import torch
import torch.nn.functional as F

from course_lib.embeddings import words
from course_lib.instruction import bootstrap_weights, parse_speeches, percentile_interval
from course_lib.lm_data import play_of, work_texts

RRF_K = 60.0  # Cormack et al.'s constant: a document's 1st and 10th ranks weigh 1/61 and 1/70

# ---------------------------------------------------------------------------------------------
# 1. The corpus as passages
# ---------------------------------------------------------------------------------------------

# "ACT I." and "SCENE II. A Camp near Forres." start lines of the cleaned plays; a few editions
# write "Act" and "Scene", or put both on one line ("ACT I. SCENE I.").
_ACT = re.compile(r"^(?:ACT|Act)\s+([IVXL]+)\b")
_SCENE = re.compile(r"(?:^|\.\s+)(?:SCENE|Scene)\s+([IVXL]+)\b")


@dataclass(frozen=True)
class Line:
    """One spoken line: ``number`` counts the play's spoken lines from 0 (two identical lines of a
    play are two lines)."""

    play: str
    scene: str
    speaker: str
    text: str
    number: int


@dataclass(frozen=True)
class Passage:
    """Consecutive lines of one scene; ``id`` is its row in the index."""

    id: int
    play: str
    scene: str
    lines: tuple[Line, ...]

    @property
    def text(self) -> str:
        return format_lines(self.lines)

    @property
    def speakers(self) -> tuple[str, ...]:
        """The speakers of the passage, each once, in order of their first line."""
        return tuple(dict.fromkeys(line.speaker for line in self.lines))


def format_lines(lines: Sequence[Line]) -> str:
    """Lines laid out as in the plays: ``NAME.`` on its own line before each speech, a blank line
    between speeches (the layout the course GPT was pretrained on)."""
    speeches = [f"{speaker}.\n" + "\n".join(line.text for line in group)
                for speaker, group in groupby(lines, key=lambda line: line.speaker)]
    return "\n\n".join(speeches)


def split_scenes(text: str) -> list[tuple[str, str]]:
    """``(label, text)`` for each scene of a cleaned play, labelled ``"ACT.SCENE"`` (``"I.II"``).
    What precedes the first scene heading (the list of persons, a prologue) is left out; a text
    without any scene heading is one scene, ``"whole"``."""
    scenes, act, label, block = [], "", "whole", []
    for line in text.split("\n"):
        act_match, scene_match = _ACT.match(line), _SCENE.search(line)
        if act_match:
            act = act_match.group(1)
        if scene_match and (act_match or line.lstrip().upper().startswith("SCENE")):
            scenes.append((label, "\n".join(block)))
            label, block = f"{act}.{scene_match.group(1)}" if act else scene_match.group(1), []
        elif not act_match:
            block.append(line)
    scenes.append((label, "\n".join(block)))
    if len(scenes) > 1:
        scenes = scenes[1:]  # the text before the first heading
    return [(name, body) for name, body in scenes if body.strip()]


def scene_lines(body: str) -> list[tuple[str, str]]:
    """``(speaker, line)`` for each spoken line of a scene, from chapter 13's speech parser (which
    keeps a speech that goes on after a stage direction the cleaning removed)."""
    return [(speech.speaker, line) for speech in parse_speeches(body) for line in speech.lines]


@cache
def play_lines(work: str) -> tuple[Line, ...]:
    """Every spoken line of a work, in order, with its scene and speaker (parsed once)."""
    out: list[Line] = []
    play = play_of(work).removesuffix("_gut")
    for scene, body in split_scenes(work_texts([work])[0]):
        for speaker, text in scene_lines(body):
            out.append(Line(play, scene, speaker, text, len(out)))
    return tuple(out)


def chunk_spans(n: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Windows ``[(start, stop), ...]`` over ``n`` items: ``size`` items each, each starting
    ``size - overlap`` after the previous one; the last window is cut at ``n`` and none starts
    once a window has reached ``n``. ``n = 0`` gives ``[]``. Needs ``size >= 1`` and
    ``0 <= overlap < size`` (else ``ValueError``)."""
    if overlap < 0 or overlap >= size:  # also catches size < 1, since overlap >= 0
        raise ValueError(f"need size >= 1 and 0 <= overlap < size, got size={size}, overlap={overlap}")
    spans, start = [], 0
    while start < n:
        stop = min(start + size, n)
        spans.append((start, stop))
        if stop == n:
            break
        start += size - overlap
    return spans


def make_passages(works: Sequence[str], size: int = 8, overlap: int = 2,
                  spans: Callable[[int, int, int], list[tuple[int, int]]] = chunk_spans) -> list[Passage]:
    """Passages of ``size`` consecutive lines overlapping by ``overlap``, scene by scene."""
    passages: list[Passage] = []
    for work in works:
        for scene, group in groupby(play_lines(work), key=lambda line: line.scene):
            lines = tuple(group)
            for start, stop in spans(len(lines), size, overlap):
                passages.append(Passage(len(passages), lines[0].play, scene, lines[start:stop]))
    return passages


# ---------------------------------------------------------------------------------------------
# 2. BM25
# ---------------------------------------------------------------------------------------------


def bm25_idf(doc_freq: torch.Tensor, n_docs: int, epsilon: float = 0.25) -> torch.Tensor:
    """rank_bm25's BM25Okapi idf, float64 ``(V,)``: ``ln(N - n + 0.5) - ln(n + 0.5)`` for a term
    in ``n`` of ``N`` documents; a negative idf (a term in more than half the documents) is
    replaced by ``epsilon`` times the mean idf of the whole vocabulary (negative ones included)."""
    df = doc_freq.to(torch.float64)
    idf = torch.log(n_docs - df + 0.5) - torch.log(df + 0.5)
    floor = epsilon * idf.mean()
    return torch.where(idf < 0, floor, idf)


def bm25_scores(tf: torch.Tensor, doc_len: torch.Tensor, idf: torch.Tensor, k1: float = 1.5,
                b: float = 0.75) -> torch.Tensor:
    """BM25 scores float64 ``(N,)`` of ``N`` documents for a query of ``T`` terms: ``tf`` ``(N, T)``
    counts of each query term (a repeated query term is a repeated column), ``doc_len`` ``(N,)``
    every document's length in terms, ``idf`` ``(T,)``."""
    dl = doc_len.to(torch.float64)
    norm = k1 * (1 - b + b * dl / dl.mean())
    # float64 idf times the counts (integers, exact in any dtype) makes the whole sum float64
    return (idf.to(torch.float64) * tf * (k1 + 1) / (tf + norm[:, None])).sum(1)


class BM25Index:
    """An inverted index: a sparse ``(N, V)`` matrix of term counts, stored by column so that a
    query reads only its own terms' columns. ``idf_fn`` and ``score_fn`` are BM25's two formulas
    (the chapter passes the student's)."""

    def __init__(self, docs: Sequence[Sequence[str]], k1: float = 1.5, b: float = 0.75,
                 epsilon: float = 0.25, idf_fn: Callable = bm25_idf,
                 score_fn: Callable = bm25_scores) -> None:
        from scipy.sparse import csc_matrix

        self.vocab: dict[str, int] = {}
        rows, cols, counts = [], [], []
        for i, doc in enumerate(docs):
            for term, count in Counter(doc).items():
                rows.append(i)
                cols.append(self.vocab.setdefault(term, len(self.vocab)))
                counts.append(count)
        self.n_docs = len(docs)
        self.tf = csc_matrix((counts, (rows, cols)), shape=(self.n_docs, len(self.vocab)), dtype=np.float64)
        self.doc_len = torch.tensor([len(doc) for doc in docs], dtype=torch.int64)
        self.doc_freq = torch.from_numpy(np.diff(self.tf.indptr)).to(torch.int64)
        self.k1, self.b, self.score_fn = k1, b, score_fn
        self.idf = idf_fn(self.doc_freq, self.n_docs, epsilon)

    def scores(self, query: Sequence[str]) -> torch.Tensor:
        """float64 ``(N,)``; terms not in the corpus are dropped (rank_bm25 scores them 0)."""
        ids = [self.vocab[term] for term in query if term in self.vocab]
        tf = torch.from_numpy(self.tf[:, ids].toarray())
        return self.score_fn(tf, self.doc_len, self.idf[ids], self.k1, self.b)

    def search(self, query: Sequence[str], k: int) -> torch.Tensor:
        return top_ids(self.scores(query), k)


def top_ids(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` best ids of the last dim, best first; equal scores in order of id (a stable sort)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


# ---------------------------------------------------------------------------------------------
# 3. Dense retrieval: exact and with FAISS
# ---------------------------------------------------------------------------------------------


def cosine_search(doc_emb: torch.Tensor, query_emb: torch.Tensor, k: int) -> torch.Tensor:
    """Exact search: int64 ``(Q, k)`` ids of the largest cosine similarities (rows of both inputs
    unit length, so the cosine is the dot product)."""
    return top_ids(query_emb @ doc_emb.T, k)


def faiss_flat(emb: torch.Tensor):
    """A FAISS flat (exact) inner-product index over the rows of ``emb``."""
    import faiss

    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(np.ascontiguousarray(emb.numpy(), dtype=np.float32))
    return index


def faiss_ivf(emb: torch.Tensor, nlist: int, seed: int = 0):
    """A FAISS IVF index: k-means cuts the vectors into ``nlist`` cells; a search visits the
    ``nprobe`` cells whose centroids are nearest the query, and only their vectors."""
    import faiss

    x = np.ascontiguousarray(emb.numpy(), dtype=np.float32)
    quantizer = faiss.IndexFlatIP(x.shape[1])
    index = faiss.IndexIVFFlat(quantizer, x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.cp.min_points_per_centroid = 1  # small corpora: no warning, the clustering still runs
    index.train(x)
    index.add(x)
    return index


def faiss_search(index, queries: torch.Tensor, k: int, nprobe: int | None = None
                 ) -> tuple[torch.Tensor, float]:
    """int64 ``(Q, k)`` ids (``-1`` where fewer than ``k`` vectors were visited) and the seconds
    the search took."""
    if nprobe is not None:
        index.nprobe = nprobe
    x = np.ascontiguousarray(queries.numpy(), dtype=np.float32)
    start = time.perf_counter()
    _, ids = index.search(x, k)
    return torch.from_numpy(ids).to(torch.int64), time.perf_counter() - start


def overlap_at_k(found: torch.Tensor, exact: torch.Tensor) -> float:
    """The share of the exact top-k an approximate search also returned (its "recall" against
    exact search, not against what is relevant)."""
    k = exact.shape[1]
    hits = sum(len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, exact, strict=True))
    return hits / (k * len(exact))


# ---------------------------------------------------------------------------------------------
# 4. Fusion
# ---------------------------------------------------------------------------------------------


def rrf_scores(rankings: torch.Tensor, n_docs: int, k: float = RRF_K) -> torch.Tensor:
    """Reciprocal rank fusion, float64 ``(n_docs,)``: a document gets ``1 / (k + rank)`` from each
    ranking (a row of the int64 ``(L, R)`` ``rankings``, best first, rank 1 first) that lists it;
    ``-1`` marks an empty slot and counts for nothing."""
    L, R = rankings.shape
    ranks = torch.arange(1, R + 1, dtype=torch.float64).expand(L, R)
    valid = rankings >= 0
    scores = torch.zeros(n_docs, dtype=torch.float64)
    return scores.index_add_(0, rankings[valid], 1.0 / (k + ranks[valid]))


def fuse(rankings: torch.Tensor, n_docs: int, top: int, k: float = RRF_K,
         score_fn: Callable = rrf_scores) -> torch.Tensor:
    """The ``top`` documents by fused score (equal scores: smaller id first), int64 ``(top,)``."""
    return top_ids(score_fn(rankings, n_docs, k), top)


def pad_ranking(ids: torch.Tensor, length: int) -> torch.Tensor:
    """A ranking cut or padded with ``-1`` to ``length``."""
    out = torch.full((length,), -1, dtype=torch.int64)
    out[: min(length, len(ids))] = ids[:length]
    return out


# ---------------------------------------------------------------------------------------------
# 5. Questions with known answers, and the metrics
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    """"Who says this line?" about one line of the corpus. ``relevant``: the passages that hold
    the line (two where it falls in an overlap)."""

    kind: str  # "line": the line as written; "fragment": two thirds of its words, half-remembered
    quote: str
    speaker: str
    play: str
    scene: str
    relevant: tuple[int, ...]

    @property
    def text(self) -> str:
        return f'Who says "{self.quote}"?'


def fragment(text: str, rng: random.Random, keep: float = 2 / 3, min_words: int = 4) -> str:
    """A half-remembered quote: a random ``keep`` share of the line's words (at least
    ``min_words``), in their order, lower case, no punctuation."""
    tokens = words(text)
    n = max(min_words, round(keep * len(tokens)))
    kept = sorted(rng.sample(range(len(tokens)), min(n, len(tokens))))
    return " ".join(tokens[i] for i in kept)


def make_questions(passages: Sequence[Passage], n: int, seed: int = 0, min_words: int = 6,
                   min_chars: int = 25) -> list[Question]:
    """``n`` questions (or fewer if the corpus has fewer lines), alternately of kind ``"line"``
    and ``"fragment"``, about lines drawn with a seeded ``random.Random`` among the lines of
    ``passages`` that have at least ``min_words`` words and ``min_chars`` characters and whose
    text occurs once in the whole corpus (so that the speaker is the one right answer)."""
    holders: dict[Line, list[int]] = defaultdict(list)
    for passage in passages:
        for line in passage.lines:
            holders[line].append(passage.id)
    text_counts = Counter(line.text for line in holders)
    pool = [line for line in holders if text_counts[line.text] == 1
            and len(words(line.text)) >= min_words and len(line.text) >= min_chars]
    rng = random.Random(seed)
    chosen = rng.sample(pool, min(n, len(pool)))
    questions = []
    for i, line in enumerate(chosen):
        kind = "line" if i % 2 == 0 else "fragment"
        quote = line.text if kind == "line" else fragment(line.text, rng)
        questions.append(Question(kind, quote, line.speaker, line.play, line.scene, tuple(holders[line])))
    return questions


def relevance_matrix(questions: Sequence[Question], n_docs: int) -> torch.Tensor:
    """bool ``(Q, N)``: passage ``j`` holds question ``i``'s line."""
    relevant = torch.zeros(len(questions), n_docs, dtype=torch.bool)
    for i, question in enumerate(questions):
        relevant[i, list(question.relevant)] = True
    return relevant


def ranking_metrics(ranked: torch.Tensor, relevant: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Per question (float64 ``(Q,)`` each), for ``ranked`` int64 ``(Q, R)`` ids (best first,
    distinct within a row, ``-1`` an empty slot that is never relevant, ``1 <= k <= R``) and
    ``relevant`` bool ``(Q, N)``:

    - ``"recall"``: the share of the relevant documents in the top ``k``;
    - ``"rr"``: ``1 / rank`` of the first relevant document in the top ``k`` (0 if none);
    - ``"ndcg"``: DCG@k ``= sum_i rel_i / log2(i + 1)`` (ranks ``i`` from 1) over the best DCG@k
      possible with that many relevant documents.
    A question with no relevant document scores 0 on all three."""
    top = ranked[:, :k]
    hits = (relevant.gather(1, top.clamp_min(0)) & (top >= 0)).to(torch.float64)
    n_relevant = relevant.sum(1).to(torch.float64)
    recall = hits.sum(1) / n_relevant.clamp_min(1)
    ranks = torch.arange(1, k + 1, dtype=torch.float64)
    first = hits.argmax(1)  # the first hit's position (0 when there is none: masked below)
    rr = torch.where(hits.any(1), 1.0 / ranks[first], torch.zeros_like(recall))
    discounts = 1.0 / torch.log2(ranks + 1)
    dcg = (hits * discounts).sum(1)
    ideal_n = n_relevant.clamp(max=k).to(torch.int64)
    ideal = torch.cat([torch.zeros(1, dtype=torch.float64), discounts.cumsum(0)])[ideal_n]
    ndcg = torch.where(ideal > 0, dcg / ideal, torch.zeros_like(dcg))  # 0 / 0 is not selected
    return {"recall": recall, "rr": rr, "ndcg": ndcg}


def random_rankings(n_queries: int, n_docs: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """The random baseline: ``length`` distinct random ids per query."""
    return torch.stack([torch.randperm(n_docs, generator=generator)[:length] for _ in range(n_queries)])


def mean_interval(rows: torch.Tensor, n_boot: int = 1000, seed: int = 0, level: float = 0.95
                  ) -> tuple[float, float, float]:
    """The mean of per-question ``rows`` and its percentile bootstrap interval over questions."""
    rows = rows.to(torch.float64)
    weights = bootstrap_weights(len(rows), n_boot, torch.Generator().manual_seed(seed))
    low, high = percentile_interval(weights @ rows / len(rows), level)
    return float(rows.mean()), low, high


def rewrite_queries(question: Question, idf: Callable[[str], float], n_keywords: int = 4) -> list[str]:
    """Rule-based rewrites for RAG-Fusion (real systems ask an LLM; ours is too small): the
    question as asked, the quote alone (the template's words dropped), and the quote's
    ``n_keywords`` rarest words (highest idf), a keyword query."""
    tokens = list(dict.fromkeys(words(question.quote)))
    keywords = sorted(tokens, key=lambda w: -idf(w))[:n_keywords]
    return [question.text, question.quote, " ".join(keywords)]


# ---------------------------------------------------------------------------------------------
# 6. Answers
# ---------------------------------------------------------------------------------------------


def extractive_speaker(passages: Sequence[Passage], quote: str) -> str:
    """The speaker of the line, among the passages' lines, that shares the most distinct words
    with the quote (ties: the first such line, passages in order)."""
    wanted = set(words(quote))
    best, best_line = -1, None
    for passage in passages:
        for line in passage.lines:
            shared = len(wanted & set(words(line.text)))
            if shared > best:
                best, best_line = shared, line
    return best_line.speaker if best_line is not None else ""


@torch.no_grad()
def sequence_logprobs(model, prefixes: Sequence[list[int]], continuations: Sequence[list[int]],
                      batch_size: int = 32) -> torch.Tensor:
    """float64 ``(B,)``: log p(continuation | prefix) under a GPT, summed over the continuation's
    tokens; each prefix is cut on the left so that the pair fits the model's block size."""
    device = next(model.parameters()).device
    block = model.config.block_size
    out = []
    for i in range(0, len(prefixes), batch_size):
        rows = []
        for prefix, cont in zip(prefixes[i:i + batch_size], continuations[i:i + batch_size], strict=True):
            keep = max(1, block - len(cont))
            rows.append((prefix[-keep:], cont))
        T = max(len(p) + len(c) for p, c in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.int64)
        for r, (p, c) in enumerate(rows):
            ids[r, : len(p) + len(c)] = torch.tensor(p + c)
        logp = F.log_softmax(model(ids.to(device))[0].float(), dim=-1).cpu()
        for r, (p, c) in enumerate(rows):
            positions = torch.arange(len(p) - 1, len(p) + len(c) - 1)
            out.append(logp[r, positions, torch.tensor(c)].double().sum())
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)


def gpt_choose_speaker(model, tokenizer, quote: str, candidates: Sequence[str], context: str = "") -> str:
    """The candidate ``NAME`` that makes ``NAME.`` + newline + the quote most likely after the
    context (a retrieved passage, or nothing: a blank line, as between speeches)."""
    if not candidates:
        return ""
    prefix = tokenizer.encode(context + "\n\n")
    conts = [tokenizer.encode(f"{name}.\n{quote}\n") for name in candidates]
    scores = sequence_logprobs(model, [prefix] * len(conts), conts)
    return candidates[int(scores.argmax())]
