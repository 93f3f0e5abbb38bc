"""Trusted checks for chapter 0 (see grader/probes.py): each exercise again, on secret inputs."""

import torch

from course_lib import sizing as ref
from grader.probes import F64, I64, powers_of_ten, same_as, uniform

N = 40  # cases per exercise


def _ints(g, low, high, shape=(N,)):
    """Integers in [low, high): the cases of one argument."""
    return torch.randint(low, high, shape, generator=g)


# -- exercise 1: mlp_param_count ------------------------------------------------------------------


def _layer_sizes(x):
    return [[int(v) for v in row[:length]] for row, length in zip(x["sizes"], x["lengths"], strict=True)]


def _mlp_counts(mlp_param_count, x):
    return torch.tensor([mlp_param_count(sizes, bias=bool(b)) for sizes, b in
                         zip(_layer_sizes(x), x["bias"], strict=True)], dtype=I64)


# -- exercise 2: gpt_param_count ------------------------------------------------------------------


def _gpt_counts(gpt_param_count, x):
    cases = zip(*(x[k].tolist() for k in "vbnd"), x["tied"].tolist(), strict=True)
    return torch.tensor([gpt_param_count(*c[:4], tied=bool(c[4])) for c in cases], dtype=I64)


# -- exercise 3: training_memory_bytes ------------------------------------------------------------


def _memory(training_memory_bytes, x):
    out = []
    for n, p, o in zip(x["n"].tolist(), x["precision"].tolist(), x["optimizer"].tolist(), strict=True):
        m = training_memory_bytes(n, precision=["fp32", "bf16", "fp16"][p],
                                  optimizer=["sgd", "momentum", "adam"][o])
        out.append([m["weights"], m["gradients"], m["optimizer"], m["total"]])
    return torch.tensor(out, dtype=I64)


# -- exercises 4 and 5: training_flops, training_days --------------------------------------------


def _flops(training_flops, x):
    cases = zip(x["n"].tolist(), x["d"].tolist(), strict=True)
    return torch.tensor([float(training_flops(n, d)) for n, d in cases], dtype=F64)


def _days(training_days, x):
    cases = zip(*(x[k].tolist() for k in ("n", "d", "peak", "mfu", "gpus")), strict=True)
    return torch.tensor([float(training_days(n, d, peak, mfu=mfu, n_gpus=gpus))
                         for n, d, peak, mfu, gpus in cases], dtype=F64)


PROBES = [
    same_as("ex1_mlp_params_tests", ref.mlp_param_count,
            lambda g: {"sizes": _ints(g, 1, 5000, (N, 7)), "lengths": _ints(g, 2, 8), "bias": _ints(g, 0, 2)},
            _mlp_counts, rtol=0, atol=0),
    same_as("ex2_gpt_params_tests", ref.gpt_param_count,
            lambda g: {"v": _ints(g, 1, 200_000), "b": _ints(g, 1, 8192), "n": _ints(g, 0, 49),
                       "d": _ints(g, 1, 4097), "tied": _ints(g, 0, 2)},
            _gpt_counts, rtol=0, atol=0),
    same_as("ex3_training_memory_tests", ref.training_memory_bytes,
            lambda g: {"n": _ints(g, 0, 10**12), "precision": _ints(g, 0, 3), "optimizer": _ints(g, 0, 3)},
            _memory, rtol=0, atol=0),
    same_as("ex4_training_flops_tests", ref.training_flops,
            lambda g: {"n": powers_of_ten(g, 0, 12, N), "d": powers_of_ten(g, 6, 13, N)},
            _flops, rtol=1e-9, atol=0),
    same_as("ex5_training_days_tests", ref.training_days,
            lambda g: {"n": powers_of_ten(g, 6, 12, N), "d": powers_of_ten(g, 8, 13, N),
                       "peak": powers_of_ten(g, 11, 15.5, N), "mfu": uniform(g, 0.05, 1.0, N),
                       "gpus": _ints(g, 1, 4097)},
            _days, rtol=1e-9, atol=0),
    same_as("ex6_pairwise_distances_tests", ref.pairwise_sq_distances,
            lambda g: {"a": torch.randn(37, 5, generator=g, dtype=F64),
                       "b": 3 * torch.randn(23, 5, generator=g, dtype=F64)},
            args=("a", "b"), rtol=1e-7, atol=1e-9),
]
