"""course_lib.inference: KV-cache memory, left padding, batched and speculative decoding, export."""

import math

import numpy as np
import pytest
import torch

from course_lib import inference as inf
from course_lib.gpt import GPT, GPTConfig, generate


def tiny_gpt(seed=0, n_layer=2, vocab=40, block=48, dtype=torch.float64):
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=2, n_embd=16, dropout=0.0)
    return GPT(config).to(dtype).eval()


def test_kv_cache_bytes_matches_the_cache_buffers():
    model = tiny_gpt(dtype=torch.float32)
    cache = model.new_cache()
    model(torch.randint(0, 40, (3, 5)), cache=cache)
    allocated = (cache.keys.numel() + cache.values.numel()) * cache.keys.element_size()
    c = model.config
    assert inf.kv_cache_bytes(c.n_layer, c.n_head, c.head_dim, c.block_size, 3, 4) == allocated
    assert inf.kv_bytes_per_token(c, 4) * c.block_size * 3 == allocated
    # Llama-2-7B at 4,096 tokens in fp16: 2 GiB per sequence.
    assert inf.kv_cache_bytes(32, 32, 128, 4096, 1, 2) == 2 * 1024**3


def test_left_pad():
    ids, mask, positions = inf.left_pad([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[True] * 3, [False, False, True], [False] * 3]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 0]]
    assert ids.dtype == positions.dtype == torch.int64 and mask.dtype == torch.bool


def test_forward_padded_matches_each_sequence_alone():
    model = tiny_gpt()
    prompts = [[1, 2, 3, 4, 5], [7], [9, 9, 3]]
    ids, mask, positions = inf.left_pad(prompts, pad_id=0)
    batched = inf.forward_padded(model, ids, mask, positions)
    for row, prompt in enumerate(prompts):
        alone = model(torch.tensor([prompt]))[0][0]
        torch.testing.assert_close(batched[row, -len(prompt):], alone, rtol=1e-10, atol=1e-10)
    assert torch.isfinite(batched).all()  # padding queries see themselves: no NaN rows


def test_forward_padded_rejects_a_wrong_mask():
    model = tiny_gpt()
    ids, mask, positions = inf.left_pad([[1, 2]], 0)
    with pytest.raises(ValueError, match="mask"):
        inf.forward_padded(model, ids, mask[:, :1], positions)


def test_generate_padded_equals_generating_each_prompt_alone():
    model = tiny_gpt(seed=1)
    prompts = [[1, 2, 3, 4, 5, 6], [7], [9, 9, 3]]
    seen = []
    new = inf.generate_padded(model, prompts, 7, pad_id=0, on_step=lambda s, t: seen.append((s, t.tolist())))
    assert new.shape == (3, 7)
    for row, prompt in enumerate(prompts):
        want = generate(model, torch.tensor([prompt]), 7, temperature=0.0)[0, len(prompt):]
        assert new[row].tolist() == want.tolist()
    assert [s for s, _ in seen] == list(range(7)) and seen[0][1] == new[:, 0].tolist()
    with pytest.raises(ValueError, match="block_size"):
        inf.generate_padded(model, prompts, 45, pad_id=0)


def test_continuous_batching_uses_fewer_steps_and_finishes_everything():
    g = torch.Generator().manual_seed(0)
    arrivals, lengths = torch.randint(0, 30, (40,), generator=g), torch.randint(2, 40, (40,), generator=g)
    requests = [inf.Request(arrival=int(a), prefill=8, new_tokens=int(n))
                for a, n in zip(arrivals, lengths, strict=True)]
    static = inf.simulate_batching(requests, slots=4, continuous=False)
    cont = inf.simulate_batching(requests, slots=4, continuous=True)
    for schedule in (static, cont):
        assert all(r.done is not None and r.done - r.start == r.new_tokens for r in schedule.requests)
        assert all(r.start >= r.arrival for r in schedule.requests)
        assert max(schedule.busy) <= 4
        assert sum(schedule.busy) == sum(r.new_tokens for r in requests)
    assert cont.steps < static.steps
    assert cont.utilisation(4) > static.utilisation(4)
    assert sum(cont.latencies()) < sum(static.latencies())
    assert requests[0].start is None  # the caller's requests are not modified


def random_probs(g, rows, vocab, sharpness=2.0):
    return torch.softmax(sharpness * torch.randn(rows, vocab, generator=g, dtype=torch.float64), dim=-1)


def test_speculative_accept_with_one_hot_distributions_is_the_target_greedy():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        k, vocab = 4, 6
        target = torch.randint(0, vocab, (k + 1,), generator=g)
        other = torch.randint(0, vocab, (k,), generator=g)
        draft = torch.where(torch.rand(k, generator=g) < 0.6, target[:k], other)
        out = inf.speculative_accept(draft, torch.eye(vocab, dtype=torch.float64)[draft],
                                     torch.eye(vocab, dtype=torch.float64)[target], g)
        agree = int((draft == target[:k]).long().cumprod(0).sum())
        assert out.tolist() == target[:agree + 1].tolist()
        assert out.dtype == torch.int64


