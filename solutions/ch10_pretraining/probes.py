"""Trusted checks for chapter 10 (see grader/probes.py): each exercise again, on secret inputs.

Sizes, probabilities and flags are drawn from the generator too and travel as small tensors
(``cfg*``), so a student cannot tune an answer to a fixed case.
"""

import torch
import torch.nn.functional as F
from torch import nn

from course_lib import pretraining as ref
from grader.probes import F32, F64, I64, Probe, checker, randint, same_as

# -- exercise 1: the next-token loss ---------------------------------------------------------------

N_LOSS = 6


def _loss_inputs(g):
    x = {}
    for i in range(N_LOSS):
        b, t, v = randint(g, 1, 5), randint(g, 2, 24), randint(g, 2, 90)
        dtype = F64 if i % 2 else F32
        ids = torch.randint(0, v, (b, t), generator=g)
        ignore = -100 if i < 4 else randint(g, 0, v - 1)
        pad = torch.rand(b, t, generator=g) < 0.3
        pad[0, 1] = False
        ids[pad] = ignore
        ids[0, 1] = (ignore + 1) % v if ignore >= 0 else ids[0, 1].clamp(min=0)
        x[f"logits{i}"] = 4 * torch.randn(b, t, v, generator=g, dtype=dtype)
        x[f"ids{i}"] = ids
        x[f"cfg{i}"] = torch.tensor([ignore])
    return x


def _loss_outputs(f, x):
    return {f"out{i}": f(x[f"logits{i}"], x[f"ids{i}"], int(x[f"cfg{i}"][0])) for i in range(N_LOSS)}


# -- exercise 2: MLM masking (checked by its rules and statistics) ---------------------------------

MLM_SPECIAL = (0, 1, 2)


def _mlm_inputs(g):
    vocab = randint(g, 200, 3000)
    ids = torch.randint(3, vocab, (300, 600), generator=g)
    ids[torch.rand(300, 600, generator=g) < 0.15] = 0
    ids[:, 0] = 1
    prob = [0.1, 0.15, 0.25, 0.4][randint(g, 0, 3)]
    mask_id = randint(g, 0, 2)
    small = torch.randint(0, 40, (3, 4, 17), generator=g)
    return {"ids": ids, "small": small,
            "cfg": torch.tensor([vocab, mask_id, randint(g, 0, 10**6)]),
            "prob": torch.tensor(prob, dtype=F64)}


def _mlm_outputs(f, x):
    vocab, mask_id, seed = (int(v) for v in x["cfg"])
    prob = float(x["prob"])
    out = {}
    special = list(MLM_SPECIAL)
    inputs, labels = f(x["ids"], prob, special, mask_id, vocab, torch.Generator().manual_seed(seed))
    out["inputs"], out["labels"] = inputs, labels
    again = f(x["ids"], prob, list(MLM_SPECIAL), mask_id, vocab, torch.Generator().manual_seed(seed))
    out["same_seed"] = torch.tensor(bool(torch.equal(again[0], inputs) and torch.equal(again[1], labels)))
    small = f(x["small"], 0.5, list(MLM_SPECIAL), mask_id, 40, torch.Generator().manual_seed(seed + 1))
    out["small_inputs"], out["small_labels"] = small
    return out


def _mlm_rules(ids, inputs, labels, mask_id, vocab):
    if tuple(inputs.shape) != tuple(ids.shape) or tuple(labels.shape) != tuple(ids.shape):
        return f"shapes {tuple(inputs.shape)}, {tuple(labels.shape)}; expected {tuple(ids.shape)}"
    if inputs.dtype != I64 or labels.dtype != I64:
        return "inputs and labels must be int64"
    selected = labels != -100
    if not torch.equal(labels[selected], ids[selected]):
        return "labels are neither the original id nor -100"
    if (selected & torch.isin(ids, torch.tensor(MLM_SPECIAL))).any():
        return "a special token was selected"
    if not torch.equal(inputs[~selected], ids[~selected]):
        return "a position that was not selected changed"
    if ((inputs < 0) | (inputs >= vocab)).any():
        return "inputs outside the vocabulary"
    return None


