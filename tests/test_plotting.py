"""course_lib.plotting: what each plot draws (Agg backend, set in conftest.py)."""

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.collections import PathCollection
from matplotlib.image import AxesImage

from course_lib.plotting import (
    plot_decision_boundary,
    plot_history,
    plot_steps,
    show_images,
)
from course_lib.training import History


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _history():
    h = History()
    for epoch in range(4):
        h.log(train_loss=1.0 / (epoch + 1), val_loss=1.2 / (epoch + 1), val_accuracy=0.5 + epoch / 10)
    h.steps = [float(v) for v in np.linspace(2.0, 0.1, 50)]
    return h


def _labels(ax):
    return [line.get_label() for line in ax.get_lines()]


def test_plot_history_default_is_every_loss():
    ax = plot_history(_history())
    assert _labels(ax) == ["train_loss", "val_loss"]
    x, y = ax.get_lines()[0].get_data()
    assert list(x) == [1, 2, 3, 4]  # epochs count from 1
    assert np.allclose(y, [1.0, 0.5, 1 / 3, 0.25])
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["train_loss", "val_loss"]
    assert ax.get_xlabel() == "epoch"
    assert ax.get_yscale() == "linear"


def test_plot_history_keys_logy_title_and_given_axes():
    fig, ax = plt.subplots()
    out = plot_history(_history(), keys=["val_accuracy"], ax=ax, logy=True, title="Run 1")
    assert out is ax
    assert _labels(ax) == ["val_accuracy"]
    assert np.allclose(ax.get_lines()[0].get_ydata(), [0.5, 0.6, 0.7, 0.8])
    assert ax.get_yscale() == "log"
    assert ax.get_title() == "Run 1"


def test_plot_history_from_dict():
    ax = plot_history({"loss": [3, 2, 1], "accuracy": [0.1, 0.2, 0.3]})
    assert _labels(ax) == ["loss"]


def test_plot_history_markers_only_for_short_runs():
    short = plot_history({"loss": list(range(5))})
    long = plot_history({"loss": list(range(40))})
    assert short.get_lines()[0].get_marker() == "o"
    assert long.get_lines()[0].get_marker() in (None, "None", "")


def test_plot_history_nothing_to_plot():
    with pytest.raises(ValueError, match="val_accuracy"):
        plot_history({"val_accuracy": [0.5]})
    with pytest.raises(KeyError):
        plot_history(_history(), keys=["missing"])


def test_plot_steps_raw_and_smoothed():
    ax = plot_steps(_history(), smooth=10)
    raw, smooth = ax.get_lines()
    assert raw.get_label() == "step loss" and smooth.get_label() == "mean of 10"
    assert len(raw.get_xdata()) == 50
    x, y = smooth.get_data()
    assert len(x) == 41 and x[0] == 9  # the mean of steps 0..9 is drawn at step 9
    steps = np.linspace(2.0, 0.1, 50)
    assert y[0] == pytest.approx(steps[:10].mean())
    assert y[-1] == pytest.approx(steps[-10:].mean())


def test_plot_steps_too_short_to_smooth():
    h = History(steps=[1.0, 0.5, 0.25])
    assert _labels(plot_steps(h, smooth=20)) == ["step loss"]
    assert _labels(plot_steps(h, smooth=1)) == ["step loss"]


def _points():
    x = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]])
    y = (x[:, 0] > 0).long()
    return x, y


def _contour(ax):
    return next(c for c in ax.collections if not isinstance(c, PathCollection))


def _classes_shaded(ax):
    """The classes with a non-empty filled region (one contour level per class)."""
    return [i for i, path in enumerate(_contour(ax).get_paths()) if len(path.vertices)]


def test_decision_boundary_draws_contour_and_scatter():
    x, y = _points()
    calls = []

    def predict(grid):
        calls.append((grid.shape, torch.is_grad_enabled()))
        return torch.stack([-grid[:, 0], grid[:, 0]], dim=1)  # logits: class 1 right of x = 0

    ax = plot_decision_boundary(predict, x, y, resolution=30, title="linear")
    assert calls == [(torch.Size([900, 2]), False)]  # one call, on the grid, without grad
    scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(scatters) == 1
    assert np.allclose(scatters[0].get_offsets(), x.numpy())
    assert list(scatters[0].get_array()) == [0, 0, 1, 1]
    assert len(ax.collections) >= 2  # the filled contour is there too
    assert ax.get_xlim() == pytest.approx((-1.5, 1.5))
    assert ax.get_ylim() == pytest.approx((-1.5, 1.5))
    assert ax.get_title() == "linear"


