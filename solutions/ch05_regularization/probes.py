"""Trusted checks for chapter 5 (see grader/probes.py): each exercise again, on secret inputs."""

import math

import torch

from course_lib import regularization as ref
from grader.probes import F32, F64, Probe, compare_outputs, uniform


def _seeds(g, n):
    return torch.randint(0, 2**31 - 1, (n,), generator=g)


def _gen(seed):
    return torch.Generator().manual_seed(int(seed))


def _grads(f, tensors, up):
    """Gradients of sum(f(*leaves) * up) with respect to each of ``tensors`` (and f's output)."""
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    out = f(*leaves)
    (out * up).sum().backward()
    return out, [leaf.grad for leaf in leaves]


# -- exercise 1: early stopping ------------------------------------------------------------------

CURVES, EPOCHS = 24, 30
GRID = 32  # losses on a grid of 1/32: ties with the best and improvements of exactly min_delta


def _early_inputs(g):
    t = torch.arange(EPOCHS, dtype=F64)
    turn = uniform(g, 5, 30, (CURVES, 1))
    curve = 1 + uniform(g, 0.0, 0.004, (CURVES, 1)) * (t - turn) ** 2
    noise = uniform(g, 0.0, 0.08, (CURVES, 1)) * torch.randn(CURVES, EPOCHS, generator=g, dtype=F64)
    losses = torch.round((curve + noise) * GRID) / GRID
    losses[torch.rand(CURVES, EPOCHS, generator=g) < 0.04] = math.nan
    return {
        "losses": losses,
        "patience": torch.randint(1, 7, (CURVES,), generator=g),
        "min_delta": torch.tensor([0.0, 1.0, 2.0, 4.0], dtype=F64)[
            torch.randint(0, 4, (CURVES,), generator=g)] / GRID,
    }


def _early_trace(cls, x):
    """(stop, best, best_epoch, bad_epochs) before the first step and after every step of each curve;
    every fourth curve is fed as 0-d tensors."""
    traces = []
    for k in range(CURVES):
        stopper = cls(int(x["patience"][k]), float(x["min_delta"][k]))
        rows = [[0.0, float(stopper.best), float(stopper.best_epoch), float(stopper.bad_epochs)]]
        for loss in x["losses"][k].tolist():
            stop = stopper.step(torch.tensor(loss, dtype=F64) if k % 4 == 3 else loss)
            rows.append([float(stop), float(stopper.best), float(stopper.best_epoch),
                         float(stopper.bad_epochs)])
        traces.append(rows)
    return torch.tensor(traces, dtype=F64)


def _early_check(x, out):
    want, got = _early_trace(ref.EarlyStopping, x), out.get("out")
    if got is None or tuple(got.shape) != tuple(want.shape):
        return f"returned {None if got is None else tuple(got.shape)}, expected {tuple(want.shape)}"
    same = (got.to(F64) == want) | (torch.isnan(got.to(F64)) & torch.isnan(want))
    if same.all():
        return None
    k, epoch, field = (int(i) for i in (~same).nonzero()[0])
    name = ["step() returned", "best =", "best_epoch =", "bad_epochs ="][field]
    where = "a new EarlyStopping" if epoch == 0 else f"after epoch {epoch - 1}"
    return (f"{name} {got[k, epoch, field].item():g}, expected {want[k, epoch, field].item():g} ({where}; "
            f"patience {int(x['patience'][k])}, min_delta {float(x['min_delta'][k]):g})")


# -- exercise 2: dropout --------------------------------------------------------------------------


def _dropout_inputs(g):
    return {
        "x": uniform(g, 0.5, 20.0) * torch.randn(200, 150, generator=g, dtype=F64),
        "x32": torch.randn(100, 120, generator=g),
        "p": torch.stack([uniform(g, 0.05, 0.3), uniform(g, 0.4, 0.6), uniform(g, 0.7, 0.9)]),
        "seeds": _seeds(g, 6),
    }


