"""Trusted checks for chapter 2 (see grader/probes.py): each exercise again, on secret inputs."""

import torch
from torch import nn

from course_lib import activations as ref
from grader.probes import F32, F64, Probe, compare_outputs, randint, uniform

DERIVATIVES = ("relu", "leaky_relu", "sigmoid", "tanh", "gelu", "silu")


def _compare(got, want, rtol, atol, what, dtype=None):
    """Why ``got`` is not ``want`` within the tolerances (compared in float64), or None."""
    if dtype is not None and got.dtype != dtype:
        return f"{what}: dtype {got.dtype}, expected {dtype}"
    return compare_outputs({what: want}, {what: got}, default=(rtol, atol), same_dtype=None)


def _first_failure(reasons):
    return next((r for r in reasons if r is not None), None)


def _params_changed(model, before):
    """The largest change the call made to the model's parameters (0 when it changed none)."""
    return max([(b.to(F64) - p.detach().to(F64)).abs().max().item()
                for b, p in zip(before, model.parameters(), strict=True) if b.numel()] or [0.0])


# -- exercise 1: collapse_linear --------------------------------------------------------------


def _stack_inputs(g, prefix, sizes, dtype):
    out = {}
    for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        out[f"{prefix}W{i}"] = torch.randn(m, n, generator=g, dtype=dtype) / m**0.5
        out[f"{prefix}b{i}"] = torch.randn(n, generator=g, dtype=dtype)
    return out


def _sizes(g, n_layers, low=1, high=11):
    return torch.randint(low, high, (n_layers + 1,), generator=g).tolist()


def _collapse_inputs(g):
    deep = randint(g, 2, 8)
    short = randint(g, 1, 3)
    return {**_stack_inputs(g, "a", _sizes(g, deep), F64), **_stack_inputs(g, "b", _sizes(g, short), F32),
            **_stack_inputs(g, "c", _sizes(g, 1), F64)}


def _stack(x, prefix):
    n = sum(1 for k in x if k.startswith(f"{prefix}W"))
    return [x[f"{prefix}W{i}"] for i in range(n)], [x[f"{prefix}b{i}"] for i in range(n)]


def _collapse_run(ns, x):
    out = {}
    for prefix in "abc":
        w, b = ns["collapse_linear"](*_stack(x, prefix))
        out[f"{prefix}_W"], out[f"{prefix}_b"] = w.clone(), b.clone()
        # The result must be new tensors: changing it must not change the given layers (which
        # check_inputs_unchanged compares), also for the single layer of stack c.
        w.add_(1.0)
        b.add_(1.0)
    return out


def _collapse_check(x, out):
    reasons = []
    cases = [("a", F64, 1e-9, 1e-10), ("b", F32, 1e-4, 1e-5), ("c", F64, 1e-9, 1e-10)]
    for prefix, dtype, rtol, atol in cases:
        weights, biases = _stack(x, prefix)
        w, b = ref.collapse_linear([t.to(F64) for t in weights], [t.to(F64) for t in biases])
        layers = " -> ".join(str(t.shape[0]) for t in weights) + f" -> {weights[-1].shape[1]}"
        what = f"layers {layers} ({dtype})"
        reasons += [
            _compare(out[f"{prefix}_W"], w, rtol, atol, f"W for {what}", dtype),
            _compare(out[f"{prefix}_b"], b, rtol, atol, f"b for {what}", dtype),
        ]
    return _first_failure(reasons)


# -- exercise 2: stable_sigmoid ---------------------------------------------------------------

EDGES = [-1e4, 1e4, -88.5, 88.5, -89.5, 89.5, -709.5, 709.5, -745.5, 745.5,
         -1e-3, 1e-3, -1e-30, 1e-30, -40.0, 40.0, -50.0, 50.0, -300.0, 300.0]


def _sigmoid_points(g, dtype):
    # No exact 0: there the slope of a correct answer written with abs() is autograd's choice.
    x = torch.cat([1600 * torch.rand(1000, generator=g, dtype=dtype) - 800,
                   10 * torch.randn(500, generator=g, dtype=dtype),
                   torch.tensor(EDGES, dtype=dtype)])
    return x[torch.randperm(len(x), generator=g)].reshape(-1, 4)


