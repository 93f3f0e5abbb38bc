"""course_lib.gpt: shapes, causality, the two attention paths, the KV cache, sampling, and the
compute arithmetic (FLOPs per token, MFU)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from course_lib import sizing
from course_lib.gpt import (
    CHAR_10M,
    GPT,
    GPT2_124M,
    PEAK_BF16_FLOPS,
    GPTConfig,
    KVCache,
    attention_math,
    causal_mask,
    decode_step_static,
    flops_per_token,
    generate,
    mfu,
    padded_vocab_size,
    peak_bf16_flops,
    sample_next_token,
    top_k_filter,
    top_p_filter,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(**overrides) -> GPTConfig:
    values = dict(vocab_size=37, block_size=24, n_layer=2, n_head=4, n_embd=32)
    values.update(overrides)
    return GPTConfig(**values)


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides)).eval()


def random_ids(batch: int, length: int, vocab: int = 37, seed: int = 1) -> torch.Tensor:
    return torch.randint(vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- config and sizes ---------------------------------------------------------------------------


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="attention"):
        GPTConfig(attention="flash")
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(dropout=1.0)
    config = tiny_config(dropout=0.1)
    assert GPTConfig.from_dict(config.to_dict()) == config
    assert padded_vocab_size(50257, 64) == 50304 and padded_vocab_size(64, 64) == 64


def test_param_count_matches_the_chapter_0_formula():
    for config in (tiny_config(), CHAR_10M, GPT2_124M):
        with torch.device("meta"):  # no memory, no init cost: only the shapes
            model = GPT(config)
        expected = sizing.gpt_param_count(config.vocab_size, config.block_size, config.n_layer,
                                          config.n_embd, tied=True)
        assert model.num_params() == expected
        position_table = config.block_size * config.n_embd
        assert model.num_params(exclude_position_embedding=True) == expected - position_table
    with torch.device("meta"):
        assert GPT(GPT2_124M).num_params() == 124_475_904  # GPT-2 small with vocabulary 50,304


def test_weight_tying_shares_one_matrix():
    model = tiny_model()
    assert model.lm_head.weight is model.wte.weight
    ids = random_ids(2, 10)
    _, loss = model(ids, ids)
    loss.backward()
    # The shared matrix gets gradient from both uses: the head (every row) and the lookup.
    assert model.wte.weight.grad is not None and model.wte.weight.grad.abs().sum() > 0


def test_gpt2_initialisation_scales():
    torch.manual_seed(0)
    config = tiny_config(n_layer=8, n_embd=256, n_head=4, vocab_size=512)
    model = GPT(config)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    assert model.blocks[3].attn.proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert model.blocks[3].mlp.proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0
    assert torch.equal(model.ln_f.weight, torch.ones(256))


# --- forward ------------------------------------------------------------------------------------


def test_forward_shapes_and_initial_loss():
    model = tiny_model(vocab_size=64)
    ids = random_ids(3, 24, vocab=64)
    targets = random_ids(3, 24, vocab=64, seed=2)
    logits, loss = model(ids, targets)
    assert logits.shape == (3, 24, 64) and logits.dtype == torch.float32
    assert loss.shape == ()
    # Small initial weights give nearly uniform predictions: loss close to ln(vocab). (Targets
    # equal to the inputs would score better: the tied head favours the token it just read.)
    assert loss.item() == pytest.approx(math.log(64), abs=0.15)
    logits_last, none = model(ids, last_only=True)
    assert none is None and logits_last.shape == (3, 1, 64)
    torch.testing.assert_close(logits_last[:, 0], logits[:, -1], rtol=0, atol=1e-6)


def test_ignore_index_targets():
    model = tiny_model()
    ids = random_ids(2, 12)
    targets = ids.clone()
    targets[:, :6] = -1
    _, loss = model(ids, targets)
    logits, _ = model(ids)
    expected = F.cross_entropy(logits[:, 6:].reshape(-1, 37), ids[:, 6:].reshape(-1))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


def test_context_longer_than_block_size_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="block_size"):
        model(random_ids(1, 25))


@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_changing_a_future_token_never_changes_earlier_logits(attention):
    model = tiny_model(attention=attention)
    ids = random_ids(2, 20)
    base, _ = model(ids)
    for t in (1, 7, 19):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 5) % 37
        logits, _ = model(changed)
        torch.testing.assert_close(logits[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert (logits[:, t] - base[:, t]).abs().max() > 1e-3  # the changed position does change


def test_math_attention_equals_sdpa_in_float64():
    sdpa = tiny_model(attention="sdpa").double()
    math_model = tiny_model(attention="math").double()
    math_model.load_state_dict(sdpa.state_dict())
    ids = random_ids(3, 24)
    a, loss_a = sdpa(ids, ids)
    b, loss_b = math_model(ids, ids)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-12)


def test_math_attention_equals_sdpa_in_float32_with_gradients():
    sdpa = tiny_model(attention="sdpa")
    math_model = tiny_model(attention="math")
    ids = random_ids(2, 16)
    sdpa(ids, ids)[1].backward()
    math_model(ids, ids)[1].backward()
    for (name, p), q in zip(sdpa.named_parameters(), math_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_math_function_matches_torch(causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g, dtype=torch.float64) for _ in range(3))
    out, weights = attention_math(q, k, v, causal=causal)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 9, dtype=torch.float64))
    if causal:
        assert torch.all(weights.triu(diagonal=1) == 0)


def test_causal_mask_with_a_cached_prefix():
    assert torch.equal(causal_mask(3, 3), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    # Two new queries after three cached keys sit at positions 3 and 4.
    assert torch.equal(causal_mask(2, 5), torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))
    assert causal_mask(1, 6).all()


def test_attention_weights_for_plots():
    model = tiny_model()
    weights = model.attention_weights(random_ids(2, 10))
    assert weights.shape == (2, 2, 4, 10, 10)  # (layer, batch, head, query, key)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 4, 10))
    assert torch.all(weights.triu(diagonal=1) == 0)


def test_dropout_only_in_training_mode():
    model = tiny_model(dropout=0.5)
    ids = random_ids(2, 12)
    model.eval()
    torch.testing.assert_close(model(ids)[0], model(ids)[0], rtol=0, atol=0)
    model.train()
    assert not torch.allclose(model(ids)[0], model(ids)[0])


def test_a_tiny_model_overfits_one_batch():
    model = tiny_model(seed=3, vocab_size=16, n_embd=32, n_head=2)
    model.train()
    ids = random_ids(4, 24, vocab=16, seed=5)
    x, y = ids[:, :-1], ids[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(150):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, f"loss after 150 steps on one batch: {loss.item():.4f}"


# --- KV cache and generation --------------------------------------------------------------------


def test_kv_cache_gives_the_same_logits_as_the_full_forward():
    model = tiny_model()
    ids = random_ids(2, 20)
    full, _ = model(ids)
    cache = model.new_cache()
    pieces = [model(ids[:, :8], cache=cache)[0]]  # a prefix of 8, then 3 tokens, then one by one
    pieces.append(model(ids[:, 8:11], cache=cache)[0])
    for t in range(11, 20):
        pieces.append(model(ids[:, t:t + 1], cache=cache)[0])
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)


def test_kv_cache_refuses_to_overflow():
    cache = KVCache(n_layer=1, max_len=4)
    k = torch.zeros(1, 2, 3, 8)
    cache.update(0, k, k)
    cache.advance(3)
    with pytest.raises(ValueError, match="KV cache"):
        cache.update(0, k, k)


def test_static_decode_step_matches_the_dynamic_cache():
    model = tiny_model()
    ids = random_ids(2, 16)
    full, _ = model(ids)
    cache = model.new_cache()
    model(ids[:, :5], cache=cache)
    # Positions not written yet are read (with weight 0) by the static step: they must be finite.
    assert torch.all(cache.keys[:, :, :, 5:] == 0) and torch.all(cache.values[:, :, :, 5:] == 0)
    for t in range(5, 16):
        position = torch.tensor([t])
        logits = decode_step_static(model, ids[:, t:t + 1], position, cache.keys, cache.values)
        cache.advance(1)
        torch.testing.assert_close(logits, full[:, t], rtol=0, atol=1e-5)


def test_greedy_generation_is_identical_with_and_without_the_cache():
    model = tiny_model(vocab_size=37)
    prompt = random_ids(3, 4)
    new = model.config.block_size - 4  # the whole context window
    with_cache = model.generate(prompt, new, temperature=0, use_cache=True)
    without = model.generate(prompt, new, temperature=0, use_cache=False)
    assert with_cache.shape == (3, 24)
    assert torch.equal(with_cache[:, :4], prompt)
    assert torch.equal(with_cache, without)


def test_generation_past_the_block_size():
    model = tiny_model()
    prompt = random_ids(1, 30)  # longer than the window: only its last block_size tokens are read
    for use_cache in (True, False):
        out = model.generate(prompt, 40, temperature=0, use_cache=use_cache)
        assert out.shape == (1, 70)
        assert int(out.max()) < 37


def test_sampling_is_repeatable_with_a_generator_and_restores_training_mode():
    model = tiny_model()
    model.train()
    prompt = random_ids(2, 3)
    a = model.generate(prompt, 10, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(4))
    b = model.generate(prompt, 10, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert model.training


class CountingModel:
    """A GPT seen through a wrapper that records how many positions each call feeds."""

    def __init__(self, model):
        self.model, self.config, self.calls = model, model.config, []

    def __call__(self, idx, *args, cache=None, **kwargs):
        self.calls.append((idx.shape[1], None if cache is None else cache.length))
        return self.model(idx, *args, cache=cache, **kwargs)

    def new_cache(self):
        return self.model.new_cache()

    def eval(self):
        return self.model.eval()

    def train(self, mode=True):
        return self.model.train(mode)

    @property
    def training(self):
        return self.model.training


def test_generate_function_matches_the_method_and_feeds_one_token_per_step():
    model = tiny_model()
    prompt = random_ids(2, 5)
    for new in (3, 19, 45):  # within the window, filling it, and past it (the cache refills)
        counted = CountingModel(model)
        out = generate(counted, prompt, new, temperature=0)
        assert torch.equal(out, model.generate(prompt, new, temperature=0))
        if new <= 19:
            assert torch.equal(out, generate(model, prompt, new, temperature=0, use_cache=False))
        assert counted.calls[0] == (5, 0)
        decode = [c for c in counted.calls[1:] if c[1] != 0]
        assert all(length == 1 for length, _ in decode) and len(counted.calls) == new
        refills = [c for c in counted.calls[1:] if c[1] == 0]
        assert refills == [(12, 0)] * len(refills) and len(refills) == max(0, (new - 21) // 13 + 1)
        plain = CountingModel(model)
        generate(plain, prompt, new, temperature=0, use_cache=False)
        assert [c[1] for c in plain.calls] == [None] * new
        assert [c[0] for c in plain.calls] == [min(5 + i, 24) for i in range(new)]
    for top_k in (None, 5):
        a = generate(model, prompt, 30, 0.9, top_k, generator=torch.Generator().manual_seed(2))
        b = model.generate(prompt, 30, 0.9, top_k, generator=torch.Generator().manual_seed(2))
        assert torch.equal(a, b)


def test_generate_function_restores_the_mode_and_crops_a_long_prompt():
    model = tiny_model(dropout=0.5).train()
    prompt = random_ids(1, 30)
    counted = CountingModel(model)
    out = generate(counted, prompt, 4, temperature=0)
    assert model.training and counted.calls[0] == (24, 0) and counted.calls[1] == (12, 0)
    assert torch.equal(out, model.generate(prompt, 4, temperature=0))


# --- sampling filters ---------------------------------------------------------------------------


def test_temperature_zero_and_top_one_are_greedy():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 0.0, 0.0]])
    expected = torch.tensor([[1], [0]])
    assert torch.equal(sample_next_token(logits, temperature=0), expected)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert torch.equal(sample_next_token(logits, top_k=1, generator=g), expected)
        assert torch.equal(sample_next_token(logits, top_p=0.01, generator=g), expected)
    with pytest.raises(ValueError):
        sample_next_token(logits, temperature=-1)


def test_top_k_filter_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = top_k_filter(logits, 2)
    assert torch.equal(torch.isfinite(kept), torch.tensor([[False, True, False, True, False]]))
    assert torch.equal(top_k_filter(logits, 10), logits)


def test_top_p_filter_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    keep = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert keep(0.4) == [False, True, False, False]
    assert keep(0.75) == [False, True, False, True]  # 0.5 < 0.75 <= 0.5 + 0.3
    assert keep(0.9) == [False, True, True, True]
    assert keep(1.0) == [True, True, True, True]
    with pytest.raises(ValueError):
        top_p_filter(logits, 0.0)


def test_sampled_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([0.05, 0.5, 0.15, 0.3]).log().expand(20_000, 4)
    g = torch.Generator().manual_seed(0)
    tokens = sample_next_token(logits, temperature=1.0, top_p=0.75, generator=g)[:, 0]
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    expected = torch.tensor([0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8])
    torch.testing.assert_close(freq, expected, rtol=0, atol=0.015)
    hot = sample_next_token(logits, temperature=2.0, generator=g)[:, 0]
    freq_hot = torch.bincount(hot, minlength=4).float() / len(hot)
    flat = torch.tensor([0.05, 0.5, 0.15, 0.3]).sqrt()  # temperature 2: p^(1/2), renormalised
    torch.testing.assert_close(freq_hot, flat / flat.sum(), rtol=0, atol=0.015)


# --- FLOPs and MFU ------------------------------------------------------------------------------


def test_flops_per_token():
    with torch.device("meta"):
        model = GPT(GPT2_124M)
    n = 124_475_904 - 1024 * 768
    assert model.flops_per_token() == 6 * n + 12 * 12 * 768 * 1024
    assert model.flops_per_token(256) == 6 * n + 12 * 12 * 768 * 256
    assert flops_per_token(1000, 2, 8, 4) == 6000 + 12 * 2 * 8 * 4


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA A10", 125e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA A10G", None),
    ("Tesla T4", None),
    ("NVIDIA GeForce RTX 3090", None),
])
def test_peak_table(name, peak):
    assert peak_bf16_flops(device_name=name) == peak


def test_no_made_up_mfu():
    assert peak_bf16_flops("cpu") is None
    assert mfu(1e5, 1e9, None) is None
    assert mfu(5e5, 1e9, 1e15) == pytest.approx(0.5)
    assert mfu(5e5, 1e9, 1e15, n_gpus=2) == pytest.approx(0.25)
    assert all(peak > 1e13 for _, _, peak in PEAK_BF16_FLOPS)