def _dropout_run(ns, x):
    f, p, s = ns["dropout"], [float(v) for v in x["p"]], x["seeds"]
    out = {f"out{i}": f(x["x"], p[i], training=True, generator=_gen(s[i])) for i in range(3)}
    out["out32"] = f(x["x32"], p[0], generator=_gen(s[3]))
    small = x["x"][:20]
    out["seeded_a"], out["seeded_b"] = (f(small, p[1], training=True, generator=_gen(s[2])) for _ in "ab")
    out["eval"] = f(small, p[2], training=False)
    out["p0"] = f(small, 0.0, training=True, generator=_gen(s[4]))
    out["p1"] = f(small, 1.0, training=True, generator=_gen(s[5]))
    leaf = small.clone().requires_grad_(True)
    grad_out = f(leaf, p[1], training=True, generator=_gen(s[5]))
    grad_out.sum().backward()
    out["grad_out"], out["grad"] = grad_out, leaf.grad
    return out


def _dropout_one(x, out, p, what):
    if tuple(out.shape) != tuple(x.shape) or out.dtype != x.dtype:
        return f"{what}: shape {tuple(out.shape)} {out.dtype}, expected {tuple(x.shape)} {x.dtype}"
    if not torch.isfinite(out).all():
        return f"{what}: values that are not finite"
    kept = out != 0
    rate = 1 - kept.double().mean().item()
    if abs(rate - p) > 0.02:
        return f"{what}: {rate:.3f} of the elements dropped, expected p = {p:.3f}"
    if not torch.allclose(out[kept].double(), x[kept].double() / (1 - p), rtol=1e-6, atol=0):
        return f"{what}: the kept elements are not x / (1 - p)"
    rows, cols = (~kept).double().mean(dim=1), (~kept).double().mean(dim=0)
    if rows.std().item() > 0.15 or cols.std().item() > 0.15:
        return f"{what}: the drop rate varies between rows or columns (elements are not independent)"
    return None


def _dropout_check(x, out):
    p = x["p"].tolist()
    for i in range(3):
        if (reason := _dropout_one(x["x"], out[f"out{i}"], p[i], f"p={p[i]:.3f}")) is not None:
            return reason
    if (reason := _dropout_one(x["x32"], out["out32"], p[0], "float32 input")) is not None:
        return reason
    if not torch.equal(out["seeded_a"], out["seeded_b"]):
        return "two calls with equally seeded generators gave different results"
    small = x["x"][:20]
    for key, want, what in [("eval", small, "training=False"), ("p0", small, "p=0"),
                            ("p1", torch.zeros_like(small), "p=1")]:
        if tuple(out[key].shape) != tuple(want.shape) or not torch.equal(out[key].to(F64), want):
            return f"dropout with {what} is wrong (expected {'zeros' if key == 'p1' else 'x unchanged'})"
    grad, kept = out["grad"], out["grad_out"] != 0
    if tuple(grad.shape) != tuple(small.shape):
        return "no gradient (or one of the wrong shape) reached x"
    if not torch.allclose(grad.to(F64), kept.double() / (1 - p[1]), rtol=1e-9, atol=1e-12):
        return "the gradient of sum(dropout(x)) is not mask / (1 - p)"
    return None


# -- exercise 3: initialization -------------------------------------------------------------------

CASES = [("xavier", "normal"), ("xavier", "uniform"), ("he", "normal"), ("he", "uniform"), (None, None)]


def _init_inputs(g):
    small = torch.randint(80, 121, (len(CASES),), generator=g)
    large = torch.round(small * uniform(g, 1.5, 2.5, len(CASES))).long()
    swap = torch.rand(len(CASES), generator=g) < 0.5
    swap[2], swap[3] = False, True  # He is checked with fan_in < fan_out and with fan_in > fan_out
    return {"fan_in": torch.where(swap, large, small), "fan_out": torch.where(swap, small, large),
            "seeds": _seeds(g, len(CASES) + 1)}


def _init_run(ns, x):
    f, out = ns["init_weight"], {}
    for i, (scheme, dist) in enumerate(CASES):
        fan_in, fan_out, gen = int(x["fan_in"][i]), int(x["fan_out"][i]), _gen(x["seeds"][i])
        out[f"w{i}"] = (f(fan_in, fan_out, generator=gen) if scheme is None  # the defaults: He, normal
                        else f(fan_in, fan_out, scheme, dist, generator=gen))
    out["a"] = f(20, 30, "xavier", "uniform", generator=_gen(x["seeds"][-1]))
    out["b"] = f(20, 30, "xavier", "uniform", generator=_gen(x["seeds"][-1]))
    return out