def test_decision_boundary_shades_the_predicted_classes():
    x, y = _points()
    everywhere_0 = plot_decision_boundary(lambda g: torch.stack([g[:, 0] * 0 + 1, g[:, 0] * 0], 1),
                                          x, y, resolution=20)
    assert np.allclose(_contour(everywhere_0).levels, [-0.5, 0.5, 1.5])
    assert _classes_shaded(everywhere_0) == [0]
    split = plot_decision_boundary(lambda g: torch.stack([-g[:, 0], g[:, 0]], 1), x, y,
                                   resolution=20)
    assert _classes_shaded(split) == [0, 1]


@pytest.mark.parametrize("predict", [
    lambda g: (g[:, 0] > 0).long(),          # class ids
    lambda g: g[:, 0] > 0,                   # booleans
    lambda g: torch.sigmoid(10 * g[:, :1]),  # (m, 1): probability of class 1, not arg-maxed
    lambda g: torch.sigmoid(10 * g[:, 0]),   # (m,): probability of class 1
], ids=["ids", "bool", "column", "probability"])
def test_decision_boundary_accepts_ids_and_scores(predict):
    x, y = _points()
    ax = plot_decision_boundary(predict, x, y, resolution=20)
    assert np.allclose(_contour(ax).levels, [-0.5, 0.5, 1.5])
    assert _classes_shaded(ax) == [0, 1]


def test_decision_boundary_three_classes():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    y = torch.tensor([0, 1, 2])

    def predict(grid):
        return torch.stack([-(grid[:, 0] - c).abs() for c in (0.0, 1.0, 2.0)], dim=1)

    ax = plot_decision_boundary(predict, x, y, resolution=30)
    assert np.allclose(_contour(ax).levels, [-0.5, 0.5, 1.5, 2.5])
    assert _classes_shaded(ax) == [0, 1, 2]


def test_decision_boundary_rejects_non_2d_points():
    with pytest.raises(ValueError, match="2-D"):
        plot_decision_boundary(lambda g: g[:, 0], torch.zeros(5, 3), torch.zeros(5))
    with pytest.raises(ValueError, match="2-D"):
        plot_decision_boundary(lambda g: g[:, 0], torch.zeros(5), torch.zeros(5))


def _image_axes(fig):
    return [ax for ax in fig.axes if any(isinstance(a, AxesImage) for a in ax.get_children())]


@pytest.mark.parametrize("shape", [(7, 8, 8), (7, 1, 8, 8), (7, 64)])
def test_show_images_shapes(shape):
    images = torch.rand(*shape)
    fig = show_images(images, ncols=3)
    assert len(fig.axes) == 9  # 3 rows of 3
    shown = _image_axes(fig)
    assert len(shown) == 7
    first = shown[0].get_images()[0].get_array()
    assert first.shape == (8, 8)
    assert np.allclose(first, images.reshape(7, 8, 8)[0].numpy())
    assert all(not ax.axison for ax in fig.axes)


def test_show_images_labels_and_numpy():
    fig = show_images(np.zeros((3, 4, 4)), labels=["a", 1, "c"])
    assert len(fig.axes) == 3
    assert [ax.get_title() for ax in fig.axes] == ["a", "1", "c"]


def test_show_images_flat_with_image_shape():
    fig = show_images(np.ones((2, 12)), image_shape=(3, 4))
    assert _image_axes(fig)[0].get_images()[0].get_array().shape == (3, 4)


@pytest.mark.parametrize("shape", [(3, 10), (3, 3, 8, 8), (3,), (2, 2, 2, 2, 2), (0, 8, 8)])
def test_show_images_bad_shapes(shape):
    with pytest.raises(ValueError):
        show_images(np.zeros(shape))
