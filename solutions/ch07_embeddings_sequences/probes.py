"""Trusted checks for chapter 7 (see grader/probes.py): each exercise again, on secret inputs.

Sizes travel as small integer tensors (``cfg*``) drawn from the generator, so a student cannot
tune an answer to a fixed case.
"""

import math

import torch

from course_lib import embeddings as ref
from grader.probes import F32, F64, Probe, log_uniform, randint, same_as

# -- exercise 1: the skip-gram negative-sampling loss ---------------------------------------------

SGNS_CASES = 4  # the last one in float32 with huge dot products


def _sgns_inputs(g):
    x = {}
    for i in range(SGNS_CASES):
        b, k, d = randint(g, 1, 40), randint(g, 1, 12), randint(g, 1, 24)
        last = i == SGNS_CASES - 1
        dtype, scale = (F32, log_uniform(g, 20, 60)) if last else (F64, log_uniform(g, 0.05, 5))
        x[f"c{i}"] = scale * torch.randn(b, d, generator=g, dtype=dtype)
        x[f"o{i}"] = scale * torch.randn(b, d, generator=g, dtype=dtype)
        x[f"n{i}"] = scale * torch.randn(b, k, d, generator=g, dtype=dtype)
    return x


def _sgns_outputs(loss_fn, x):
    out = {}
    for i in range(SGNS_CASES):
        leaves = [x[f"{name}{i}"].clone().requires_grad_(True) for name in "con"]
        loss = loss_fn(*leaves)
        out[f"out{i}"] = loss.detach()
        for name, grad in zip("con", torch.autograd.grad(loss, leaves), strict=True):
            out[f"grad{i}_{name}"] = grad
    return out


# float32 with dot products in the thousands: a dot product's rounding (terms of ~1e3) moves the
# sigmoids near 0 by ~1e-3, so the gradients are compared loosely (the float64 cases are exact).
SGNS_TOL = {f"out{SGNS_CASES - 1}": (1e-5, 1e-3)}
SGNS_TOL.update({f"grad{SGNS_CASES - 1}_{n}": (1e-2, 1e-3) for n in "con"})


# -- exercise 2: nearest neighbours by cosine -----------------------------------------------------

COS_CASES = 4  # the last one in float32


def _cos_inputs(g):
    x = {}
    for i in range(COS_CASES):
        dtype = F32 if i == COS_CASES - 1 else F64
        v, d = randint(g, 20, 60 if dtype == F32 else 300), randint(g, 2, 32)
        emb = torch.randn(v, d, generator=g, dtype=F64)
        emb = emb * torch.exp(1.5 * torch.randn(v, 1, generator=g, dtype=F64))  # lengths far apart
        zero = randint(g, 0, v - 1)
        emb[zero] = 0.0  # a zero row: similarity 0
        n_ex = randint(g, 0, 4)
        exclude = torch.randperm(v, generator=g)[:n_ex]
        k = randint(g, 1, min(12, v - n_ex))
        query = torch.randn(d, generator=g, dtype=F64)
        if i == 1:  # the query is one of the rows, excluded as in the demo
            # never the zero row: a zero query makes every similarity 0, a tie in any order
            row = int(exclude[0]) if n_ex and int(exclude[0]) != zero else (zero + 1) % v
            query = emb[row].clone()
        if i == 2:  # a short query: the similarities are still cosines
            query = query * log_uniform(g, 0.001, 0.5)
        x[f"e{i}"], x[f"q{i}"], x[f"ex{i}"] = emb.to(dtype), query.to(dtype), exclude
        x[f"cfg{i}"] = torch.tensor([k])
    return x


def _cos_outputs(fn, x):
    out = {}
    for i in range(COS_CASES):
        indices, sims = fn(x[f"e{i}"].clone(), x[f"q{i}"].clone(), int(x[f"cfg{i}"][0]),
                           exclude=[int(j) for j in x[f"ex{i}"]])
        out[f"idx{i}"] = torch.as_tensor(indices).to(torch.int64)
        out[f"out{i}"] = sims
    return out


COS_TOL = {f"idx{i}": (0.0, 0.0) for i in range(COS_CASES)}
COS_TOL[f"out{COS_CASES - 1}"] = (1e-5, 1e-6)


# -- exercise 3: the bag-of-words classifier ------------------------------------------------------

# (n_classes, class probabilities or None, dtype, accuracy the answer must reach on held-out data);
# the reference reaches about 0.9 on these tasks, always guessing one class at most 0.75.
BOW_PLAN = [(3, None, F32, 0.75), (2, (0.75, 0.25), F64, 0.85), (4, None, F32, 0.72)]


def _bow_inputs(g):
    x = {}
    for i, (c, probs, dtype, _) in enumerate(BOW_PLAN):
        xtr, ytr, xte, yte = ref.synthetic_bow_task(g, n_train=400, n_test=400,
                                                    vocab_size=randint(g, 120, 220), n_classes=c,
                                                    class_probs=probs, dtype=dtype)
        x.update({f"xtr{i}": xtr, f"ytr{i}": ytr, f"xte{i}": xte, f"yte{i}": yte})
    # Labels for all-zero features: only the bias can learn their frequencies.
    prior = torch.tensor([0.55, 0.3, 0.15], dtype=F64)[torch.randperm(3, generator=g)]
    x["y_flat"] = torch.multinomial(prior, randint(g, 80, 200), replacement=True, generator=g)
    return x


