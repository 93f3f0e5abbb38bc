"""The CUDA paths of the language-model engine. Skipped without a GPU (CI has none); run on a GPU
machine with ``python -m pytest tests/test_gpu.py`` (``scripts/gpu_lm.sh OUT tests``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from course_lib.gpt import GPT, GPTConfig, peak_bf16_flops
from course_lib.lm_data import LMData
from course_lib.lm_train import TrainConfig, Trainer, load_weights, save_weights
from course_lib.tokenizers import CharTokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
SMALL = GPTConfig(vocab_size=64, block_size=64, n_layer=2, n_head=4, n_embd=64)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def random_data(vocab_size: int = 64, n: int = 50_000, seed: int = 0) -> LMData:
    tokens = np.random.default_rng(seed).integers(0, vocab_size, n).astype(np.uint16)
    return LMData(CharTokenizer(["a"]), tokens, tokens[: n // 10])


def test_sdpa_matches_math_on_cuda_fp32_and_bf16():
    torch.manual_seed(0)
    sdpa = GPT(SMALL).to(CUDA).eval()
    math_model = GPT(GPTConfig(**{**SMALL.to_dict(), "attention": "math"})).to(CUDA).eval()
    math_model.load_state_dict(sdpa.state_dict())
    idx = torch.randint(SMALL.vocab_size, (4, SMALL.block_size), device=CUDA)
    with torch.no_grad():
        # fp32 with TF32 matrix products off: the two paths differ only by summation order.
        torch.backends.cuda.matmul.allow_tf32 = False
        assert relative_error(sdpa(idx)[0], math_model(idx)[0]) < 1e-5
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert relative_error(sdpa(idx)[0], math_model(idx)[0]) < 2e-2


def test_greedy_generation_same_with_and_without_cache_and_compiled():
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    model = GPT(GPTConfig(**{**SMALL.to_dict(), "block_size": 96})).to(CUDA)
    prompt = torch.randint(SMALL.vocab_size, (2, 5), device=CUDA)
    plain = model.generate(prompt, 60, temperature=0, use_cache=False)
    cached = model.generate(prompt, 60, temperature=0, use_cache=True)
    compiled = model.generate(prompt, 60, temperature=0, use_cache=True, compiled=True)
    assert torch.equal(plain, cached)
    assert torch.equal(cached, compiled)


def test_trainer_uses_bf16_and_fused_adamw_and_learns():
    torch.manual_seed(0)
    model = GPT(SMALL)
    config = TrainConfig(max_steps=150, batch_size=8, lr=3e-3, warmup_steps=10)
    trainer = Trainer(model, random_data(), config, device=CUDA)
    assert trainer.dtype == torch.bfloat16
    assert trainer.optimizer.defaults.get("fused") is True
    # One fixed batch, repeated: a model with capacity to spare must drive its loss down.
    x, y = trainer.data.get_batch("train", 8, SMALL.block_size, torch.Generator().manual_seed(0), CUDA)
    first = None
    for _ in range(150):
        with trainer.autocast():
            _, loss = trainer.model(x, y)
        loss.backward()
        trainer.optimizer_step()
        first = first if first is not None else loss.item()
    assert first > 3.5 and loss.item() < 0.5


def test_compiled_training_step_matches_eager():
    losses = []
    for compile_model in (False, True):
        torch.manual_seed(0)
        config = TrainConfig(max_steps=5, batch_size=8, warmup_steps=1, compile=compile_model, seed=1)
        trainer = Trainer(GPT(SMALL), random_data(), config, device=CUDA)
        losses.append(torch.stack([trainer.train_step() for _ in range(5)]).float().cpu())
    # bf16 and different kernel fusions: close, not bit-equal.
    assert torch.allclose(losses[0], losses[1], atol=2e-2), losses


def test_weights_round_trip_bit_exact_from_cuda(tmp_path):
    torch.manual_seed(0)
    model = GPT(SMALL).to(CUDA)
    save_weights(model, tmp_path / "w.safetensors")
    loaded = load_weights(GPT(SMALL), tmp_path / "w.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor.cpu(), loaded.state_dict()[name]), name


def test_mfu_peak_known_for_this_gpu():
    name = torch.cuda.get_device_name(CUDA)
    if "H100" in name or "H200" in name or "A100" in name:
        assert peak_bf16_flops(CUDA) is not None