def test_speculative_accept_keeps_the_target_distribution():
    g = torch.Generator().manual_seed(1)
    k, vocab, n = 3, 5, 20000
    q, p = random_probs(g, k, vocab), random_probs(g, k + 1, vocab)
    firsts, seconds = torch.zeros(vocab), torch.zeros(vocab)
    for _ in range(n):
        draft = torch.stack([torch.multinomial(q[i], 1, generator=g)[0] for i in range(k)])
        out = inf.speculative_accept(draft, q, p, g)
        firsts[out[0]] += 1
        if len(out) > 1 and draft[0] == 0:  # the token after an accepted first proposal 0
            seconds[out[1]] += 1
    for counts, probs in ((firsts, p[0]), (seconds, p[1])):
        expected = counts.sum() * probs.float()
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 20.5, (chi2, counts, expected)  # chi-square, 4 degrees of freedom: p < 0.0004
    # The draft's own distribution would be rejected by the same statistic.
    expected = firsts.sum() * q[0].float()
    assert float(((firsts - expected) ** 2 / expected).sum()) > 100


def test_speculative_accept_accepts_everything_when_draft_equals_target():
    g = torch.Generator().manual_seed(2)
    q = random_probs(g, 4, 7)
    p = torch.cat([q, random_probs(g, 1, 7)])
    draft = torch.stack([torch.multinomial(q[i], 1, generator=g)[0] for i in range(4)])
    assert inf.speculative_accept(draft, q, p, g)[:4].tolist() == draft.tolist()


@pytest.mark.parametrize("k", [1, 3, 5])
def test_speculative_generate_greedy_equals_the_target_greedy(k):
    target = tiny_gpt(seed=3, n_layer=3, block=64)
    draft = inf.truncated_draft(target, 1)
    assert draft.blocks[0] is target.blocks[0] and len(draft.blocks) == 1
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    want = generate(target, prompt, 20, temperature=0.0)
    got, stats = inf.speculative_generate(target, draft, prompt, 20, k=k)
    assert got.tolist() == want.tolist()
    assert stats.rounds >= math.ceil(20 / (k + 1)) and 0 <= stats.accepted <= stats.proposed
    # A draft identical to the target is always accepted: k + 1 tokens per target pass.
    got, stats = inf.speculative_generate(target, target, prompt, 20, k=k)
    assert got.tolist() == want.tolist() and stats.acceptance == 1.0


def test_lookup_and_oracle_drafts():
    draft = inf.LookupDraft(vocab_size=50, ngram=2)
    assert draft.propose([1, 2, 3, 9, 1, 2], 4) == [3, 9, 1, 2]  # copies what followed the last "1 2"
    assert draft.propose([5, 6, 7], 2) == [7, 7]  # no earlier match: repeats the last token
    target = tiny_gpt(seed=5, n_layer=2, block=64)
    prompt = torch.tensor([[4, 2, 4, 2, 4]])
    want = generate(target, prompt, 16, temperature=0.0)
    got, _ = inf.speculative_generate(target, inf.LookupDraft(40), prompt, 16, k=3)
    assert got.tolist() == want.tolist()
    perfect = inf.OracleDraft(want[0].tolist(), 1.0, 40)
    got, stats = inf.speculative_generate(target, perfect, prompt, 16, k=3)
    assert got.tolist() == want.tolist() and stats.acceptance == 1.0 and stats.rounds == 4
    got, stats = inf.speculative_generate(target, inf.OracleDraft(want[0].tolist(), 0.0, 40), prompt, 16, k=3)
    assert got.tolist() == want.tolist() and stats.accepted == 0 and stats.rounds == 16


def test_speculative_generate_samples_like_the_target():
    target = tiny_gpt(seed=4, n_layer=2, vocab=4, block=16)
    draft = inf.truncated_draft(target, 1)
    prompt = torch.tensor([[1, 2]])
    with torch.no_grad():
        probs = torch.softmax(target(prompt)[0][0, -1], dim=-1)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    n = 3000
    for _ in range(n):
        out, _ = inf.speculative_generate(target, draft, prompt, 1, k=2, temperature=1.0, generator=g)
        counts[out[0, 2]] += 1
    expected = n * probs.float()
    assert float(((counts - expected) ** 2 / expected).sum()) < 16.3  # 3 dof, p < 0.001


def test_percentiles_match_numpy():
    g = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        values = g.exponential(size=n).tolist()
        qs = [0, 1, 50, 95, 99, 100, 37.5]
        assert inf.percentiles(values, qs) == pytest.approx(np.percentile(values, qs).tolist(), rel=1e-12)
    with pytest.raises(ValueError):
        inf.percentiles([], [50])


def test_time_calls_counts_calls():
    calls = []
    times = inf.time_calls(lambda: calls.append(1), repeat=3, warmup=2)
    assert len(times) == 3 and len(calls) == 5 and all(t >= 0 for t in times)


def test_export_program_and_onnx_match_pytorch(tmp_path):
    model = tiny_gpt(dtype=torch.float32)
    example = torch.randint(0, 40, (2, 9))
    program = inf.export_program(model, example)
    other = torch.randint(0, 40, (2, 17))  # another length: the exported length is symbolic
    torch.testing.assert_close(program.module()(other), model(other)[0], rtol=1e-5, atol=1e-5)
    path = inf.export_onnx(model, example, tmp_path / "gpt.onnx")
    session = inf.onnx_session(path, threads=1)
    got = session.run(["logits"], {"idx": other.numpy()})[0]
    np.testing.assert_allclose(got, model(other)[0].detach().numpy(), rtol=1e-4, atol=1e-4)
    path = inf.export_onnx(program, example, tmp_path / "from_program.onnx")  # the program, translated
    got = inf.onnx_session(path, threads=1).run(["logits"], {"idx": other.numpy()})[0]
    np.testing.assert_allclose(got, model(other)[0].detach().numpy(), rtol=1e-4, atol=1e-4)
