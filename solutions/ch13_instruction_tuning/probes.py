"""Trusted checks for chapter 13 (see grader/probes.py): each exercise again, on secret inputs.

Sizes, seeds and flags are drawn from the generator too and travel as small tensors (``cfg*``),
so a student cannot tune an answer to a fixed case. BLEU's words travel as integer ids.
"""

import math

import torch

from course_lib import instruction as ref
from course_lib import model_selection
from grader.probes import F64, randint, same_as, uniform

# -- exercise 1: the prompt loss mask ---------------------------------------------------------------

N_MASK = 6


def _mask_inputs(g):
    x = {}
    for i in range(N_MASK):
        b, t = randint(g, 1, 6), randint(g, 2, 48)
        lengths = torch.randint(2, t + 1, (b,), generator=g)
        prompts = torch.stack([torch.randint(1, int(n), (1,), generator=g)[0] for n in lengths])
        ids = torch.randint(0, 2048, (b, t), generator=g)
        pad = randint(g, 0, 2047)
        for row in range(b):
            ids[row, int(lengths[row]) - 1] = pad  # the end-of-text token is also the pad id
            ids[row, int(lengths[row]):] = pad
        x[f"ids{i}"], x[f"prompts{i}"], x[f"lengths{i}"] = ids, prompts, lengths
        x[f"cfg{i}"] = torch.tensor([-100 if i < 4 else -randint(g, 1, 50)])
    return x


def _mask_outputs(f, x):
    return {f"out{i}": f(x[f"ids{i}"], x[f"prompts{i}"], x[f"lengths{i}"], int(x[f"cfg{i}"][0]))
            for i in range(N_MASK)}


# -- exercise 2: corpus BLEU ------------------------------------------------------------------------

N_CORPORA = 8


def _bleu_inputs(g):
    x = {}
    for i in range(N_CORPORA):
        pairs = randint(g, 1, 8)
        vocab = randint(g, 3, 12)
        hyp_lens = torch.randint(0 if i % 4 else 1, 16, (pairs,), generator=g)
        ref_lens = torch.randint(1, 16, (pairs,), generator=g)
        x[f"hyp{i}"] = torch.randint(0, vocab, (int(hyp_lens.sum()),), generator=g)
        x[f"ref{i}"] = torch.randint(0, vocab, (int(ref_lens.sum()),), generator=g)
        x[f"hyp_lens{i}"], x[f"ref_lens{i}"] = hyp_lens, ref_lens
        x[f"cfg{i}"] = torch.tensor([[4, 4, 2, 3][randint(g, 0, 3)]])
    # A one-word hypothesis that occurs in its reference: c = 1, every p_n = 1, only BP < 1 when r > 1.
    ref_len = randint(g, 1, 3)
    x[f"ref{N_CORPORA}"] = torch.randint(0, 4, (ref_len,), generator=g)
    x[f"hyp{N_CORPORA}"] = x[f"ref{N_CORPORA}"][randint(g, 0, ref_len - 1)].reshape(1)
    x[f"hyp_lens{N_CORPORA}"], x[f"ref_lens{N_CORPORA}"] = torch.tensor([1]), torch.tensor([ref_len])
    x[f"cfg{N_CORPORA}"] = torch.tensor([4])
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
            for i in range(N_CORPORA + 1)}


# -- exercise 3: k-fold splits ----------------------------------------------------------------------

N_KFOLD = 5


def _kfold_inputs(g):
    x = {}
    for i in range(N_KFOLD):
        k = randint(g, 2, 8)
        x[f"cfg{i}"] = torch.tensor([k + randint(g, 0, 70), k, randint(g, 0, 10**6), int(i > 0)])
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
    n = randint(g, 5, 40)
    # Where the two equal lowest losses of the tie case fall: at the first trial, the second, or anywhere.
    first = [0, 1, randint(g, 0, n - 2)][randint(g, 0, 2)]
    return {"cfg": torch.tensor([randint(g, 0, 10**6), n]), "shift": uniform(g, -2.0, 2.0, 2),
            "ties": torch.tensor([first, randint(g, first + 1, n - 1)])}


def _tied_objective(first, second):
    """Scores trials by the order of the calls: 0 for trials ``first`` and ``second``, and values
    from {1, 2, 3} (equal among themselves too) for the others."""
    calls = []

    def objective(c):
        calls.append(c)
        i = len(calls) - 1
        return 0.0 if i in (first, second) else float(1 + i % 3)

    return objective


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
    first, second = (int(v) for v in x["ties"])
    best = f(_tied_objective(first, second), SPACE, n, torch.Generator().manual_seed(seed + 1))[0]
    out["best_of_ties"] = torch.tensor([float(best[k]) for k in SPACE], dtype=F64)
    return out


# same_dtype="out": the out* results must have the reference's dtype (int64 labels, a float64 BLEU).
PROBES = [
    same_as("ex1_sft_labels_tests", ref.sft_labels, _mask_inputs, _mask_outputs, rtol=0, atol=0,
            same_dtype="out"),
    same_as("ex2_bleu_tests", ref.corpus_bleu, _bleu_inputs, _bleu_outputs, rtol=1e-9, atol=1e-12,
            same_dtype="out"),
    same_as("ex3_kfold_tests", model_selection.kfold_splits, _kfold_inputs, _kfold_outputs, rtol=0, atol=0),
    same_as("ex4_random_search_tests", model_selection.random_search, _search_inputs, _search_outputs,
            rtol=1e-9, atol=1e-12),
]
