"""Trusted checks for chapter 8 (see grader/probes.py): each exercise again, on secret inputs.

Sizes, head counts and flags are drawn from the generator too and travel as small integer tensors
(``cfg*``), so a student cannot tune an answer to a fixed case.
"""

import torch

from course_lib import attention as ref
from course_lib.gpt import Block, GPTConfig
from grader.probes import F32, F64, randint, same_as

# Every output entry is a weighted sum: compared normwise (against the largest entry), float64
# to rounding; the float32 cases (``out32``) get their own tolerances. The results keep the
# reference's dtype (float32 stays float32).
WEIGHTED_SUMS = {"rtol": 1e-9, "atol": 1e-12, "normwise": True, "same_dtype": "out"}


# -- exercise 1: scaled dot-product attention ------------------------------------------------------

# (mask kind, causal): 0 none, 1 padding, 2 random
SDPA_PLAN = [(0, False), (0, True), (1, False), (1, True), (2, False), (2, True)]


def _sdpa_inputs(g):
    x = {}
    for i, (kind, causal) in enumerate(SDPA_PLAN):
        b, h = randint(g, 1, 3), randint(g, 1, 3)
        tq = randint(g, 1, 9)
        tk = tq if causal else randint(g, 1, 9)
        d, dv = randint(g, 1, 16), randint(g, 1, 8)
        x[f"q{i}"] = torch.randn(b, h, tq, d, generator=g, dtype=F64) * (3.0 if i == 5 else 1.0)
        x[f"k{i}"] = torch.randn(b, h, tk, d, generator=g, dtype=F64)
        x[f"v{i}"] = torch.randn(b, h, tk, dv, generator=g, dtype=F64)
        if kind == 1:
            lengths = torch.randint(1, tk + 1, (b,), generator=g)
            x[f"mask{i}"] = ref.padding_mask(lengths, tk)[:, None, None, :]
        elif kind == 2:
            mask = torch.rand(b, h, tq, tk, generator=g) < 0.6
            mask[..., 0] = True  # no row fully masked
            x[f"mask{i}"] = mask
        x[f"cfg{i}"] = torch.tensor([kind, int(causal)])
    x["q32"], x["k32"], x["v32"] = (torch.randn(2, 4, 10, 8, generator=g, dtype=F32) for _ in range(3))
    return x


def _sdpa_outputs(f, x):
    out = {}
    for i in range(len(SDPA_PLAN)):
        causal = bool(x[f"cfg{i}"][1])
        out[f"out{i}"] = f(x[f"q{i}"], x[f"k{i}"], x[f"v{i}"], mask=x.get(f"mask{i}"), is_causal=causal)
    out["out32"] = f(x["q32"], x["k32"], x["v32"], is_causal=True)
    return out


# -- exercise 2: multi-head attention --------------------------------------------------------------

MHA_CASES = 5


def _mha_inputs(g):
    x = {}
    for i in range(MHA_CASES):
        h = randint(g, 1, 4)
        c = h * randint(g, 1, 5)
        t = randint(g, 1, 8)
        x[f"x{i}"] = torch.randn(randint(g, 1, 3), t, c, generator=g, dtype=F64)
        for name in ("w_q", "w_k", "w_v", "w_o"):
            x[f"{name}{i}"] = torch.randn(c, c, generator=g, dtype=F64) / c**0.5
        for name in ("b_q", "b_k", "b_v", "b_o"):
            x[f"{name}{i}"] = torch.randn(c, generator=g, dtype=F64)
        x[f"cfg{i}"] = torch.tensor([h, int(i % 2 == 1), int(i != 2)])  # heads, causal, biases
    return x


def _mha_outputs(f, x):
    out = {}
    for i in range(MHA_CASES):
        h, causal, bias = (int(v) for v in x[f"cfg{i}"])
        ws = [x[f"{n}{i}"] for n in ("w_q", "w_k", "w_v", "w_o")]
        bs = [x[f"{n}{i}"] if bias else None for n in ("b_q", "b_k", "b_v", "b_o")]
        out[f"out{i}"] = f(x[f"x{i}"], *ws, h, *bs, is_causal=bool(causal))
    return out


# -- exercise 3: RoPE --------------------------------------------------------------------------------

ROPE_CASES = 4


def _rope_inputs(g):
    x = {}
    for i in range(ROPE_CASES):
        d = 2 * randint(g, 1, 12)
        t = randint(g, 1, 10)
        batch, heads = randint(g, 1, 2), randint(g, 1, 3)
        x[f"x{i}"] = torch.randn(batch, heads, t, d, generator=g, dtype=F64)
        x[f"pos{i}"] = torch.randperm(400, generator=g)[:t] if i else torch.arange(t)
        base = 10000.0 if i < 2 else 10.0 ** (1 + 5 * float(torch.rand(1, generator=g)))
        x[f"base{i}"] = torch.tensor(base, dtype=F64)
    x["x32"] = torch.randn(3, 12, 16, generator=g, dtype=F32)
    return x


def _rope_outputs(f, x):
    out = {"out0_default": f(x["x0"])}
    for i in range(ROPE_CASES):
        out[f"out{i}"] = f(x[f"x{i}"], x[f"pos{i}"], base=float(x[f"base{i}"]))
    out["out32"] = f(x["x32"])
    return out


# -- exercise 4: the transformer block ---------------------------------------------------------------

BLOCK_CASES = 3


def _block_inputs(g):
    x = {}
    for i in range(BLOCK_CASES):
        h = randint(g, 1, 4)
        c = h * randint(g, 1, 4)
        block = Block(GPTConfig(vocab_size=1, block_size=16, n_layer=1, n_head=h, n_embd=c))
        for name, p in block.named_parameters():
            if name.startswith("ln") and name.endswith("weight"):
                value = 0.5 + torch.rand(p.shape, generator=g, dtype=F64)
            elif p.ndim == 1:
                value = 0.3 * torch.randn(p.shape, generator=g, dtype=F64)
            else:
                value = torch.randn(p.shape, generator=g, dtype=F64) / p.shape[1] ** 0.5
            x[f"b{i}:{name}"] = value
        x[f"x{i}"] = 2 * torch.randn(randint(g, 1, 3), randint(g, 1, 10), c, generator=g, dtype=F64)
        x[f"cfg{i}"] = torch.tensor([h])
    return x


def _block_outputs(f, x):
    out = {}
    for i in range(BLOCK_CASES):
        prefix = f"b{i}:"
        state = {k[len(prefix):]: v.clone() for k, v in x.items() if k.startswith(prefix)}
        out[f"out{i}"] = f(x[f"x{i}"].clone(), state, int(x[f"cfg{i}"][0]))
    return out


PROBES = [
    same_as("ex1_attention_tests", ref.scaled_dot_product_attention, _sdpa_inputs, _sdpa_outputs,
            tolerances={"out32": (1e-5, 1e-6)}, **WEIGHTED_SUMS),
    same_as("ex2_multi_head_tests", ref.multi_head_attention, _mha_inputs, _mha_outputs, **WEIGHTED_SUMS),
    same_as("ex3_rope_tests", ref.apply_rope, _rope_inputs, _rope_outputs,
            tolerances={"out32": (1e-5, 1e-6)}, **WEIGHTED_SUMS),
    same_as("ex4_block_tests", ref.transformer_block, _block_inputs, _block_outputs, **WEIGHTED_SUMS),
]
