"""Tests of course_lib.attention against PyTorch's attention and course_lib.gpt's modules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from course_lib import attention as A
from course_lib.gpt import Block, CausalSelfAttention, GPTConfig

F64 = torch.float64


def _qkv(*shape, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g, dtype=dtype) for _ in range(3))


@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_matches_pytorch(is_causal):
    q, k, v = _qkv(2, 3, 7, 8)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    got = A.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_sdpa_with_padding_and_causal_masks():
    q, k, v = _qkv(3, 2, 6, 4, seed=1)
    keys = A.padding_mask([6, 4, 1])[:, None, None, :]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=keys)
    got = A.scaled_dot_product_attention(q, k, v, mask=keys)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    both = keys & torch.ones(6, 6, dtype=torch.bool).tril()
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=both)
    got = A.scaled_dot_product_attention(q, k, v, mask=keys, is_causal=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_sdpa_different_lengths_and_value_width():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(4, 3, 5, generator=g, dtype=F64)
    k = torch.randn(4, 9, 5, generator=g, dtype=F64)
    v = torch.randn(4, 9, 2, generator=g, dtype=F64)
    want = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(A.scaled_dot_product_attention(q, k, v), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="as many queries as keys"):
        A.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_probabilities_rows_sum_to_one_and_respect_the_mask():
    q, k, _ = _qkv(2, 5, 6)
    w = A.attention_probabilities(q, k, is_causal=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 5, dtype=F64), rtol=0, atol=1e-12)
    assert torch.all(w.triu(1) == 0)
    assert w[:, 0, 0].eq(1).all()  # the first query sees only itself


def test_scaling_keeps_the_scores_at_unit_variance():
    g = torch.Generator().manual_seed(3)
    d = 256
    q, k = torch.randn(2000, d, generator=g), torch.randn(2000, d, generator=g)
    scores = (q * k).sum(-1)
    assert abs(scores.var().item() / d - 1) < 0.1
    assert abs((scores / math.sqrt(d)).var().item() - 1) < 0.1


def test_padding_mask():
    mask = A.padding_mask(torch.tensor([3, 1, 0]), 4)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [[True, True, True, False], [True, False, False, False], [False] * 4]
    assert A.padding_mask([2, 5]).shape == (2, 5)


def test_heads_split_and_merge():
    x = torch.arange(2 * 3 * 6.0).view(2, 3, 6)
    heads = A.split_heads(x, 3)
    assert heads.shape == (2, 3, 3, 2)
    torch.testing.assert_close(heads[0, 1, 0], torch.tensor([2.0, 3.0]))  # head 1: channels 2, 3
    torch.testing.assert_close(A.merge_heads(heads), x)


def test_multi_head_matches_nn_multihead_attention():
    torch.manual_seed(4)
    mha = torch.nn.MultiheadAttention(12, 3, batch_first=True).double()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    x = torch.randn(2, 5, 12, dtype=F64)
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    pad = A.padding_mask([5, 3])
    want = mha(x, x, x, key_padding_mask=~pad, need_weights=False)[0]
    got = A.multi_head_attention(x, w_q, w_k, w_v, mha.out_proj.weight, 3, b_q, b_k, b_v, mha.out_proj.bias,
                                 mask=pad[:, None, None, :])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_multi_head_matches_gpt_causal_self_attention():
    torch.manual_seed(5)
    attn = CausalSelfAttention(GPTConfig(vocab_size=1, block_size=8, n_layer=1, n_head=4, n_embd=16)).double()
    with torch.no_grad():
        attn.qkv.bias.normal_()
    x = torch.randn(3, 8, 16, dtype=F64)
    w_q, w_k, w_v = attn.qkv.weight.chunk(3)
    b_q, b_k, b_v = attn.qkv.bias.chunk(3)
    got = A.multi_head_attention(x, w_q, w_k, w_v, attn.proj.weight, 4, b_q, b_k, b_v, attn.proj.bias,
                                 is_causal=True)
    torch.testing.assert_close(got, attn(x), rtol=1e-10, atol=1e-12)
    state = A.gpt_attention_weights(w_q, w_k, w_v, attn.proj.weight, b_q, b_k, b_v, attn.proj.bias)
    config = GPTConfig(vocab_size=1, block_size=8, n_layer=1, n_head=4, n_embd=16)
    fresh = CausalSelfAttention(config).double()
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(x), attn(x), rtol=0, atol=0)


def test_sinusoidal_positions():
    pe = A.sinusoidal_positions(50, 16)
    assert pe.shape == (50, 16) and pe.dtype == torch.float32
    torch.testing.assert_close(pe[0], torch.tensor([0.0, 1.0] * 8))
    p, i = 7, 3
    angle = p / 10000 ** (2 * i / 16)
    torch.testing.assert_close(pe[p, 2 * i], torch.tensor(math.sin(angle)), rtol=0, atol=1e-6)
    torch.testing.assert_close(pe[p, 2 * i + 1], torch.tensor(math.cos(angle)), rtol=0, atol=1e-6)
    # The dot product of two codes depends on their offset only.
    pe = A.sinusoidal_positions(60, 16, dtype=F64)
    torch.testing.assert_close(pe[10] @ pe[13], pe[40] @ pe[43], rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        A.sinusoidal_positions(4, 5)


def test_rope_by_hand():
    x = torch.tensor([[1.0, 0.0, 0.0, 2.0]] * 3, dtype=F64)  # positions 0, 1, 2
    out = A.apply_rope(x)
    torch.testing.assert_close(out[0], x[0], rtol=0, atol=0)
    theta0, theta1 = 1.0, 10000 ** -0.5
    want1 = torch.tensor([math.cos(theta0), math.sin(theta0), -2 * math.sin(theta1), 2 * math.cos(theta1)],
                         dtype=F64)
    torch.testing.assert_close(out[1], want1, rtol=0, atol=1e-12)
    torch.testing.assert_close(A.rope_frequencies(4), torch.tensor([1.0, 0.01], dtype=F64))


def test_rope_keeps_norms_and_scores_depend_on_the_offset_only():
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 16, generator=g, dtype=F64).expand(40, 16)
    k = torch.randn(1, 16, generator=g, dtype=F64).expand(40, 16)
    rq, rk = A.apply_rope(q), A.apply_rope(k)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1), rtol=1e-12, atol=0)
    scores = rq @ rk.T
    for offset in (-5, 0, 3, 11):
        diagonal = torch.diagonal(scores, offset=-offset)  # (m, n) with m - n = offset
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), rtol=1e-10, atol=1e-10)
    shifted = A.apply_rope(q[:5], positions=torch.arange(7, 12))
    torch.testing.assert_close(shifted, rq[7:12], rtol=0, atol=1e-12)
    assert A.apply_rope(torch.randn(2, 3, 5, 8)).dtype == torch.float32


def test_transformer_block_matches_gpt_block():
    torch.manual_seed(7)
    block = Block(GPTConfig(vocab_size=1, block_size=16, n_layer=1, n_head=2, n_embd=8)).double()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(2, 6, 8, dtype=F64)
    state = block.state_dict()
    torch.testing.assert_close(A.transformer_block(x, state, 2), block(x), rtol=1e-10, atol=1e-12)
    # Causal: the first outputs do not change when a later token does.
    y = x.clone()
    y[:, -1] += 1
    out_x, out_y = A.transformer_block(x, state, 2), A.transformer_block(y, state, 2)
    torch.testing.assert_close(out_x[:, :-1], out_y[:, :-1], rtol=0, atol=1e-12)
    assert not torch.allclose(out_x[:, -1], out_y[:, -1])
