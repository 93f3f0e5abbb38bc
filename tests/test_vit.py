"""Behaviour of course_lib.vit, chapter 8's vision transformer: patches in row-major order equal to a
strided convolution, an attention layer without the causal mask (every position sees every other),
and a ViT whose shapes, pooling and parameter count are as stated and which learns the digits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from course_lib import vit
from course_lib.cnn import as_images, count_parameters, evaluate_accuracy, train_classifier
from course_lib.data import load_digits
from course_lib.gpt import CausalSelfAttention, GPTConfig

F64 = torch.float64


def test_patchify_by_hand():
    image = torch.arange(16.0).view(1, 1, 4, 4)
    assert vit.patchify(image, 2).tolist() == [[[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]]
    two_channels = torch.stack([image[0, 0], 100 + image[0, 0]]).unsqueeze(0)
    assert vit.patchify(two_channels, 2)[0, 1].tolist() == [2, 3, 6, 7, 102, 103, 106, 107]


@pytest.mark.parametrize("shape,patch", [((2, 1, 8, 8), 4), ((3, 3, 6, 9), 3), ((1, 2, 4, 10), 2),
                                         ((2, 1, 8, 8), 1), ((1, 1, 8, 8), 8)])
def test_patchify_is_a_strided_convolution(shape, patch):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(shape, generator=gen, dtype=F64)
    weight = torch.randn(5, shape[1], patch, patch, generator=gen, dtype=F64)
    bias = torch.randn(5, generator=gen, dtype=F64)
    tokens = vit.patchify(images, patch)
    assert tokens.shape == (shape[0], (shape[2] // patch) * (shape[3] // patch), shape[1] * patch * patch)
    as_conv = vit.patch_embedding_as_conv(images, weight, bias, patch)
    torch.testing.assert_close(tokens @ weight.view(5, -1).T + bias, as_conv, rtol=1e-12, atol=1e-12)
    # The same vectors as chapter 6's im2col with kernel = stride = patch, laid out as rows.
    torch.testing.assert_close(tokens, F.unfold(images, patch, stride=patch).transpose(1, 2), rtol=0, atol=0)


def test_patchify_keeps_dtype_and_rejects_sizes():
    assert vit.patchify(torch.zeros(1, 1, 4, 4, dtype=torch.float16), 2).dtype == torch.float16
    for shape, patch in (((1, 1, 8, 9), 2), ((1, 1, 6, 8), 4)):
        with pytest.raises(ValueError):
            vit.patchify(torch.zeros(shape), patch)


def test_self_attention_is_the_gpt_layer_without_the_mask():
    config = GPTConfig(vocab_size=1, block_size=8, n_layer=1, n_head=2, n_embd=8)
    torch.manual_seed(0)
    causal = CausalSelfAttention(config).double().eval()
    encoder = vit.SelfAttention(config).double().eval()
    encoder.load_state_dict(causal.state_dict())
    x = torch.randn(2, 5, 8, dtype=F64)
    # The last position sees everything in both; the others see later positions only without the mask.
    torch.testing.assert_close(encoder(x)[:, -1], causal(x)[:, -1])
    assert not torch.allclose(encoder(x)[:, 0], causal(x)[:, 0])
    changed = x.clone()
    changed[:, -1] += 1.0
    assert not torch.allclose(encoder(changed)[:, 0], encoder(x)[:, 0])
    block = vit.encoder_block(config)
    assert sorted(block.state_dict()) == sorted(vit.Block(config).state_dict())


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_shapes_and_parameters(pool):
    config = vit.ViTConfig(image_size=8, patch=4, channels=1, n_classes=10, n_layer=2, n_head=4, n_embd=16,
                           pool=pool)
    model = vit.ViT(config)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    c, tokens = 16, 4 + 1
    per_block = 12 * c * c + 13 * c
    expected = (16 * c + c) + c + tokens * c + 2 * per_block + 2 * c + (c * 10 + 10)
    assert count_parameters(model) == expected


def test_vit_pooling_reads_the_right_tokens():
    torch.manual_seed(0)
    model = vit.ViT(vit.ViTConfig(n_embd=16, n_layer=1, n_head=2, pool="cls")).eval()
    images = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        logits = model(images)
        model.pos_embed[:, 0] += 1.0                                  # moves the class token only
        assert not torch.allclose(model(images), logits)


def test_vit_config_rejects_bad_shapes():
    with pytest.raises(ValueError):
        vit.ViTConfig(image_size=8, patch=3)
    with pytest.raises(ValueError):
        vit.ViTConfig(pool="max")


def test_small_vit_learns_the_digits():
    digits = load_digits()
    torch.manual_seed(0)
    model = vit.ViT(vit.ViTConfig(n_embd=32, n_layer=1, n_head=2))
    train_classifier(model, (as_images(digits.train.x), digits.train.y), epochs=4, lr=3e-3, seed=0,
                     progress=False)
    # Guessing gives 10%; four epochs of the chapter's quick recipe reach well above it.
    assert evaluate_accuracy(model, as_images(digits.test.x), digits.test.y) > 0.5