def _sigmoid_run(ns, x):
    out = {}
    for key in ("x32", "x64"):
        value = ns["stable_sigmoid"](x[key])
        leaf = x[key].clone().requires_grad_(True)
        ns["stable_sigmoid"](leaf).sum().backward()
        out[f"{key}_value"], out[f"{key}_grad"] = value, leaf.grad
    return out


def _sigmoid_check(x, out):
    reasons = []
    for key, dtype, rtol, grad_atol in [("x32", F32, 2e-6, 1e-6), ("x64", F64, 1e-12, 1e-14)]:
        x64 = x[key].to(F64)
        value = ref.stable_sigmoid(x64)
        slope = (value * ref.stable_sigmoid(-x64)).to(dtype)
        tiny = torch.finfo(dtype).tiny
        reasons += [
            _compare(out[f"{key}_value"], value, rtol, tiny, f"stable_sigmoid ({dtype})", dtype),
            _compare(out[f"{key}_grad"], slope, 1e-4, grad_atol, f"autograd's gradient ({dtype})", dtype),
        ]
    return _first_failure(reasons)


# -- exercise 3: gelu -------------------------------------------------------------------------


def _gelu_inputs(g):
    extremes = torch.tensor([-1e4, -300.0, -50.0, -10.0, -1e-20, 0.0, 1e-20, 10.0, 50.0, 300.0, 1e4])
    return {
        "x64": 4 * torch.randn(7, 30, generator=g, dtype=F64),
        "x32": torch.cat([5 * torch.randn(117, generator=g), extremes]).reshape(2, 4, 16),
    }


def _gelu_run(ns, x):
    out = {}
    for key in ("x64", "x32"):
        out[f"{key}_none"] = ns["gelu"](x[key])
        out[f"{key}_tanh"] = ns["gelu"](x[key], approximate="tanh")
    return out


def _gelu_check(x, out):
    reasons = []
    for key, dtype, rtol, atol in [("x64", F64, 1e-10, 1e-12), ("x32", F32, 1e-5, 1e-6)]:
        for form in ("none", "tanh"):
            want = ref.gelu(x[key].to(F64), approximate=form)
            reasons.append(_compare(out[f"{key}_{form}"], want, rtol, atol,
                                    f"gelu(x, approximate={form!r}) ({dtype})", dtype))
    return _first_failure(reasons)


# -- exercise 4: activation_derivative --------------------------------------------------------


def _derivative_inputs(g):
    zeros = torch.tensor([0.0, -0.0, 30.0, -30.0, 1e-8, -1e-8], dtype=F64)
    x64 = torch.cat([4 * torch.randn(200, generator=g, dtype=F64), zeros])
    x32 = torch.cat([3 * torch.randn(114, generator=g), torch.tensor([0.0, 0.0, -0.0, 30.0, -30.0, 2.5])])
    return {
        "x64": x64[torch.randperm(len(x64), generator=g)],
        "x32": x32[torch.randperm(len(x32), generator=g)].reshape(12, 10),
        "slope": uniform(g, 0.05, 0.5),
    }


def _derivative_run(ns, x):
    out = {}
    f = ns["activation_derivative"]
    for key in ("x64", "x32"):
        for name in DERIVATIVES:
            out[f"{key}_{name}"] = f(name, x[key])
        out[f"{key}_leaky_slope"] = f("leaky_relu", x[key], negative_slope=float(x["slope"]))
    return out


def _derivative_check(x, out):
    reasons = []
    slope = float(x["slope"])
    for key, dtype, tol in [("x64", F64, 1e-8), ("x32", F32, 1e-5)]:
        x64 = x[key].to(F64)
        wants = {name: ref.activation_derivative(name, x64) for name in DERIVATIVES}
        wants["leaky_slope"] = ref.activation_derivative("leaky_relu", x64, negative_slope=slope)
        for name, want in wants.items():
            label = f"leaky_relu (negative_slope={slope:.3f})" if name == "leaky_slope" else name
            reasons.append(_compare(out[f"{key}_{name}"], want, tol, tol, f"{label}' ({dtype})", dtype))
    return _first_failure(reasons)


