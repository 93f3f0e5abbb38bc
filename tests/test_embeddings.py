"""Behaviour of course_lib.embeddings, chapter 7's reference: the skip-gram loss against its
formula and a BCE-with-logits form, nearest neighbours against a brute-force ranking, the LSTM
cell against nn.LSTMCell, the bag-of-words classifier above chance on held-out plays, and the
vanishing gradient of a plain RNN."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_lib import embeddings as E

F64 = torch.float64


@pytest.fixture
def one_thread():
    """Small models run faster on one thread (and much faster beside other busy processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- words ---------------------------------------------------------------------------------------


def test_words_lowercases_and_keeps_inner_apostrophes():
    assert E.words("O'er the HILL, 'tis Hamlet's -- ay!") == ["o'er", "the", "hill", "tis", "hamlet's", "ay"]


def test_build_vocab_and_encode():
    vocab, counts = E.build_vocab("b a b c b a d".split(), max_size=3)
    assert vocab == ["<unk>", "b", "a"]
    assert counts["b"] == 3
    assert E.encode_words(["a", "b", "zzz"], vocab).tolist() == [2, 1, 0]


def test_bag_of_words_counts_and_unknowns():
    vocab = ["<unk>", "to", "be"]
    bag = E.bag_of_words([["to", "be", "or", "not", "to", "be"], []], vocab)
    assert bag.dtype == torch.float32
    assert bag.tolist() == [[2.0, 2.0, 2.0], [0.0, 0.0, 0.0]]
    assert E.bag_of_words([["to", "or"]], ["to", "be"]).tolist() == [[1.0, 0.0]]  # no <unk>: dropped


def test_skipgram_pairs_all_pairs_within_window():
    centres, contexts = E.skipgram_pairs(torch.arange(5), window=2)
    pairs = set(zip(centres.tolist(), contexts.tolist(), strict=True))
    expected = {(i, j) for i in range(5) for j in range(5) if 0 < abs(i - j) <= 2}
    assert pairs == expected and len(centres) == len(expected)


def test_noise_distribution_and_subsampling():
    counts = torch.tensor([0, 1, 16, 81])
    p = E.noise_distribution(counts)
    assert torch.allclose(p, torch.tensor([0.0, 1.0, 8.0, 27.0]) / 36, atol=1e-7)
    keep = E.subsample_keep_prob(torch.tensor([1, 10_000, 1_000_000]), threshold=1e-4)
    assert keep[0] == 1.0 and keep[2] < keep[1] < 1.0
    freq = 1_000_000 / 1_010_001
    assert keep[2].item() == pytest.approx(math.sqrt(1e-4 / freq) + 1e-4 / freq, rel=1e-5)


# --- the skip-gram loss --------------------------------------------------------------------------


def test_sgns_loss_matches_formula_and_bce_form():
    g = torch.Generator().manual_seed(0)
    c, o, n = (torch.randn(*s, generator=g, dtype=F64) for s in ((7, 5), (7, 5), (7, 3, 5)))
    loss = E.sgns_loss(c, o, n)
    pos = (c * o).sum(1)
    neg = torch.einsum("bkd,bd->bk", n, c)
    by_hand = (-torch.log(torch.sigmoid(pos)) - torch.log(torch.sigmoid(-neg)).sum(1)).mean()
    assert torch.allclose(loss, by_hand, rtol=1e-12, atol=0)
    logits = torch.cat([pos[:, None], neg], 1)
    targets = torch.cat([torch.ones(7, 1, dtype=F64), torch.zeros(7, 3, dtype=F64)], 1)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(1).mean()
    assert torch.allclose(loss, bce, rtol=1e-12, atol=0)


def test_sgns_loss_is_stable_and_differentiable_in_float32():
    c = torch.tensor([[40.0, 0.0]], requires_grad=True)
    loss = E.sgns_loss(c, torch.tensor([[-25.0, 0.0]]), torch.tensor([[[25.0, 0.0]]]))
    assert loss.item() == pytest.approx(2000.0, rel=1e-6)
    loss.backward()
    assert torch.allclose(c.grad, torch.tensor([[50.0, 0.0]]), atol=1e-4)


def test_cbow_loss_is_sgns_on_the_mean_context():
    g = torch.Generator().manual_seed(1)
    ctx, centre = torch.randn(3, 4, 6, generator=g), torch.randn(3, 6, generator=g)
    neg = torch.randn(3, 2, 6, generator=g)
    assert torch.allclose(E.cbow_loss(ctx, centre, neg), E.sgns_loss(ctx.mean(1), centre, neg), atol=1e-6)


def test_train_skipgram_lowers_the_loss_and_groups_words(one_thread):
    # A toy language: two topics whose words only co-occur within their topic.
    g = torch.Generator().manual_seed(0)
    topic_a, topic_b = torch.arange(1, 6), torch.arange(6, 11)
    chunks = [(topic_a if i % 2 else topic_b)[torch.randint(0, 5, (20,), generator=g)] for i in range(200)]
    ids = torch.cat(chunks)
    model, losses = E.train_skipgram(ids, 11, dim=8, window=2, steps=300, batch_size=256, lr=0.05,
                                     progress=False)
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 - 0.5
    emb = model.inp.weight.detach()
    idx, _ = E.cosine_top_k(emb, emb[1], 3, exclude=[1])
    assert set(idx.tolist()) <= set(topic_a.tolist())


# --- nearest neighbours --------------------------------------------------------------------------


def test_cosine_top_k_against_brute_force():
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(50, 7, generator=g, dtype=F64) * torch.rand(50, 1, generator=g, dtype=F64)
    emb[10] = 0.0
    q = torch.randn(7, generator=g, dtype=F64)
    idx, sims = E.cosine_top_k(emb, q, 6, exclude=[4, 5])
    brute = [(F.cosine_similarity(emb[i], q, dim=0).item() if i != 10 else 0.0, i)
             for i in range(50) if i not in (4, 5)]
    brute.sort(reverse=True)
    assert idx.tolist() == [i for _, i in brute[:6]]
    assert torch.allclose(sims, torch.tensor([s for s, _ in brute[:6]], dtype=F64), atol=1e-12)
    assert idx.dtype == torch.int64 and sims.dtype == F64


def test_analogy_on_planted_vectors():
    # king - man + woman = queen by construction (every vector of length sqrt 2).
    man, woman, king, queen, other = (torch.tensor(v, dtype=F64) for v in
                                      ([1, 0, 1, 0], [0, 1, 1, 0], [1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 1, 1]))
    emb = torch.stack([man, woman, king, queen, other])
    idx, sims = E.analogy(emb, 0, 1, 2, k=1)
    assert idx.tolist() == [3]
    assert sims.item() == pytest.approx(1.0, abs=1e-12)


def test_char_ngrams():
    assert E.char_ngrams("an", 3, 4) == ["<an", "an>", "<an>"]
    grams = E.char_ngrams("king", 3, 5)
    assert "<ki" in grams and "ing>" in grams and "<king>" in grams and len(grams) == len(set(grams))


# --- recurrent networks --------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_lstm_cell_matches_torch(bias):
    torch.manual_seed(0)
    cell = nn.LSTMCell(4, 6, bias=bias).double()
    x, h, c = torch.randn(3, 4, dtype=F64), torch.randn(3, 6, dtype=F64), torch.randn(3, 6, dtype=F64)
    biases = (cell.bias_ih, cell.bias_hh) if bias else (None, None)
    h_new, c_new = E.lstm_cell(x, h, c, cell.weight_ih, cell.weight_hh, *biases)
    want_h, want_c = cell(x, (h, c))
    assert torch.allclose(h_new, want_h, atol=1e-12) and torch.allclose(c_new, want_c, atol=1e-12)


def test_plain_rnn_gradient_vanishes_and_lstm_keeps_more():
    rnn = E.input_gradient_norms("rnn", length=80, scale=0.5)
    lstm = E.input_gradient_norms("lstm", length=80, scale=0.5)
    assert rnn.shape == (80,) and rnn.dtype == F64
    assert rnn[0] / rnn[-1] < 1e-10  # geometric decay over 80 steps
    assert lstm[0] / lstm[-1] > 1e3 * (rnn[0] / rnn[-1])
    exploding = E.input_gradient_norms("rnn", length=80, scale=4.0)
    assert exploding[0] / exploding[-1] > rnn[0] / rnn[-1]


def test_char_lstm_learns_a_repeating_text(one_thread):
    data = torch.tensor([0, 1, 2, 3] * 200)
    torch.manual_seed(0)
    model = E.CharLSTM(4, embed=8, hidden=32)
    losses = E.train_char_lm(model, data, steps=60, batch_size=8, seq_len=16, lr=1e-2, progress=False)
    assert losses[0] > 1.2 and sum(losses[-5:]) / 5 < 0.1  # log 4 = 1.39 -> almost certain
    assert E.sample_chars(model, [0], 8, temperature=0.5) == [0, 1, 2, 3, 0, 1, 2, 3, 0]


# --- the genre classifier ------------------------------------------------------------------------


def test_genre_passages_split_by_play():
    data = E.genre_passages(passage_words=50, max_per_play=10)
    train_plays, test_plays = set(data["train"][2]), set(data["test"][2])
    assert not train_plays & test_plays
    assert test_plays == set(E.TEST_PLAYS)
    assert all(len(doc) == 50 for doc in data["train"][0][:20])
    assert sorted(set(data["test"][1].tolist())) == [0, 1, 2]


def test_fit_bow_classifier_on_synthetic_task(one_thread):
    xtr, ytr, xte, yte = E.synthetic_bow_task(torch.Generator().manual_seed(0), n_classes=4)
    w, b = E.fit_bow_classifier(xtr, ytr, 4)
    assert w.shape == (200, 4) and b.shape == (4,) and w.dtype == torch.float32
    assert E.accuracy_of(w, b, xte, yte) > 0.85  # guessing one class: about 0.25


def test_genre_classifier_beats_the_majority_on_held_out_plays(one_thread):
    data = E.genre_passages(passage_words=60, max_per_play=40)
    docs, y, _ = data["train"]
    vocab, _ = E.build_vocab([w for d in docs for w in d], 1000)
    x = E.tf_features(E.bag_of_words(docs, vocab))
    xte, yte = E.tf_features(E.bag_of_words(data["test"][0], vocab)), data["test"][1]
    w, b = E.fit_bow_classifier(x, y, 3, steps=100)
    majority = float((yte == torch.bincount(y).argmax()).float().mean())
    assert E.accuracy_of(w, b, xte, yte) > majority + 0.12
