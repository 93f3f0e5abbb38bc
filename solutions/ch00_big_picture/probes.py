"""Trusted checks for chapter 0 (see grader/probes.py): each exercise again, on secret inputs."""

import torch

from course_lib import sizing as ref
from grader.probes import Probe

N = 40  # cases per exercise


def _ints(g, low, high, n=N):
    return torch.randint(low, high, n if isinstance(n, tuple) else (n,), generator=g)


def _log_uniform(g, low_exp, high_exp, n=N):
    return 10 ** (low_exp + (high_exp - low_exp) * torch.rand(n, generator=g, dtype=torch.float64))


def _layer_sizes(x):
    return [[int(v) for v in row[:length]] for row, length in zip(x["sizes"], x["lengths"], strict=True)]


def _memory(f, x):
    out = []
    for n, p, o in zip(x["n"].tolist(), x["precision"].tolist(), x["optimizer"].tolist(), strict=True):
        m = f(n, precision=["fp32", "bf16", "fp16"][p], optimizer=["sgd", "momentum", "adam"][o])
        out.append([m["weights"], m["gradients"], m["optimizer"], m["total"]])
    return torch.tensor(out, dtype=torch.int64)


PROBES = [
    Probe(
        "ex1_mlp_params_tests",
        inputs=lambda g: {
            "sizes": _ints(g, 1, 5000, (N, 7)),
            "lengths": _ints(g, 2, 8),
            "bias": _ints(g, 0, 2),
        },
        run=lambda ns, x: torch.tensor(
            [ns["mlp_param_count"](s, bias=bool(b)) for s, b in zip(_layer_sizes(x), x["bias"], strict=True)],
            dtype=torch.int64,
        ),
        expected=lambda x: torch.tensor(
            [ref.mlp_param_count(s, bias=bool(b)) for s, b in zip(_layer_sizes(x), x["bias"], strict=True)],
            dtype=torch.int64,
        ),
        rtol=0,
        atol=0,
    ),
    Probe(
        "ex2_gpt_params_tests",
        inputs=lambda g: {
            "v": _ints(g, 1, 200_000),
            "b": _ints(g, 1, 8192),
            "n": _ints(g, 0, 49),
            "d": _ints(g, 1, 4097),
            "tied": _ints(g, 0, 2),
        },
        run=lambda ns, x: torch.tensor(
            [
                ns["gpt_param_count"](*c[:4], tied=bool(c[4]))
                for c in zip(*(x[k].tolist() for k in "vbnd"), x["tied"].tolist(), strict=True)
            ],
            dtype=torch.int64,
        ),
        expected=lambda x: torch.tensor(
            [
                ref.gpt_param_count(*c[:4], tied=bool(c[4]))
                for c in zip(*(x[k].tolist() for k in "vbnd"), x["tied"].tolist(), strict=True)
            ],
            dtype=torch.int64,
        ),
        rtol=0,
        atol=0,
    ),
    Probe(
        "ex3_training_memory_tests",
        inputs=lambda g: {"n": _ints(g, 0, 10**12), "precision": _ints(g, 0, 3), "optimizer": _ints(g, 0, 3)},
        run=lambda ns, x: _memory(ns["training_memory_bytes"], x),
        expected=lambda x: _memory(ref.training_memory_bytes, x),
        rtol=0,
        atol=0,
    ),
    Probe(
        "ex4_training_flops_tests",
        inputs=lambda g: {"n": _log_uniform(g, 0, 12), "d": _log_uniform(g, 6, 13)},
        run=lambda ns, x: torch.tensor(
            [
                float(ns["training_flops"](n, d))
                for n, d in zip(x["n"].tolist(), x["d"].tolist(), strict=True)
            ],
            dtype=torch.float64,
        ),
        expected=lambda x: 6.0 * x["n"] * x["d"],
        rtol=1e-9,
        atol=0,
    ),
    Probe(
        "ex5_training_days_tests",
        inputs=lambda g: {
            "n": _log_uniform(g, 6, 12),
            "d": _log_uniform(g, 8, 13),
            "peak": _log_uniform(g, 11, 15.5),
            "mfu": 0.05 + 0.95 * torch.rand(N, generator=g, dtype=torch.float64),
            "gpus": _ints(g, 1, 4097),
        },
        run=lambda ns, x: torch.tensor(
            [
                float(ns["training_days"](n, d, p, mfu=u, n_gpus=k))
                for n, d, p, u, k in zip(
                    *(x[k].tolist() for k in ["n", "d", "peak", "mfu", "gpus"]), strict=True
                )
            ],
            dtype=torch.float64,
        ),
        expected=lambda x: 6.0 * x["n"] * x["d"] / (x["peak"] * x["mfu"] * x["gpus"]) / 86_400,
        rtol=1e-9,
        atol=0,
    ),
    Probe(
        "ex6_pairwise_distances_tests",
        inputs=lambda g: {
            "a": torch.randn(37, 5, generator=g, dtype=torch.float64),
            "b": 3 * torch.randn(23, 5, generator=g, dtype=torch.float64),
        },
        run=lambda ns, x: ns["pairwise_sq_distances"](x["a"], x["b"]),
        expected=lambda x: ((x["a"][:, None, :] - x["b"][None, :, :]) ** 2).sum(-1),
        rtol=1e-7,
        atol=1e-9,
    ),
]
