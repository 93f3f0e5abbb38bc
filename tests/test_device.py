"""course_lib.device: choosing the device, seeding, and the autocast dtype."""

import random

import numpy as np
import pytest
import torch

from course_lib import device as dev
from course_lib.device import DEVICE_ENV, autocast_dtype, describe_device, get_device, seed_everything


@pytest.fixture(autouse=True)
def _no_device_env(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)


def _cuda(monkeypatch, available: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)


def _mps(monkeypatch, available: bool) -> None:
    monkeypatch.setattr(dev, "_mps_available", lambda: available)


def test_default_is_cpu_without_gpu(monkeypatch):
    _cuda(monkeypatch, False)
    _mps(monkeypatch, True)  # MPS is never picked unless asked for
    assert get_device() == torch.device("cpu")


def test_default_on_this_machine_is_cpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert get_device().type == "cpu"


def test_default_prefers_cuda_when_available(monkeypatch):
    _cuda(monkeypatch, True)
    assert get_device() == torch.device("cuda")


def test_explicit_cpu(monkeypatch):
    _cuda(monkeypatch, True)  # an explicit choice wins over an available GPU
    assert get_device("cpu") == torch.device("cpu")
    assert get_device(torch.device("cpu")) == torch.device("cpu")


def test_requesting_cuda_without_gpu_raises_clearly(monkeypatch):
    _cuda(monkeypatch, False)
    with pytest.raises(RuntimeError, match="no CUDA GPU") as info:
        get_device("cuda")
    assert "get_device()" in str(info.value)
    assert DEVICE_ENV in str(info.value)


def test_requesting_cuda_with_gpu(monkeypatch):
    _cuda(monkeypatch, True)
    assert get_device("cuda:0") == torch.device("cuda", 0)


def test_env_var_selects_device(monkeypatch):
    _cuda(monkeypatch, True)
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert get_device() == torch.device("cpu")


def test_env_var_cuda_without_gpu_raises(monkeypatch):
    _cuda(monkeypatch, False)
    monkeypatch.setenv(DEVICE_ENV, "cuda")
    with pytest.raises(RuntimeError, match=DEVICE_ENV):
        get_device()


def test_empty_env_var_is_ignored(monkeypatch):
    _cuda(monkeypatch, False)
    monkeypatch.setenv(DEVICE_ENV, "")
    assert get_device() == torch.device("cpu")


def test_preferred_argument_beats_env_var(monkeypatch):
    _cuda(monkeypatch, False)
    monkeypatch.setenv(DEVICE_ENV, "cuda")
    assert get_device("cpu") == torch.device("cpu")


def test_mps_only_when_allowed(monkeypatch):
    _cuda(monkeypatch, False)
    _mps(monkeypatch, True)
    assert get_device() == torch.device("cpu")
    assert get_device(allow_mps=True) == torch.device("mps")


def test_mps_allowed_but_unavailable_falls_back_to_cpu(monkeypatch):
    _cuda(monkeypatch, False)
    _mps(monkeypatch, False)
    assert get_device(allow_mps=True) == torch.device("cpu")


def test_cuda_beats_mps(monkeypatch):
    _cuda(monkeypatch, True)
    _mps(monkeypatch, True)
    assert get_device(allow_mps=True) == torch.device("cuda")


def test_requesting_unavailable_mps_raises(monkeypatch):
    _mps(monkeypatch, False)
    with pytest.raises(RuntimeError, match="MPS"):
        get_device("mps")


def _draws():
    return (random.random(), float(np.random.rand()), torch.rand(3).tolist())


def test_seed_everything_repeats_python_numpy_and_torch():
    seed_everything(123)
    first = _draws()
    seed_everything(123)
    assert _draws() == first
    seed_everything(124)
    assert _draws() != first


def test_seed_everything_returns_seeded_generator():
    g1 = seed_everything(7)
    g2 = seed_everything(7)
    assert isinstance(g1, torch.Generator)
    assert torch.equal(torch.rand(5, generator=g1), torch.rand(5, generator=g2))
    assert g1.initial_seed() == 7


def test_seed_everything_accepts_large_seed():
    seed_everything(2**40 + 3)  # NumPy only takes 32-bit seeds: reduced, not rejected
    a = np.random.rand()
    seed_everything(2**40 + 3)
    assert np.random.rand() == a


def test_autocast_dtype_cpu_and_mps_are_float32():
    assert autocast_dtype("cpu") == torch.float32
    assert autocast_dtype(torch.device("cpu")) == torch.float32
    assert autocast_dtype("mps") == torch.float32


def test_autocast_dtype_cuda_bf16_when_supported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert autocast_dtype("cuda") == torch.bfloat16


def test_autocast_dtype_cuda_fp16_otherwise(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert autocast_dtype("cuda:0") == torch.float16


def test_describe_device_cpu():
    text = describe_device("cpu")
    assert text == f"cpu ({torch.get_num_threads()} threads)"


def test_describe_device_default_is_cpu_here(monkeypatch):
    _cuda(monkeypatch, False)
    assert describe_device().startswith("cpu (")


def test_describe_device_cuda_names_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"Fake GPU {i}")
    assert describe_device("cuda") == "cuda (Fake GPU 0)"
    assert describe_device("cuda:3") == "cuda (Fake GPU 3)"
