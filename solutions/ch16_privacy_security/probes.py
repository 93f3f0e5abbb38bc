"""Trusted checks for chapter 16 (see grader/probes.py): each exercise again, on secret inputs.

Sizes, seeds and options are drawn from the generator too and travel as small tensors (``cfg*``),
so a student cannot tune an answer to a fixed case. Strings travel as integer word ids.
"""

import torch

from course_lib import privacy, safety
from grader.probes import F32, F64, randint, same_as, uniform

# -- exercise 1: the membership attack's AUC --------------------------------------------------------

N_AUC = 8


def _auc_inputs(g):
    x = {}
    for i in range(N_AUC):
        m, n = randint(g, 1, 60), randint(g, 1, 60)
        if i % 2 == 0:  # integer-valued losses: many ties
            a = torch.randint(0, randint(g, 1, 5), (m,), generator=g).to(F64)
            b = torch.randint(0, 5, (n,), generator=g).to(F64)
        else:
            a = torch.rand(m, generator=g, dtype=F64) * 4
            b = torch.rand(n, generator=g, dtype=F64) * 4 + uniform(g, -1.0, 1.0).item()
        if i % 4 == 3:
            a, b = a.to(F32), b.to(F32)
        x[f"member{i}"], x[f"nonmember{i}"] = a, b
    # float64 losses 1e-12 apart: equal once rounded to float32, so they must be compared in float64
    base = torch.rand(randint(g, 1, 20), generator=g, dtype=F64) + 1
    x[f"member{N_AUC}"], x[f"nonmember{N_AUC}"] = base, base.flip(0) + 1e-12
    return x


def _auc_outputs(f, x):
    return {f"out{i}": torch.tensor(float(f(x[f"member{i}"], x[f"nonmember{i}"])), dtype=F64)
            for i in range(N_AUC + 1)}


# -- exercise 2: clip and noise ---------------------------------------------------------------------

N_CLIP = 6


def _clip_inputs(g):
    x = {}
    for i in range(N_CLIP):
        dtype = F64 if i % 2 else F32
        batch, n_params = randint(g, 1, 8), randint(g, 1, 4)
        for k in range(n_params):
            shape = tuple(randint(g, 1, 4) for _ in range(randint(g, 0, 2)))
            grad = torch.randn((batch, *shape), generator=g, dtype=dtype) * uniform(g, 0.1, 3.0).item()
            if batch > 2:
                grad[1] = 0.0  # an example with a zero gradient
            x[f"g{i}_{k}"] = grad
        sigma = [0.0, uniform(g, 0.2, 3.0).item()][i % 3 != 0]
        max_norm = uniform(g, 0.2, 2.5).item()
        x[f"cfg{i}"] = torch.tensor([max_norm, sigma, randint(g, 0, 10**6), n_params], dtype=F64)
    return x


def _clip_outputs(f, x):
    out = {}
    for i in range(N_CLIP):
        max_norm, sigma, seed, n_params = x[f"cfg{i}"].tolist()
        grads = [x[f"g{i}_{k}"] for k in range(int(n_params))]
        result = f(grads, max_norm, sigma, torch.Generator().manual_seed(int(seed)))
        for k in range(int(n_params)):
            out[f"out{i}_{k}"] = result[k]
    return out


# -- exercise 3: injection success rate -------------------------------------------------------------

WORDS = ["a", "b", "ab", "ba", "A", "B!", "a,", "b.", "c", "a-b", "Treason", "treasonous"]
N_RATE = 6


def _rate_inputs(g):
    x = {}
    for i in range(N_RATE):
        n = randint(g, 1, 40)
        x[f"answer_lens{i}"] = torch.randint(0, 6, (n,), generator=g)
        x[f"answers{i}"] = torch.randint(0, len(WORDS), (int(x[f"answer_lens{i}"].sum()),), generator=g)
        x[f"payload_lens{i}"] = torch.randint(1, 3, (n,), generator=g)
        x[f"payloads{i}"] = torch.randint(0, 5, (int(x[f"payload_lens{i}"].sum()),), generator=g)
        x[f"cfg{i}"] = torch.tensor([[1.96, 1.0, 2.576, uniform(g, 0.5, 3.0).item()][i % 4]], dtype=F64)
    return x


def _texts(flat, lengths):
    out, start = [], 0
    for n in lengths.tolist():
        out.append(" ".join(WORDS[int(v)] for v in flat[start:start + n]))
        start += n
    return out


def _rate_outputs(f, x):
    out = {}
    for i in range(N_RATE):
        answers = _texts(x[f"answers{i}"], x[f"answer_lens{i}"])
        payloads = _texts(x[f"payloads{i}"], x[f"payload_lens{i}"])
        z = float(x[f"cfg{i}"][0])
        result = f(answers, payloads) if z == 1.96 else f(answers, payloads, z)
        out[f"out{i}"] = torch.tensor([float(v) for v in result], dtype=F64)
    return out


# -- exercise 4: WEAT's effect size -----------------------------------------------------------------

N_WEAT = 6


def _weat_inputs(g):
    x = {}
    for i in range(N_WEAT):
        dtype = F64 if i % 2 else F32
        d = randint(g, 2, 16)
        sizes = [randint(g, 2, 8), randint(g, 1, 8), randint(g, 1, 8), randint(g, 1, 8)]
        for name, k in zip("xyab", sizes, strict=True):
            x[f"{name}{i}"] = torch.randn(k, d, generator=g, dtype=dtype) * uniform(g, 0.1, 5.0).item()
        x[f"x{i}"] = x[f"x{i}"] + uniform(g, 0.0, 1.0).item() * x[f"a{i}"][:1]
    return x


def _weat_outputs(f, x):
    return {f"out{i}": torch.tensor(float(f(x[f"x{i}"], x[f"y{i}"], x[f"a{i}"], x[f"b{i}"])), dtype=F64)
            for i in range(N_WEAT)}


PROBES = [
    same_as("ex1_membership_auc_tests", privacy.membership_auc, _auc_inputs, _auc_outputs, rtol=0, atol=1e-9,
            check_inputs_unchanged=True),
    same_as("ex2_clip_and_noise_tests", privacy.clip_and_noise, _clip_inputs, _clip_outputs, rtol=1e-5,
            atol=1e-6, same_dtype="out", check_inputs_unchanged=True),
    same_as("ex3_injection_rate_tests", safety.injection_success_rate, _rate_inputs, _rate_outputs, rtol=0,
            atol=1e-9),
    same_as("ex4_weat_tests", safety.weat_effect_size, _weat_inputs, _weat_outputs, rtol=1e-5, atol=1e-6,
            check_inputs_unchanged=True),
]
