"""Trusted checks for chapter 1 (see grader/probes.py): each exercise again, on secret inputs."""

import math

import torch

from course_lib import mlp as ref
from grader.probes import F64, Probe, same_as


def _params(g, n_in, hidden, n_out):
    return {
        "W1": torch.randn(n_in, hidden, generator=g, dtype=F64),
        "b1": torch.randn(hidden, generator=g, dtype=F64),
        "W2": torch.randn(hidden, n_out, generator=g, dtype=F64),
        "b2": torch.randn(n_out, generator=g, dtype=F64),
    }


def _split(x):
    return {k: x[k] for k in ("W1", "b1", "W2", "b2")}


def _forward(mlp_forward, x):
    logits, cache = mlp_forward(x["x"], _split(x))
    return {"logits": logits, "h_pre": cache["h_pre"], "h": cache["h"]}


def _backward_inputs(g):
    params = _params(g, 6, 9, 4)
    x = torch.randn(11, 6, generator=g, dtype=F64)
    _, cache = ref.mlp_forward(x, params)
    return {**params, **cache, "dlogits": torch.randn(11, 4, generator=g, dtype=F64)}


def _backward(mlp_backward, x):
    return mlp_backward(x["dlogits"], {"x": x["x"], "h_pre": x["h_pre"], "h": x["h"]}, _split(x))


def _numerical_gradient_run(ns, x):
    # The point comes back as an output, compared with the probe's tolerance: the answer may move
    # it and put it back (not check_inputs_unchanged, which is exact).
    A, point = x["A"], x["point"].clone()
    grad = ns["numerical_gradient"](lambda v: float((A * torch.sin(v)).sum() + (v @ v.T).trace()), point)
    return {"grad": grad, "point_after": point}


def _train_inputs(g):
    teacher = torch.randn(8, 3, generator=g)
    x = torch.randn(400, 8, generator=g)
    return {"x": x, "y": (x @ teacher).argmax(dim=1)}


def _train_run(ns, x):
    params, losses = ns["train_mlp"](x["x"], x["y"], n_hidden=32, lr=0.5, epochs=15, batch_size=32, seed=3)
    # Accuracy is judged on the student's own forward pass, so a mistake in exercise 1 does not
    # cost the points of this exercise a second time.
    logits = ns["mlp_forward"](x["x"], params)[0]
    return {"logits": logits, "losses": torch.tensor(losses, dtype=F64)}


def _train_check(x, out):
    losses = out["losses"]
    steps = 15 * math.ceil(len(x["x"]) / 32)
    if losses.shape != (steps,):
        return f"{losses.numel()} losses, expected one per step ({steps})"
    if not torch.isfinite(losses).all():
        return "the loss is not finite"
    first, last = losses[:25].mean().item(), losses[-25:].mean().item()
    if not last < 0.5 * first:
        return f"the loss fell only from {first:.3f} to {last:.3f}"
    if out["logits"].shape != (len(x["x"]), 3):
        return f"logits of shape {tuple(out['logits'].shape)}"
    accuracy = (out["logits"].argmax(dim=1) == x["y"]).double().mean().item()
    if accuracy < 0.9:
        return f"training accuracy {accuracy:.3f} is below 0.9"
    return None


PROBES = [
    same_as("ex1_forward_tests", ref.mlp_forward,
            lambda g: {"x": torch.randn(13, 6, generator=g, dtype=F64), **_params(g, 6, 9, 4)},
            _forward, rtol=1e-9, atol=1e-12),
    same_as("ex2_cross_entropy_tests", ref.softmax_cross_entropy,
            lambda g: {"logits": 30 * torch.randn(17, 5, generator=g, dtype=F64),
                       "y": torch.randint(0, 5, (17,), generator=g)},
            args=("logits", "y"), rtol=1e-7, atol=1e-10),
    same_as("ex3_backward_tests", ref.mlp_backward, _backward_inputs, _backward, rtol=1e-9, atol=1e-12),
    Probe(
        "ex4_numerical_gradient_tests",
        inputs=lambda g: {
            "A": torch.randn(3, 4, generator=g, dtype=F64),
            "point": torch.randn(3, 4, generator=g, dtype=F64),
        },
        run=_numerical_gradient_run,
        # d/dv of sum(A * sin v) + trace(v v^T) is A * cos v + 2 v; the point must come back unchanged.
        expected=lambda x: {
            "grad": x["A"] * torch.cos(x["point"]) + 2 * x["point"],
            "point_after": x["point"],
        },
        rtol=1e-6,
        atol=1e-6,
    ),
    Probe("ex5_train_tests", inputs=_train_inputs, run=_train_run, check=_train_check),
]
