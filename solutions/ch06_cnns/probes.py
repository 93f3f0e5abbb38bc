"""Trusted checks for chapter 6 (see grader/probes.py): each exercise again, on secret inputs.

Shapes, strides and paddings are drawn from the generator too and travel as small integer
tensors (``cfg*``), so a student cannot tune an answer to a fixed case.
"""

import math

import torch

from course_lib import cnn as ref
from grader.probes import F32, F64, log_uniform, randint, same_as

# Floats are compared normwise: convolutions sum many terms, so an entry's rounding scales with
# the largest one.

# -- exercise 1: convolution as im2col + matmul ---------------------------------------------------

CONV_CASES = 5  # the last one in float32


def _conv_case(g, i, dtype):
    """One random configuration; case 1 has no bias, case 2 different strides/paddings per axis."""
    kh, kw = randint(g, 1, 5), randint(g, 1, 5)
    if i == 0:
        kh = kw = 3
    sh = sw = randint(g, 1, 3)
    ph = pw = randint(g, 0, 2)
    if i == 2:
        sw, pw = randint(g, 1, 3), randint(g, 0, 2)
    n, c_in, c_out = randint(g, 1, 3), randint(g, 1, 4), randint(g, 1, 5)
    h = randint(g, max(1, kh - 2 * ph), 12)
    w = randint(g, max(1, kw - 2 * pw), 12)
    scale_x, scale_w = log_uniform(g, 0.1, 100), log_uniform(g, 0.1, 10)
    case = {
        f"x{i}": scale_x * torch.randn(n, c_in, h, w, generator=g, dtype=dtype),
        f"w{i}": scale_w * torch.randn(c_out, c_in, kh, kw, generator=g, dtype=dtype),
        f"cfg{i}": torch.tensor([sh, sw, ph, pw, int(i != 1)]),
    }
    case[f"b{i}"] = scale_x * scale_w * torch.randn(c_out, generator=g, dtype=dtype)
    return case


def _conv_inputs(g):
    x = {}
    for i in range(CONV_CASES):
        x.update(_conv_case(g, i, F32 if i == CONV_CASES - 1 else F64))
    # Gradients through the function: stride (2, 1), padding (1, 1), a 3x2 kernel.
    x["gx"] = torch.randn(2, 3, 7, 6, generator=g, dtype=F64)
    x["gw"] = torch.randn(4, 3, 3, 2, generator=g, dtype=F64)
    x["gb"] = torch.randn(4, generator=g, dtype=F64)
    x["gup"] = torch.randn(2, 4, 4, 7, generator=g, dtype=F64)
    return x


def _conv_args(x, i):
    sh, sw, ph, pw, has_bias = (int(v) for v in x[f"cfg{i}"])
    stride = sh if sh == sw else (sh, sw)
    padding = ph if ph == pw else (ph, pw)
    return x[f"x{i}"], x[f"w{i}"], (x[f"b{i}"] if has_bias else None), stride, padding


def _conv_outputs(conv, x):
    """Case 0 to 4, then gradients; the inputs' own tensors are passed (check_inputs_unchanged)."""
    out = {}
    for i in range(CONV_CASES):
        inp, weight, bias, stride, padding = _conv_args(x, i)
        out[f"out{i}"] = conv(inp, weight, bias, stride=stride, padding=padding)
    leaves = [x[k].clone().requires_grad_(True) for k in ("gx", "gw", "gb")]
    y = conv(*leaves, stride=(2, 1), padding=(1, 1))
    grads = torch.autograd.grad((y * x["gup"]).sum(), leaves)
    out.update({"grad_y": y.detach(), "grad_x": grads[0], "grad_w": grads[1], "grad_b": grads[2]})
    return out


CONV_TOL = {f"out{CONV_CASES - 1}": (1e-4, 1e-6)}  # float32, normwise


# -- exercise 2: max-pooling ----------------------------------------------------------------------

POOL_CASES = 8


