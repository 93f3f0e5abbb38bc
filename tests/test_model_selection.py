"""Unit tests of course_lib.model_selection: k-fold splits, grid and random search, and the
softmax-regression task they are compared on."""

import math

import pytest
import torch

from course_lib import model_selection as ms

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_kfold_splits_sizes_cover_and_no_leak():
    folds = ms.kfold_splits(11, 3)
    assert [len(v) for _, v in folds] == [4, 4, 3]
    assert folds[0][1].tolist() == [0, 1, 2, 3] and folds[1][0].tolist() == [0, 1, 2, 3, 8, 9, 10]
    shuffled = ms.kfold_splits(50, 4, torch.Generator().manual_seed(0))
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat([v for _, v in shuffled]), order)
    for train, val in shuffled:
        assert set(train.tolist()).isdisjoint(val.tolist()) and len(train) + len(val) == 50


def test_sample_config_is_log_uniform_and_seeded():
    space = {"lr": (1e-4, 1.0, "log"), "p": (0.0, 0.5, "linear"), "width": (8, 11, "int")}
    g = torch.Generator().manual_seed(0)
    draws = [ms.sample_config(space, g) for _ in range(4000)]
    lrs = torch.tensor([d["lr"] for d in draws])
    # log-uniform on 4 decades: a quarter below 1e-3; uniform would put 0.1% there
    assert abs((lrs < 1e-3).float().mean().item() - 0.25) < 0.03
    assert {d["width"] for d in draws} == {8, 9, 10, 11}
    g1 = torch.Generator().manual_seed(5)
    u = [float(torch.rand((), generator=g1, dtype=torch.float64)) for _ in range(3)]
    got = ms.sample_config(space, torch.Generator().manual_seed(5))
    assert got["lr"] == pytest.approx(10 ** (-4 + 4 * u[0]), rel=1e-12)
    assert got["p"] == pytest.approx(0.5 * u[1]) and got["width"] == 8 + math.floor(4 * u[2])


def test_random_search_minimises_and_grid_search_enumerates():
    space = {"x": (1e-3, 1e3, "log")}
    best, trials = ms.random_search(lambda c: (math.log10(c["x"]) - 1) ** 2, space, 50,
                                     torch.Generator().manual_seed(0))
    assert len(trials) == 50 and best == min(trials, key=lambda t: t[1])[0]
    assert abs(math.log10(best["x"]) - 1) < 0.3
    best, trials = ms.grid_search(lambda c: c["a"] * 10 + c["b"], {"a": [3, 1, 2], "b": [1, 0]})
    assert best == {"a": 1, "b": 0} and len(trials) == 6
    assert ms.log_grid(1e-3, 1e1, 5) == pytest.approx([1e-3, 1e-2, 1e-1, 1, 10])


def test_softmax_regression_cv_prefers_a_sensible_learning_rate():
    from course_lib.data import load_digits

    digits = load_digits()
    x, y = digits.train.x[:400], digits.train.y[:400]
    folds = ms.kfold_splits(len(y), 3, torch.Generator().manual_seed(0))
    good = ms.softmax_regression_cv(x, y, {"lr": 1.0, "weight_decay": 1e-4}, folds, steps=40)
    tiny = ms.softmax_regression_cv(x, y, {"lr": 1e-4, "weight_decay": 1e-4}, folds, steps=40)
    huge = ms.softmax_regression_cv(x, y, {"lr": 1e4, "weight_decay": 1e-4}, folds, steps=40)
    assert good < 0.8 < math.log(10) - 0.01 < tiny + 0.01 and (huge > good)
