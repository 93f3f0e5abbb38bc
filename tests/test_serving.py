"""course_lib.serving: PSI, the model registry, the HTTP server on loopback, the load test."""

import math

import pytest
import torch

from course_lib import serving
from course_lib.gpt import GPT, GPTConfig
from course_lib.inference import generate_padded
from course_lib.lm_train import PRETRAINED_NAME, PRETRAINED_ROOT
from course_lib.tokenizers import load_tokenizer


def test_psi_by_hand():
    # Reference 0..9, 2 bins: the edge is the median 4.5. Current: 8 of 10 values above it.
    reference = torch.arange(10.0)
    current = torch.tensor([0.0, 1.0] + [7.0] * 8)
    e, a = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([0.2, 0.8], dtype=torch.float64)
    want = float(((a - e) * torch.log(a / e)).sum())
    assert serving.psi(reference, current, n_bins=2) == pytest.approx(want, rel=1e-12)
    assert serving.psi(reference, reference, n_bins=5) == pytest.approx(0.0, abs=1e-15)


def test_psi_edges_go_up_and_empty_bins_are_clamped():
    reference = torch.tensor([1.0, 2.0, 3.0, 4.0])  # 2 bins: edge 2.5; 4 bins: edges 1.75, 2.5, 3.25
    # A value equal to an edge goes to the bin above it.
    assert serving.psi(reference, torch.tensor([2.5, 2.5]), n_bins=2) == pytest.approx(
        (1 - 0.5) * math.log(1 / 0.5) + (1e-4 - 0.5) * math.log(1e-4 / 0.5), rel=1e-9)
    assert serving.psi(torch.randn(500), torch.randn(500) + 2) > 0.25


def test_ks_statistic():
    stat, p = serving.ks_statistic([1, 2, 3, 4], [1, 2, 3, 4])
    assert stat == 0.0 and p == 1.0
    assert serving.psi_label(0.05) == "stable" and serving.psi_label(0.3) == "shift"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(PRETRAINED_ROOT / PRETRAINED_NAME / "tokenizer.json")


def small_model(seed=0, n_layer=2):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=2048, block_size=64, n_layer=n_layer, n_head=2, n_embd=32)).eval()


def test_registry_promote_rollback_retire_and_checksum(tmp_path, tokenizer):
    registry = serving.ModelRegistry(tmp_path)
    sha1 = registry.register("gpt", "v1", small_model(0), tokenizer, {"note": "first"})
    registry.register("gpt", "v2", small_model(1), tokenizer)
    assert len(sha1) == 64 and registry.versions("gpt")["v1"]["status"] == "staged"
    with pytest.raises(ValueError, match="immutable"):
        registry.register("gpt", "v1", small_model(0), tokenizer)
    registry.promote("gpt", "v1")
    registry.promote("gpt", "v2")
    assert registry.production("gpt") == "v2" and registry.versions("gpt")["v1"]["status"] == "archived"
    model, _, info = registry.load("gpt")
    assert info["version"] == "v2"
    torch.testing.assert_close(model.wte.weight, small_model(1).wte.weight)
    with pytest.raises(ValueError, match="in production"):
        registry.retire("gpt", "v2")
    assert registry.rollback("gpt") == "v1" and registry.production("gpt") == "v1"
    registry.retire("gpt", "v2")
    with pytest.raises(ValueError, match="retired"):
        registry.load("gpt", "v2")
    with pytest.raises(ValueError, match="retired"):
        registry.promote("gpt", "v2")
    weights = tmp_path / "gpt" / "v1" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(serving.ChecksumError):
        registry.load("gpt", "v1")


@pytest.fixture(scope="module")
def running(tokenizer):
    service = serving.Service(small_model(2), tokenizer, version="v1", sha256="abc", max_batch=4,
                              max_new_tokens_limit=32)
    server = serving.Server(serving.build_app(service)).start()
    yield service, server
    server.stop()
    service.close()
    assert not server.thread.is_alive() and not service.worker.is_alive()