def _mlm_check(x, out):
    vocab, mask_id, _ = (int(v) for v in x["cfg"])
    prob = float(x["prob"])
    ids = x["ids"]
    for why in (_mlm_rules(ids, out["inputs"], out["labels"], mask_id, vocab),
                _mlm_rules(x["small"], out["small_inputs"], out["small_labels"], mask_id, 40)):
        if why:
            return why
    if not bool(out["same_seed"]):
        return "the same generator seed gave a different result"
    inputs, labels = out["inputs"], out["labels"]
    selected = labels != -100
    eligible = (~torch.isin(ids, torch.tensor(MLM_SPECIAL))).sum().item()
    n = selected.sum().item()
    if abs(n / eligible - prob) > 0.006:
        return f"selected {n / eligible:.4f} of the eligible tokens, expected {prob}"
    masked = (inputs[selected] == mask_id).sum().item() / n
    kept = (inputs[selected] == ids[selected]).sum().item() / n
    if abs(masked - 0.8) > 0.02 or abs(kept - 0.1) > 0.015 or abs(1 - masked - kept - 0.1) > 0.015:
        return f"of the selected tokens {masked:.3f} masked, {kept:.3f} kept; expected 0.8 and 0.1"
    rand = inputs[selected & (inputs != mask_id) & (inputs != ids)].double()
    if abs(rand.mean().item() - (vocab - 1) / 2) > 0.06 * vocab or rand.max() < 0.9 * vocab:
        return "the random tokens are not uniform over the vocabulary"
    return None


# -- exercise 3: gradient accumulation --------------------------------------------------------------

SIZE = 24


def _accum_inputs(g):
    x = {"w0": 0.4 * torch.randn(16, 5, generator=g, dtype=F64),
         "b0": 0.1 * torch.randn(16, generator=g, dtype=F64),
         "w1": 0.4 * torch.randn(4, 16, generator=g, dtype=F64),
         "b1": 0.1 * torch.randn(4, generator=g, dtype=F64),
         "x": torch.randn(3, SIZE, 5, generator=g, dtype=F64),
         "y": torch.randint(0, 4, (3, SIZE), generator=g)}
    # micro-batch counts (dividing SIZE), optimiser (0 SGD, 1 SGD momentum, 2 AdamW), clip flag
    x["cfg"] = torch.tensor([[2, 3, 4, 6, 8, 12][randint(g, 0, 5)], randint(g, 0, 2), randint(g, 0, 1)])
    return x


def _accum_outputs(f, x):
    n_micro, kind, clip = (int(v) for v in x["cfg"])
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    with torch.no_grad():
        for p, key in zip(model.parameters(), ("w0", "b0", "w1", "b1"), strict=True):
            p.copy_(x[key])
    if kind == 0:
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
    elif kind == 1:
        opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    m = SIZE // n_micro
    out = {}
    for s in range(x["x"].shape[0]):
        batches = [(x["x"][s, i:i + m], x["y"][s, i:i + m]) for i in range(0, SIZE, m)]
        loss = f(model, opt, lambda mod, a, b: F.cross_entropy(mod(a), b), batches, 0.05 if clip else 0.0)
        out[f"loss{s}"] = torch.tensor(float(loss), dtype=F64)
    for i, p in enumerate(model.parameters()):
        out[f"param{i}"] = p.detach().clone()
    return out


def _accum_reference(x):
    one = dict(x, cfg=x["cfg"].clone())
    one["cfg"][0] = 1  # the reference takes the step on one batch holding everything
    return _accum_outputs(ref.train_step_with_accumulation, one)


# -- exercise 4: the nucleus distribution -----------------------------------------------------------

N_NUCLEUS = 6


def _nucleus_inputs(g):
    x = {}
    shapes = [(1, 60), (8, 30), (2, 3, 100), (4, 2048), (3, 1), (5, 7)]
    for i, shape in enumerate(shapes):
        dtype = F64 if i % 2 else F32
        scale = 0.5 + 5 * torch.rand(1, generator=g)
        x[f"logits{i}"] = scale * torch.randn(*shape, generator=g, dtype=dtype)
        x[f"cfg{i}"] = torch.tensor([[0.1, 0.5, 0.9, 0.95, 1.0, 0.3][randint(g, 0, 5)],
                                     [1.0, 0.7, 1.5][randint(g, 0, 2)]], dtype=F64)
    return x


def _nucleus_outputs(f, x):
    return {f"out{i}": f(x[f"logits{i}"], float(x[f"cfg{i}"][0]), float(x[f"cfg{i}"][1]))
            for i in range(N_NUCLEUS)}


# same_dtype="out": the answer's out* results must have the reference's dtype (float32 stays float32).
PROBES = [
    same_as("ex1_next_token_loss_tests", ref.next_token_loss, _loss_inputs, _loss_outputs,
            rtol=1e-5, atol=1e-7, same_dtype="out"),
    Probe("ex2_mlm_mask_tests", inputs=_mlm_inputs, run=lambda ns, x: _mlm_outputs(ns["mlm_mask"], x),
          check=_mlm_check),
    # not same_as: the reference takes the step on one batch (_accum_reference), the answer on several
    Probe("ex3_accumulation_tests", inputs=_accum_inputs,
          run=lambda ns, x: _accum_outputs(ns["accumulation_step"], x),
          check=checker(_accum_reference, default=(1e-7, 1e-9))),
    same_as("ex4_nucleus_tests", ref.nucleus_probs, _nucleus_inputs, _nucleus_outputs, rtol=1e-5, atol=1e-6,
            same_dtype="out"),
]
