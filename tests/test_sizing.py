"""Unit tests for course_lib.sizing: parameter, memory and compute arithmetic (chapter 0).

Parameter counts are checked against what PyTorch itself counts for the stated architectures,
built on the ``meta`` device (shapes without memory) so that even GPT-2 XL costs nothing.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from torch import nn

from course_lib import sizing

GPT2_SIZES = {  # (n_layer, d_model) -> published parameter count with vocab 50257, block 1024
    (12, 768): 124_439_808,
    (24, 1024): 354_823_168,
    (36, 1280): 774_030_080,
    (48, 1600): 1_557_611_200,
}


class _Block(nn.Module):
    """The GPT-2 block's parameters as stated in course_lib.sizing's docstring."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)


class _GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int, d_model: int,
                 tied: bool) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(block_size, d_model)
        self.h = nn.ModuleList(_Block(d_model) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight


def _torch_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # shared tensors are counted once


def _gpt_torch_count(vocab_size: int, block_size: int, n_layer: int, d_model: int,
                     tied: bool) -> int:
    with torch.device("meta"):
        return _torch_count(_GPT(vocab_size, block_size, n_layer, d_model, tied))


# --- parameters -------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "expected"), GPT2_SIZES.items())
def test_gpt2_published_sizes(shape: tuple[int, int], expected: int) -> None:
    n_layer, d_model = shape
    assert sizing.gpt_param_count(50257, 1024, n_layer, d_model) == expected
    assert sizing.gpt_param_count(50257, 1024, n_layer, d_model, tied=False) == (
        expected + 50257 * d_model)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize(("vocab_size", "block_size", "n_layer", "d_model"),
                         [(10, 4, 1, 2), (10, 4, 0, 2), (1, 1, 1, 1), (65, 256, 6, 384),
                          (50257, 1024, 12, 768), (32000, 4096, 32, 4096)])
def test_gpt_count_matches_torch_model(vocab_size: int, block_size: int, n_layer: int,
                                       d_model: int, tied: bool) -> None:
    expected = _gpt_torch_count(vocab_size, block_size, n_layer, d_model, tied)
    assert sizing.gpt_param_count(vocab_size, block_size, n_layer, d_model, tied=tied) == expected


def test_gpt_count_random_configs_match_torch_model() -> None:
    rng = random.Random(0)
    for _ in range(10):
        config = (rng.randint(1, 3000), rng.randint(1, 512), rng.randint(0, 4),
                  rng.randint(1, 96), rng.random() < 0.5)
        assert sizing.gpt_param_count(*config[:4], tied=config[4]) == _gpt_torch_count(*config)


def test_gpt_count_is_an_int_and_rejects_bad_sizes() -> None:
    assert type(sizing.gpt_param_count(50257, 1024, 12, 768)) is int
    with pytest.raises(ValueError):
        sizing.gpt_param_count(0, 1024, 12, 768)
    with pytest.raises(ValueError):
        sizing.gpt_param_count(50257, 1024, -1, 768)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("sizes", [[1, 1], [2, 3, 1], (784, 128, 10), [64, 256, 256, 256, 10],
                                   [4096, 16384, 4096]])
def test_mlp_count_matches_sequential(sizes: list[int], bias: bool) -> None:
    layers = []
    for n_in, n_out in itertools.pairwise(sizes):
        layers += [nn.Linear(n_in, n_out, bias=bias, device="meta"), nn.ReLU()]
    assert sizing.mlp_param_count(sizes, bias=bias) == _torch_count(nn.Sequential(*layers))


def test_mlp_count_small_cases_by_hand() -> None:
    assert sizing.mlp_param_count([2, 3, 1]) == 13
    assert sizing.mlp_param_count([2, 3, 1], bias=False) == 9
    assert type(sizing.mlp_param_count([2, 3, 1])) is int


@pytest.mark.parametrize("bad", [[], [5], [3, 0, 2], [4, -1]])
def test_mlp_count_rejects_bad_sizes(bad: list[int]) -> None:
    with pytest.raises(ValueError):
        sizing.mlp_param_count(bad)


# --- memory -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("precision", "size"),
                         [("fp32", 4), ("bf16", 2), ("fp16", 2), ("FP32", 4), ("fp8", 1),
                          (torch.float32, 4), (torch.bfloat16, 2), (torch.float16, 2),
                          (torch.float64, 8)])