def test_health_generate_and_stream(running, tokenizer):
    service, server = running
    assert server.url.startswith("http://127.0.0.1:")
    with serving.client(server.url) as http:
        health = http.get("/health").json()
        assert health == {"status": "ok", "version": "v1", "sha256": "abc", "block_size": 64}
        body = http.post("/generate", json={"prompt": "KING. Good", "max_new_tokens": 6}).json()
    ids = tokenizer.encode("KING. Good")
    want = generate_padded(service.model, [ids], 6, pad_id=0)[0].tolist()
    assert body["tokens"] == want and body["prompt_tokens"] == len(ids) and body["version"] == "v1"
    lines, times = serving.stream_tokens(server.url, {"prompt": "KING. Good", "max_new_tokens": 6})
    assert [line["token"] for line in lines[:-1]] == want and lines[-1] == {"done": True, "tokens": 6}
    assert times == sorted(times)
    assert service.monitor.summary()["generate_requests"] >= 2


@pytest.mark.parametrize("payload, fragment", [
    ({"prompt": "hi", "max_new_tokens": -1}, "greater than or equal to 1"),
    ({"prompt": "hi", "max_new_tokens": 0}, "greater than or equal to 1"),
    ({"prompt": "hi", "max_new_tokens": "5"}, "valid integer"),
    ({"prompt": 5}, "valid string"),
    ({"prompt": ""}, "at least 1 character"),
    ({"prompt": "hi", "temperature": -0.5}, "greater than or equal to 0"),
    ({"prompt": "hi", "stream": "yes"}, "valid boolean"),
    ({"prompt": "hi", "max_tokens": 3}, "Extra inputs"),
    ({}, "Field required"),
    ({"prompt": "hi", "max_new_tokens": 40}, "limit of 32"),
    ({"prompt": "word " * 80, "max_new_tokens": 5}, "exceeds the model's context of 64"),
])
def test_bad_requests_get_a_clear_4xx(running, payload, fragment):
    _, server = running
    with serving.client(server.url) as http:
        response = http.post("/generate", json=payload)
    assert response.status_code == 422
    assert fragment in response.text


def test_not_json_and_wrong_method(running):
    _, server = running
    with serving.client(server.url) as http:
        assert http.post("/generate", content=b"{not json", headers={"content-type": "application/json"}
                         ).status_code == 422
        assert http.get("/generate").status_code == 405
        assert http.post("/embed", json={"texts": []}).status_code == 422


def test_embed(running):
    _, server = running
    with serving.client(server.url) as http:
        body = http.post("/embed", json={"texts": ["to be", "or not to be"]}).json()
    vectors = torch.tensor(body["embeddings"])
    assert vectors.shape == (2, 32) and body["dim"] == 32
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(2))


def test_load_test_batches_concurrent_requests(running):
    service, server = running
    payloads = [{"prompt": f"Line {i} of the play", "max_new_tokens": 4} for i in range(12)]
    result = serving.load_test(server.url, payloads, concurrency=4)
    assert result.errors == 0 and len(result.latencies_s) == 12 and result.new_tokens == 48
    row = result.row()
    assert row["p50 ms"] <= row["p95 ms"] <= row["p99 ms"] and row["req/s"] > 0
    assert max(r.batch_size for r in service.monitor.snapshot("generate")) > 1  # requests were batched


def test_swap_changes_the_served_version(running, tokenizer):
    service, server = running
    old = (service.model, service.tokenizer, service.version, service.sha256)
    try:
        service.swap(small_model(3), tokenizer, "v2", "def")
        with serving.client(server.url) as http:
            assert http.get("/health").json()["version"] == "v2"
            assert http.post("/generate", json={"prompt": "a", "max_new_tokens": 2}).json()["version"] == "v2"
    finally:
        service.swap(*old)


def test_batches_never_mix_temperatures_or_overflow_the_context(tokenizer):
    service = serving.Service(small_model(), tokenizer, max_batch=8)
    try:
        jobs = [serving.Job([1] * 50, 10, 0.0), serving.Job([1] * 5, 10, 0.5), serving.Job([1] * 5, 20, 0.0),
                serving.Job([1] * 5, 10, 0.0)]
        assert service._compatible(jobs) == [jobs[0], jobs[3]]
    finally:
        service.close()


def test_server_stops_when_the_block_raises(tokenizer):
    service = serving.Service(small_model(), tokenizer)
    server = serving.Server(serving.build_app(service))
    with pytest.raises(RuntimeError, match="boom"), server:
        assert server.thread.is_alive()
        raise RuntimeError("boom")
    assert not server.thread.is_alive()
    service.close()
    assert not service.worker.is_alive()
