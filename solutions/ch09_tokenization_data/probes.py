"""Trusted checks for chapter 9 (see grader/probes.py): each exercise again, on secret inputs.

Text travels as tensors of Unicode code points, merges as ``(k, 2)`` integer tensors, documents as
word ids (``w17``) with flags for capitals and punctuation, groups as integer labels.
"""

from collections import Counter

import torch

from course_lib import data_prep as ref
from course_lib.lm_data import work_texts
from grader.probes import F64, I64, Probe, randint, same_as, uniform

# Works whose text the BPE probes cut slices from.
SOURCE_WORKS = ("sonnets_gut", "hamlet_gut_f", "tempest_gut", "rape_of_lucrece_gut")


def _codes(text):
    return torch.tensor([ord(c) for c in text], dtype=I64)


def _text(codes):
    return "".join(map(chr, codes.tolist()))


def _random_text(g, alphabet, low, high):
    picks = torch.randint(0, len(alphabet), (randint(g, low, high),), generator=g)
    return "".join(alphabet[i] for i in picks.tolist())


def _unicode_text(g, length):
    """Random characters from ASCII to emoji (never a surrogate, which UTF-8 cannot encode)."""
    ranges = [(32, 126), (32, 126), (160, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFD), (0x10000, 0x1FAFF)]
    out = []
    for _ in range(length):
        low, high = ranges[randint(g, 0, len(ranges) - 1)]
        out.append(chr(randint(g, low, high)))
    return "".join(out)


def _corpus_slice(g, length):
    text = work_texts([SOURCE_WORKS[randint(g, 0, len(SOURCE_WORKS) - 1)]])[0]
    start = randint(g, 0, len(text) - length)
    return text[start:start + length]


def _pairs_tensor(pairs):
    return torch.tensor([[int(a), int(b)] for a, b in pairs], dtype=I64).reshape(-1, 2)


# -- exercise 1: BPE training ---------------------------------------------------------------------


def _bpe_train_inputs(g):
    texts = [
        (_random_text(g, "ab c", 40, 200), randint(g, 3, 30)),        # few symbols: many ties
        (_random_text(g, "aaab .,!1", 40, 200), randint(g, 3, 30)),    # runs, digits, punctuation
        (_unicode_text(g, randint(g, 20, 80)) * 2, randint(g, 1, 20)),
        (_corpus_slice(g, 1500), randint(g, 30, 60)),
        (_random_text(g, "xy", 2, 6), 50),                              # runs out of pairs early
    ]
    x = {}
    for i, (text, k) in enumerate(texts):
        x[f"text{i}"], x[f"k{i}"] = _codes(text), torch.tensor(k)
    return x


def _bpe_train_outputs(train, x):
    n = len([k for k in x if k.startswith("text")])
    return {f"merges{i}": _pairs_tensor(train(_text(x[f"text{i}"]), int(x[f"k{i}"]))) for i in range(n)}


# -- exercise 2: encode and decode ----------------------------------------------------------------


def _codec_inputs(g):
    train_text = _corpus_slice(g, 4000) + " café naïve déjà 😀😀 中文中文 — … " * 3
    merges = ref.train_bpe(train_text, randint(g, 80, 200))
    texts = ["", _corpus_slice(g, 600), _unicode_text(g, 60), train_text[-60:],
             "naïve café 😀 \t\n\x00 " + _unicode_text(g, 10)]
    x = {"merges": _pairs_tensor(merges)}
    for i, text in enumerate(texts):
        x[f"text{i}"] = _codes(text)
    x["ids"] = torch.randint(0, 256 + len(merges), (randint(g, 20, 60),), generator=g)
    x["cut"] = torch.tensor(list("中文😀".encode())[: randint(g, 1, 6)], dtype=I64)
    return x


def _codec_outputs(encode, decode, x):
    merges = [tuple(p) for p in x["merges"].tolist()]
    out = {}
    for key in sorted(k for k in x if k.startswith("text")):
        text = _text(x[key])
        ids = [int(i) for i in encode(text, merges)]
        out[f"ids_{key}"] = torch.tensor(ids, dtype=I64)
        out[f"back_{key}"] = _codes(decode(ids, merges))
    out["decoded_ids"] = _codes(decode(x["ids"].tolist(), merges))
    out["decoded_cut"] = _codes(decode(x["cut"].tolist(), merges))
    return out