def test_bytes_per_value(precision: str | torch.dtype, size: int) -> None:
    assert sizing.bytes_per_value(precision) == size


@pytest.mark.parametrize(("precision", "optimizer", "per_param"),
                         [("fp32", "adam", (4, 4, 8)), ("fp32", "sgd", (4, 4, 0)),
                          ("fp32", "momentum", (4, 4, 4)), ("bf16", "adam", (2, 2, 4)),
                          ("fp16", "momentum", (2, 2, 2)), ("bf16", "sgd", (2, 2, 0)),
                          ("fp16", "AdamW", (2, 2, 4))])
def test_training_memory_bytes(precision: str, optimizer: str,
                               per_param: tuple[int, int, int]) -> None:
    n = 123_456_789_012
    memory = sizing.training_memory_bytes(n, precision, optimizer)
    assert set(memory) == {"weights", "gradients", "optimizer", "total"}
    assert all(type(v) is int for v in memory.values())
    assert (memory["weights"], memory["gradients"], memory["optimizer"]) == tuple(
        n * b for b in per_param)
    assert memory["total"] == n * sum(per_param)


def test_training_memory_defaults_and_errors() -> None:
    assert sizing.training_memory_bytes(1000) == {
        "weights": 4000, "gradients": 4000, "optimizer": 8000, "total": 16000}
    assert sizing.training_memory_bytes(0)["total"] == 0
    with pytest.raises(ValueError, match="precision"):
        sizing.training_memory_bytes(10, "fp12")
    with pytest.raises(ValueError, match="optimizer"):
        sizing.training_memory_bytes(10, "fp32", "lion")