# -- networks built from the inputs (exercises 5 and 6) ---------------------------------------


def _linear_inputs(g, prefix, sizes, dtype, bias_shift=0.0, bias=True):
    out = {}
    for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        out[f"{prefix}W{i}"] = torch.randn(n, m, generator=g, dtype=dtype) * (2 / m) ** 0.5
        if bias:
            out[f"{prefix}b{i}"] = 0.5 * torch.randn(n, generator=g, dtype=dtype) - bias_shift
    return out


def _load(model, x, prefix):
    """Copy the weights (nn.Linear layout) named ``prefix``W0, ``prefix``b0, ... into the
    nn.Linear modules of ``model``, in model.modules() order."""
    with torch.no_grad():
        for i, layer in enumerate(m for m in model.modules() if isinstance(m, nn.Linear)):
            layer.weight.copy_(x[f"{prefix}W{i}"])
            if layer.bias is not None:
                layer.bias.copy_(x[f"{prefix}b{i}"])
    return model


def _sequential(x, prefix, activations, dtype):
    """A flat nn.Sequential: Linear, activation, Linear, ..., Linear, sized by the inputs."""
    n = sum(1 for k in x if k.startswith(f"{prefix}W"))
    layers = []
    with torch.random.fork_rng(devices=[]):  # nn.Linear's own init draws from the global RNG
        for i in range(n):
            n_out, n_in = x[f"{prefix}W{i}"].shape
            layers.append(nn.Linear(n_in, n_out, dtype=dtype))
            if i < n - 1:
                layers.append(activations[i % len(activations)]())
    return _load(nn.Sequential(*layers), x, prefix)


# -- exercise 5: layer_grad_norms -------------------------------------------------------------


def _nested(x):
    """Nested containers, a layer without bias (its weights: nW0, nb0, nW1, nW2, nb2, ...) and a
    LayerNorm."""
    with torch.random.fork_rng(devices=[]):
        model = nn.Sequential(
            nn.Sequential(nn.Linear(5, 7, dtype=F64), nn.ReLU()), nn.Linear(7, 7, bias=False, dtype=F64),
            nn.GELU(), nn.LayerNorm(7, dtype=F64),  # a weight that is not an nn.Linear's
            nn.Sequential(nn.Linear(7, 6, dtype=F64), nn.Tanh(), nn.Linear(6, 3, dtype=F64)))
    return _load(model, x, "n")


def _grad_norm_models(x):
    depth_net = _sequential(x, "d", [nn.Sigmoid], F32)  # deep sigmoid net: tiny first-layer gradients
    return {"nested": (_nested(x), x["n_x"], x["n_y"]), "deep": (depth_net, x["d_x"], x["d_y"])}


def _grad_norm_inputs(g):
    depth = randint(g, 6, 11)
    nested = _linear_inputs(g, "n", [5, 7, 7, 6, 3], F64)
    del nested["nb1"]  # the second linear layer has no bias
    return {
        **nested,
        "n_x": torch.randn(32, 5, generator=g, dtype=F64),
        "n_y": torch.randint(0, 3, (32,), generator=g),
        **_linear_inputs(g, "d", [5] + [16] * depth + [3], F32),
        "d_x": torch.randn(32, 5, generator=g),
        "d_y": torch.randint(0, 3, (32,), generator=g),
    }


def _grad_norm_run(ns, x):
    out = {}
    for name, (model, inputs, labels) in _grad_norm_models(x).items():
        for p in model.parameters():  # left-over gradients that must not leak into the result
            p.grad = torch.full_like(p, 3.0)
        before = [p.detach().clone() for p in model.parameters()]
        out[f"{name}_first"] = ns["layer_grad_norms"](model, inputs, labels)
        out[f"{name}_second"] = ns["layer_grad_norms"](model, inputs, labels)
        out[f"{name}_params_changed"] = _params_changed(model, before)
    return out


