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
        x[f"hidden{i}"] = torch.randn(b, t, d, generator=g, dtype=dtype)
        x[f"mask{i}"] = mask
        x[f"w{i}"] = torch.randn(c, d, generator=g, dtype=dtype)
        x[f"b{i}"] = torch.randn(c, generator=g, dtype=dtype)
    return x


def _head_outputs(f, x):
    return {f"out{i}": f(x[f"hidden{i}"], x[f"mask{i}"], x[f"w{i}"], x[f"b{i}"]) for i in range(N_HEAD)}


# -- exercise 2: freezing ------------------------------------------------------------------------------


def _freeze_inputs(g):
    layers = randint(g, 1, 5)
    return {"cfg": torch.tensor([layers, randint(g, 0, layers), randint(g, 2, 4), randint(g, 0, 10**6)])}


def _freeze_outputs(f, x):
    layers, k, width, seed = (int(v) for v in x["cfg"])
    torch.manual_seed(seed)
    clf = ref.GPTClassifier(
        GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=layers, n_head=2, n_embd=2 * width)), 3
    )
    for p in clf.parameters():
        p.requires_grad_(bool(torch.rand(1) < 0.5))
    count = f(clf, k)
    flags = torch.tensor([p.requires_grad for _, p in clf.named_parameters()])
    return {"count": torch.tensor(int(count)), "flags": flags}


# -- exercise 3: class weights and the weighted loss -------------------------------------------------

N_WCE = 5


def _wce_inputs(g):
    x = {}
    for i in range(N_WCE):
        n, c = randint(g, 1, 90), randint(g, 2, 7)
        dtype = F64 if i % 2 else F32
        x[f"labels{i}"] = torch.randint(0, c, (n,), generator=g)
        x[f"logits{i}"] = 6 * torch.randn(n, c, generator=g, dtype=dtype)
        x[f"weights{i}"] = torch.rand(c, generator=g, dtype=dtype) + 0.05
        x[f"cfg{i}"] = torch.tensor([c])
    return x


def _wce_outputs(class_weights, weighted_cross_entropy, x):
    out = {}
    for i in range(N_WCE):
        out[f"w{i}"] = class_weights(x[f"labels{i}"], int(x[f"cfg{i}"][0]))
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
    return x


def _metric_outputs(confusion_matrix, classification_metrics, x):
    out = {}
    for i in range(N_METRICS):
        c = int(x[f"cfg{i}"][0])
        out[f"cm{i}"] = confusion_matrix(x[f"true{i}"], x[f"pred{i}"], c)
        m = classification_metrics(x[f"true{i}"], x[f"pred{i}"], c)
        for key in METRIC_KEYS:
            out[f"{key}{i}"] = torch.as_tensor(m[key]).double()
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
    return out


# same_dtype="out": the answer's out* results must have the reference's dtype (float32 stays float32).
PROBES = [
    same_as("ex1_last_token_head_tests", ref.last_token_logits, _head_inputs, _head_outputs,
            rtol=1e-5, atol=1e-6, same_dtype="out"),
    same_as("ex2_freeze_tests", ref.freeze_layers, _freeze_inputs, _freeze_outputs, rtol=1e-9, atol=1e-12),
    same_as("ex3_class_weights_tests", (ref.class_weights, ref.weighted_cross_entropy), _wce_inputs,
            _wce_outputs, rtol=1e-5, atol=1e-7),
    same_as("ex4_metrics_tests", (ref.confusion_matrix, ref.classification_metrics), _metric_inputs,
            _metric_outputs, rtol=1e-9, atol=1e-12),
    same_as("ex5_lora_tests", ref.LoRALinear, _lora_inputs, _lora_outputs, rtol=1e-5, atol=1e-5),
]