def _bow_run(ns, x):
    out = {}
    for i, (c, _, _, _) in enumerate(BOW_PLAN):
        w, b = ns["fit_bow_classifier"](x[f"xtr{i}"].clone(), x[f"ytr{i}"].clone(), c)
        out[f"logits{i}"] = x[f"xte{i}"] @ w + b
    y_flat = x["y_flat"].clone()
    out["b_flat"] = ns["fit_bow_classifier"](torch.zeros(len(y_flat), 20, dtype=F64), y_flat, 3)[1]
    return out


def _bow_check(x, out):
    for i, (c, _, _, needed) in enumerate(BOW_PLAN):
        logits = out.get(f"logits{i}")
        if logits is None or tuple(logits.shape) != (len(x[f"yte{i}"]), c):
            return f"task {i}: held-out logits of shape {None if logits is None else tuple(logits.shape)}"
        if not torch.isfinite(logits).all():
            return f"task {i}: logits that are not finite"
        acc = float((logits.argmax(1) == x[f"yte{i}"]).to(F64).mean())
        if acc < needed:
            return f"task {i} ({c} classes): held-out accuracy {acc:.3f} < {needed}"
    return _bias_check(x["y_flat"], out.get("b_flat"))


def _bias_check(y, b):
    """With all-zero features the training loss must reach the entropy of the label frequencies."""
    if not isinstance(b, torch.Tensor) or tuple(b.shape) != (3,) or not torch.isfinite(b).all():
        return f"all-zero features: b is {b!r}, expected 3 finite numbers"
    freq = torch.bincount(y, minlength=3).to(F64) / len(y)
    entropy = float(-(freq * freq.clamp_min(1e-300).log()).sum())
    loss = float(torch.nn.functional.cross_entropy(b.to(F64).expand(len(y), 3), y))
    if loss > entropy + 0.02:
        return f"all-zero features: training loss {loss:.4f}, the bias alone reaches {entropy:.4f}"
    return None


# -- exercise 4: the LSTM cell --------------------------------------------------------------------

LSTM_CASES = 4  # case 2 without biases, the last one in float32


def _lstm_inputs(g):
    x = {}
    for i in range(LSTM_CASES):
        b, n_in, h = randint(g, 1, 8), randint(g, 1, 12), randint(g, 1, 16)
        dtype = F32 if i == LSTM_CASES - 1 else F64
        scale = log_uniform(g, 0.3, 3.0)
        case = {"x": torch.randn(b, n_in, generator=g, dtype=dtype),
                "h": torch.randn(b, h, generator=g, dtype=dtype),
                "c": 2 * torch.randn(b, h, generator=g, dtype=dtype),
                "wih": scale * torch.randn(4 * h, n_in, generator=g, dtype=dtype) / math.sqrt(n_in),
                "whh": scale * torch.randn(4 * h, h, generator=g, dtype=dtype) / math.sqrt(h),
                "bih": torch.randn(4 * h, generator=g, dtype=dtype),
                "bhh": torch.randn(4 * h, generator=g, dtype=dtype)}
        x.update({f"{k}{i}": v for k, v in case.items()})
    return x


def _lstm_outputs(cell, x):
    out = {}
    for i in range(LSTM_CASES):
        names = ["x", "h", "c", "wih", "whh"] + ([] if i == 2 else ["bih", "bhh"])
        leaves = [x[f"{n}{i}"].clone().requires_grad_(True) for n in names]
        args = leaves if i != 2 else [*leaves, None, None]
        h_new, c_new = cell(*args)
        out[f"out{i}_h"], out[f"out{i}_c"] = h_new.detach(), c_new.detach()
        up_h = torch.cos(torch.arange(h_new.numel(), dtype=h_new.dtype)).view(h_new.shape)
        up_c = torch.sin(torch.arange(c_new.numel(), dtype=c_new.dtype)).view(c_new.shape)
        grads = torch.autograd.grad((h_new * up_h).sum() + (c_new * up_c).sum(), leaves)
        out.update({f"grad{i}_{n}": grad for n, grad in zip(names, grads, strict=True)})
    return out


LSTM_TOL = {k: (1e-5, 1e-6) for k in [f"out{LSTM_CASES - 1}_h", f"out{LSTM_CASES - 1}_c"]
            + [f"grad{LSTM_CASES - 1}_{n}" for n in ("x", "h", "c", "wih", "whh", "bih", "bhh")]}


# same_dtype="out": the answer's out* results must have the reference's dtype (float32 stays float32).
PROBES = [
    # (1e-7, 1e-8): F.softplus, a right answer, returns x itself beyond x = 20 (off by e^-20)
    same_as("ex1_sgns_loss_tests", ref.sgns_loss, _sgns_inputs, _sgns_outputs, rtol=1e-7, atol=1e-8,
            tolerances=SGNS_TOL, normwise=True, same_dtype="out"),
    same_as("ex2_cosine_top_k_tests", ref.cosine_top_k, _cos_inputs, _cos_outputs, rtol=1e-9, atol=1e-12,
            tolerances=COS_TOL, same_dtype="out"),
    Probe("ex3_bow_classifier_tests", inputs=_bow_inputs, run=_bow_run, check=_bow_check),
    same_as("ex4_lstm_cell_tests", ref.lstm_cell, _lstm_inputs, _lstm_outputs, rtol=1e-9, atol=1e-12,
            tolerances=LSTM_TOL, normwise=True, same_dtype="out"),
]
