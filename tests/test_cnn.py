"""Behaviour of course_lib.cnn, chapter 6's reference: both convolutions and max-pooling agree
with PyTorch's, the receptive field formula with autograd, the residual block with its stated
architecture, and the digits CNN reaches 97% test accuracy with the chapter's full recipe."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_lib import cnn
from course_lib.data import load_digits

F64 = torch.float64



# --- shapes ----------------------------------------------------------------------------------


def test_pair():
    assert cnn.pair(3) == (3, 3)
    assert cnn.pair((2, 5)) == (2, 5)


@pytest.mark.parametrize("size,kernel,stride,padding,expected", [
    (8, 3, 1, 0, 6), (8, 3, 1, 1, 8), (8, 3, 2, 1, 4), (7, 2, 2, 0, 3), (224, 7, 2, 3, 112),
    (5, 5, 1, 0, 1), (10, 4, 3, 0, 3)])
def test_conv_output_size(size, kernel, stride, padding, expected):
    assert cnn.conv_output_size(size, kernel, stride, padding) == expected
    out = F.conv2d(torch.zeros(1, 1, size, size), torch.zeros(1, 1, kernel, kernel),
                   stride=stride, padding=padding)
    assert out.shape[-1] == expected


def test_conv_output_size_rejects_what_does_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        cnn.conv_output_size(2, 5)
    with pytest.raises(ValueError):
        cnn.conv_output_size(8, 3, stride=0)


# --- convolution -----------------------------------------------------------------------------

CONV_CASES = [
    # (N, C_in, H, W), (C_out, kH, kW), stride, padding, bias
    ((2, 3, 8, 8), (4, 3, 3), 1, 0, True),
    ((2, 3, 8, 8), (4, 3, 3), 1, 1, False),
    ((1, 1, 9, 7), (2, 3, 3), 2, 1, True),
    ((3, 2, 10, 11), (5, 2, 3), (2, 1), (1, 2), True),
    ((1, 4, 6, 6), (3, 6, 6), 1, 0, True),     # the kernel covers the whole image
    ((2, 2, 5, 5), (1, 1, 1), 1, 0, True),     # 1x1: a linear map over channels at each pixel
    ((1, 3, 13, 17), (2, 5, 4), 3, 2, False),
]


def _conv_inputs(case, dtype, seed):
    shape, (c_out, kh, kw), stride, padding, has_bias = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=dtype)
    weight = torch.randn(c_out, shape[1], kh, kw, generator=g, dtype=dtype)
    bias = torch.randn(c_out, generator=g, dtype=dtype) if has_bias else None
    return x, weight, bias, stride, padding


@pytest.mark.parametrize("implementation", [cnn.conv2d_unfold, cnn.conv2d_sliding])
@pytest.mark.parametrize("case", CONV_CASES)
def test_convolutions_match_torch_in_float64(implementation, case):
    x, weight, bias, stride, padding = _conv_inputs(case, F64, seed=len(str(case)))
    expected = F.conv2d(x, weight, bias, stride=stride, padding=padding)
    got = implementation(x, weight, bias, stride=stride, padding=padding)
    assert got.shape == expected.shape and got.dtype == F64
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


def test_conv2d_unfold_in_float32_and_its_gradients():
    x, weight, bias, stride, padding = _conv_inputs(CONV_CASES[3], torch.float32, seed=1)
    leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
    expected = F.conv2d(*leaves, stride=stride, padding=padding)
    expected.pow(2).sum().backward()
    ours = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
    got = cnn.conv2d_unfold(*ours, stride=stride, padding=padding)
    got.pow(2).sum().backward()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(ours, leaves, strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-4, rtol=1e-5)


def test_convolution_is_cross_correlation_not_flipped():
    # A kernel that picks the pixel to the right of the centre shifts the image left.
    x = torch.arange(16.0).view(1, 1, 4, 4)
    pick_right = torch.zeros(1, 1, 3, 3)
    pick_right[0, 0, 1, 2] = 1.0
    out = cnn.conv2d_unfold(x, pick_right, padding=1)
    assert torch.equal(out[0, 0, :, :3], x[0, 0, :, 1:])
    assert torch.equal(out[0, 0, :, 3], torch.zeros(4))


def test_conv_rejects_mismatched_channels():
    with pytest.raises(ValueError, match="channels"):
        cnn.conv2d_unfold(torch.zeros(1, 3, 5, 5), torch.zeros(2, 2, 3, 3))
    with pytest.raises(ValueError, match="bias"):
        cnn.conv2d_sliding(torch.zeros(1, 2, 5, 5), torch.zeros(2, 2, 3, 3), torch.zeros(3))


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 0), (3, 2, 1), ((2, 3), (1, 2), (1, 0)),
                                                   (4, 4, 2)])
def test_im2col_matches_unfold(kernel, stride, padding):
    x = torch.randn(2, 3, 9, 8, generator=torch.Generator().manual_seed(0))
    expected = F.unfold(x, kernel, padding=padding, stride=stride)
    got = cnn.im2col(x, kernel, stride=stride, padding=padding)
    assert torch.equal(got, expected)


# --- pooling ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel,stride,padding", [(2, None, 0), (2, 1, 0), (3, 2, 1), (3, 3, 1),
                                                   (3, 1, 1), (5, 2, 2), ((2, 3), (1, 2), (1, 1))])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_max_pool2d_matches_torch(kernel, stride, padding, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 9, 10, generator=g, dtype=dtype) - 2.0  # mostly negative: padding shows
    expected = F.max_pool2d(x, kernel, stride=stride, padding=padding)
    got = cnn.max_pool2d(x, kernel, stride=stride, padding=padding)
    assert got.shape == expected.shape and got.dtype == dtype
    assert torch.equal(got, expected)


def test_max_pool2d_pads_with_minus_infinity():
    x = torch.full((1, 1, 2, 2), -5.0)
    assert torch.equal(cnn.max_pool2d(x, 2, stride=1, padding=1), torch.full((1, 1, 3, 3), -5.0))


def test_max_pool2d_rejects_too_much_padding_and_integers():
    with pytest.raises(ValueError, match="half"):
        cnn.max_pool2d(torch.zeros(1, 1, 4, 4), 2, padding=2)
    with pytest.raises(TypeError):
        cnn.max_pool2d(torch.zeros(1, 1, 4, 4, dtype=torch.int64), 2)


# --- receptive field -------------------------------------------------------------------------


@pytest.mark.parametrize("layers,expected", [
    ([], 1), ([(3, 1)], 3), ([(3, 1)] * 2, 5), ([(3, 1)] * 3, 7), ([(2, 2)], 2),
    ([(3, 1), (2, 2), (3, 1)], 8),
    ([(3, 1), (3, 1), (2, 2), (3, 1), (3, 1), (2, 2)], 16),   # two VGG stages
    ([(7, 2), (3, 2), (3, 1), (3, 1)], 27)])                  # ResNet's stem and a block
def test_receptive_field_known_values(layers, expected):
    assert cnn.receptive_field(layers) == expected


def test_receptive_field_matches_autograd_on_random_stacks():
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        depth = int(torch.randint(1, 5, (1,), generator=g))
        layers = [(int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g)))
                  for _ in range(depth)]
        assert cnn.receptive_field(layers) == cnn.measure_receptive_field(layers), layers


def test_receptive_field_rejects_bad_layers():
    with pytest.raises(ValueError):
        cnn.receptive_field([(3, 0)])


# --- residual block --------------------------------------------------------------------------


def test_residual_block_shapes_and_shortcuts():
    x = torch.randn(2, 8, 8, 8)
    same = cnn.ResidualBlock(8, 8)
    assert isinstance(same.shortcut, nn.Identity)
    assert same(x).shape == (2, 8, 8, 8)
    for block, shape in [(cnn.ResidualBlock(8, 16), (2, 16, 8, 8)),
                         (cnn.ResidualBlock(8, 8, stride=2), (2, 8, 4, 4)),
                         (cnn.ResidualBlock(8, 16, stride=2), (2, 16, 4, 4))]:
        assert isinstance(block.shortcut, nn.Sequential)
        assert block.shortcut[0].kernel_size == (1, 1) and block.shortcut[0].bias is None
        assert block(x).shape == shape
    assert cnn.count_parameters(same) == 2 * 8 * 8 * 9 + 2 * 2 * 8
    assert (cnn.ResidualBlock(8, 8)(x) >= 0).all()


def test_residual_block_with_zero_last_gamma_is_relu_of_its_input():
    block = cnn.ResidualBlock(6, 6).double().eval()
    with torch.no_grad():
        block.bn2.weight.zero_()
    x = torch.randn(3, 6, 5, 5, dtype=F64)
    torch.testing.assert_close(block(x), torch.relu(x), atol=1e-12, rtol=0)


def test_gradient_reaches_the_input_through_the_shortcut_only():
    x = torch.randn(2, 4, 6, 6, dtype=F64)
    grads = {}
    for skip in (True, False):
        block = cnn.ResidualBlock(4, 4, skip=skip).double().eval()
        with torch.no_grad():
            block.conv1.weight.zero_()
            block.conv2.weight.zero_()
        leaf = x.clone().requires_grad_(True)
        block(leaf).sum().backward()
        grads[skip] = leaf.grad
    torch.testing.assert_close(grads[True], (x > 0).to(F64), atol=0, rtol=0)
    assert torch.count_nonzero(grads[False]) == 0


def test_projection_shortcut_in_eval_mode():
    block = cnn.ResidualBlock(2, 3, stride=2).double().eval()
    with torch.no_grad():
        block.bn2.weight.zero_()  # the main path adds 0: what is left is the projection
        block.shortcut[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]],
                                                    dtype=F64).view(3, 2, 1, 1))
    x = torch.randn(1, 2, 4, 4, dtype=F64)
    projected = torch.stack([x[0, 0], x[0, 1], x[0, 0] - x[0, 1]])[None, :, ::2, ::2]
    expected = torch.relu(projected / (1 + block.shortcut[1].eps) ** 0.5)
    torch.testing.assert_close(block(x), expected, atol=1e-12, rtol=1e-12)


def test_deep_plain_stack_spreads_its_gradient_norms_more_than_a_residual_one(one_torch_thread):
    torch.manual_seed(0)
    digits = load_digits()
    x, y = cnn.as_images(digits.train.x[:128]), digits.train.y[:128]
    spread = {}
    for residual in (True, False):
        net = cnn.deep_conv_net(10, width=8, residual=residual)
        assert len([m for m in net if isinstance(m, cnn.ResidualBlock)]) == 10
        norms = cnn.block_gradient_norms(net, x, y)
        assert len(norms) == 10 and all(n > 0 for n in norms)
        assert all(p.grad is None for p in net.parameters())
        spread[residual] = max(norms) / min(norms)
    assert spread[False] > 3 * spread[True], spread


# --- networks, inspection, training ------------------------------------------------------------


@pytest.mark.parametrize("width", [1, 4, 8, 32])
def test_digits_cnn_shape_and_parameter_count(width):
    model = cnn.DigitsCNN(width)
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    assert cnn.count_parameters(model) == cnn.digits_cnn_param_count(width) == 27 * width**2 + 93 * width + 10


def test_digits_mlp():
    model = cnn.digits_mlp(32)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert cnn.count_parameters(model) == 75 * 32 + 10


def test_feature_maps_of_the_digits_cnn():
    model = cnn.DigitsCNN(4).train()
    maps = cnn.feature_maps(model, torch.randn(2, 1, 8, 8))
    assert [tuple(m.shape) for _, m in maps] == [(2, 4, 8, 8), (2, 4, 8, 8), (2, 4, 4, 4),
                                                 (2, 8, 4, 4), (2, 8, 2, 2)]
    assert [name for name, _ in maps] == ["features.1", "features.3", "features.4", "features.6",
                                          "features.7"]
    assert model.training  # restored
    assert all(not m._forward_hooks for m in model.modules())


def test_inception_block_concatenates_its_branches():
    block = cnn.InceptionBlock(16, c1=8, c3_reduce=4, c3=12, c5_reduce=2, c5=4, pool_proj=4)
    assert block(torch.randn(2, 16, 7, 7)).shape == (2, 28, 7, 7)
    reduce_then_5x5 = (16 * 2 + 2) + (2 * 4 * 25 + 4)
    assert cnn.count_parameters(block.branch5) == reduce_then_5x5


def test_random_shift_moves_each_image_by_at_most_max_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(50, 2, 8, 8)
    x[:, :, 3:5, 3:5] = torch.rand(50, 2, 2, 2, generator=g) + 0.5  # content away from the edge
    assert cnn.random_shift(x, 0) is x
    shifted = cnn.random_shift(x, 1, generator=g)
    assert shifted.shape == x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    moves = set()
    for i in range(len(x)):
        found = [(dy, dx) for dy in range(3) for dx in range(3)
                 if torch.equal(shifted[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert found, f"image {i} is not a shift of the input"
        moves.add(found[0])
    assert len(moves) >= 7  # the offsets vary from image to image
    torch.testing.assert_close(shifted.sum(), x.sum())  # nothing fell off the edge


def test_full_recipe_reaches_97_percent_on_the_digits_test_split(one_torch_thread):
    digits = load_digits()
    torch.manual_seed(0)
    model = cnn.DigitsCNN(32)
    history = cnn.train_classifier(model, (cnn.as_images(digits.train.x), digits.train.y), epochs=20,
                                   lr=3e-3, max_shift=1, seed=0, device="cpu", progress=False,
                                   val=(cnn.as_images(digits.val.x), digits.val.y))
    assert len(history.epochs["train_loss"]) == 20 and len(history.epochs["val_acc"]) == 20
    assert history.epochs["train_loss"][-1] < 0.1 * history.epochs["train_loss"][0]
    assert cnn.evaluate_accuracy(model, cnn.as_images(digits.test.x), digits.test.y) >= 0.97


def test_train_classifier_rejects_zero_epochs():
    with pytest.raises(ValueError):
        cnn.train_classifier(cnn.DigitsCNN(2), (torch.zeros(4, 1, 8, 8), torch.zeros(4).long()),
                             epochs=0, lr=1e-3)
