"""Trusted checks for chapter 4 (see grader/probes.py): each exercise again, on secret inputs."""

import torch

from course_lib import optimizers as ref
from grader.probes import (
    F32,
    F64,
    Probe,
    as_tensors,
    compare_outputs,
    powers_of_ten,
    randint,
    random_shape,
    same_as,
    uniform,
)

SHAPES = [(4, 6), (6,), (6, 3), (3,)]  # W1, b1, W2, b2 of a small network
STEPS = 30


# -- exercises 1 and 2: the optimizers, driven through a run a real training loop would make -----


def _run_inputs(g, grad_scales):
    """Starting parameters, 30 steps of gradients, a changing lr, late-joining parameters, a reload
    from state_dict() and one last step through a closure."""
    x = {f"p{i}": torch.randn(s, generator=g, dtype=F64) for i, s in enumerate(SHAPES)}
    for i, (s, scale) in enumerate(zip(SHAPES, grad_scales, strict=True)):
        x[f"grad{i}"] = scale * torch.randn(STEPS, *s, generator=g, dtype=F64)
        x[f"cgrad{i}"] = scale * torch.randn(s, generator=g, dtype=F64)
    x["lr_factor"] = uniform(g, 0.2, 1.5, STEPS)
    x["reload_at"] = torch.tensor(randint(g, 5, 25))
    x["closure_loss"] = uniform(g, 0.1, 10.0)
    return x


def _drive(make, x, idle):
    """The parameters after every step of ``make(params)`` on the run ``x`` describes, and the loss
    its step(closure) returned. ``idle[i]``: parameter i has no gradient for its first steps."""
    params = [x[f"p{i}"].clone().requires_grad_(True) for i in range(len(SHAPES))]
    opt = make(params)
    base_lrs = [group["lr"] for group in opt.param_groups]
    for step in range(STEPS):
        if step == int(x["reload_at"]):
            saved = opt.state_dict()
            opt = make(params)
            opt.load_state_dict(saved)
        for group, lr in zip(opt.param_groups, base_lrs, strict=True):
            group["lr"] = lr * float(x["lr_factor"][step])
        for i, p in enumerate(params):
            if step < idle[i] or p.grad is None:
                p.grad = None if step < idle[i] else x[f"grad{i}"][step].clone()
            else:
                # As zero_grad(set_to_none=False) and backward do: the same .grad tensor gets the
                # new values, so an optimizer state that aliases p.grad changes with it.
                p.grad.copy_(x[f"grad{i}"][step])
        opt.step()

    def closure():
        for i, p in enumerate(params):
            p.grad = x[f"cgrad{i}"].clone()
        return x["closure_loss"].clone()

    loss = opt.step(closure)
    out = {f"p{i}": p.detach().clone() for i, p in enumerate(params)}
    out["closure_loss"] = loss
    return out


def _sgd_inputs(g):
    x = _run_inputs(g, powers_of_ten(g, -1, 1, 4).tolist())
    # lr, momentum (group 0), lr and momentum of the Nesterov group, weight decay (all groups)
    x["hyper"] = torch.stack([uniform(g, 0.01, 0.1), uniform(g, 0.5, 0.95), uniform(g, 0.01, 0.1),
                              uniform(g, 0.5, 0.95), uniform(g, 0.01, 0.2)])
    x["idle"] = torch.tensor([randint(g, 1, 8), 0, 0, randint(g, 1, 15)])  # W1 (momentum), b2 (none)
    return x


def _sgd(cls, x):
    lr, mu, nesterov_lr, nesterov_mu, wd = x["hyper"].tolist()

    def make(ps):
        return cls([{"params": ps[:1]},
                    {"params": ps[1:3], "lr": nesterov_lr, "momentum": nesterov_mu, "nesterov": True},
                    {"params": ps[3:], "momentum": 0.0}],
                   lr=lr, momentum=mu, weight_decay=wd)

    return _drive(make, x, x["idle"].tolist())


def _adam_inputs(g):
    # W1's gradients are tiny (where eps matters), the others of ordinary sizes.
    x = _run_inputs(g, [float(powers_of_ten(g, -9, -7))] + powers_of_ten(g, -1, 1, 3).tolist())
    # lr, beta1, beta2, eps, weight decay: the defaults (row 0) and the override of group 1 (row 1)
    x["hyper"] = torch.stack([
        torch.stack([uniform(g, 0.005, 0.05), uniform(g, 0.0, 0.95), uniform(g, 0.9, 0.999),
                     powers_of_ten(g, -9, -7), uniform(g, 0.01, 0.2)]),
        torch.stack([uniform(g, 0.005, 0.05), uniform(g, 0.5, 0.9), uniform(g, 0.9, 0.99),
                     powers_of_ten(g, -3, -1), uniform(g, 0.01, 0.2)]),
    ])
    x["idle"] = torch.tensor([randint(g, 1, 8), randint(g, 1, 15), 0, 0])  # W1 and b1 join late
    return x


def _adam(cls, x):
    (lr, b1, b2, eps, wd), (lr1, b11, b21, eps1, wd1) = x["hyper"].tolist()
    out = {}
    # Adam with L2 weight decay, two parameters joining late; AdamW (decoupled), all from the start.
    for name, decoupled, idle in [("adam", False, x["idle"].tolist()), ("adamw", True, [0] * 4)]:
        def make(ps, decoupled=decoupled):
            return cls([{"params": ps[:1]},
                        {"params": ps[1:3], "lr": lr1, "betas": (b11, b21), "eps": eps1,
                         "weight_decay": wd1},
                        {"params": ps[3:]}],
                       lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, decoupled_weight_decay=decoupled)

        out.update({f"{name}_{k}": v for k, v in _drive(make, x, idle).items()})
    return out


