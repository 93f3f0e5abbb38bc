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
    # Zero inputs and zero biases put h_pre exactly at 0, where the ReLU's slope is 0.
    x[:3] = 0.0
    params["b1"][:4] = 0.0
    _, cache = ref.mlp_forward(x, params)
    return {**params, **cache, "dlogits": torch.randn(11, 4, generator=g, dtype=F64)}


def _backward(mlp_backward, x):
    return mlp_backward(x["dlogits"], {"x": x["x"], "h_pre": x["h_pre"], "h": x["h"]}, _split(x))


def _numerical_gradient_run(ns, x):
    # The point comes back as an output, compared with the probe's tolerance: the answer may move
    # it and put it back (not check_inputs_unchanged, which is exact).
    A, point = x["A"], x["point"].clone()
    # (sum v)^2 couples the elements: an element not put back changes the next differences.
    grad = ns["numerical_gradient"](
        lambda v: float((A * torch.sin(v)).sum() + (v @ v.T).trace() + v.sum() ** 2), point)
    return {"grad": grad, "point_after": point}


N_TRAIN = 417  # 13 * 32 + 1: in the lr = 0 run the last batch of an epoch holds one example
N_FIT = 400  # the training run whose accuracy is judged: a last batch of one example at lr = 0.5
# would jolt the weights each epoch (training accuracy fell to 0.76 on some seeds)


def _train_inputs(g):
    teacher = torch.randn(8, 3, generator=g)
    x = torch.randn(N_TRAIN, 8, generator=g)
    return {"x": x, "y": (x @ teacher).argmax(dim=1)}


def _train_run(ns, x):
    fit_x, fit_y = x["x"][:N_FIT], x["y"][:N_FIT]
    params, losses = ns["train_mlp"](fit_x, fit_y, n_hidden=32, lr=0.5, epochs=15, batch_size=32, seed=3)
    # Accuracy is judged on the student's own forward pass, so a mistake in exercise 1 does not
    # cost the points of this exercise a second time.
    logits = ns["mlp_forward"](fit_x, params)[0]
    # lr = 0 in float64: the losses are batch means at the initial parameters (see _batching_error).
    _, losses0 = ns["train_mlp"](x["x"].double(), x["y"], n_hidden=8, lr=0.0, epochs=2, batch_size=32, seed=4)
    # The loss of all examples at the initial parameters, by the student's own forward pass and
    # loss (a mistake there is exercise 1's or 2's, not this one's).
    init = ns["init_mlp"](x["x"].shape[1], 8, int(x["y"].max()) + 1, seed=4, dtype=F64)
    loss_all = ns["softmax_cross_entropy"](ns["mlp_forward"](x["x"].double(), init)[0], x["y"])[0]
    return {"logits": logits, "losses": torch.tensor(losses, dtype=F64),
            "losses_lr0": torch.tensor(losses0, dtype=F64), "loss_all_lr0": loss_all.detach().double()}


def _batching_error(x, losses0, loss_all):
    """With lr = 0 each epoch's losses, weighted by the batch sizes, add up to the loss of every
    example at the initial parameters, whatever the order: every example once, batches of 32."""
    n, per_epoch = len(x["x"]), math.ceil(len(x["x"]) / 32)
    if losses0.shape != (2 * per_epoch,):
        return f"{losses0.numel()} losses with lr=0, expected {2 * per_epoch}"
    want = float(loss_all) * n
    sizes = torch.full((per_epoch,), 32.0, dtype=F64)
    sizes[-1] = n - 32 * (per_epoch - 1)
    for epoch in range(2):
        got = (losses0[epoch * per_epoch:(epoch + 1) * per_epoch] * sizes).sum().item()
        if not math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9):
            return (f"with lr=0, epoch {epoch + 1}'s losses weighted by batch size add up to {got:.6f}, "
                    f"not the loss of all {n} examples ({want:.6f}): not every example once per epoch")
    return None


def _train_check(x, out):
    batching = _batching_error(x, out["losses_lr0"], out["loss_all_lr0"])
    if batching:
        return batching
    losses = out["losses"]
    steps = 15 * math.ceil(N_FIT / 32)
    if losses.shape != (steps,):
        return f"{losses.numel()} losses, expected one per step ({steps})"
    if not torch.isfinite(losses).all():
        return "the loss is not finite"
    first, last = losses[:25].mean().item(), losses[-25:].mean().item()
    if not last < 0.5 * first:
        return f"the loss fell only from {first:.3f} to {last:.3f}"
    if out["logits"].shape != (N_FIT, 3):
        return f"logits of shape {tuple(out['logits'].shape)}"
    accuracy = (out["logits"].argmax(dim=1) == x["y"][:N_FIT]).double().mean().item()
    # 0.8, not 0.9: this exercise grades the training loop. With a wrong forward from exercise 1 (no
    # ReLU: a linear model) the loop still trains, to about 0.9 and on one secret seed 0.897, so a
    # bar at 0.9 failed or passed the same loop by chance.
    if accuracy < 0.8:
        return f"training accuracy {accuracy:.3f} is below 0.8"
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
        # d/dv of sum(A * sin v) + trace(v v^T) + (sum v)^2 is A * cos v + 2 v + 2 sum v; the
        # point must come back unchanged.
        expected=lambda x: {
            "grad": x["A"] * torch.cos(x["point"]) + 2 * x["point"] + 2 * x["point"].sum(),
            "point_after": x["point"],
        },
        rtol=1e-6,
        atol=1e-6,
    ),
    Probe("ex5_train_tests", inputs=_train_inputs, run=_train_run, check=_train_check),
]