# -- exercise 3: near-duplicates ------------------------------------------------------------------

SETTINGS = [(0.1, 3), (0.5, 3), (0.3, 2), (0.6, 1), (0.25, 4)]


def _dedup_inputs(g):
    docs = []
    for _ in range(randint(g, 4, 7)):
        base = torch.randint(0, 80, (randint(g, 15, 60),), generator=g)
        docs.append(base)
        for _ in range(randint(g, 0, 2)):  # planted near-duplicates, more or less edited
            rate = float(torch.rand(1, generator=g)) * 0.4
            edited = torch.where(torch.rand(len(base), generator=g) < rate,
                                 torch.randint(0, 80, (len(base),), generator=g), base)
            docs.append(edited)
    docs += [torch.tensor([1, 2, 3, 4, 5]), torch.tensor([2, 3, 4, 5, 6]), torch.tensor([7]),
             torch.zeros(0, dtype=I64)]  # exactly 0.5 at n=3; too short; empty
    order = torch.randperm(len(docs), generator=g).tolist()
    x = {}
    for i, j in enumerate(order):
        x[f"doc{i}"] = docs[j].to(I64)
        x[f"upper{i}"] = torch.rand(len(docs[j]), generator=g) < 0.2        # capitals
        x[f"punct{i}"] = torch.randint(0, 4, (len(docs[j]),), generator=g)  # separators
    return x


def _dedup_texts(x):
    separators = [" ", ", ", "; ", "!\n"]
    texts = []
    for i in range(len([k for k in x if k.startswith("doc")])):
        words = [f"W{w}" if up else f"w{w}" for w, up in zip(x[f"doc{i}"].tolist(), x[f"upper{i}"].tolist(),
                                                              strict=True)]
        texts.append("".join(w + separators[s] for w, s in zip(words, x[f"punct{i}"].tolist(), strict=True)))
    return texts


def _dedup_outputs(find, x):
    texts = _dedup_texts(x)
    return {f"pairs{k}": _pairs_tensor(find(texts, threshold, n))
            for k, (threshold, n) in enumerate(SETTINGS)}


# -- exercise 4: grouped split --------------------------------------------------------------------

SPLIT_SEEDS = 6
# Cases 0-2: random groups and sizes; 3: one-item groups of size 1 that reach the fraction exactly
# (compared without tolerance); 4: a fraction that would take every group (training keeps one).
SPLIT_CASES = 5
SPLIT_TOL = (1e-9, 1e-9, 1e-9, 0.0, 1e-9)
SALTS = 4


def _split_inputs(g):
    x = {}
    for case in range(3):
        n_groups = randint(g, 10, 40)
        n_items = randint(g, n_groups, 3 * n_groups)
        x[f"groups{case}"] = torch.randint(0, n_groups, (n_items,), generator=g)
        x[f"sizes{case}"] = uniform(g, 0.5, 20.5, n_items)
        x[f"fraction{case}"] = torch.tensor([0.1, 0.2, 0.3][case], dtype=F64)
    n = 4 * randint(g, 2, 6)
    x["groups3"] = torch.randperm(n, generator=g)
    x["sizes3"] = torch.ones(n, dtype=F64)
    x["fraction3"] = torch.tensor([0.25, 0.5, 0.75][randint(g, 0, 2)], dtype=F64)
    n = randint(g, 2, 5)
    x["groups4"] = torch.arange(n).repeat(3)[torch.randperm(3 * n, generator=g)]
    x["sizes4"] = uniform(g, 0.5, 20.5, 3 * n)
    x["fraction4"] = torch.tensor(0.97, dtype=F64)
    return x


def _as_lists(train, val):
    return torch.tensor([int(i) for i in train], dtype=I64), torch.tensor([int(i) for i in val], dtype=I64)


