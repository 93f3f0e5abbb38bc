"""Trusted checks for chapter 17 (see grader/probes.py): each exercise again, on secret inputs.

Sizes, seeds and options are drawn from the generator and travel as small tensors (``cfg*``), so
an answer cannot be tuned to a fixed case. Lists (token sequences, latencies) travel as flat
tensors with their lengths.
"""

import torch

from course_lib import inference as ref
from course_lib import serving as ref_serving
from grader.probes import F64, randint, same_as, uniform

# -- exercise 1: the KV cache's size ------------------------------------------------------------------

N_KV = 12


def _kv_inputs(g):
    return {f"cfg{i}": torch.tensor([randint(g, 1, 120) for _ in range(5)] + [[1, 2, 4][randint(g, 0, 2)]])
            for i in range(N_KV)}


def _kv_outputs(f, x):
    return {f"out{i}": torch.tensor(f(*(int(v) for v in x[f"cfg{i}"]))) for i in range(N_KV)}


# -- exercise 2: left padding ---------------------------------------------------------------------------

N_PAD = 8


def _pad_inputs(g):
    x = {}
    for i in range(N_PAD):
        lengths = torch.randint(1, 14, (randint(g, 1, 7),), generator=g)
        x[f"tokens{i}"] = torch.randint(0, 100, (int(lengths.sum()),), generator=g)
        x[f"lengths{i}"] = lengths
        x[f"cfg{i}"] = torch.tensor([randint(g, 0, 99)])
    return x


def _split(flat, lengths):
    out, start = [], 0
    for n in lengths.tolist():
        out.append([int(v) for v in flat[start:start + n]])
        start += n
    return out


def _pad_outputs(f, x):
    out = {}
    for i in range(N_PAD):
        ids, mask, positions = f(_split(x[f"tokens{i}"], x[f"lengths{i}"]), int(x[f"cfg{i}"][0]))
        out[f"out_ids{i}"], out[f"out_mask{i}"], out[f"out_positions{i}"] = ids, mask, positions
    return out


# -- exercise 3: the speculative acceptance step -------------------------------------------------------

N_SPEC = 40


def _spec_inputs(g):
    x = {}
    for i in range(N_SPEC):
        k, v = randint(g, 1, 7), randint(g, 2, 10)
        sharp = float(uniform(g, 0.3, 6.0))
        q = torch.softmax(sharp * torch.randn(k, v, generator=g, dtype=F64), dim=-1)
        p = torch.softmax(sharp * torch.randn(k + 1, v, generator=g, dtype=F64), dim=-1)
        if i % 5 == 0:  # greedy: one-hot distributions
            q = torch.eye(v, dtype=F64)[torch.randint(0, v, (k,), generator=g)]
            p = torch.eye(v, dtype=F64)[torch.randint(0, v, (k + 1,), generator=g)]
        elif i % 5 == 1:  # a draft that agrees with the target on its first rows
            rows = randint(g, 1, k)
            p[:rows] = q[:rows]
        x[f"tokens{i}"] = torch.stack([torch.multinomial(q[j], 1, generator=g)[0] for j in range(k)])
        x[f"q{i}"], x[f"p{i}"] = q, p
        x[f"cfg{i}"] = torch.tensor([randint(g, 0, 10**9)])
    return x


def _spec_outputs(f, x):
    return {f"out{i}": f(x[f"tokens{i}"], x[f"q{i}"], x[f"p{i}"],
                         torch.Generator().manual_seed(int(x[f"cfg{i}"][0])))
            for i in range(N_SPEC)}


# -- exercise 4: percentiles ---------------------------------------------------------------------------

N_PCT = 10


def _pct_inputs(g):
    x = {}
    for i in range(N_PCT):
        n = randint(g, 1, 80)
        values = torch.rand(n, generator=g, dtype=F64) * float(uniform(g, 0.001, 1000.0))
        if i % 3 == 0:
            values = torch.round(values * 10) / 10  # ties
        x[f"values{i}"] = values
        x[f"qs{i}"] = torch.cat([torch.tensor([0.0, 100.0, 50.0, 95.0, 99.0], dtype=F64),
                                 torch.rand(randint(g, 0, 6), generator=g, dtype=F64) * 100])
    return x


def _pct_outputs(f, x):
    return {f"out{i}": torch.tensor(f(x[f"values{i}"].tolist(), x[f"qs{i}"].tolist()), dtype=F64)
            for i in range(N_PCT)}


# -- exercise 5: the population stability index --------------------------------------------------------

N_PSI = 10


def _psi_inputs(g):
    x = {}
    for i in range(N_PSI):
        n, m = randint(g, 3, 400), randint(g, 1, 400)
        if i % 3 == 0:  # integers (prompt lengths): values on the edges
            reference = torch.randint(0, 15, (n,), generator=g).to(F64)
            current = torch.randint(0, 15, (m,), generator=g).to(F64) + randint(g, 0, 5)
        else:
            reference = torch.randn(n, generator=g, dtype=F64)
            scale, shift = float(uniform(g, 0.5, 2.0)), float(uniform(g, -1, 1))
            current = torch.randn(m, generator=g, dtype=F64) * scale + shift
        if i % 4 == 1:
            current = current + 1000  # every value above the reference
        if i % 5 == 3:  # values closer together than float32 can tell apart: float64 is needed
            reference, current = 1 + 1e-10 * reference, 1 + 1e-10 * current
        x[f"reference{i}"], x[f"current{i}"] = reference, current
        x[f"cfg{i}"] = torch.tensor([float(randint(g, 2, 12)), [1e-4, 1e-3, 1e-6][i % 3]], dtype=F64)
    return x


def _psi_outputs(f, x):
    out = {}
    for i in range(N_PSI):
        n_bins, eps = int(x[f"cfg{i}"][0]), float(x[f"cfg{i}"][1])
        reference, current = x[f"reference{i}"], x[f"current{i}"]
        if i % 5 == 2:
            reference, current = reference.float(), current.float()
        out[f"out{i}"] = torch.tensor(f(reference, current, n_bins, eps), dtype=F64)
    return out


# same_dtype="out": the out* results keep the reference's dtype (int64 bytes and tokens, bool masks,
# a float64 for Python floats).
PROBES = [
    same_as("ex1_kv_cache_bytes_tests", ref.kv_cache_bytes, _kv_inputs, _kv_outputs, rtol=0, atol=0,
            same_dtype="out"),
    same_as("ex2_left_pad_tests", ref.left_pad, _pad_inputs, _pad_outputs, rtol=0, atol=0, same_dtype="out"),
    same_as("ex3_speculative_accept_tests", ref.speculative_accept, _spec_inputs, _spec_outputs,
            rtol=0, atol=0, same_dtype="out", check_inputs_unchanged=True),
    same_as("ex4_percentiles_tests", ref.percentiles, _pct_inputs, _pct_outputs, rtol=1e-12, atol=1e-15,
            same_dtype="out"),
    same_as("ex5_psi_tests", ref_serving.psi, _psi_inputs, _psi_outputs, rtol=1e-9, atol=1e-12,
            same_dtype="out"),
]
