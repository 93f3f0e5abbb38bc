"""Trusted checks for chapter 11 (see grader/probes.py): each exercise again, on secret inputs.

The distributed exercises run in real processes here too: ``run`` forks ranks in the student's
kernel (course_lib.launch.run_workers) with the student's function, and returns what every rank
computed; the grader compares it with the same computation in one process.
"""

import torch
import torch.nn.functional as F
from torch import nn

from course_lib import launch, parallel
from course_lib import sizing as sizing_ref
from grader.probes import F64, I64, Probe, checker, randint, same_as

PRECISIONS = ("fp32", "bf16", "fp16", "BF16")
OPTIMIZERS = ("adam", "adamw", "sgd", "momentum", "AdamW", "rmsprop")


# -- exercise 1: the memory calculator -------------------------------------------------------------

N_MEMORY = 24


def _memory_inputs(g):
    n = torch.randint(0, 2**62, (N_MEMORY,), generator=g) % (10**13)
    n[0] = torch.randint(0, 5000, (1,), generator=g)
    cfg = torch.stack([torch.randint(0, 4, (N_MEMORY,), generator=g),
                       torch.randint(0, 6, (N_MEMORY,), generator=g),
                       torch.randint(1, 1025, (N_MEMORY,), generator=g),
                       torch.arange(N_MEMORY) % 4], dim=1)
    return {"n": n, "cfg": cfg}


def _memory_outputs(f, x):
    out = {}
    keys = ("weights", "gradients", "master", "optimizer", "total")
    for i in range(N_MEMORY):
        prec, opt, world, stage = (int(v) for v in x["cfg"][i])
        got = f(int(x["n"][i]), PRECISIONS[prec], OPTIMIZERS[opt], world, stage)
        out[f"case{i}"] = torch.tensor([int(got[k]) for k in keys], dtype=I64)
    return out


# -- exercise 2: averaging gradients ---------------------------------------------------------------


def _dp_inputs(g):
    return {"w0": torch.randn(7, 5, generator=g, dtype=F64), "b0": torch.randn(7, generator=g, dtype=F64),
            "w1": torch.randn(3, 7, generator=g, dtype=F64), "b1": torch.randn(3, generator=g, dtype=F64),
            "x": torch.randn(12, 5, generator=g, dtype=F64), "y": torch.randint(0, 3, (12,), generator=g),
            "world": torch.tensor([randint(g, 2, 3)])}


def _dp_model(x):
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    with torch.no_grad():
        for p, key in zip(model.parameters(), ("w0", "b0", "w1", "b1"), strict=True):
            p.copy_(x[key])
    return model


def _dp_rank(rank, world, averager, x):
    model = _dp_model(x)
    n = len(x["x"]) // world
    F.cross_entropy(model(x["x"][rank * n:(rank + 1) * n]), x["y"][rank * n:(rank + 1) * n]).backward()
    averager(model)
    return [p.grad.clone() for p in model.parameters()]


def _dp_outputs(ns, x):
    world = int(x["world"][0])
    ranks = launch.run_workers(_dp_rank, world, args=(ns["average_gradients"], x), timeout=60)
    return {f"rank{r}_grad{i}": g for r, grads in enumerate(ranks) for i, g in enumerate(grads)}


def _dp_reference(x):
    world = int(x["world"][0])
    model = _dp_model(x)
    F.cross_entropy(model(x["x"]), x["y"]).backward()
    return {f"rank{r}_grad{i}": p.grad for r in range(world) for i, p in enumerate(model.parameters())}


# -- exercise 3: tensor-parallel shards --------------------------------------------------------------


def _shard_inputs(g):
    return {"w": torch.randn(12, 8, generator=g, dtype=F64), "b": torch.randn(12, generator=g, dtype=F64)}


def _shard_outputs(f, x):
    out = {}
    for world in (1, 2, 4):
        for style in ("column", "row"):
            for rank in range(world):
                w, b = f(x["w"], x["b"], rank, world, style)
                out[f"{style}{world}_{rank}_w"] = w.clone()
                out[f"{style}{world}_{rank}_b"] = b.clone()
                # The task asks for copies: overwriting a shard must leave the inputs as they were
                # (check_inputs_unchanged compares them with the grader's copy).
                w.fill_(-1.0)
                b.fill_(-1.0)
            out[f"{style}{world}_nobias"] = torch.tensor(f(x["w"], None, 0, world, style)[1] is None)
    return out


# -- exercise 4: the row-parallel linear layer -------------------------------------------------------


def _row_inputs(g):
    return {"w": torch.randn(6, 8, generator=g, dtype=F64), "b": torch.randn(6, generator=g, dtype=F64),
            "x": torch.randn(2, 3, 8, generator=g, dtype=F64),
            "up": torch.randn(2, 3, 6, generator=g, dtype=F64)}


def _row_rank(rank, world, layer, x):
    k = 8 // world
    xs = x["x"][..., rank * k:(rank + 1) * k].clone().requires_grad_()
    ws = x["w"][:, rank * k:(rank + 1) * k].clone().requires_grad_()
    bs = x["b"].clone().requires_grad_()
    out = layer(xs, ws, bs)
    (out * x["up"]).sum().backward()
    return out.detach(), xs.grad, ws.grad, bs.grad


def _row_outputs(ns, x):
    out = {}
    for world in (2, 4):
        ranks = launch.run_workers(_row_rank, world, args=(ns["row_parallel_linear"], x), timeout=60)
        for r, values in enumerate(ranks):
            for name, value in zip(("out", "xgrad", "wgrad", "bgrad"), values, strict=True):
                out[f"w{world}_r{r}_{name}"] = value
    return out


def _row_reference(x):
    w, b, xx = (x[k].clone().requires_grad_() for k in ("w", "b", "x"))
    y = F.linear(xx, w, b)
    (y * x["up"]).sum().backward()
    out = {}
    for world in (2, 4):
        k = 8 // world
        for r in range(world):
            part = slice(r * k, (r + 1) * k)
            out[f"w{world}_r{r}_out"] = y.detach()
            out[f"w{world}_r{r}_xgrad"] = xx.grad[..., part]
            out[f"w{world}_r{r}_wgrad"] = w.grad[:, part]
            out[f"w{world}_r{r}_bgrad"] = b.grad
    return out


# Averaging gradients and the row-parallel layer are not same_as: the answer runs on forked ranks,
# the reference in one process. Byte counts and shards are compared exactly.
PROBES = [
    same_as("ex1_memory_tests", sizing_ref.memory_per_gpu, _memory_inputs, _memory_outputs, rtol=0, atol=0),
    Probe("ex2_average_gradients_tests", inputs=_dp_inputs, run=_dp_outputs,
          check=checker(_dp_reference, default=(1e-10, 1e-12))),
    same_as("ex3_tp_shard_tests", parallel.tp_shard, _shard_inputs, _shard_outputs, rtol=0, atol=0,
            check_inputs_unchanged=True),
    Probe("ex4_row_parallel_tests", inputs=_row_inputs, run=_row_outputs,
          check=checker(_row_reference, default=(1e-10, 1e-12))),
]
