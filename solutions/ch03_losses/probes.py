"""Trusted checks for chapter 3 (see grader/probes.py): each exercise again, on secret inputs.

Every loss is checked on its value and on its autograd gradient, in float64 and float32, with
the edge cases of the hidden tests (logits up to 1e4, masked -inf logits, ignored targets,
pseudo-counts) and random shapes, options and dims; inputs must come back unchanged.
"""

import torch

from course_lib import losses as ref
from grader.probes import F32, F64, randint, random_shape, same_as, uniform


def _value_and_grad(loss_fn, leaf):
    """The loss and its gradient with respect to ``leaf`` (a fresh tensor that requires grad)."""
    loss = loss_fn(leaf)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


def _leaf(t):
    """A tensor that requires grad and shares ``t``'s memory: changing it in place changes the
    input, which check_inputs_unchanged catches."""
    return t.detach().requires_grad_(True)


# -- exercise 1: Huber ---------------------------------------------------------------------------


def _huber_inputs(g):
    delta = uniform(g, 0.1, 3.0)
    shape = random_shape(g, 3, 1, 6)
    far = torch.cat([torch.stack([delta, -delta, torch.zeros((), dtype=F64)]),
                     uniform(g, 1e5, 1e6, (3,)), -uniform(g, 1e5, 1e6, (3,))])
    return {
        "pred": 4 * torch.randn(shape, generator=g, dtype=F64),
        "target": torch.randn(shape, generator=g, dtype=F64),
        "delta": delta,
        "pred32": 4 * torch.randn(37, generator=g),
        "target32": torch.randn(37, generator=g),
        "delta32": uniform(g, 0.2, 5.0),
        "far": far,  # exactly on the joint |r| = delta, at 0, and far out (target 0)
        "far_target": torch.zeros_like(far),
    }


def _huber_case(f, x):
    out = {}
    for key, pred, target, delta in (
        ("", x["pred"], x["target"], x["delta"]),
        ("32", x["pred32"], x["target32"], x["delta32"]),
        ("_far", x["far"], x["far_target"], x["delta"]),
    ):
        out[f"loss{key}"], out[f"grad{key}"] = _value_and_grad(
            lambda p, t=target, d=float(delta): f(p, t, delta=d), _leaf(pred))
    return out


# -- exercise 2: binary cross-entropy with logits ------------------------------------------------


def _bce_inputs(g):
    labels = randint(g, 2, 6)
    rows = randint(g, 3, 11)
    return {
        # float64, soft labels, one pos_weight per label (broadcast along the last dim)
        "z": 3 * torch.randn(rows, 4, labels, generator=g, dtype=F64),
        "y": torch.rand(rows, 4, labels, generator=g, dtype=F64),
        "w": uniform(g, 0.1, 5.0, (labels,)),
        # float32, a Python float pos_weight
        "z32": 5 * torch.randn(9, 3, generator=g),
        "y32": torch.rand(9, 3, generator=g),
        "w32": uniform(g, 0.2, 4.0),
        # float32 logits with float64 targets and weights: the result keeps the logits' dtype
        "y32_64": torch.rand(9, 3, generator=g, dtype=F64),
        "w3_64": uniform(g, 0.2, 4.0, (3,)),
        # float32 and float64 logits up to 1e4, hard and soft labels
        "zbig32": uniform(g, -1e4, 1e4, (20,), F32),
        "ybig32": torch.randint(0, 2, (20,), generator=g).to(F32),
        "zbig": uniform(g, -1e4, 1e4, (20,)),
        "ybig": torch.rand(20, generator=g, dtype=F64),
        # float32 logits where exp overflows
        "zexp": torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0]) * uniform(g, 88, 200, (6,), F32),
        "yexp": torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.7]),
    }


def _bce_case(f, x):
    out = {}
    out["loss"], out["grad"] = _value_and_grad(lambda z: f(z, x["y"], pos_weight=x["w"]), _leaf(x["z"]))
    out["loss32"], out["grad32"] = _value_and_grad(
        lambda z: f(z, x["y32"], pos_weight=float(x["w32"])), _leaf(x["z32"]))
    out["loss_big32"], out["grad_big32"] = _value_and_grad(lambda z: f(z, x["ybig32"]), _leaf(x["zbig32"]))
    out["loss_big"], out["grad_big"] = _value_and_grad(lambda z: f(z, x["ybig"]), _leaf(x["zbig"]))
    out["loss_exp"] = f(x["zexp"], x["yexp"]).detach()
    out["out_mixed_dtypes"] = f(x["z32"], x["y32_64"], pos_weight=x["w3_64"]).detach()  # dtype kept
    return out


# -- exercise 3: log-softmax ---------------------------------------------------------------------


def _log_softmax_inputs(g):
    masked = 3 * torch.randn(7, 5, generator=g)
    masked[torch.rand(7, 5, generator=g) < 0.35] = -float("inf")
    keep = torch.randint(0, 5, (7,), generator=g)
    masked[torch.arange(7), keep] = uniform(g, -1e4, 1e4, (7,), F32)  # never a row of only -inf
    return {
        "x3d": 5 * torch.randn(4, 5, 6, generator=g, dtype=F64),
        "dim": torch.tensor(randint(g, -3, 2)),
        "x1d": torch.randn(randint(g, 1, 11), generator=g, dtype=F64),
        "x32": 4 * torch.randn(6, 9, generator=g),
        "big32": uniform(g, -1e4, 1e4, (8, 5), F32),
        "big": uniform(g, -1e4, 1e4, (8, 5)),
        "masked": masked,
        "upstream": torch.randn(4, 5, 6, generator=g, dtype=F64),
    }