def _init_check(x, out):
    for i, (scheme, dist) in enumerate(CASES):
        fan_in, fan_out = int(x["fan_in"][i]), int(x["fan_out"][i])
        scheme, dist = scheme or "he", dist or "normal"
        what = f"init_weight({fan_in}, {fan_out}, {scheme!r}, {dist!r})"
        w = out[f"w{i}"]
        if tuple(w.shape) != (fan_out, fan_in) or w.dtype != F32:
            return f"{what}: shape {tuple(w.shape)} {w.dtype}, expected ({fan_out}, {fan_in}) float32"
        w = w.to(F64)
        if not torch.isfinite(w).all():
            return f"{what}: values that are not finite"
        target = ref.init_std(fan_in, fan_out, scheme)
        std = w.std().item()
        if abs(std / target - 1) > 0.06:
            return f"{what}: std {std:.4g}, expected {target:.4g}"
        if abs(w.mean().item()) / target > 0.07:
            return f"{what}: mean {w.mean().item():.3g} is not 0"
        beyond_2 = (w.abs() > 2 * target).double().mean().item()
        within_1 = (w.abs() < target).double().mean().item()
        if dist == "normal" and (abs(beyond_2 - 0.0455) > 0.02 or abs(within_1 - 0.6827) > 0.04):
            return f"{what}: the weights are not normally distributed"
        if dist == "uniform":
            bound, peak = math.sqrt(3) * target, w.abs().max().item()
            if not 0.98 * bound < peak <= bound * (1 + 1e-6) or abs(within_1 - 1 / math.sqrt(3)) > 0.04:
                return f"{what}: the weights are not uniform on [-{bound:.4g}, {bound:.4g}]"
    if tuple(out["a"].shape) != (30, 20) or not torch.equal(out["a"], out["b"]):
        return "two calls with equally seeded generators gave different weights"
    return None


# -- exercise 4: batch normalization --------------------------------------------------------------

BN_RUNS = [(16, 5, 3), (2, 7, 2)]  # (N, C, training steps), each followed by one evaluation step


def _bn_inputs(g):
    x = {}
    for r, (n, c, steps) in enumerate(BN_RUNS):
        x[f"x{r}"] = uniform(g, 0.5, 5.0) * torch.randn(steps + 1, n, c, generator=g, dtype=F64) \
            + 3 * torch.randn(c, generator=g, dtype=F64)
        x[f"gamma{r}"] = torch.randn(c, generator=g, dtype=F64)
        x[f"beta{r}"] = torch.randn(c, generator=g, dtype=F64)
        x[f"rm{r}"] = torch.randn(c, generator=g, dtype=F64)
        x[f"rv{r}"] = uniform(g, 0.5, 2.0, c)
    x["momentum"], x["eps"] = uniform(g, 0.05, 0.5), 10 ** uniform(g, -5, -2)
    x["big"] = 1e4 + torch.randn(64, 3, generator=g)  # float32 around 1e4, spread 1
    x["gx"] = torch.randn(12, 4, generator=g, dtype=F64)
    x["gg"] = uniform(g, 0.5, 1.5, 4)
    x["gb"] = torch.randn(4, generator=g, dtype=F64)
    x["up"] = torch.randn(12, 4, generator=g, dtype=F64)
    return x


def _bn_all(f, x):
    out = {}
    for r, (_, _, steps) in enumerate(BN_RUNS):
        # run 0 with a random momentum and eps, run 1 (N = 2) with the defaults
        kwargs = {"momentum": float(x["momentum"]), "eps": float(x["eps"])} if r == 0 else {}
        rm, rv = x[f"rm{r}"], x[f"rv{r}"]
        for step in range(steps + 1):
            o, rm, rv = f(x[f"x{r}"][step], x[f"gamma{r}"], x[f"beta{r}"], rm, rv, step < steps, **kwargs)
            out[f"out{r}_{step}"], out[f"rm{r}_{step}"], out[f"rv{r}_{step}"] = o, rm, rv
    c = x["big"].shape[1]
    o, _, rv = f(x["big"], torch.ones(c), torch.zeros(c), torch.zeros(c), torch.ones(c), True)
    out["out_big"], out["rv_big"] = o, rv
    up = x["up"]
    zeros, ones = torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64)
    o, grads = _grads(lambda a, b, c: f(a, b, c, zeros, ones, True)[0], (x["gx"], x["gg"], x["gb"]), up)
    out["out_grad"], out["grad_x"], out["grad_gamma"], out["grad_beta"] = o, *grads
    # The running statistics are buffers: no autograd graph, even when x requires gradients.
    _, rm, rv = f(x["gx"].clone().requires_grad_(True), x["gg"], x["gb"], zeros, ones, True)
    out["stats_require_grad"] = torch.tensor(float(rm.requires_grad or rv.requires_grad))
    return out