def test_training_memory_matches_real_adam_state() -> None:
    """Adam's state really is two tensors the size of each parameter (plus a scalar step)."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    n = _torch_count(model)
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                      for key, t in s.items() if key != "step")
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    memory = sizing.training_memory_bytes(n, "fp32", "adam")
    assert memory["optimizer"] == state_bytes
    assert memory["gradients"] == grad_bytes


# --- compute ----------------------------------------------------------------------------------


def test_training_flops_is_6nd() -> None:
    assert sizing.training_flops(1_000_000, 2_000_000) == pytest.approx(1.2e13, rel=1e-12)
    assert sizing.training_flops(175e9, 300e9) == pytest.approx(3.15e23, rel=1e-12)  # GPT-3
    assert sizing.training_flops(405e9, 15.6e12) == pytest.approx(3.79e25, rel=1e-3)  # Llama 3.1
    assert sizing.training_flops(0, 10**12) == 0
    assert isinstance(sizing.training_flops(10**12, 10**13), float)  # no int64 overflow trouble


def test_training_flops_matches_counted_linear_flops() -> None:
    """6 FLOPs per weight per token: forward 2, backward 4 (input and weight gradients)."""
    n_in, n_out, tokens = 32, 16, 10
    forward = 2 * tokens * n_in * n_out             # x @ W^T
    backward = 2 * forward                          # dx = dy @ W and dW = dy^T @ x
    assert sizing.training_flops(n_in * n_out, tokens) == forward + backward


def test_training_days() -> None:
    # 6e19 FLOPs at 1e15 FLOP/s and 50% utilisation: 1.2e5 s.
    assert sizing.training_days(1e9, 1e10, 1e15, mfu=0.5) == pytest.approx(1.2e5 / 86_400)
    assert sizing.training_days(1e9, 1e10, 1e15) == pytest.approx(1.5e5 / 86_400)  # mfu 0.4
    one = sizing.training_days(7e9, 1.4e11, 989e12, mfu=0.4, n_gpus=1)
    assert sizing.training_days(7e9, 1.4e11, 989e12, mfu=0.4, n_gpus=64) == pytest.approx(one / 64)
    for bad in [0.0, -0.1, 1.5]:
        with pytest.raises(ValueError):
            sizing.training_days(1e9, 1e10, 1e15, mfu=bad)


# --- pairwise distances -----------------------------------------------------------------------


def _brute_force(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.float64)
    for i, j in itertools.product(range(a.shape[0]), range(b.shape[0])):
        out[i, j] = math.fsum(((a[i].double() - b[j].double()) ** 2).tolist())
    return out


@pytest.mark.parametrize(("n", "m", "d"), [(1, 1, 1), (5, 4, 3), (7, 1, 2), (0, 3, 2), (3, 0, 2)])
def test_pairwise_sq_distances_brute_force(n: int, m: int, d: int) -> None:
    g = torch.Generator().manual_seed(n * 100 + m * 10 + d)
    a, b = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    result = sizing.pairwise_sq_distances(a, b)
    assert result.shape == (n, m)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result.double(), _brute_force(a, b), atol=1e-5, rtol=1e-5)


def test_pairwise_sq_distances_matches_cdist_and_keeps_dtype() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20, 6, generator=g, dtype=torch.float64)
    b = torch.randn(30, 6, generator=g, dtype=torch.float64)
    result = sizing.pairwise_sq_distances(a, b)
    assert result.dtype == torch.float64
    torch.testing.assert_close(result, torch.cdist(a, b) ** 2, atol=1e-10, rtol=1e-10)


def test_pairwise_sq_distances_precise_far_from_origin() -> None:
    """Points around 1000 that differ by ~0.1: the |a|^2 + |b|^2 - 2ab expansion fails here."""
    g = torch.Generator().manual_seed(1)
    centre = 1000.0 * torch.randn(1, 3, generator=g, dtype=torch.float64)
    a = (centre + 0.1 * torch.randn(20, 3, generator=g, dtype=torch.float64)).float()
    b = (centre + 0.1 * torch.randn(30, 3, generator=g, dtype=torch.float64)).float()
    exact = ((a.double()[:, None] - b.double()[None]) ** 2).sum(-1)
    result = sizing.pairwise_sq_distances(a, b)
    torch.testing.assert_close(result.double(), exact, atol=1e-5, rtol=1e-4)
    expanded = (a * a).sum(1, keepdim=True) + (b * b).sum(1) - 2 * a @ b.T
    assert not torch.allclose(expanded.double(), exact, atol=1e-5, rtol=1e-4)  # the test has teeth


@pytest.mark.parametrize(("shape_a", "shape_b"), [((3, 2), (4, 3)), ((3,), (4, 3)),
                                                  ((2, 3, 2), (4, 2))])
def test_pairwise_sq_distances_rejects_bad_shapes(shape_a: tuple[int, ...],
                                                  shape_b: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        sizing.pairwise_sq_distances(torch.zeros(shape_a), torch.zeros(shape_b))


# --- chapter 11: memory per GPU with sharding, activations ------------------------------------


@pytest.mark.parametrize(("precision", "optimizer", "per_param"),
                         [("fp32", "adam", (4, 4, 0, 8)), ("bf16", "adam", (2, 2, 4, 8)),
                          ("fp16", "AdamW", (2, 2, 4, 8)), ("bf16", "sgd", (2, 2, 4, 0)),
                          ("fp32", "momentum", (4, 4, 0, 4)), ("BF16", "momentum", (2, 2, 4, 4))])
def test_memory_per_gpu_unsharded(precision: str, optimizer: str,
                                  per_param: tuple[int, int, int, int]) -> None:
    n = 7_000_000_001
    memory = sizing.memory_per_gpu(n, precision, optimizer)
    assert set(memory) == {"weights", "gradients", "master", "optimizer", "total"}
    assert all(type(v) is int for v in memory.values())
    assert (memory["weights"], memory["gradients"], memory["master"], memory["optimizer"]) == tuple(
        n * b for b in per_param)
    assert memory["total"] == n * sum(per_param)


def test_memory_per_gpu_zero_paper_numbers() -> None:
    """ZeRO (Rajbhandari et al. 2020), figure 1: a 7.5B model with Adam in mixed precision on 64
    GPUs needs 120 GB per GPU replicated, 31.4 GB with stage 1, 16.6 GB with stage 2, 1.9 GB with
    stage 3 (their GB is 1e9 bytes)."""
    n = 7_500_000_000
    want = {0: 120.0, 1: 31.4, 2: 16.6, 3: 1.9}
    for stage, gb in want.items():
        total = sizing.memory_per_gpu(n, "bf16", "adam", world_size=64, zero_stage=stage)["total"]
        assert total / 1e9 == pytest.approx(gb, abs=0.06)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_memory_per_gpu_shards_with_padding(stage: int) -> None:
    n, world = 1001, 4  # 251 parameters per shard (1004 padded)
    memory = sizing.memory_per_gpu(n, "bf16", "adam", world_size=world, zero_stage=stage)
    count = {key: (251 if stage >= cut else n) for key, cut in
             (("weights", 3), ("gradients", 2), ("master", 1), ("optimizer", 1))}
    assert memory["weights"] == 2 * count["weights"]
    assert memory["gradients"] == 2 * count["gradients"]
    assert memory["master"] == 4 * count["master"]
    assert memory["optimizer"] == 8 * count["optimizer"]
    assert memory["total"] == sum(v for k, v in memory.items() if k != "total")
    # one GPU: sharding changes nothing
    assert sizing.memory_per_gpu(n, "bf16", "adam", 1, stage) == sizing.memory_per_gpu(n, "bf16", "adam")


def test_memory_per_gpu_matches_training_memory_in_fp32() -> None:
    for optimizer in ("sgd", "momentum", "adam"):
        mine = sizing.memory_per_gpu(12345, "fp32", optimizer)
        old = sizing.training_memory_bytes(12345, "fp32", optimizer)
        assert mine["total"] == old["total"] and mine["optimizer"] == old["optimizer"]


def test_memory_per_gpu_errors() -> None:
    with pytest.raises(ValueError, match="precision"):
        sizing.memory_per_gpu(10, "fp8")
    with pytest.raises(ValueError, match="optimizer"):
        sizing.memory_per_gpu(10, "bf16", "lion")
    for bad in [dict(world_size=0), dict(zero_stage=4), dict(zero_stage=-1)]:
        with pytest.raises(ValueError):
            sizing.memory_per_gpu(10, "bf16", "adam", **bad)


def test_activation_memory_formula() -> None:
    # GPT-3 175B's shape (Korthikanti et al., table 2 setting): s 2048, h 12288, a 96, 96 layers, b 1
    s, h, a, layers = 2048, 12288, 96, 96
    per_layer = s * h * (34 + 5 * a * s / h)
    assert sizing.activation_memory_bytes(1, s, h, layers, a) == round(layers * per_layer)
    assert sizing.activation_memory_bytes(1, s, h, layers, a, attention_scores=False) == layers * 34 * s * h
    assert sizing.activation_memory_bytes(1, s, h, layers, a, recompute=True) == layers * 2 * s * h
    # linear in the batch and the number of layers, quadratic term in the sequence length
    one = sizing.activation_memory_bytes(1, 128, 64, 2, 4)
    assert sizing.activation_memory_bytes(8, 128, 64, 2, 4) == 8 * one
    assert sizing.activation_memory_bytes(1, 128, 64, 6, 4) == 3 * one
    assert sizing.activation_memory_bytes(1, 256, 64, 2, 4) > 2 * one
    assert sizing.activation_memory_bytes(1, 128, 64, 0, 4) == 0
    assert type(one) is int
    with pytest.raises(ValueError):
        sizing.activation_memory_bytes(0, 128, 64, 2, 4)
