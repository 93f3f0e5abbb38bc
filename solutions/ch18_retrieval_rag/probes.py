"""Trusted checks for chapter 18 (see grader/probes.py): each exercise again, on secret inputs.

Sizes and flags are drawn from the generator too and travel as small tensors (``cfg*``).
"""

import torch

from course_lib import retrieval as ref
from grader.probes import F32, F64, randint, same_as, uniform

# -- exercise 1: overlapping windows ------------------------------------------------------------------

N_SPANS = 12


def _spans_inputs(g):
    x = {}
    for i in range(N_SPANS):
        size = randint(g, 1, 9)
        overlap = randint(g, 0, size - 1)
        n = randint(g, 0, 60)
        if i == 0:
            n = 0
        elif i == 1:
            n = randint(g, 1, size)  # one window
        elif i == 2:
            n = size + (size - overlap) * randint(g, 1, 5)  # the last window ends exactly at n
        elif i == 3:
            overlap = size + randint(g, 0, 2)  # invalid: overlap >= size
        elif i == 4:
            overlap = -randint(g, 1, 3)  # invalid: negative
        x[f"cfg{i}"] = torch.tensor([n, size, overlap])
    return x


def _spans_outputs(chunk_spans, x):
    out = {}
    for i in range(N_SPANS):
        n, size, overlap = (int(v) for v in x[f"cfg{i}"])
        try:
            spans = chunk_spans(n, size, overlap)
        except ValueError:
            out[f"spans{i}"] = torch.tensor([[-1, -1]])  # raised, as the task asks for invalid overlaps
            continue
        pairs = [[int(a), int(b)] for a, b in spans]
        out[f"spans{i}"] = torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)
    return out


# -- exercise 2: BM25 ---------------------------------------------------------------------------------------

N_BM25 = 5


def _bm25_inputs(g):
    x = {}
    for i in range(N_BM25):
        n_docs, vocab, terms = randint(g, 1, 50), randint(g, 1, 20), randint(g, 0, 8)
        df = torch.randint(1, n_docs + 1, (vocab,), generator=g)
        if i == 0 and n_docs % 2 == 0:
            df[0] = n_docs // 2  # an idf of exactly 0: not floored
        x[f"df{i}"] = df
        x[f"cfg{i}"] = torch.tensor([n_docs])
        x[f"eps{i}"] = uniform(g, 0.0, 1.0)
        tf = torch.randint(0, 6, (n_docs, terms), generator=g)
        tf[torch.rand(n_docs, terms, generator=g) < 0.4] = 0
        x[f"tf{i}"] = tf.to(F32) if i % 2 else tf
        x[f"len{i}"] = tf.sum(1) + torch.randint(1, 40, (n_docs,), generator=g)
        x[f"idf{i}"] = uniform(g, -0.5, 4.0, size=(terms,), dtype=F64)
        x[f"k1b{i}"] = torch.stack([uniform(g, 0.3, 3.0), uniform(g, 0.0, 1.0)])
    return x


def _bm25_outputs(bm25_idf, bm25_scores, x):
    out = {}
    for i in range(N_BM25):
        n_docs = int(x[f"cfg{i}"][0])
        out[f"out_idf{i}"] = bm25_idf(x[f"df{i}"], n_docs, epsilon=float(x[f"eps{i}"]))
        out[f"out_idf_default{i}"] = bm25_idf(x[f"df{i}"], n_docs)
        k1, b = (float(v) for v in x[f"k1b{i}"])
        out[f"out_score{i}"] = bm25_scores(x[f"tf{i}"], x[f"len{i}"], x[f"idf{i}"], k1=k1, b=b)
        out[f"out_score_default{i}"] = bm25_scores(x[f"tf{i}"], x[f"len{i}"], x[f"idf{i}"])
    return out


# -- exercise 3: reciprocal rank fusion ------------------------------------------------------------------

N_RRF = 6


def _rrf_inputs(g):
    x = {}
    for i in range(N_RRF):
        n_docs, lists = randint(g, 1, 40), randint(g, 1, 6)
        length = randint(g, 1, n_docs)
        rankings = torch.stack([torch.randperm(n_docs, generator=g)[:length] for _ in range(lists)])
        cut = torch.randint(0, length + 1, (lists,), generator=g)
        if i > 0:
            rankings[torch.arange(length)[None, :] >= cut[:, None]] = -1  # shorter lists, padded
        x[f"rank{i}"] = rankings
        x[f"cfg{i}"] = torch.tensor([n_docs])
        x[f"k{i}"] = uniform(g, 0.0, 100.0)
    return x


def _rrf_outputs(rrf_scores, x):
    out = {}
    for i in range(N_RRF):
        n_docs = int(x[f"cfg{i}"][0])
        out[f"out{i}"] = rrf_scores(x[f"rank{i}"], n_docs, k=float(x[f"k{i}"]))
        out[f"out_default{i}"] = rrf_scores(x[f"rank{i}"], n_docs)
    return out


# -- exercise 4: ranking metrics ---------------------------------------------------------------------------

N_METRICS = 6


def _metric_inputs(g):
    x = {}
    for i in range(N_METRICS):
        q, n_docs = randint(g, 1, 15), randint(g, 1, 30)
        length = randint(g, 1, n_docs)
        ranked = torch.stack([torch.randperm(n_docs, generator=g)[:length] for _ in range(q)])
        if i % 2:
            ranked[torch.rand(q, length, generator=g) < 0.3] = -1  # empty slots
        relevant = torch.rand(q, n_docs, generator=g) < uniform(g, 0.05, 0.9)
        if i % 2:
            relevant[:, 0] = True  # what a -1 clamped to 0 would read: empty slots must stay misses
        relevant[0] = False  # nothing relevant
        if i == 0:
            relevant[-1] = True  # everything relevant: more relevant documents than k
        x[f"ranked{i}"] = ranked
        x[f"relevant{i}"] = relevant
        x[f"cfg{i}"] = torch.tensor([randint(g, 1, length)])
    return x


def _metric_outputs(ranking_metrics, x):
    out = {}
    for i in range(N_METRICS):
        got = ranking_metrics(x[f"ranked{i}"], x[f"relevant{i}"], int(x[f"cfg{i}"][0]))
        for key in ("recall", "rr", "ndcg"):
            out[f"out_{key}{i}"] = got[key]  # out*: float64, as the task says
    return out


PROBES = [
    same_as("ex1_chunk_spans_tests", ref.chunk_spans, _spans_inputs, _spans_outputs, rtol=0, atol=0),
    same_as("ex2_bm25_tests", (ref.bm25_idf, ref.bm25_scores), _bm25_inputs, _bm25_outputs,
            rtol=1e-9, atol=1e-12, check_inputs_unchanged=True),
    same_as("ex3_rrf_tests", ref.rrf_scores, _rrf_inputs, _rrf_outputs, rtol=1e-12, atol=1e-15,
            check_inputs_unchanged=True),
    same_as("ex4_ranking_metrics_tests", ref.ranking_metrics, _metric_inputs, _metric_outputs,
            rtol=1e-12, atol=1e-15, check_inputs_unchanged=True),
]
