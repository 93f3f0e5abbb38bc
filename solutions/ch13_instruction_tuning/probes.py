"""Trusted checks for chapter 13 (see grader/probes.py): each exercise again, on secret inputs.

Sizes, seeds and flags are drawn from the generator too and travel as small tensors (``cfg*``),
so a student cannot tune an answer to a fixed case. BLEU's words travel as integer ids.
"""

import math

import torch

from course_lib import instruction as ref
from grader.probes import Probe, checker

F64 = torch.float64


def _randint(g, low, high):
    """One integer in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


# -- exercise 1: the prompt loss mask ---------------------------------------------------------------

N_MASK = 6


def _mask_inputs(g):
    x = {}
    for i in range(N_MASK):
        b, t = _randint(g, 1, 6), _randint(g, 2, 48)
        lengths = torch.randint(2, t + 1, (b,), generator=g)
        prompts = torch.stack([torch.randint(1, int(n), (1,), generator=g)[0] for n in lengths])
        ids = torch.randint(0, 2048, (b, t), generator=g)
        pad = _randint(g, 0, 2047)
        for row in range(b):
            ids[row, int(lengths[row]) - 1] = pad  # the end-of-text token is also the pad id
            ids[row, int(lengths[row]):] = pad
        x[f"ids{i}"], x[f"prompts{i}"], x[f"lengths{i}"] = ids, prompts, lengths
        x[f"cfg{i}"] = torch.tensor([-100 if i < 4 else -_randint(g, 1, 50)])
    return x


def _mask_outputs(f, x):
    return {f"out{i}": f(x[f"ids{i}"], x[f"prompts{i}"], x[f"lengths{i}"], int(x[f"cfg{i}"][0]))
            for i in range(N_MASK)}


# -- exercise 2: corpus BLEU ------------------------------------------------------------------------

N_CORPORA = 8


def _bleu_inputs(g):
    x = {}
    for i in range(N_CORPORA):
        pairs = _randint(g, 1, 8)
        vocab = _randint(g, 3, 12)
        hyp_lens = torch.randint(0 if i % 4 else 1, 16, (pairs,), generator=g)
        ref_lens = torch.randint(1, 16, (pairs,), generator=g)
        x[f"hyp{i}"] = torch.randint(0, vocab, (int(hyp_lens.sum()),), generator=g)
        x[f"ref{i}"] = torch.randint(0, vocab, (int(ref_lens.sum()),), generator=g)
        x[f"hyp_lens{i}"], x[f"ref_lens{i}"] = hyp_lens, ref_lens
        x[f"cfg{i}"] = torch.tensor([[4, 4, 2, 3][_randint(g, 0, 3)]])
    return x


def _words(flat, lengths):
    out, start = [], 0
    for n in lengths.tolist():
        out.append([f"w{int(v)}" for v in flat[start:start + n]])
        start += n
    return out


def _bleu_outputs(f, x):
    return {f"out{i}": torch.tensor(float(f(_words(x[f"hyp{i}"], x[f"hyp_lens{i}"]),
                                            _words(x[f"ref{i}"], x[f"ref_lens{i}"]), int(x[f"cfg{i}"][0]))),
                                    dtype=F64)
            for i in range(N_CORPORA)}


# -- exercise 3: k-fold splits ----------------------------------------------------------------------

N_KFOLD = 5


def _kfold_inputs(g):
    x = {}
    for i in range(N_KFOLD):
        k = _randint(g, 2, 8)
        x[f"cfg{i}"] = torch.tensor([k + _randint(g, 0, 70), k, _randint(g, 0, 10**6), int(i > 0)])
    return x


def _kfold_outputs(f, x):
    out = {}
    for i in range(N_KFOLD):
        n, k, seed, seeded = (int(v) for v in x[f"cfg{i}"])
        folds = f(n, k, torch.Generator().manual_seed(seed) if seeded else None)
        for j, (train, val) in enumerate(folds):
            out[f"train{i}_{j}"], out[f"val{i}_{j}"] = train, val
    return out


# -- exercise 4: random search ----------------------------------------------------------------------

SPACE = {"a": (1e-4, 1e2, "log"), "b": (-1.0, 3.0, "linear"), "c": (1, 6, "int"), "d": (1e-6, 1e-1, "log")}


def _search_inputs(g):
    return {"cfg": torch.tensor([_randint(g, 0, 10**6), _randint(g, 5, 40)]),
            "shift": torch.rand(2, generator=g, dtype=F64) * 4 - 2}


def _search_outputs(f, x):
    seed, n = (int(v) for v in x["cfg"])
    s0, s1 = (float(v) for v in x["shift"])

    def objective(c):
        return ((math.log10(c["a"]) - s0) ** 2 + (c["b"] - s1) ** 2 + 0.1 * c["c"]
                + math.log10(c["d"]) ** 2 / 50)

    best, trials = f(objective, SPACE, n, torch.Generator().manual_seed(seed))
    out = {"best": torch.tensor([float(best[k]) for k in SPACE], dtype=F64),
           "losses": torch.tensor([float(loss) for _, loss in trials], dtype=F64)}
    for key in SPACE:
        out[f"trial_{key}"] = torch.tensor([float(c[key]) for c, _ in trials], dtype=F64)
    return out


PROBES = [
    Probe(
        "ex1_sft_labels_tests",
        inputs=_mask_inputs,
        run=lambda ns, x: _mask_outputs(ns["sft_labels"], x),
        check=checker(lambda x: _mask_outputs(ref.sft_labels, x), default=(0.0, 0.0)),
    ),
    Probe(
        "ex2_bleu_tests",
        inputs=_bleu_inputs,
        run=lambda ns, x: _bleu_outputs(ns["corpus_bleu"], x),
        check=checker(lambda x: _bleu_outputs(ref.corpus_bleu, x), default=(1e-9, 1e-12)),
    ),
    Probe(
        "ex3_kfold_tests",
        inputs=_kfold_inputs,
        run=lambda ns, x: _kfold_outputs(ns["kfold_splits"], x),
        check=checker(lambda x: _kfold_outputs(ref.kfold_splits, x), default=(0.0, 0.0)),
    ),
    Probe(
        "ex4_random_search_tests",
        inputs=_search_inputs,
        run=lambda ns, x: _search_outputs(ns["random_search"], x),
        check=checker(lambda x: _search_outputs(ref.random_search, x), default=(1e-9, 1e-12)),
    ),
]
