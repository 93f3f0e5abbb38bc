"""Trusted checks for chapter 12 (see grader/probes.py): each exercise again, on secret inputs.

Sizes and flags are drawn from the generator too and travel as small tensors (``cfg*``).
"""

import torch
from torch import nn

from course_lib import finetuning as ref
from course_lib.gpt import GPT, GPTConfig
from grader.probes import F32, F64, randint, same_as

# -- exercise 1: the last-token head ------------------------------------------------------------------

N_HEAD = 5


def _head_inputs(g):
    x = {}
    for i in range(N_HEAD):
        b, t, d, c = randint(g, 1, 6), randint(g, 1, 10), randint(g, 1, 16), randint(g, 1, 5)
        dtype = F64 if i % 2 else F32
        mask = (torch.rand(b, t, generator=g) < 0.6).long()
        mask[:, randint(g, 0, t - 1)] = 1
        if i == 0:  # a row whose only real token is the first: its "last real position" is 0
            mask[0] = 0
            mask[0, 0] = 1
        x[f"hidden{i}"] = torch.randn(b, t, d, generator=g, dtype=dtype)
        x[f"mask{i}"] = mask
        x[f"w{i}"] = torch.randn(c, d, generator=g, dtype=dtype)
        x[f"b{i}"] = torch.randn(c, generator=g, dtype=dtype)
    return x


def _head_outputs(f, x):
    return {f"out{i}": f(x[f"hidden{i}"], x[f"mask{i}"], x[f"w{i}"], x[f"b{i}"]) for i in range(N_HEAD)}


# -- exercise 2: freezing ------------------------------------------------------------------------------


N_FREEZE = 4


def _freeze_inputs(g):
    x = {}
    for i in range(N_FREEZE):
        layers = randint(g, 2, 5)
        # case 0 trains every block, case 1 none, the others a random number in between
        k = (layers, 0)[i] if i < 2 else randint(g, 1, layers - 1)
        x[f"cfg{i}"] = torch.tensor([layers, k, randint(g, 2, 4), randint(g, 0, 10**6)])
    return x


def _freeze_outputs(f, x):
    out = {}
    for i in range(N_FREEZE):
        layers, k, width, seed = (int(v) for v in x[f"cfg{i}"])
        torch.manual_seed(seed)
        clf = ref.GPTClassifier(
            GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=layers, n_head=2, n_embd=2 * width)), 3
        )
        for p in clf.parameters():
            p.requires_grad_(bool(torch.rand(1) < 0.5))
        out[f"count{i}"] = torch.tensor(int(f(clf, k)))
        out[f"flags{i}"] = torch.tensor([p.requires_grad for _, p in clf.named_parameters()])
    return out


# -- exercise 3: class weights and the weighted loss -------------------------------------------------

N_WCE = 5


def _wce_inputs(g):
    x = {}
    for i in range(N_WCE):
        n, c = randint(g, 1, 90), randint(g, 2, 7)
        dtype = F64 if i % 2 else F32
        x[f"labels{i}"] = torch.randint(0, c, (n,), generator=g)
        if i == 0:  # classes that do not occur, and one that occurs exactly once
            n = randint(g, 2, 12)
            x[f"labels{i}"] = torch.cat([torch.full((n - 1,), c - 1), torch.tensor([randint(g, 0, c - 2)])])
        x[f"logits{i}"] = 6 * torch.randn(n, c, generator=g, dtype=dtype)
        x[f"weights{i}"] = torch.rand(c, generator=g, dtype=dtype) + 0.05
        x[f"cfg{i}"] = torch.tensor([c])
    return x


# A float32 loss near 0 from logits of size ten: a correct logsumexp and log_softmax differ by the
# rounding of the logits (1.2e-7 seen on one secret seed), far beyond rtol * loss; 1e-5 absolute
# still fails every weighting or normalising mistake, which moves the loss by its own size.
F32_LOSS_TOL = {f"loss{i}": (1e-5, 1e-5) for i in range(N_WCE) if i % 2 == 0}


def _wce_outputs(class_weights, weighted_cross_entropy, x):
    out = {}
    for i in range(N_WCE):
        out[f"out_w{i}"] = class_weights(x[f"labels{i}"], int(x[f"cfg{i}"][0]))  # float32: dtype checked
        out[f"loss{i}"] = weighted_cross_entropy(x[f"logits{i}"], x[f"labels{i}"], x[f"weights{i}"])
    return out


# -- exercise 4: metrics --------------------------------------------------------------------------------

N_METRICS = 6
METRIC_KEYS = ("accuracy", "precision", "recall", "f1", "macro_f1")


def _metric_inputs(g):
    x = {}
    for i in range(N_METRICS):
        c, n = randint(g, 2, 7), randint(g, 1, 80)
        x[f"true{i}"] = torch.randint(0, c, (n,), generator=g)
        x[f"pred{i}"] = torch.randint(0, max(1, c - 1 - i % 2), (n,), generator=g)
        x[f"cfg{i}"] = torch.tensor([c])
        if i < 2:  # a class with exactly one true example (case 0) or one prediction (case 1), right
            once, other = ("true", "pred") if i == 0 else ("pred", "true")
            _single_example(x, f"{once}{i}", f"{other}{i}", randint(g, 0, c - 1), c)
    return x