def _split_run(ns, x):
    class Salted(str):
        """A label whose hash changes with `salt`, as a str's hash changes from process to process."""
        salt = 0

        def __hash__(self):
            return hash((Salted.salt, str(self)))

    split, out = ns["grouped_split"], {}
    for case in range(SPLIT_CASES):
        groups = [f"play{g}" for g in x[f"groups{case}"].tolist()]
        sizes = x[f"sizes{case}"].tolist()
        fraction = float(x[f"fraction{case}"])
        for seed in range(SPLIT_SEEDS):
            train, val = split(groups, sizes, fraction, seed)
            out[f"train{case}_{seed}"], out[f"val{case}_{seed}"] = _as_lists(train, val)
        out[f"again_train{case}"], out[f"again_val{case}"] = _as_lists(*split(groups, sizes, fraction, 0))
    labels = [Salted(f"play{g}") for g in x["groups0"].tolist()]
    for salt in range(SALTS):
        Salted.salt = salt
        out[f"salted_train{salt}"], out[f"salted_val{salt}"] = _as_lists(
            *split(labels, x["sizes0"].tolist(), float(x["fraction0"]), 1))
    return out


def _split_problem(groups, sizes, fraction, train, val, tol):
    """Why (train, val) is not a valid split of these groups, or None."""
    if sorted(train + val) != list(range(len(groups))):
        return "not every item is in exactly one of train and val"
    if train != sorted(train) or val != sorted(val) or not train or not val:
        return "train and val must be sorted and non-empty"
    leaked = {groups[i] for i in train} & {groups[i] for i in val}
    if leaked:
        return f"{len(leaked)} groups have members on both sides"
    by_group = Counter()
    for group, size in zip(groups, sizes, strict=True):
        by_group[group] += size
    total = sum(sizes)
    share = sum(sizes[i] for i in val) / total
    left = len({groups[i] for i in train})
    if share < fraction - tol and left > 1:
        return f"validation share {share:.4f} < {fraction} while training kept {left} groups"
    largest = max(by_group[groups[i]] for i in val) / total
    if share - largest >= fraction + tol:
        return f"validation share {share:.4f}: without its largest group it still holds at least {fraction}"
    return None


def _split_case_problem(x, out, case):
    groups, sizes = x[f"groups{case}"].tolist(), x[f"sizes{case}"].tolist()
    fraction = float(x[f"fraction{case}"])
    vals = set()
    for seed in range(SPLIT_SEEDS):
        train, val = out[f"train{case}_{seed}"].tolist(), out[f"val{case}_{seed}"].tolist()
        problem = _split_problem(groups, sizes, fraction, train, val, SPLIT_TOL[case])
        if problem:
            return f"case {case}, seed {seed}: {problem}"
        vals.add(tuple(val))
    if len(vals) < 2 and case < 4:  # case 4 may have only two groups
        return f"case {case}: every seed gave the same split"
    if (out[f"again_train{case}"].tolist() != out[f"train{case}_0"].tolist()
            or out[f"again_val{case}"].tolist() != out[f"val{case}_0"].tolist()):
        return f"case {case}: the same seed gave a different split"
    return None


def _split_check(x, out):
    for case in range(SPLIT_CASES):
        problem = _split_case_problem(x, out, case)
        if problem:
            return problem
    salted = {(tuple(out[f"salted_train{s}"].tolist()), tuple(out[f"salted_val{s}"].tolist()))
              for s in range(SALTS)}
    if len(salted) > 1:
        return ("the same arguments gave different splits when the labels' hashes changed (as str hashes "
                "do from one Python process to the next): the order came from a set")
    return None


# Merges, ids, texts and pairs: integers, compared exactly.
PROBES = [
    same_as("ex1_train_bpe_tests", ref.train_bpe, _bpe_train_inputs, _bpe_train_outputs, rtol=0, atol=0),
    same_as("ex2_encode_decode_tests", (ref.bpe_encode, ref.bpe_decode), _codec_inputs, _codec_outputs,
            rtol=0, atol=0),
    same_as("ex3_near_duplicates_tests", ref.near_duplicate_pairs, _dedup_inputs, _dedup_outputs,
            rtol=0, atol=0),
    Probe("ex4_grouped_split_tests", inputs=_split_inputs, run=_split_run, check=_split_check),
]