def _pool_inputs(g):
    x = {}
    # (kernel or None for random, stride: 0 = None / -1 = random, padding: -1 = random, dtype)
    # the last two: a stride larger than the kernel, and an even kernel with padding k / 2
    plan = [(2, 0, 0, F32), (3, 2, 1, F64), (3, 0, 1, F32), (None, -1, -1, F64), (None, -1, -1, F32),
            (None, 0, -1, F64), (None, -3, -1, F64), (4, 2, 2, F32)]
    for i, (k, s, p, dtype) in enumerate(plan):
        k = randint(g, 1, 5) if k is None else k
        s = randint(g, 1, 3) if s == -1 else randint(g, k + 1, k + 2) if s == -3 else s
        p = randint(g, 0, k // 2) if p == -1 else p
        h, w = randint(g, max(1, k - 2 * p), 11), randint(g, max(1, k - 2 * p), 11)
        n, c = randint(g, 1, 3), randint(g, 1, 4)
        x[f"x{i}"] = log_uniform(g, 0.1, 100) * (torch.randn(n, c, h, w, generator=g, dtype=dtype) - 2.0)
        x[f"cfg{i}"] = torch.tensor([k, s, p])
    # Infinite values: every window all -inf but for one cell, and one +inf.
    side = 2 * randint(g, 2, 4)
    inf = torch.full((1, 2, side, side), -math.inf)
    rows = torch.randint(0, 2, (2, side // 2, side // 2), generator=g)
    cols = torch.randint(0, 2, (2, side // 2, side // 2), generator=g)
    for c in range(2):
        for a in range(side // 2):
            for b in range(side // 2):
                value = -10 * float(torch.rand(1, generator=g))
                inf[0, c, 2 * a + rows[c, a, b], 2 * b + cols[c, a, b]] = value
    inf[0, 1, randint(g, 0, side - 1), randint(g, 0, side - 1)] = math.inf
    x["inf"] = inf
    # All -inf but one cell, pooled with padding: the padded windows of -inf cells give -inf.
    inf_pad = torch.full((1, 2, 2 * randint(g, 2, 3) + 1, randint(g, 4, 7)), -math.inf, dtype=F64)
    inf_pad[0, 1, randint(g, 0, inf_pad.shape[2] - 1), randint(g, 0, inf_pad.shape[3] - 1)] = 1.0
    x["inf_pad"] = inf_pad
    return x


def _pool_outputs(pool, x):
    out = {}
    for i in range(POOL_CASES):
        k, s, p = (int(v) for v in x[f"cfg{i}"])
        out[f"out{i}"] = pool(x[f"x{i}"], k, stride=None if s == 0 else s, padding=p)
    out["out_inf"] = pool(x["inf"], 2)
    out["out_inf_pad"] = pool(x["inf_pad"], 3, stride=2, padding=1)
    return out


# -- exercise 3: receptive field ------------------------------------------------------------------

RF_CASES, RF_DEPTH = 40, 7


def _rf_inputs(g):
    lengths = torch.randint(1, RF_DEPTH + 1, (RF_CASES,), generator=g)
    lengths[0] = 0  # no layers at all
    return {
        "kernels": torch.randint(1, 8, (RF_CASES, RF_DEPTH), generator=g),
        "strides": torch.randint(1, 5, (RF_CASES, RF_DEPTH), generator=g),
        "lengths": lengths,
    }


def _rf_layers(x):
    return [
        [(int(k), int(s)) for k, s in zip(ks[:n], ss[:n], strict=True)]
        for ks, ss, n in zip(x["kernels"], x["strides"], x["lengths"].tolist(), strict=True)
    ]


def _rf_all(f, x):
    return torch.tensor([int(f(layers)) for layers in _rf_layers(x)], dtype=torch.int64)


# -- exercise 4: the digits CNN -------------------------------------------------------------------


def _cnn_shapes(w):
    return [(w, 1, 3, 3), (w,), (w, w, 3, 3), (w,), (2 * w, w, 3, 3), (2 * w,), (10, 8 * w), (10,)]


def _cnn_inputs(g):
    w, batch = randint(g, 2, 9), randint(g, 1, 8)
    x = {"width": torch.tensor(w), "images": torch.rand(batch, 1, 8, 8, generator=g, dtype=F64),
         "noise": 2 * torch.randn(batch, 1, 8, 8, generator=g, dtype=F64),
         "up": torch.randn(batch, 10, generator=g, dtype=F64)}
    for i, shape in enumerate(_cnn_shapes(w)):
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 3
        x[f"p{i}"] = torch.randn(shape, generator=g, dtype=F64) / math.sqrt(fan_in) * 1.5
    return x


def _cnn_outputs(cls, x):
    model = cls(int(x["width"])).double()
    params = list(model.parameters())
    out = {"n_params": torch.tensor(sum(p.numel() for p in params), dtype=torch.int64)}
    with torch.no_grad():
        for i, p in enumerate(params):
            if f"p{i}" not in x or tuple(p.shape) != tuple(x[f"p{i}"].shape):
                raise ValueError(f"parameter {i} has shape {tuple(p.shape)}, unlike the reference's")
            p.copy_(x[f"p{i}"])
    if len(params) != len([k for k in x if k.startswith("p") and k[1:].isdigit()]):
        raise ValueError(f"{len(params)} parameter tensors, expected 8")
    model.eval()
    out["out_noise_eval"] = model(x["noise"])
    model.train()
    out["out_noise"] = model(x["noise"])
    logits = model(x["images"])
    out["out_images"] = logits
    for i, grad in enumerate(torch.autograd.grad((logits * x["up"]).sum(), params)):
        out[f"grad{i}"] = grad
    return out


# -- exercise 5: the residual block ---------------------------------------------------------------

# (in == out channels?, stride): identity, projection for channels, for both, for the stride alone
BLOCK_PLAN = [(True, 1), (False, 1), (False, 2), (True, 2), (True, 3)]


def _bn_state(g, prefix, c):
    return {
        f"{prefix}.weight": 0.5 + torch.rand(c, generator=g, dtype=F64),
        f"{prefix}.bias": torch.rand(c, generator=g, dtype=F64) - 0.5,
        f"{prefix}.running_mean": torch.rand(c, generator=g, dtype=F64) - 0.5,
        f"{prefix}.running_var": 0.5 + 1.5 * torch.rand(c, generator=g, dtype=F64),
        f"{prefix}.num_batches_tracked": torch.tensor(randint(g, 0, 50), dtype=torch.int64),
    }


def _block_inputs(g):
    x = {}
    for i, (same, stride) in enumerate(BLOCK_PLAN):
        c_in = randint(g, 2, 6)
        c_out = c_in if same else c_in + randint(g, 1, 4)
        state = {"conv1.weight": torch.randn(c_out, c_in, 3, 3, generator=g, dtype=F64) / (3 * c_in**0.5)}
        state.update(_bn_state(g, "bn1", c_out))
        state["conv2.weight"] = torch.randn(c_out, c_out, 3, 3, generator=g, dtype=F64) / (3 * c_out**0.5)
        state.update(_bn_state(g, "bn2", c_out))
        if not same or stride != 1:
            state["shortcut.0.weight"] = torch.randn(c_out, c_in, 1, 1, generator=g, dtype=F64)
            state.update(_bn_state(g, "shortcut.1", c_out))
        x.update({f"b{i}:{k}": v for k, v in state.items()})
        size = randint(g, 4, 9)
        x[f"x{i}"] = torch.randn(randint(g, 2, 4), c_in, size, size, generator=g, dtype=F64)
        x[f"cfg{i}"] = torch.tensor([c_in, c_out, stride])
    return x


def _block_outputs(cls, x):
    out = {}
    for i in range(len(BLOCK_PLAN)):
        c_in, c_out, stride = (int(v) for v in x[f"cfg{i}"])
        block = cls(c_in, c_out, stride).double()
        prefix = f"b{i}:"
        block.load_state_dict({k[len(prefix):]: v.clone() for k, v in x.items() if k.startswith(prefix)},
                              strict=True)
        names = [n for n, _ in block.named_parameters()]
        for mode in ("eval", "train"):
            block.train(mode == "train")
            leaf = x[f"x{i}"].clone().requires_grad_(True)
            y = block(leaf)
            out[f"out{i}_{mode}"] = y
            up = torch.cos(torch.arange(y.numel(), dtype=F64)).view(y.shape)  # fixed, not all-ones
            grads = torch.autograd.grad((y * up).sum(), [leaf, *block.parameters()])
            out[f"grad{i}_{mode}_input"] = grads[0]
            for name, grad in zip(names, grads[1:], strict=True):
                out[f"grad{i}_{mode}_{name}"] = grad
        for name, buffer in block.named_buffers():
            out[f"buf{i}_{name}"] = buffer
    return out


PROBES = [
    same_as("ex1_conv2d_tests", ref.conv2d_unfold, _conv_inputs, _conv_outputs, rtol=1e-9, atol=1e-12,
            tolerances=CONV_TOL, normwise=True, check_inputs_unchanged=True),
    same_as("ex2_max_pool_tests", ref.max_pool2d, _pool_inputs, _pool_outputs, rtol=0, atol=0, normwise=True,
            check_inputs_unchanged=True),
    same_as("ex3_receptive_field_tests", ref.receptive_field, _rf_inputs, _rf_all, rtol=0, atol=0),
    same_as("ex4_digits_cnn_tests", ref.DigitsCNN, _cnn_inputs, _cnn_outputs, rtol=1e-9, atol=1e-12,
            normwise=True),
    same_as("ex5_residual_block_tests", ref.ResidualBlock, _block_inputs, _block_outputs, rtol=1e-8,
            atol=1e-12, normwise=True),
]
