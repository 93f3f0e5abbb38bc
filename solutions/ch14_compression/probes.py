"""Trusted checks for chapter 14 (see grader/probes.py): each exercise again, on secret inputs.

Sizes, sparsities, temperatures and bit widths are drawn from the generator and travel as small
tensors (``cfg*``), so an answer cannot be tuned to a fixed case. Quantization codes are compared
with :func:`course_lib.compression.codes_mismatch`: exactly, except for one code of slack where
``w / scale`` lies within 1e-3 of a half-integer (another correct formula may round the other way).
"""

import torch

from course_lib import compression as ref
from grader.probes import F32, F64, Probe, randint, same_as, uniform

# -- exercise 1: the global magnitude mask ----------------------------------------------------------

N_MASK = 8


def _mask_inputs(g):
    x = {}
    for i in range(N_MASK):
        n = randint(g, 1, 4)
        dtype = F64 if i % 2 else F32
        for j in range(n):
            shape = tuple(randint(g, 1, 8) for _ in range(randint(g, 1, 3)))
            w = torch.randn(shape, generator=g, dtype=dtype) * float(uniform(g, 0.1, 10.0))
            if i % 3 == 0:
                w = torch.round(w * 2) / 2  # ties at the threshold
            x[f"w{i}_{j}"] = w
        sparsity = [0.0, 1.0][i] if i < 2 else float(uniform(g, 0.0, 1.0))
        x[f"cfg{i}"] = torch.tensor([n, sparsity], dtype=F64)
    # float64 weights that float32 cannot tell apart: the threshold must be kept in float64.
    base = 1.0 + float(uniform(g, 0.0, 1.0))
    x[f"w{N_MASK}_0"] = torch.tensor([base + 1e-12, base * 0.5, base + 2e-12, base - 3e-12], dtype=F64)
    x[f"cfg{N_MASK}"] = torch.tensor([1, 0.5], dtype=F64)
    return x


def _mask_outputs(f, x):
    out = {}
    for i in range(N_MASK + 1):
        n, sparsity = int(x[f"cfg{i}"][0]), float(x[f"cfg{i}"][1])
        masks = f([x[f"w{i}_{j}"] for j in range(n)], sparsity)
        for j, m in enumerate(masks):
            out[f"out{i}_{j}"] = m
    return out


# -- exercise 2: the distillation loss --------------------------------------------------------------

N_DISTILL = 6


def _distill_inputs(g):
    x = {}
    for i in range(N_DISTILL):
        n, v = randint(g, 1, 8), randint(g, 2, 50)
        scale = [1.0, 4.0, 20.0][i % 3]
        x[f"s{i}"] = scale * torch.randn(n, v, generator=g, dtype=F64)
        x[f"t{i}"] = scale * torch.randn(n, v, generator=g, dtype=F64)
        x[f"y{i}"] = torch.randint(0, v, (n,), generator=g)
        alpha = float(i % 2) if i < 2 else float(uniform(g, 0.0, 1.0))
        x[f"cfg{i}"] = torch.tensor([float(uniform(g, 0.5, 8.0)), alpha], dtype=F64)
    return x


def _distill_outputs(f, x):
    out = {}
    for i in range(N_DISTILL):
        s = x[f"s{i}"].clone().requires_grad_()
        t = x[f"t{i}"].clone().requires_grad_()
        temperature, alpha = (float(v) for v in x[f"cfg{i}"])
        loss = f(s, t, x[f"y{i}"], temperature, alpha)
        loss.backward()
        out[f"out{i}"] = loss.detach()
        out[f"grad{i}"] = s.grad
        out[f"teacher_grad{i}"] = torch.tensor(0.0 if t.grad is None else 1.0)
    s32 = x["s0"].float().clone().requires_grad_()
    out["out_f32"] = f(s32, x["t0"].float(), x["y0"], 2.0, 0.5).detach()
    return out


# -- exercises 3-5: quantization, compared code by code ---------------------------------------------


