"""course_lib.compression: pruning, distillation, quantization and QAT on small models."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_lib import compression as C
from course_lib.gpt import GPT, GPTConfig


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)).eval()


def tokens(n=2000, seed=0):
    """A learnable stream: a fixed cycle through the 64 ids, with a seeded start."""
    return ((np.arange(n) * 7 + seed) % 64).astype(np.uint16)


# -- pruning ---------------------------------------------------------------------------------------


def test_global_masks_threshold_and_ties():
    a = torch.tensor([[0.1, -0.2], [0.3, 0.2]])
    b = torch.tensor([0.05, -0.4, 0.2])
    masks = C.global_magnitude_masks([a, b], 0.3)  # N = 7, k = 2: t = 0.1, ties none
    assert masks[0].tolist() == [[False, True], [True, True]] and masks[1].tolist() == [False, True, True]
    masks = C.global_magnitude_masks([a, b], 0.5)  # k = 3: t = 0.2, the three 0.2s all pruned
    assert masks[0].tolist() == [[False, False], [True, False]] and masks[1].tolist() == [False, True, False]
    assert all(m.all() for m in C.global_magnitude_masks([a, b], 0.1))  # k = 0
    assert not any(m.any() for m in C.global_magnitude_masks([a, b], 1.0))
    assert masks[0].dtype == torch.bool and masks[0].shape == a.shape


def test_global_masks_match_torch_prune_without_ties():
    layers = [nn.Linear(20, 30), nn.Linear(30, 5)]
    masks = C.global_magnitude_masks([m.weight for m in layers], 0.6)
    want = C.torch_global_masks([(m, "weight") for m in layers], 0.6)
    assert all(torch.equal(a, b) for a, b in zip(masks, want, strict=True))
    assert not hasattr(layers[0], "weight_mask")  # torch_global_masks worked on copies


def test_layer_masks_prune_each_layer_equally():
    ws = [torch.randn(10, 10), 10 * torch.randn(10, 10)]
    masks = C.layer_magnitude_masks(ws, 0.5)
    assert [int((~m).sum()) for m in masks] == [50, 50]
    glob = C.global_magnitude_masks(ws, 0.5)
    assert int((~glob[0]).sum()) > 80  # the small layer takes nearly all the pruning


def test_apply_masks_and_sparsity():
    w = torch.randn(4, 5)
    C.apply_masks([w], C.global_magnitude_masks([w], 0.4))
    assert C.sparsity_of([w]) == pytest.approx(0.4)


def test_structured_mlp_pruning_shrinks_and_keeps_function_at_zero_fraction():
    model = tiny_gpt()
    x = torch.randint(0, 64, (2, 10))
    same = C.prune_mlp_neurons(model, 0.0)
    assert torch.allclose(same(x)[0], model(x)[0], atol=1e-6)
    half = C.prune_mlp_neurons(model, 0.5)
    assert half.blocks[0].mlp.fc.out_features == 64 and half.blocks[0].mlp.proj.in_features == 64
    assert half.num_params() < model.num_params()


def test_head_importance_and_masking():
    model = tiny_gpt()
    x = torch.randint(0, 64, (2, 12))
    y = torch.randint(0, 64, (2, 12))
    imp = C.head_importance(model, x, y)
    assert imp.shape == (2, 2) and (imp >= 0).all()
    masked = C.mask_heads(model, [(0, 1)])
    assert not torch.allclose(masked(x)[0], model(x)[0])
    assert torch.equal(model.blocks[0].attn.proj.weight, tiny_gpt().blocks[0].attn.proj.weight)
    everything = C.mask_heads(model, [(0, 0), (0, 1)])
    # Zeroed proj columns equal a gate of zero: the same logits as the hooks give.
    gates = torch.ones(2, 2)
    gates[0] = 0
    handles = C._head_gate_hooks(model, gates)
    try:
        gated = model(x)[0]
    finally:
        for h in handles:
            h.remove()
    assert torch.allclose(everything(x)[0], gated, atol=1e-6)


# -- distillation ----------------------------------------------------------------------------------


def test_distillation_loss_against_kl_div():
    torch.manual_seed(0)
    s, t = torch.randn(6, 9, dtype=torch.float64), torch.randn(6, 9, dtype=torch.float64)
    y = torch.randint(0, 9, (6,))
    for temp, alpha in ((1.0, 1.0), (2.0, 0.5), (4.0, 0.0), (3.0, 0.7)):
        kl = F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1), log_target=True,
                      reduction="batchmean")
        want = alpha * temp**2 * kl + (1 - alpha) * F.cross_entropy(s, y)
        assert torch.allclose(C.distillation_loss(s, t, y, temp, alpha), want, rtol=1e-12)
    assert C.distillation_loss(t, t, y, 2.0, 1.0).abs() < 1e-12  # KL of a distribution with itself


def test_distillation_loss_teacher_gets_no_gradient_and_large_logits_are_finite():
    s = (1e4 * torch.randn(4, 7)).requires_grad_()
    t = (1e4 * torch.randn(4, 7)).requires_grad_()
    loss = C.distillation_loss(s, t, torch.zeros(4, dtype=torch.long), 2.0, 0.5)
    loss.backward()
    assert torch.isfinite(loss) and t.grad is None and torch.isfinite(s.grad).all()


def test_students_see_the_same_batches_and_learn():
    teacher = tiny_gpt(1)
    data = tokens()
    hard = C.train_student(tiny_gpt(2), data, steps=15, batch_size=4, block_size=16, lr=3e-3, seed=3)
    soft = C.train_student(tiny_gpt(2), data, steps=15, batch_size=4, block_size=16, lr=3e-3, seed=3,
                           teacher=teacher, alpha=0.0)  # alpha 0: the hard loss, through loss_fn
    assert hard == pytest.approx(soft, rel=1e-4)
    assert hard[-1] < hard[0]


# -- quantization ----------------------------------------------------------------------------------


def test_int8_per_channel_edge_cases():
    w = torch.tensor([[127.0, 0.5, 1.5, -2.5], [0.0, 0.0, 0.0, 0.0], [-1.0, 0.25, 0.5, 0.0]])
    q, scale = C.quantize_int8_per_channel(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert q[0].tolist() == [127, 0, 2, -2]  # halves to even
    assert q[1].tolist() == [0, 0, 0, 0] and scale[1] == 1.0
    assert q[2, 0] == -127
    deq = C.dequantize_int8(q, scale)
    assert (deq - w).abs().max() <= (scale[:, None] / 2 + 1e-7).max()


def test_int4_pack_roundtrip_and_error_bound():
    torch.manual_seed(0)
    u = torch.randint(0, 16, (3, 8), dtype=torch.uint8)
    packed = C.pack_int4(u)
    assert packed.shape == (3, 4) and packed[0, 0] == u[0, 0] + 16 * u[0, 1]
    assert torch.equal(C.unpack_int4(packed), u)
    w = torch.randn(6, 32)
    w[1, :8] = 0
    packed, scales = C.quantize_int4_grouped(w, 8)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 16) and scales.shape == (6, 4)
    assert scales[1, 0] == 1.0
    deq = C.dequantize_int4_grouped(packed, scales, 8)
    bound = scales.repeat_interleave(8, dim=1) / 2 + 1e-6
    assert ((deq - w).abs() <= bound).all()
    assert torch.allclose(deq.abs().reshape(6, 4, 8).amax(-1), w.abs().reshape(6, 4, 8).amax(-1), rtol=1e-6)


def test_fake_quant_granularities_and_asymmetric():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    errs = {g: C.relative_error(C.fake_quant(w, 4, g, 16), w) for g in ("tensor", "channel", "group")}
    assert errs["group"] < errs["channel"] < errs["tensor"]
    relu_like = w.abs()  # one-sided: the asymmetric grid wastes no codes on negatives
    assert C.relative_error(C.fake_quant(relu_like, 4, symmetric=False), relu_like) < \
        C.relative_error(C.fake_quant(relu_like, 4), relu_like)
    assert C.relative_error(C.fake_quant(w, 8), w) < C.relative_error(C.fake_quant(w, 4), w)
    q8 = C.dequantize_int8(*C.quantize_int8_per_channel(w))
    assert torch.allclose(C.fake_quant(w, 8, "channel"), q8, atol=1e-6)
    assert C.binarize(w).abs().unique().numel() <= 16
    assert C.bits_per_weight(4, "group", 384, 64) == 4.5


def test_weight_only_and_dynamic_int8_models_are_close_and_smaller():
    model = tiny_gpt()
    x = torch.randint(0, 64, (2, 12))
    ref = model(x)[0]
    for kind, tol in (("int8", 0.05), ("int4", 0.5)):
        q = C.quantize_weights(model, kind, group_size=16)
        assert (q(x)[0] - ref).abs().max() < tol
        assert C.saved_bytes(q) < C.saved_bytes(model)
    dyn = C.dynamic_int8(model)
    assert (dyn(x)[0] - ref).abs().max() < 0.1
    assert C.saved_bytes(dyn) < C.saved_bytes(model)


def test_fake_quantize_ste_and_qat():
    w = torch.randn(5, 8, requires_grad=True)
    out = C.fake_quantize(w, 4)
    g = torch.randn(5, 8)
    out.backward(g)
    assert torch.equal(w.grad, g)
    assert torch.allclose(out, C.fake_quant(w.detach(), 4), atol=1e-6)
    model = tiny_gpt()
    qat, losses = C.qat_finetune(model, tokens(), bits=4, steps=5, batch_size=4, block_size=16, lr=1e-3)
    w0 = qat.blocks[0].attn.qkv.weight
    assert torch.allclose(C.fake_quantize(w0, 4), w0, atol=1e-6)  # baked: already on the grid
    assert len(losses) == 5 and not any(isinstance(m, C.FakeQuant) for m in qat.modules())
    ptq = C.ptq_model(model, 4)
    assert torch.allclose(ptq.blocks[0].mlp.fc.weight, C.fake_quantize(model.blocks[0].mlp.fc.weight, 4))


def test_codes_mismatch_allows_one_only_near_halves():
    ratio = torch.tensor([0.5, 1.2, 2.5])
    want = torch.tensor([0, 1, 2])
    assert C.codes_mismatch(torch.tensor([1, 1, 3]), want, ratio) is None
    assert C.codes_mismatch(torch.tensor([0, 2, 2]), want, ratio) is not None
    assert C.codes_mismatch(torch.tensor([0, 1, 4]), want, ratio) is not None


def test_measuring_helpers():
    model = tiny_gpt()
    losses = C.window_losses(model, tokens(200), 16, batch_size=4)
    assert losses.shape == (len(range(0, 200 - 16, 16)),) and losses.dtype == torch.float64
    low, high = C.bootstrap_mean_interval(losses, transform=torch.exp)
    assert low <= float(losses.mean().exp()) <= high
    assert C.latency_ms(lambda: model(torch.zeros(1, 4, dtype=torch.long)), repeats=3, warmup=1) > 0
