"""course_lib.training: batches, evaluate, train_epochs, fit and History."""

import pytest
import torch
from torch import nn

from course_lib.training import History, accuracy, batches, evaluate, fit, train_epochs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _separable(n=200, seed=0):
    """Two Gaussian clouds 6 standard deviations apart: linearly separable."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 2, generator=g) + torch.where(y[:, None] == 1, 3.0, -3.0)
    return x, y


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(2, 2)


def _fit(model, epochs, **kwargs):
    x, y = _separable()
    xv, yv = _separable(60, seed=1)
    kwargs.setdefault("optimizer", torch.optim.SGD(model.parameters(), lr=0.1))
    return fit(model, (x, y), loss_fn=nn.functional.cross_entropy, epochs=epochs,
               batch_size=32, val=(xv, yv), metrics={"accuracy": accuracy}, device="cpu",
               progress=False, **kwargs)


def test_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 1])) == pytest.approx(0.75)
    assert accuracy(logits, torch.tensor([1, 0, 1, 0])) == 0.0


def test_fit_learns_a_separable_problem():
    history = _fit(_model(), epochs=5)
    losses = history.epochs["train_loss"]
    assert losses[-1] < 0.5 * losses[0]
    assert history.last("val_accuracy") >= 0.95
    assert history.last("train_accuracy") >= 0.95
    assert history.last("val_loss") < 0.2


def test_history_records_every_epoch_and_step():
    history = _fit(_model(), epochs=3)
    assert set(history.epochs) == {"train_loss", "train_accuracy", "val_loss", "val_accuracy"}
    assert all(len(v) == 3 for v in history.epochs.values())
    assert len(history.steps) == 3 * 7  # ceil(200 / 32) = 7 steps per epoch
    assert all(isinstance(v, float) for v in history.steps)


def test_train_loss_is_the_mean_of_the_epoch_steps():
    history = _fit(_model(), epochs=1)
    # six batches of 32 and one of 8, weighted by batch size
    weights = torch.tensor([32.0] * 6 + [8.0])
    expected = (torch.tensor(history.steps) * weights).sum() / 200
    assert history.epochs["train_loss"][0] == pytest.approx(expected.item(), rel=1e-5)


def test_val_metrics_match_evaluate():
    model = _model()
    history = _fit(model, epochs=2)
    xv, yv = _separable(60, seed=1)
    result = evaluate(model, xv, yv, nn.functional.cross_entropy, {"accuracy": accuracy})
    assert history.last("val_loss") == pytest.approx(result["loss"], rel=1e-6)
    assert history.last("val_accuracy") == pytest.approx(result["accuracy"])


def test_fit_is_repeatable_with_the_same_seed():
    a = _fit(_model(), epochs=2, seed=5)
    b = _fit(_model(), epochs=2, seed=5)
    assert a.steps == b.steps
    c = _fit(_model(), epochs=2, seed=6)
    assert a.steps != c.steps  # another shuffling order


def test_fit_without_val_or_metrics():
    model = _model()
    x, y = _separable()
    history = fit(model, (x, y), loss_fn=nn.functional.cross_entropy,
                  optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epochs=2,
                  batch_size=50, device="cpu", progress=False)
    assert set(history.epochs) == {"train_loss"}
    assert len(history.epochs["train_loss"]) == 2
    assert len(history.steps) == 8


def test_fit_without_metrics_does_not_evaluate_the_training_set():
    calls = []

    class Counting(nn.Linear):
        def forward(self, x):
            calls.append(len(x))
            return super().forward(x)

    torch.manual_seed(0)
    model = Counting(2, 2)
    x, y = _separable(100)
    fit(model, (x, y), loss_fn=nn.functional.cross_entropy,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epochs=1, batch_size=25,
        device="cpu", progress=False)
    assert calls == [25, 25, 25, 25]  # the training steps only


def test_continue_with_history():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = _fit(model, epochs=2, optimizer=optimizer)
    steps_before = list(first.steps)
    second = _fit(model, epochs=3, optimizer=optimizer, history=first)
    assert second is first
    assert len(second.epochs["train_loss"]) == 5
    assert len(second.epochs["val_accuracy"]) == 5
    assert second.steps[:len(steps_before)] == steps_before
    assert len(second.steps) == 5 * 7


def test_zero_epochs_changes_nothing():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    history = _fit(model, epochs=0)
    assert history.epochs == {} and history.steps == []
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_negative_epochs_raise():
    with pytest.raises(ValueError, match="epochs"):
        _fit(_model(), epochs=-1)


def test_bad_batch_size_raises():
    x, y = _separable(10)
    with pytest.raises(ValueError, match="batch_size"):
        list(batches(x, y, 0))
    model = _model()
    with pytest.raises(ValueError, match="batch_size"):
        fit(model, (x, y), loss_fn=nn.functional.cross_entropy,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epochs=1, batch_size=-1,
            device="cpu", progress=False)


def test_fit_leaves_model_in_train_mode_and_on_device():
    model = _model()
    _fit(model, epochs=1)
    assert model.training
    assert next(model.parameters()).device.type == "cpu"



def _epochs(model, epochs, **kwargs):
    x, y = _separable()
    kwargs.setdefault("optimizer", torch.optim.SGD(model.parameters(), lr=0.1))
    return train_epochs(model, (x, y), loss_fn=nn.functional.cross_entropy, epochs=epochs,
                        batch_size=32, device="cpu", progress=False, **kwargs)


def test_train_epochs_runs_only_while_the_caller_iterates():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    steps = []
    training = _epochs(model, 5, step_losses=steps)
    assert steps == [] and all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    seen = []
    for epoch, mean_loss in training:  # noqa: B007 (the last epoch's mean is checked below)
        seen.append(epoch)
        if epoch == 1:
            break  # stopping early: the remaining epochs never run
    assert seen == [0, 1]
    assert len(steps) == 2 * 7
    weights = torch.tensor([32.0] * 6 + [8.0])
    assert mean_loss == pytest.approx((torch.tensor(steps[7:]) * weights).sum().item() / 200, rel=1e-5)


def test_fit_is_train_epochs_plus_logging():
    steps = []
    for _ in _epochs(_model(), 2, step_losses=steps, seed=3):
        pass
    assert _fit(_model(), epochs=2, seed=3).steps == steps


def test_penalties_change_the_update_but_not_the_recorded_loss():
    def run(**kwargs):
        model, steps = _model(), []
        for _ in _epochs(model, 1, step_losses=steps, **kwargs):
            pass
        return model.weight.detach(), steps

    plain_weight, plain_steps = run()
    penalised_weight, penalised_steps = run(penalties=[lambda m: (m.weight ** 2).sum()])
    assert penalised_steps[0] == plain_steps[0]  # same start, same first batch, loss_fn alone
    assert penalised_weight.norm() < 0.8 * plain_weight.norm()  # measured: 0.51 of the norm


def test_augment_and_scheduler_run_once_per_batch():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    generators = []

    def augment(xb, generator):
        generators.append(generator)
        return xb

    for _ in _epochs(model, 2, optimizer=optimizer, augment=augment, scheduler=scheduler):
        pass
    assert len(generators) == 2 * 7 and all(g is generators[0] for g in generators)
    assert isinstance(generators[0], torch.Generator)  # the seeded one that also shuffles
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 14)


@pytest.mark.parametrize("n, batch_size", [(10, 3), (9, 3), (5, 10), (1, 1)])
@pytest.mark.parametrize("shuffle", [True, False])
def test_batches_cover_every_row_once(n, batch_size, shuffle):
    x = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)
    y = torch.arange(n)
    out = list(batches(x, y, batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(0)))
    sizes = [len(yb) for _, yb in out]
    assert sizes == [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    seen = torch.cat([yb for _, yb in out])
    assert sorted(seen.tolist()) == list(range(n))
    for xb, yb in out:  # rows stay paired with their labels
        assert torch.equal(xb[:, 0], 2 * yb.float())
    if not shuffle:
        assert seen.tolist() == list(range(n))


def test_batches_shuffle_depends_on_generator():
    x, y = torch.zeros(50, 1), torch.arange(50)

    def order(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.cat([yb for _, yb in batches(x, y, 7, generator=g)]).tolist()

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert order(0) != list(range(50))


def test_batches_length_mismatch():
    with pytest.raises(ValueError, match="rows"):
        list(batches(torch.zeros(4, 2), torch.zeros(3), 2))


class _ModeSpy(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.linear(x)


def test_evaluate_uses_eval_mode_and_restores_it():
    model = _ModeSpy()
    x, y = _separable(20)
    model.train()
    result = evaluate(model, x, y, nn.functional.cross_entropy, batch_size=8)
    assert model.modes == [False, False, False]
    assert model.training
    model.eval()
    evaluate(model, x, y, nn.functional.cross_entropy)
    assert not model.training
    assert set(result) == {"loss"}


def test_evaluate_restores_mode_after_an_error():
    class Broken(_ModeSpy):
        def forward(self, x):
            raise RuntimeError("boom")

    model = Broken()
    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        evaluate(model, torch.zeros(3, 2), torch.zeros(3, dtype=torch.long),
                 nn.functional.cross_entropy)
    assert model.training


def test_evaluate_matches_full_batch_loss_without_grad():
    model = _model()
    x, y = _separable(50)
    result = evaluate(model, x, y, nn.functional.cross_entropy, {"accuracy": accuracy},
                      batch_size=16)
    with torch.no_grad():
        logits = model(x)
    assert result["loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-6)
    assert result["accuracy"] == pytest.approx(accuracy(logits, y))
    assert all(p.grad is None for p in model.parameters())


def test_history_log_and_last():
    h = History()
    h.log(loss=1, acc=torch.tensor(0.5))
    h.log(loss=0.5)
    assert h.epochs == {"loss": [1.0, 0.5], "acc": [0.5]}
    assert isinstance(h.epochs["acc"][0], float)
    assert h.last("loss") == 0.5
    with pytest.raises(KeyError, match="acc"):
        h.last("val_loss")