def _bn_check(x, out):
    # The float32 case against the reference in float64: the answer's rounding is judged, not ours.
    want = _bn_all(ref.batch_norm, {k: v.double() if k == "big" else v for k, v in x.items()})
    want["out_big"], want["rv_big"] = want["out_big"].float(), want["rv_big"].float()
    return compare_outputs(want, out, {"out_big": (0, 1e-2), "rv_big": (0, 1e-2)}, (1e-9, 1e-10))


# -- exercise 5: layer normalization --------------------------------------------------------------

# (shape of x, normalized_shape, affine, eps or None for the default)
LN_CASES = [((3, 7, 16), 16, True, 1e-5), ((2, 3, 5, 6), (5, 6), True, "eps"), ((4, 12), [12], False, 1e-5),
            ((2, 3, 4), (2, 3, 4), True, 1e-6), ((1, 1), 1, False, 1e-5), ((5, 9), (9,), True, 0.1),
            ((3, 8), 8, False, None)]


def _ln_inputs(g):
    x = {}
    for i, (shape, norm, affine, _) in enumerate(LN_CASES):
        dims = [norm] if isinstance(norm, int) else list(norm)
        scale = 1e-3 if i == len(LN_CASES) - 1 else uniform(g, 0.5, 50.0)  # tiny: eps matters
        x[f"x{i}"] = scale * torch.randn(*shape, generator=g, dtype=F64) + uniform(g, -5.0, 5.0)
        if affine:
            x[f"w{i}"] = torch.randn(*dims, generator=g, dtype=F64)
            x[f"b{i}"] = torch.randn(*dims, generator=g, dtype=F64)
    x["eps"] = 10 ** uniform(g, -4, -2)
    x["big"] = 1e4 + torch.randn(6, 256, generator=g)  # float32 around 1e4, spread 1
    x["gx"] = torch.randn(4, 6, generator=g, dtype=F64)
    x["gw"] = torch.randn(6, generator=g, dtype=F64)
    x["gb"] = torch.randn(6, generator=g, dtype=F64)
    x["up"] = torch.randn(4, 6, generator=g, dtype=F64)
    return x


def _ln_all(f, x):
    out = {}
    for i, (_, norm, affine, eps) in enumerate(LN_CASES):
        args = (x[f"w{i}"], x[f"b{i}"]) if affine else ()
        kwargs = {} if eps is None else {"eps": float(x["eps"]) if eps == "eps" else eps}
        out[f"out{i}"] = f(x[f"x{i}"], norm, *args, **kwargs)
    out["out_big"] = f(x["big"], 256)
    out["out_weight_only"] = f(x["gx"], 6, weight=x["gw"])  # each may come without the other
    out["out_bias_only"] = f(x["gx"], 6, bias=x["gb"])
    o, grads = _grads(lambda a, w, b: f(a, 6, w, b), (x["gx"], x["gw"], x["gb"]), x["up"])
    out["out_grad"], out["grad_x"], out["grad_w"], out["grad_b"] = o, *grads
    return out


def _ln_check(x, out):
    want = _ln_all(ref.layer_norm, {k: v.double() if k == "big" else v for k, v in x.items()})
    want["out_big"] = want["out_big"].float()
    return compare_outputs(want, out, {"out_big": (0, 1e-2)}, (1e-9, 1e-10))


PROBES = [
    Probe(
        "ex1_early_stopping_tests",
        inputs=_early_inputs,
        run=lambda ns, x: _early_trace(ns["EarlyStopping"], x),
        check=_early_check,
    ),
    Probe("ex2_dropout_tests", inputs=_dropout_inputs, run=_dropout_run, check=_dropout_check,
          check_inputs_unchanged=True),
    Probe("ex3_init_tests", inputs=_init_inputs, run=_init_run, check=_init_check),
    Probe("ex4_batch_norm_tests", inputs=_bn_inputs, run=lambda ns, x: _bn_all(ns["batch_norm"], x),
          check=_bn_check, check_inputs_unchanged=True),
    Probe("ex5_layer_norm_tests", inputs=_ln_inputs, run=lambda ns, x: _ln_all(ns["layer_norm"], x),
          check=_ln_check, check_inputs_unchanged=True),
]