# -- exercise 3: warmup_cosine_lr ---------------------------------------------------------------


def _schedule_inputs(g):
    settings = []
    for i in range(8):
        warmup = 0 if i == 0 else randint(g, 1, 60)
        total = warmup + (1 if i == 1 else randint(g, 1, 300))
        base = float(powers_of_ten(g, -5, 0.5))
        low = 0.0 if i == 2 else base * float(uniform(g, 0.0, 0.5))
        settings.append([base, warmup, total, low])
    total = randint(g, 1, 49)
    invalid = [[-randint(g, 1, 4), 1.0, 0, 10],                 # a negative step
               [0, 1.0, total, total],                        # warmup_steps == total_steps
               [0, 1.0, total + randint(g, 1, 9), total],     # warmup_steps > total_steps
               [randint(g, 0, 4), 1.0, -randint(g, 1, 4), 10]]  # negative warmup_steps
    return {"settings": torch.tensor(settings, dtype=F64), "invalid": torch.tensor(invalid, dtype=F64)}


def _schedules(f, x):
    lrs, is_float = [], []
    for base, warmup, total, low in x["settings"].tolist():
        for step in range(int(total) + 11):
            lr = f(step, base, int(warmup), int(total), low)
            is_float.append(float(isinstance(lr, float)))
            lrs.append(float(lr))
    return torch.tensor(lrs, dtype=F64), torch.tensor(is_float, dtype=F64)


def _schedule_run(ns, x):
    lrs, is_float = _schedules(ns["warmup_cosine_lr"], x)
    raised = []
    for step, base, warmup, total in x["invalid"].tolist():
        try:
            ns["warmup_cosine_lr"](int(step), base, int(warmup), int(total))
            raised.append(0.0)
        except ValueError:
            raised.append(1.0)
    return {"lr": lrs, "is_float": is_float, "raised": torch.tensor(raised, dtype=F64)}


def _schedule_expected(x):
    lrs, is_float = _schedules(ref.warmup_cosine_lr, x)
    return {"lr": lrs, "is_float": torch.ones_like(is_float),
            "raised": torch.ones(len(x["invalid"]), dtype=F64)}


# -- exercise 4: clip_grad_norm_ ----------------------------------------------------------------

# (dtype, scale of the gradients, max_norm, how the tensors are passed)
CLIP_CASES = [(F64, 1.0, 0.5, "generator"), (F32, 1e3, 1.0, "list"), (F64, 1e-3, 1.0, "list"),
              (F32, 1e-4, 1e-5, "list"), (F64, 1.0, 1.5, "tensor"), (F64, 1.0, 1.0, "no gradient")]


def _clip_inputs(g):
    x = {}
    for c, (dtype, scale, max_norm, how) in enumerate(CLIP_CASES):
        n = 1 if how == "tensor" else 0 if how == "no gradient" else randint(g, 2, 4)
        for i in range(n):
            shape = random_shape(g, randint(g, 1, 2), 1, 8)
            x[f"c{c}_g{i}"] = (scale * torch.randn(shape, generator=g, dtype=F64)).to(dtype)
        x[f"c{c}_max"] = max_norm * uniform(g, 0.5, 2.0)
    return x


def _clip(f, x):
    out = {}
    for c, (dtype, _, _, how) in enumerate(CLIP_CASES):
        grads = [x[k] for k in sorted(x) if k.startswith(f"c{c}_g")]
        leaves = [torch.zeros_like(gr, requires_grad=True) for gr in grads]
        for leaf, gr in zip(leaves, grads, strict=True):
            leaf.grad = gr.clone()
        unused = torch.zeros(3, dtype=dtype, requires_grad=True)  # .grad is None: skipped
        params = leaves[0] if how == "tensor" else [unused] if how == "no gradient" else [*leaves, unused]
        if how == "generator":
            params = (p for p in params)
        held = [leaf.grad for leaf in leaves]  # clipping is in place: these tensors must change
        out[f"c{c}_norm"] = f(params, float(x[f"c{c}_max"]))
        out.update({f"c{c}_grad{i}": grad for i, grad in enumerate(held)})
        out[f"c{c}_unused_has_grad"] = float(unused.grad is not None)
    return out


def _clip_check(x, got):
    want = as_tensors(_clip(ref.clip_grad_norm_, x))
    # Gradients of very different sizes share one norm: each key's atol follows its own scale.
    tolerances = {k: (1e-5, 1e-6 * (w.abs().max().item() if w.numel() else 0.0)) for k, w in want.items()}
    return compare_outputs(want, got, tolerances, same_dtype=None)


PROBES = [
    same_as("ex1_sgd_tests", ref.SGD, _sgd_inputs, _sgd, rtol=1e-8, atol=1e-10),
    same_as("ex2_adam_tests", ref.Adam, _adam_inputs, _adam, rtol=1e-8, atol=1e-10),
    Probe(
        "ex3_warmup_cosine_tests",
        inputs=_schedule_inputs,
        run=_schedule_run,
        expected=_schedule_expected,
        rtol=1e-9,
        atol=1e-14,
    ),
    Probe("ex4_clip_grad_norm_tests", inputs=_clip_inputs, run=lambda ns, x: _clip(ns["clip_grad_norm_"], x),
          check=_clip_check),
]