def _log_softmax_case(f, x):
    dim = int(x["dim"])
    leaf = _leaf(x["x3d"])
    out3d = f(leaf, dim=dim)
    (grad,) = torch.autograd.grad(out3d, leaf, x["upstream"])
    return {
        "x3d": out3d.detach(),
        "grad": grad,
        "x1d": f(x["x1d"], dim=0),
        "x32": f(x["x32"]),
        "big32": f(x["big32"], dim=-1),
        "big": f(x["big"], dim=1),
        "masked": f(x["masked"], dim=-1),
    }


# -- exercise 4: cross-entropy -------------------------------------------------------------------


def _targets(g, n, classes, ignore, share):
    y = torch.randint(0, classes, (n,), generator=g)
    y[torch.rand(n, generator=g) < share] = ignore
    y[randint(g, 0, n - 1)] = (ignore + 1) % classes if 0 <= ignore < classes else 1  # one is kept
    return y


def _cross_entropy_inputs(g):
    n, c = randint(g, 10, 39), randint(g, 3, 11)
    pad = randint(g, 0, 4)  # ignore_index that is a valid class: that class is the padding
    return {
        "z": 2 * torch.randn(n, c, generator=g, dtype=F64),
        "y": _targets(g, n, c, -100, 0.4),
        "eps": uniform(g, 0.05, 0.6),
        "zplain": 4 * torch.randn(n, c, generator=g, dtype=F64),
        "yplain": torch.randint(0, c, (n,), generator=g),
        "zpad": torch.randn(30, 5, generator=g, dtype=F64),
        "ypad": _targets(g, 30, 5, pad, 0.0),
        "pad": torch.tensor(pad),
        "zbig32": uniform(g, -1e4, 1e4, (12, 5), F32),
        "ybig32": _targets(g, 12, 5, -100, 0.3),
        "zbig": uniform(g, -1e4, 1e4, (12, 5)),
        "ybig": torch.randint(0, 5, (12,), generator=g),
        "z32": 3 * torch.randn(16, 50, generator=g),
        "y32": _targets(g, 16, 50, -100, 0.3),
    }


def _cross_entropy_case(f, x):
    eps = float(x["eps"])
    out = {}
    out["loss"], out["grad"] = _value_and_grad(lambda z: f(z, x["y"], label_smoothing=eps), _leaf(x["z"]))
    out["loss_plain"], out["grad_plain"] = _value_and_grad(lambda z: f(z, x["yplain"]), _leaf(x["zplain"]))
    out["loss_pad"], out["grad_pad"] = _value_and_grad(
        lambda z: f(z, x["ypad"], label_smoothing=0.1, ignore_index=int(x["pad"])), _leaf(x["zpad"]))
    out["loss_big32"] = f(x["zbig32"], x["ybig32"], label_smoothing=0.1).detach()
    out["loss_big"] = f(x["zbig"], x["ybig"], label_smoothing=0.05).detach()
    out["loss32"] = f(x["z32"], x["y32"], label_smoothing=0.1).detach()
    return out


# -- exercise 5: the maximum-likelihood categorical ----------------------------------------------


def _categorical_inputs(g):
    c = randint(g, 2, 14)
    return {
        "s": torch.randint(0, c, (randint(g, 1, 999),), generator=g),
        "c": torch.tensor(c),
        "s2d": 3 * torch.randint(0, 4, (20, 30), generator=g),  # classes 0, 3, 6, 9 of 12
        "alpha": uniform(g, 0.1, 3.0),
        "s100": torch.randint(0, 100, (50,), generator=g),
        "alpha100": uniform(g, 0.001, 0.1),
        "empty": torch.zeros(0, dtype=torch.int64),
    }


def _categorical_case(f, x):
    return {
        "plain": f(x["s"], int(x["c"])),
        "smoothed": f(x["s2d"], 12, alpha=float(x["alpha"])),
        "many": f(x["s100"], 100, alpha=float(x["alpha100"])),
        "empty": f(x["empty"], 4, alpha=2.0),
        "single": f(torch.zeros(17, dtype=torch.int64), 1),
    }


PROBES = [
    same_as("ex1_huber_tests", ref.huber_loss, _huber_inputs, _huber_case, rtol=1e-5, atol=1e-6,
            check_inputs_unchanged=True),
    same_as("ex2_bce_tests", ref.bce_with_logits, _bce_inputs, _bce_case, rtol=1e-5, atol=1e-6,
            check_inputs_unchanged=True),
    # atol: float32 log-probabilities near -2e4 carry rounding of about 1e-3
    same_as("ex3_log_softmax_tests", ref.log_softmax, _log_softmax_inputs, _log_softmax_case, rtol=1e-5,
            atol=1e-3, check_inputs_unchanged=True),
    same_as("ex4_cross_entropy_tests", ref.cross_entropy, _cross_entropy_inputs, _cross_entropy_case,
            rtol=1e-5, atol=1e-6, check_inputs_unchanged=True),
    same_as("ex5_fit_categorical_tests", ref.fit_categorical, _categorical_inputs, _categorical_case,
            rtol=1e-10, atol=1e-12, check_inputs_unchanged=True),
]