def _matrices(g, i, cols_multiple=1):
    rows = randint(g, 1, 16)
    cols = cols_multiple * randint(g, 1, 40 // cols_multiple + 1)
    w = torch.randn(rows, cols, generator=g) * 10 ** (4 * torch.rand(rows, 1, generator=g) - 2)
    if i % 2:
        w[randint(g, 0, rows - 1)] = 0
    if i % 3 == 0:
        w[:, 0] = -2 * w.abs().amax(1)  # the largest magnitude negative
    return w


N_INT8 = 5


def _int8_inputs(g):
    x = {f"w{i}": _matrices(g, i) for i in range(N_INT8)}
    x["q"] = torch.randint(-127, 128, (randint(g, 1, 9), randint(g, 1, 20)), generator=g, dtype=torch.int8)
    x["s"] = torch.rand(x["q"].shape[0], generator=g) + 0.01
    return x


def _int8_run(ns, x):
    out = {}
    for i in range(N_INT8):
        q, scale = ns["quantize_int8_per_channel"](x[f"w{i}"])
        out[f"q{i}"], out[f"scale{i}"] = q, scale
    out["deq"] = ns["dequantize_int8"](x["q"], x["s"])
    return out


def _check_scale_and_dtype(got, want, key, dtype):
    if got[key].dtype != dtype:
        return f"{key}: dtype {got[key].dtype}, expected {dtype}"
    if tuple(got[key].shape) != tuple(want.shape):
        return f"{key}: shape {tuple(got[key].shape)}, expected {tuple(want.shape)}"
    if not torch.allclose(got[key].double(), want.double(), rtol=1e-6, atol=0):
        return f"{key}: differs from the reference"
    return None


def _int8_check(x, got):
    for i in range(N_INT8):
        w = x[f"w{i}"]
        q, scale = ref.quantize_int8_per_channel(w)
        why = _check_scale_and_dtype(got, scale, f"scale{i}", torch.float32)
        if why is None and got[f"q{i}"].dtype != torch.int8:
            why = f"codes of dtype {got[f'q{i}'].dtype}, expected int8"
        why = why or ref.codes_mismatch(got[f"q{i}"], q, w / scale[:, None])
        if why is not None:
            return f"quantize_int8_per_channel (case {i}): {why}"
    return _check_scale_and_dtype(got, ref.dequantize_int8(x["q"], x["s"]), "deq", torch.float32)


N_INT4 = 5


def _int4_inputs(g):
    x = {}
    for i in range(N_INT4):
        group = 2 * randint(g, 1, 16)
        w = _matrices(g, i, group)
        x[f"w{i}"], x[f"cfg{i}"] = w, torch.tensor([group])
    x["packed"] = torch.randint(0, 256, (randint(g, 1, 6), 12), generator=g, dtype=torch.uint8)
    x["pscales"] = torch.rand(x["packed"].shape[0], 4, generator=g) + 0.01
    return x


def _int4_run(ns, x):
    out = {}
    for i in range(N_INT4):
        packed, scales = ns["quantize_int4_grouped"](x[f"w{i}"], int(x[f"cfg{i}"][0]))
        out[f"packed{i}"], out[f"scales{i}"] = packed, scales
    out["deq"] = ns["dequantize_int4_grouped"](x["packed"], x["pscales"], 6)
    return out


def _int4_check(x, got):
    for i in range(N_INT4):
        w, group = x[f"w{i}"], int(x[f"cfg{i}"][0])
        packed, scales = ref.quantize_int4_grouped(w, group)
        why = _check_scale_and_dtype(got, scales, f"scales{i}", torch.float32)
        g_packed = got[f"packed{i}"]
        if why is None and (g_packed.dtype != torch.uint8 or g_packed.shape != packed.shape):
            why = (f"packed codes {g_packed.dtype} {tuple(g_packed.shape)}, "
                   f"expected uint8 {tuple(packed.shape)}")
        if why is None:
            ratio = (w.reshape(w.shape[0], -1, group) / scales[..., None]).reshape(w.shape)
            got_codes = ref.unpack_int4(g_packed).long() - 8
            why = ref.codes_mismatch(got_codes, ref.unpack_int4(packed).long() - 8, ratio)
        if why is not None:
            return f"quantize_int4_grouped (case {i}, group size {group}): {why}"
    return _check_scale_and_dtype(got, ref.dequantize_int4_grouped(x["packed"], x["pscales"], 6), "deq",
                                  torch.float32)


N_FAKE = 6


def _fake_inputs(g):
    x = {}
    for i in range(N_FAKE):
        w = _matrices(g, i)
        x[f"w{i}"] = w.double() if i % 2 else w
        x[f"up{i}"] = torch.randn(w.shape, generator=g, dtype=x[f"w{i}"].dtype)
        x[f"cfg{i}"] = torch.tensor([randint(g, 2, 8)])
    return x


def _fake_run(ns, x):
    out = {}
    for i in range(N_FAKE):
        leaf = x[f"w{i}"].clone().requires_grad_()
        value = ns["fake_quantize"](leaf, int(x[f"cfg{i}"][0]))
        value.backward(x[f"up{i}"])
        out[f"value{i}"], out[f"grad{i}"] = value.detach(), leaf.grad
    return out


def _fake_check(x, got):
    for i in range(N_FAKE):
        w, bits = x[f"w{i}"], int(x[f"cfg{i}"][0])
        qmax = 2 ** (bits - 1) - 1
        amax = w.abs().amax(1, keepdim=True)
        scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
        want = ref.fake_quantize(w, bits)
        value, grad = got[f"value{i}"], got[f"grad{i}"]
        if value.dtype != w.dtype or value.shape != w.shape:
            return f"case {i}: value {value.dtype} {tuple(value.shape)}, expected {w.dtype} {tuple(w.shape)}"
        codes, want_codes = torch.round(value / scale), torch.round(want / scale)
        why = ref.codes_mismatch(codes, want_codes, w / scale)
        if why is not None:
            return f"case {i} ({bits} bits): {why}"
        same_code = codes == want_codes
        if not torch.allclose(value[same_code].double(), want[same_code].double(), rtol=1e-6, atol=0):
            return f"case {i}: values are not code x scale"
        if grad is None or grad.shape != w.shape or not torch.equal(grad, x[f"up{i}"]):
            return f"case {i}: the gradient is not the upstream gradient (straight-through)"
    return None


PROBES = [
    same_as("ex1_global_mask_tests", ref.global_magnitude_masks, _mask_inputs, _mask_outputs, rtol=0, atol=0,
            same_dtype="out", check_inputs_unchanged=True),
    same_as("ex2_distillation_loss_tests", ref.distillation_loss, _distill_inputs, _distill_outputs,
            rtol=1e-9, atol=1e-11, tolerances={"out_f32": (1e-5, 1e-6)}, same_dtype="out",
            check_inputs_unchanged=True),
    Probe("ex3_int8_per_channel_tests", inputs=_int8_inputs, run=_int8_run, check=_int8_check,
          check_inputs_unchanged=True),
    Probe("ex4_int4_grouped_tests", inputs=_int4_inputs, run=_int4_run, check=_int4_check,
          check_inputs_unchanged=True),
    Probe("ex5_fake_quantize_tests", inputs=_fake_inputs, run=_fake_run, check=_fake_check,
          check_inputs_unchanged=True),
]