def _grad_norm_check(x, out):
    reasons = []
    for name, (model, inputs, labels) in _grad_norm_models(x).items():
        want = ref.layer_grad_norms(model, inputs, labels)
        reasons += [
            _compare(out[f"{name}_first"], want, 1e-4, 1e-12, f"layer_grad_norms ({name} net)"),
            _compare(out[f"{name}_second"], want, 1e-4, 1e-12, f"a second call ({name} net)"),
            None if out[f"{name}_params_changed"].item() == 0 else f"the parameters changed ({name} net)",
        ]
    return _first_failure(reasons)


# -- exercise 6: dead_relu_fraction -----------------------------------------------------------

MIXED = [nn.ReLU, nn.Tanh, nn.LeakyReLU, nn.ReLU, nn.ReLU]


def _dead_inputs(g):
    width = randint(g, 8, 32)
    shift = 0.5 + 1.5 * torch.rand((), generator=g).item()  # lowered biases: some units die
    return {
        **_linear_inputs(g, "a", [6] + [width] * 5 + [3], F64, bias_shift=shift),
        "a_x": torch.randn(randint(g, 20, 64), 6, generator=g, dtype=F64),
        **_linear_inputs(g, "b", [6, 32, 32, 3], F64, bias_shift=0.3),
        "b_x": torch.randn(1, 6, generator=g, dtype=F64),  # a batch of one example
        **_linear_inputs(g, "c", [6, 8, 8, 3], F64),
        "c_x": torch.randn(10, 6, generator=g, dtype=F64),  # no ReLU at all
    }


def _dead_models(x):
    return {"mixed": (_sequential(x, "a", MIXED, F64), x["a_x"]),
            "one_example": (_sequential(x, "b", [nn.ReLU], F64), x["b_x"]),
            "no_relu": (_sequential(x, "c", [nn.Tanh], F64), x["c_x"])}


def _dead_run(ns, x):
    out = {}
    for name, (model, inputs) in _dead_models(x).items():
        before = [p.detach().clone() for p in model.parameters()]
        out[name] = ns["dead_relu_fraction"](model, inputs)
        out[f"{name}_again"] = ns["dead_relu_fraction"](model, inputs)  # no hooks left to double it
        out[f"{name}_hooks"] = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
        out[f"{name}_params_changed"] = _params_changed(model, before)
    return out


def _dead_check(x, out):
    reasons = []
    for name, (model, inputs) in _dead_models(x).items():
        want = ref.dead_relu_fraction(model, inputs)
        reasons += [
            _compare(out[name], want, 0, 1e-6, f"dead_relu_fraction ({name})"),
            _compare(out[f"{name}_again"], want, 0, 1e-6, f"a second call of dead_relu_fraction ({name})"),
            None if out[f"{name}_hooks"].item() == 0 else f"hooks left on the model ({name})",
            None if out[f"{name}_params_changed"].item() == 0 else f"the parameters changed ({name})",
        ]
    return _first_failure(reasons)


# Exercises 1 to 4 get the input tensors themselves, which must come back unchanged; 5 and 6 get
# models built from the inputs, whose parameters their runs check.
PROBES = [
    Probe("ex1_collapse_linear_tests", inputs=_collapse_inputs, run=_collapse_run, check=_collapse_check,
          check_inputs_unchanged=True),
    Probe(
        "ex2_stable_sigmoid_tests",
        inputs=lambda g: {"x32": _sigmoid_points(g, F32), "x64": _sigmoid_points(g, F64)},
        run=_sigmoid_run,
        check=_sigmoid_check,
        check_inputs_unchanged=True,
    ),
    Probe("ex3_gelu_tests", inputs=_gelu_inputs, run=_gelu_run, check=_gelu_check,
          check_inputs_unchanged=True),
    Probe("ex4_derivatives_tests", inputs=_derivative_inputs, run=_derivative_run, check=_derivative_check,
          check_inputs_unchanged=True),
    Probe("ex5_layer_grad_norms_tests", inputs=_grad_norm_inputs, run=_grad_norm_run, check=_grad_norm_check),
    Probe("ex6_dead_relu_fraction_tests", inputs=_dead_inputs, run=_dead_run, check=_dead_check),
]
