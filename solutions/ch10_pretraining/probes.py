"""Trusted checks for chapter 10 (see grader/probes.py): each exercise again, on secret inputs.

Sizes, probabilities and flags are drawn from the generator too and travel as small tensors
(``cfg*``), so a student cannot tune an answer to a fixed case.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from course_lib import gpt as gpt_ref
from course_lib import lm_train as lm_ref
from course_lib import pretraining as ref
from course_lib.gpt import GPT, GPTConfig
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
    free = torch.randint(6, 10, (300, 400), generator=g)
    free[torch.rand(300, 400, generator=g) < 0.1] = 0
    return {"ids": ids, "small": small, "free": free,
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
    # 400 seeds on one row of 40 non-special tokens between two special ones (vocabulary 16, mask_id 3)
    runs = [f(MLM_ROW, prob, special, 3, 16, torch.Generator().manual_seed(seed + 2 + s)) for s in range(400)]
    out["row_inputs"] = torch.stack([r[0][0] for r in runs])
    out["row_labels"] = torch.stack([r[1][0] for r in runs])
    # vocabulary 16, a batch of ids 6..9 and 0: any other id at a selected position is a random token
    free = f(x["free"], 0.5, special, 3, 16, torch.Generator().manual_seed(seed + 500))
    out["free_inputs"], out["free_labels"] = free
    narrow = f(x["small"].int(), 0.5, special, mask_id, 40, torch.Generator().manual_seed(seed + 1))
    out["narrow_inputs"], out["narrow_labels"] = narrow
    return out


MLM_ROW = torch.tensor([[0] + [6, 7, 8, 9] * 10 + [1]])
FREE_IDS = (0, 1, 2, 4, 5, *range(10, 16))  # ids the 16-token batch never holds, and not mask_id 3


def _mlm_independence(prob, inputs, labels):
    """Why 400 maskings of MLM_ROW are not independent per-position draws (see the test cell)."""
    selected = labels != -100
    if selected[:, [0, 41]].any():
        return "a special token was selected"
    sel = selected[:, 1:41].double()
    freq = sel.mean(0)
    if ((freq - prob).abs() > 6 * math.sqrt(prob * (1 - prob) / 400) + 1e-9).any():
        return f"positions selected with frequencies {freq.min():.3f} to {freq.max():.3f}, expected {prob}"
    n = sel.sum(1)
    if abs(n.var().item() / (40 * prob * (1 - prob)) - 1) > 0.3:
        return "the number of selected tokens does not vary as independent per-position choices do"
    q = 0.8 + 0.1 / 16
    masked = ((inputs == 3) & selected)[:, 1:41].double().sum(1)
    if abs(((masked - q * n) ** 2).sum().item() / (q * (1 - q) * n.sum().item()) - 1) > 0.3:
        return "the 80/10/10 choices are not independent per selected token"
    return None


def _mlm_random_ids(inputs, labels):
    picked = inputs[labels != -100]
    counts = torch.stack([(picked == v).sum() for v in FREE_IDS]).double()
    expected = len(picked) * 0.1 / 16
    if (counts == 0).any() or ((counts - expected) ** 2 / expected).sum().item() > 50:
        return f"random tokens not uniform over the whole vocabulary: counts {counts.long().tolist()}"
    return None


def _mlm_distribution(x, out):
    for why in (_mlm_independence(float(x["prob"]), out["row_inputs"], out["row_labels"]),
                _mlm_random_ids(out["free_inputs"], out["free_labels"])):
        if why:
            return why
    if out["narrow_inputs"].dtype != I64 or out["narrow_labels"].dtype != I64:
        return "int32 ids must give int64 results"
    if not (torch.equal(out["narrow_inputs"], out["small_inputs"])
            and torch.equal(out["narrow_labels"], out["small_labels"])):
        return "int32 ids gave another result than the same ids as int64"
    return None


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
    return _mlm_distribution(x, out)


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


# -- exercise 5: the training loop ----------------------------------------------------------------


class _RecordingGPT(GPT):
    """A GPT that records, for every call, whether it was in train mode and had gradients on."""

    def __init__(self, config):
        super().__init__(config)
        self.calls = []

    def forward(self, *args, **kwargs):
        self.calls.append((self.training, torch.is_grad_enabled()))
        return super().forward(*args, **kwargs)


def _loop_inputs(g):
    steps, accum = randint(g, 1, 7), randint(g, 1, 3)
    n_val = randint(g, 0, 2)
    # seed, optimiser (0 SGD, 1 momentum, 2 AdamW), steps, accum, warm-up, clip flag, eval_every,
    # dropout flag, handed over in eval mode, stale gradients
    cfg = [randint(g, 0, 10**6), randint(g, 0, 2), steps, accum, randint(g, 0, steps), randint(g, 0, 1),
           randint(g, 0, steps), randint(g, 0, 1), randint(g, 0, 1), randint(g, 0, 1)]
    lrs = torch.tensor([0.02, 0.004], dtype=F64) * (1 + torch.rand(2, generator=g))
    return {"cfg": torch.tensor(cfg), "lrs": lrs,
            "train": torch.randint(0, 11, (steps * accum, 3, 9), generator=g),
            "val": torch.randint(0, 11, (n_val, 2, 9), generator=g)}


def _loop_calls(train_loop, x):
    seed, kind, steps, accum, warmup, clip, eval_every, dropout, eval_mode, stale = (int(v) for v in x["cfg"])
    torch.manual_seed(seed)
    model = _RecordingGPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16,
                                    dropout=0.2 if dropout else 0.0)).double()
    if eval_mode:
        model.eval()
    if kind == 0:
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
    elif kind == 1:
        opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    else:
        opt = lm_ref.make_optimizer(model, 1.0, weight_decay=0.1, device="cpu")
    max_lr, min_lr = (float(v) for v in x["lrs"])
    if kind < 2:
        max_lr, min_lr = 20 * max_lr, 20 * min_lr  # SGD takes larger steps than AdamW
    if stale:
        for p in model.parameters():
            p.grad = torch.ones_like(p)
    served = []

    def get_batch():
        w = x["train"][len(served) % len(x["train"])]
        served.append(1)
        return w[:, :-1], w[:, 1:]

    val = [(w[:, :-1], w[:, 1:]) for w in x["val"]]
    torch.manual_seed(seed + 1)  # dropout masks
    h = train_loop(model, opt, get_batch, steps, max_lr, min_lr, warmup, accum, 0.05 if clip else 0.0, val,
                   eval_every)
    out = {"lr": torch.tensor(h["lr"], dtype=F64), "train_loss": torch.tensor(h["train_loss"], dtype=F64),
           "eval_step": torch.tensor(h["eval_step"], dtype=I64),
           "val_loss": torch.tensor(h["val_loss"], dtype=F64),
           "batches": torch.tensor(len(served)), "training": torch.tensor(model.training),
           "grads_left": torch.tensor(any(p.grad is not None and bool(p.grad.abs().max() > 0)
                                          for p in model.parameters())),
           "eval_without_grad": torch.tensor(all(not grad for training, grad in model.calls if not training)),
           "evaluated": torch.tensor(any(not training for training, _ in model.calls))}
    for i, p in enumerate(model.parameters()):
        out[f"param{i}"] = p.detach().clone()
    return out


# -- exercise 6: generate with a KV cache -------------------------------------------------------------


class _Counting:
    """Passes every call on to a GPT and records (tokens fed, cache.length before or None, grad on)."""

    def __init__(self, model):
        self.model, self.config, self.calls = model, model.config, []

    def __call__(self, idx, *args, cache=None, **kwargs):
        self.calls.append((idx.shape[1], None if cache is None else cache.length, torch.is_grad_enabled()))
        return self.model(idx, *args, cache=cache, **kwargs)

    forward = __call__

    def new_cache(self):
        return self.model.new_cache()

    def eval(self):
        self.model.eval()
        return self

    def train(self, mode=True):
        self.model.train(mode)
        return self

    @property
    def training(self):
        return self.model.training

    def parameters(self):
        return self.model.parameters()


def _gen_inputs(g):
    block = randint(g, 6, 16)
    return {"cfg": torch.tensor([randint(g, 0, 10**6), block, randint(g, 1, 12), randint(g, 1, 13)]),
            "prompt": torch.randint(0, 13, (randint(g, 1, 3), randint(g, 1, block)), generator=g),
            "long": torch.randint(0, 13, (2, block + randint(g, 1, 20)), generator=g),
            "temperature": torch.tensor([0.5, 1.0, 1.4], dtype=F64)[randint(g, 0, 2)]}


def _gen_run(generate, model, prompt, n, temperature, top_k, seed, use_cache, stats):
    mode = model.training
    counted = _Counting(model)
    out = generate(counted, prompt, n, temperature, top_k, torch.Generator().manual_seed(seed),
                   use_cache=use_cache)
    calls = counted.calls
    decode = [c for c in calls if c[1] not in (None, 0)]
    stats.append(model.training == mode and all(not c[2] for c in calls)
                 and all(c[0] <= model.config.block_size for c in calls)
                 and (all(c[1] is None for c in calls) if not use_cache else
                      bool(calls) and calls[0][1] == 0 and all(c[0] == 1 for c in decode)
                      and len(calls) <= n + len(calls) - len(decode)))
    return out


def _gen_calls(generate, x):
    seed, block, n, top_k = (int(v) for v in x["cfg"])
    temperature = float(x["temperature"])
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=13, block_size=block, n_layer=2, n_head=2, n_embd=16, dropout=0.2)
    model = GPT(config).double()
    stats, out, prompt = [], {}, x["prompt"]
    within = block - prompt.shape[1]
    model.train()  # generate must switch dropout off and give the mode back
    for use_cache in (True, False):
        key = "cached" if use_cache else "plain"
        out[f"greedy_{key}"] = _gen_run(generate, model, prompt, within, 0.0, None, seed, use_cache, stats)
        out[f"sampled_{key}"] = _gen_run(generate, model, prompt, 2 * block + n, temperature, top_k, seed + 1,
                                         use_cache, stats)
        out[f"long_{key}"] = _gen_run(generate, model, x["long"], n, 0.0, None, seed, use_cache, stats)
    model.eval()
    out["past_context"] = _gen_run(generate, model, prompt, 3 * block, 0.0, None, seed, True, stats)
    out["no_top_k"] = _gen_run(generate, model, prompt, 2 * block, temperature, None, seed + 2, True, stats)
    out["contract"] = torch.tensor(stats)
    return out


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
    # the same run (float64 GPT, seeded weights, dropout masks and batches) with the answer and the reference
    same_as("ex5_train_loop_tests", lm_ref.train_loop, _loop_inputs, _loop_calls, rtol=1e-6, atol=1e-9,
            tolerances={"lr": (1e-12, 0.0)}),
    # tokens exactly; "contract": the calls counted through _Counting (one token per cached step, ...)
    same_as("ex6_generate_tests", gpt_ref.generate, _gen_inputs, _gen_calls, rtol=0, atol=0),
]
