"""Behaviour of course_lib.adversarial (chapter 15's attacks, used by chapter 16's adversarial
training): FGSM equals its closed form on a linear model and Captum's FGSM; PGD equals Captum's
PGD from the same start, reduces to FGSM with one full step, stays in the eps-ball and the clamp,
uses its generator for the random start, and never touches the model's parameters or mode.

(tests/test_adversarial.py is the grader's adversarial-submission suite, hence this name.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from captum.robust import FGSM, PGD
from torch import nn

from course_lib import adversarial as adv

F64 = torch.float64


def _smooth_net(dtype=F64, seed=0) -> nn.Module:
    """A small nonlinear classifier with a smooth activation (no ReLU kinks, so tiny rounding
    differences cannot flip a gradient's sign between two implementations)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5)).to(dtype).eval()


def _batch(n=32, dtype=F64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 4, generator=g, dtype=dtype)
    y = torch.randint(0, 5, (n,), generator=g)
    return x, y


def _ce(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


# --- FGSM ----------------------------------------------------------------------------------------


def test_fgsm_matches_closed_form_on_a_linear_model():
    # Logits W x + b: d CE / d x = W^T (softmax(W x + b) - onehot(y)).
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(6, 4).to(F64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(4, 6, generator=g, dtype=F64))
    x = torch.randn(10, 6, generator=g, dtype=F64)
    y = torch.randint(0, 4, (10,), generator=g)
    probs = torch.softmax(lin(x).detach(), dim=-1)
    grad = (probs - F.one_hot(y, 4).to(F64)) @ lin.weight.detach()
    eps = 0.3
    torch.testing.assert_close(adv.fgsm(lin, x, y, eps), x + eps * grad.sign(), rtol=0, atol=1e-15)
    torch.testing.assert_close(adv.loss_gradient(lin, x, y), grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("clamp", [None, (0.0, 1.0)])
def test_fgsm_matches_captum(clamp):
    model = _smooth_net()
    x, y = _batch()
    lo, hi = clamp if clamp is not None else (float("-inf"), float("inf"))
    attack = FGSM(model, loss_func=lambda out, t: F.cross_entropy(out, t, reduction="none"),
                  lower_bound=lo, upper_bound=hi)
    attack.zero_thresh = 0.0  # Captum leaves pixels with |grad| <= 1e-6 alone; sign(grad) does not
    want = attack.perturb(x.clone().requires_grad_(), 0.1, y)
    torch.testing.assert_close(adv.fgsm(model, x, y, 0.1, clamp=clamp), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_fgsm_contract(dtype):
    model = _smooth_net(dtype)
    x, y = _batch(dtype=dtype)
    x_in = x.clone()
    out = adv.fgsm(model, x, y, 0.2, clamp=(0.0, 1.0))
    assert out.shape == x.shape and out.dtype == dtype and not out.requires_grad
    assert torch.equal(x, x_in)                                   # the input is not modified
    assert (out - x).abs().max() <= 0.2 + 1e-6
    assert out.min() >= 0 and out.max() <= 1
    assert all(p.grad is None for p in model.parameters())        # no gradient on the parameters
    assert not model.training                                     # mode left as given
    assert _ce(model, out, y).sum() > _ce(model, x, y).sum()      # the loss goes up


def test_fgsm_eps_zero_returns_the_input_and_moves_every_pixel_by_eps_otherwise():
    model = _smooth_net()
    x, y = _batch()
    assert torch.equal(adv.fgsm(model, x, y, 0.0), x)
    moved = (adv.fgsm(model, x, y, 0.05) - x).abs()
    torch.testing.assert_close(moved, torch.full_like(moved, 0.05), rtol=0, atol=1e-15)


def test_fgsm_leaves_existing_parameter_gradients_alone_and_works_under_no_grad():
    model = _smooth_net()
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    before = [p.grad.clone() for p in model.parameters()]
    with torch.no_grad():
        out = adv.fgsm(model, x, y, 0.1)
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before, strict=True))
    assert not torch.equal(out, x)


def test_fgsm_rejects_bad_arguments():
    model = _smooth_net()
    x, y = _batch()
    with pytest.raises(ValueError):
        adv.fgsm(model, x, y, -0.1)
    with pytest.raises(ValueError):
        adv.fgsm(model, x, y[:3], 0.1)
    with pytest.raises(TypeError):
        adv.fgsm(model, x.long(), y, 0.1)


# --- PGD -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("clamp", [None, (0.0, 1.0)])
def test_pgd_matches_captum_from_the_same_start(clamp):
    model = _smooth_net()
    x, y = _batch()
    lo, hi = clamp if clamp is not None else (float("-inf"), float("inf"))
    attack = PGD(model, loss_func=lambda out, t: F.cross_entropy(out, t, reduction="none"),
                 lower_bound=lo, upper_bound=hi)
    attack.fgsm.zero_thresh = 0.0
    want = attack.perturb(x.clone().requires_grad_(), radius=0.1, step_size=0.03, step_num=7, target=y)
    got = adv.pgd(model, x, y, 0.1, 0.03, 7, random_start=False, clamp=clamp)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_pgd_with_one_full_step_is_fgsm():
    model = _smooth_net()
    x, y = _batch()
    for clamp in (None, (0.0, 1.0)):
        torch.testing.assert_close(adv.pgd(model, x, y, 0.1, 0.1, 1, random_start=False, clamp=clamp),
                                   adv.fgsm(model, x, y, 0.1, clamp=clamp), rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_pgd_contract(dtype):
    model = _smooth_net(dtype)
    x, y = _batch(dtype=dtype)
    x_in = x.clone()
    g = torch.Generator().manual_seed(3)
    out = adv.pgd(model, x, y, 0.1, 0.02, 10, generator=g, clamp=(0.0, 1.0))
    assert out.shape == x.shape and out.dtype == dtype and not out.requires_grad
    assert torch.equal(x, x_in)
    assert (out - x).abs().max() <= 0.1 + 1e-6
    assert out.min() >= 0 and out.max() <= 1
    assert all(p.grad is None for p in model.parameters())
    # More, smaller steps find a higher loss than one FGSM step (on average over the batch).
    assert _ce(model, out, y).sum() >= _ce(model, adv.fgsm(model, x, y, 0.1, clamp=(0.0, 1.0)), y).sum()


def test_pgd_random_start_uses_the_generator():
    model = _smooth_net()
    x, y = _batch()
    a = adv.pgd(model, x, y, 0.1, 0.02, 0, generator=torch.Generator().manual_seed(5))
    b = adv.pgd(model, x, y, 0.1, 0.02, 0, generator=torch.Generator().manual_seed(5))
    c = adv.pgd(model, x, y, 0.1, 0.02, 0, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Zero steps: the start itself, uniform on [-eps, eps) around x, drawn as the docstring says.
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    torch.testing.assert_close(a, x + (2 * noise - 1) * 0.1, rtol=0, atol=1e-15)
    spread = (a - x) / 0.1
    assert spread.min() < -0.9 and spread.max() > 0.9 and abs(spread.mean()) < 0.1


def test_pgd_without_random_start_is_deterministic_and_in_train_mode_keeps_the_mode():
    model = _smooth_net().train()
    x, y = _batch()
    a = adv.pgd(model, x, y, 0.1, 0.02, 5, random_start=False)
    b = adv.pgd(model, x, y, 0.1, 0.02, 5, random_start=False)
    assert torch.equal(a, b) and model.training


# --- evaluation helpers --------------------------------------------------------------------------


def _trained_linear() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g, dtype=F64) * 2
    y = torch.randint(0, 3, (300,), generator=g)
    x = centres[y] + 0.5 * torch.randn(300, 8, generator=g, dtype=F64)
    model = nn.Linear(8, 3).to(F64)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval(), x, y


def test_accuracy_under_attack_falls_with_eps_and_pgd_is_at_least_as_strong():
    model, x, y = _trained_linear()
    eps_values = [0.0, 0.25, 0.5, 1.0, 2.0]
    fgsm_acc = adv.accuracy_under_attack(model, x, y, adv.fgsm_attack(), eps_values)
    pgd_acc = adv.accuracy_under_attack(model, x, y, adv.pgd_attack(steps=10), eps_values)
    with torch.no_grad():
        clean = (model(x).argmax(-1) == y).double().mean().item()
    assert fgsm_acc[0] == clean == pgd_acc[0] and clean > 0.95
    assert all(a >= b for a, b in zip(fgsm_acc, fgsm_acc[1:], strict=False))
    assert fgsm_acc[-1] < 0.5 * clean
    assert all(p <= f + 0.01 for p, f in zip(pgd_acc, fgsm_acc, strict=True))


def test_correct_under_attack_batches_agree_with_one_batch():
    model, x, y = _trained_linear()
    attack = adv.pgd_attack(steps=5, seed=2, clamp=(-5.0, 5.0))
    whole = adv.correct_under_attack(model, x, y, adv.fgsm_attack(), 0.5)
    batched = adv.correct_under_attack(model, x, y, adv.fgsm_attack(), 0.5, batch_size=7)
    assert whole.dtype == torch.bool and whole.shape == (300,)
    assert torch.equal(whole, batched)
    # The PGD attack's generator is seeded per call: the same curve twice.
    assert torch.equal(adv.correct_under_attack(model, x, y, attack, 0.5),
                       adv.correct_under_attack(model, x, y, attack, 0.5))
