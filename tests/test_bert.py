"""Unit tests of course_lib.bert: the encoder's parts, name mapping, and all-MiniLM-L6-v2 against
sentence-transformers (1e-4)."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from course_lib import bert

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SENTENCES = [
    "To be, or not to be, that is the question.",
    "A cat sat on the mat.",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "hi",
]


@pytest.fixture(scope="module")
def minilm():
    return bert.load_minilm()


def test_gelu_erf_is_exact_gelu():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    torch.testing.assert_close(bert.gelu_erf(x), F.gelu(x), rtol=1e-12, atol=1e-12)
    assert bert.gelu_erf(torch.tensor(1.0)).item() == pytest.approx(0.5 * (1 + math.erf(1 / math.sqrt(2))))


def test_mean_pool_ignores_padding():
    h = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(bert.mean_pool(h, mask), torch.stack([h[0, :2].mean(0), h[1, 0]]))


def test_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    model = bert.Bert(
        bert.BertConfig(
            vocab_size=50, max_position=16, n_layer=2, n_head=2, n_embd=8, n_inner=16, dropout=0.0
        )
    ).eval()
    ids = torch.randint(1, 50, (1, 5))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    with torch.no_grad():
        torch.testing.assert_close(
            model(padded, mask)[:, :5], model(ids, torch.ones(1, 5, dtype=torch.long)), rtol=1e-5, atol=1e-6
        )


def test_post_layer_norm_block():
    torch.manual_seed(0)
    config = bert.BertConfig(vocab_size=10, n_layer=1, n_head=2, n_embd=8, n_inner=16, dropout=0.0)
    block = bert.BertBlock(config).eval()
    x = torch.randn(2, 4, 8)
    a = block.ln_1(x + block.attn(x))
    want = block.ln_2(a + block.fc_out(F.gelu(block.fc(a))))
    torch.testing.assert_close(block(x), want)
    # Post-LN: every output position is normalised (mean 0, variance 1 before the affine part).
    torch.testing.assert_close(block(x).mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)


def test_start_layer_resumes_exactly():
    torch.manual_seed(0)
    model = bert.Bert(
        bert.BertConfig(vocab_size=30, n_layer=3, n_head=2, n_embd=8, n_inner=16, dropout=0.0)
    ).eval()
    ids, mask = torch.randint(1, 30, (2, 6)), torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    h = model.hidden_at(2, ids, mask)
    torch.testing.assert_close(model(ids, mask, start_layer=2, hidden=h), model(ids, mask))


def test_checkpoint_names():
    assert (
        bert.checkpoint_name_to_ours("encoder.layer.3.attention.self.query.weight")
        == "blocks.3.attn.query.weight"
    )
    assert bert.checkpoint_name_to_ours("encoder.layer.0.output.LayerNorm.bias") == "blocks.0.ln_2.bias"
    assert (
        bert.checkpoint_name_to_ours("encoder.layer.5.attention.output.dense.weight")
        == "blocks.5.attn.proj.weight"
    )
    assert bert.checkpoint_name_to_ours("embeddings.word_embeddings.weight") == "embeddings.word.weight"
    assert bert.checkpoint_name_to_ours("embeddings.position_ids") is None
    assert bert.checkpoint_name_to_ours("pooler.dense.weight") is None


def test_loader_does_not_import_transformers():
    import subprocess
    import sys

    code = (
        "import sys; from course_lib.bert import load_minilm; e = load_minilm(); e.encode(['hi']); "
        "bad = [m for m in ('transformers', 'sentence_transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_minilm_shape_and_tokenizer(minilm):
    assert minilm.model.num_params() == 22_565_376  # 22.7M with the unused pooler
    ids, mask = minilm.tokenize(["Hello world", "hi"])
    assert ids[0, 0].item() == 101 and ids[0, mask[0].sum() - 1].item() == 102  # [CLS] ... [SEP]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]] and ids[1, 3].item() == 0
    assert minilm.tokenizer.tokens("Hello") == ["[CLS]", "hello", "[SEP]"]


def test_minilm_matches_sentence_transformers(minilm):
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    sentence_transformers = pytest.importorskip("sentence_transformers")
    reference = sentence_transformers.SentenceTransformer(str(bert.minilm_dir()), device="cpu")
    want = torch.as_tensor(reference.encode(SENTENCES, convert_to_numpy=True))
    got = minilm.encode(SENTENCES)
    assert got.shape == (4, 384)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(4), rtol=0, atol=1e-5)
    # Batched with padding equals one at a time.
    torch.testing.assert_close(minilm.encode(SENTENCES, batch_size=1), got, rtol=0, atol=1e-5)


def test_minilm_embeddings_mean_something(minilm):
    e = minilm.encode(["The king is dead.", "The monarch has died.", "I like pizza with cheese."])
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.2