def _single_example(x, once, other, cls, c):
    """Make ``cls`` occur exactly once in ``x[once]`` (at index 0, where ``x[other]`` agrees): a
    ratio with a denominator of 1, which ``> 1`` or ``clamp_min(2)`` would get wrong."""
    x[once] = torch.where(x[once] == cls, (cls + 1) % c, x[once])
    x[once][0] = x[other][0] = cls


def _metric_outputs(confusion_matrix, classification_metrics, x):
    out = {}
    for i in range(N_METRICS):
        c = int(x[f"cfg{i}"][0])
        # out*: the dtypes are checked too (int64 counts, float64 metrics, as the task says)
        out[f"out_cm{i}"] = confusion_matrix(x[f"true{i}"], x[f"pred{i}"], c)
        m = classification_metrics(x[f"true{i}"], x[f"pred{i}"], c)
        for key in METRIC_KEYS:
            out[f"out_{key}{i}"] = m[key]
    return out


# -- exercise 5: LoRA -----------------------------------------------------------------------------------

N_LORA = 4


def _lora_inputs(g):
    x = {}
    for i in range(N_LORA):
        d_in, d_out, r = randint(g, 1, 12), randint(g, 1, 12), randint(g, 1, 6)
        if i == 0:
            d_out = d_in  # square: a transposed product would have the right shape
        dtype = F64 if i % 2 else F32
        x[f"W{i}"] = torch.randn(d_out, d_in, generator=g, dtype=dtype)
        x[f"bias{i}"] = torch.randn(d_out, generator=g, dtype=dtype)
        x[f"A{i}"] = torch.randn(r, d_in, generator=g, dtype=dtype)
        x[f"B{i}"] = torch.randn(d_out, r, generator=g, dtype=dtype)
        x[f"x{i}"] = torch.randn(3, d_in, generator=g, dtype=dtype)
        x[f"cfg{i}"] = torch.tensor([r, randint(g, 1, 32), i % 3 != 0])
    return x


def _lora_outputs(cls, x):
    out = {}
    for i in range(N_LORA):
        r, alpha, has_bias = (int(v) for v in x[f"cfg{i}"])
        W = x[f"W{i}"]
        base = nn.Linear(W.shape[1], W.shape[0], bias=bool(has_bias), dtype=W.dtype)
        with torch.no_grad():
            base.weight.copy_(W)
            if has_bias:
                base.bias.copy_(x[f"bias{i}"])
        layer = cls(base, r, float(alpha))
        out[f"start{i}"] = layer(x[f"x{i}"]).detach()
        out[f"trainable{i}"] = torch.tensor(sum(p.numel() for p in layer.parameters() if p.requires_grad))
        with torch.no_grad():
            layer.A.copy_(x[f"A{i}"])
            layer.B.copy_(x[f"B{i}"])
            out[f"forward{i}"] = layer(x[f"x{i}"])
            out[f"merged{i}"] = layer.merged()(x[f"x{i}"])
            out[f"after_merge{i}"] = layer(x[f"x{i}"])  # merged() leaves the layer as it was
    out.update(_lora_draws(cls, x))
    return out


def _lora_draws(cls, x):
    """A from torch's default generator: the same after the same seed, another after another seed."""
    seed = int(x["cfg0"][1])
    draws = []
    for s in (seed, seed, seed + 1):
        base = nn.Linear(6, 4)
        torch.manual_seed(s)
        draws.append(cls(base, 2, 4.0).A.detach().clone())
    same = torch.equal(draws[0], draws[1]) and bool(torch.isfinite(draws[0]).all())
    return {"same_seed": torch.tensor(same),
            "other_seed": torch.tensor(not torch.equal(draws[0], draws[2]))}


# same_dtype="out": the answer's out* results must have the reference's dtype (float32 stays float32).
PROBES = [
    same_as("ex1_last_token_head_tests", ref.last_token_logits, _head_inputs, _head_outputs,
            rtol=1e-5, atol=1e-6, same_dtype="out"),
    same_as("ex2_freeze_tests", ref.freeze_layers, _freeze_inputs, _freeze_outputs, rtol=1e-9, atol=1e-12),
    same_as("ex3_class_weights_tests", (ref.class_weights, ref.weighted_cross_entropy), _wce_inputs,
            _wce_outputs, rtol=1e-5, atol=1e-7, same_dtype="out", tolerances=F32_LOSS_TOL),
    same_as("ex4_metrics_tests", (ref.confusion_matrix, ref.classification_metrics), _metric_inputs,
            _metric_outputs, rtol=1e-9, atol=1e-12, same_dtype="out"),
    same_as("ex5_lora_tests", ref.LoRALinear, _lora_inputs, _lora_outputs, rtol=1e-5, atol=1e-5),
]
