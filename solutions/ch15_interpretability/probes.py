"""Trusted checks for chapter 15 (see grader/probes.py): each exercise again, on secret inputs.

Models are rebuilt inside ``calls`` from weights or seeds that travel as tensors (``cfg*``), so a
student cannot tune an answer to a fixed case.
"""

import torch
from torch import nn

from course_lib import adversarial as ref_adv
from course_lib import interpret as ref
from course_lib.gpt import GPT, GPTConfig
from grader.probes import F32, F64, randint, same_as, uniform

# -- exercise 1: integrated gradients -----------------------------------------------------------------

N_IG = 5


def _ig_inputs(g):
    x = {}
    for i in range(N_IG):
        n, d, h, c = randint(g, 1, 5), randint(g, 1, 9), randint(g, 2, 8), randint(g, 1, 4)
        dtype = F32 if i == 2 else F64
        x[f"w1_{i}"] = torch.randn(h, d, generator=g, dtype=dtype)
        x[f"b1_{i}"] = torch.randn(h, generator=g, dtype=dtype)
        x[f"w2_{i}"] = torch.randn(c, h, generator=g, dtype=dtype)
        x[f"x{i}"] = torch.randn(n, d, generator=g, dtype=dtype)
        x[f"base{i}"] = (torch.zeros(n, d, dtype=dtype) if i == 1
                         else 0.5 * torch.randn(n, d, generator=g, dtype=dtype))
        x[f"target{i}"] = torch.randint(0, c, (n,), generator=g)
        x[f"cfg{i}"] = torch.tensor([[1, 2, 3, 9, 40][i] + randint(g, 0, 2)])
    return x


def _mlp(w1, b1, w2):
    return lambda z: torch.tanh(z @ w1.T + b1) @ w2.T


def _ig_outputs(f, x):
    return {f"out{i}": f(_mlp(x[f"w1_{i}"], x[f"b1_{i}"], x[f"w2_{i}"]), x[f"x{i}"], x[f"target{i}"],
                         x[f"base{i}"], int(x[f"cfg{i}"][0]))
            for i in range(N_IG)}


# -- exercise 2: permutation importance ---------------------------------------------------------------

N_PI = 4


def _pi_inputs(g):
    x = {}
    for i in range(N_PI):
        n, n_features = randint(g, 4, 40), randint(g, 1, 5)
        x[f"X{i}"] = torch.randn(n, n_features, generator=g, dtype=F32 if i == 1 else F64)
        x[f"w{i}"] = torch.randn(n_features, generator=g, dtype=F64)
        x[f"y{i}"] = (torch.rand(n, generator=g) < 0.5).long()
        x[f"cfg{i}"] = torch.tensor([randint(g, 1, 4), randint(g, 0, 10**6)])
    return x


def _order_score(w):
    """Accuracy of the rule X w > 0, plus a term that depends on the order of column 0's values
    (so that shuffling the wrong rows, or every column, shows)."""
    def score(X, y):
        X = X.double()
        order = torch.arange(len(X), dtype=F64) / len(X)
        return ((X @ w > 0).long() == y).double().mean().item() + 0.1 * (X[:, 0] * order).mean().item()
    return score


def _pi_outputs(f, x):
    out = {}
    for i in range(N_PI):
        repeats, seed = (int(v) for v in x[f"cfg{i}"])
        out[f"out{i}"] = f(_order_score(x[f"w{i}"]), x[f"X{i}"], x[f"y{i}"], repeats,
                           torch.Generator().manual_seed(seed))
    return out


# -- exercise 3: the probe ----------------------------------------------------------------------------

N_PROBE = 5


def _probe_inputs(g):
    x = {}
    for i in range(N_PROBE):
        n, d, m, c = randint(g, 3, 60), randint(g, 1, 20), randint(g, 1, 10), randint(g, 2, 5)
        dtype = F32 if i % 2 else F64
        x[f"h{i}"] = torch.randn(n, d, generator=g, dtype=dtype) + uniform(g, -2.0, 2.0)
        x[f"y{i}"] = torch.randint(0, c, (n,), generator=g)
        x[f"test{i}"] = torch.randn(m, d, generator=g, dtype=dtype)
        x[f"cfg{i}"] = torch.tensor([float(c), uniform(g, 0.05, 5.0)], dtype=F64)
    return x


def _probe_outputs(f, x):
    return {f"out{i}": f(x[f"h{i}"], x[f"y{i}"], x[f"test{i}"], int(x[f"cfg{i}"][0]), float(x[f"cfg{i}"][1]))
            for i in range(N_PROBE)}


# -- exercise 4: activation patching ------------------------------------------------------------------

N_PATCH = 4


def _patch_inputs(g):
    x = {}
    for i in range(N_PATCH):
        n_layer, b, t = randint(g, 1, 3), randint(g, 1, 3), randint(g, 2, 9)
        x[f"clean{i}"] = torch.randint(0, 25, (b, t), generator=g)
        x[f"corrupt{i}"] = torch.randint(0, 25, (b, t), generator=g)
        x[f"cfg{i}"] = torch.tensor([randint(g, 0, 10**6), n_layer, randint(g, 0, n_layer - 1),
                                     [0, t - 1, randint(g, 0, t - 1), randint(g, 0, t - 1)][i]])
    return x


def _patch_outputs(f, x):
    out = {}
    for i in range(N_PATCH):
        seed, n_layer, layer, pos = (int(v) for v in x[f"cfg{i}"])
        torch.manual_seed(seed)
        config = GPTConfig(vocab_size=25, block_size=10, n_layer=n_layer, n_head=2, n_embd=8)
        gpt = GPT(config).double().eval()
        out[f"out{i}"] = f(gpt, x[f"clean{i}"], x[f"corrupt{i}"], layer, pos)
        with torch.no_grad():  # the model as it is afterwards: no hook left behind
            out[f"after{i}"] = gpt(x[f"corrupt{i}"])[0]
    return out


# -- exercise 5: FGSM ---------------------------------------------------------------------------------

N_FGSM = 5


def _fgsm_inputs(g):
    x = {}
    for i in range(N_FGSM):
        n = randint(g, 1, 6)
        x[f"x{i}"] = torch.rand(n, 1, 4, 4, generator=g, dtype=F64)
        x[f"y{i}"] = torch.randint(0, 4, (n,), generator=g)
        lo = uniform(g, 0.0, 0.3)
        # eps, clamp on?, lo, hi, seed, call inside no_grad?, train mode?
        x[f"cfg{i}"] = torch.tensor([[0.0, 0.03, 0.1, 0.25, 0.6][i] + uniform(g, 0.0, 0.01) * (i > 0),
                                     float(i % 2), lo, lo + uniform(g, 0.4, 0.7), float(randint(g, 0, 10**6)),
                                     float(i == 3), float(i == 4)], dtype=F64)
    return x


def _fgsm_outputs(f, x):
    out = {}
    for i in range(N_FGSM):
        eps, clamp_on, lo, hi, seed, no_grad, train = x[f"cfg{i}"].tolist()
        torch.manual_seed(int(seed))
        model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(),
                              nn.Linear(32, 4)).double()
        if i == 2:  # a model that ignores the first row of pixels: their gradient is exactly 0
            model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4)).double()
            with torch.no_grad():
                model[1].weight[:, :4] = 0.0
        model.train(bool(train))
        clamp = (lo, hi) if clamp_on else None
        if no_grad:
            with torch.no_grad():
                result = f(model, x[f"x{i}"], x[f"y{i}"], eps, clamp=clamp)
        else:
            result = f(model, x[f"x{i}"], x[f"y{i}"], eps, clamp=clamp)
        out[f"out{i}"] = result
        out[f"state{i}"] = torch.tensor([float(result.requires_grad), float(model.training),
                                         float(any(p.grad is not None for p in model.parameters()))])
    return out


# same_dtype="out": the out* results must have the reference's dtype (float64 scores, x's dtype kept).
PROBES = [
    same_as("ex1_integrated_gradients_tests", ref.integrated_gradients, _ig_inputs, _ig_outputs,
            rtol=1e-9, atol=1e-11, tolerances={"out2": (1e-5, 1e-6)}, same_dtype="out",
            check_inputs_unchanged=True),
    same_as("ex2_permutation_importance_tests", ref.permutation_importance, _pi_inputs, _pi_outputs,
            rtol=0, atol=1e-12, same_dtype="out", check_inputs_unchanged=True),
    same_as("ex3_probe_tests", ref.probe_scores, _probe_inputs, _probe_outputs, rtol=1e-7, atol=1e-9,
            same_dtype="out", check_inputs_unchanged=True),
    same_as("ex4_patching_tests", ref.patch_run, _patch_inputs, _patch_outputs, rtol=1e-9, atol=1e-9,
            check_inputs_unchanged=True),
    same_as("ex5_fgsm_tests", ref_adv.fgsm, _fgsm_inputs, _fgsm_outputs, rtol=0, atol=1e-12, same_dtype="out",
            check_inputs_unchanged=True),
]
