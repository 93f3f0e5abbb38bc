"""Unit tests for course_lib.retrieval (chapter 18)."""

import math
import random

import pytest
import torch
from rank_bm25 import BM25Okapi

from course_lib import retrieval as R
from course_lib.embeddings import words

# -- passages --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "size", "overlap", "want"), [
    (0, 3, 1, []),
    (2, 3, 1, [(0, 2)]),
    (3, 3, 1, [(0, 3)]),
    (7, 3, 1, [(0, 3), (2, 5), (4, 7)]),
    (8, 3, 1, [(0, 3), (2, 5), (4, 7), (6, 8)]),
    (6, 3, 0, [(0, 3), (3, 6)]),
    (5, 4, 3, [(0, 4), (1, 5)]),
    (3, 1, 0, [(0, 1), (1, 2), (2, 3)]),
])
def test_chunk_spans(n, size, overlap, want):
    assert R.chunk_spans(n, size, overlap) == want


@pytest.mark.parametrize(("size", "overlap"), [(3, 3), (3, 4), (3, -1), (0, 0)])
def test_chunk_spans_rejects_bad_overlap(size, overlap):
    with pytest.raises(ValueError):
        R.chunk_spans(10, size, overlap)


def test_every_item_is_covered_and_windows_overlap():
    for n in range(0, 30):
        for size in range(1, 6):
            for overlap in range(size):
                spans = R.chunk_spans(n, size, overlap)
                covered = {i for start, stop in spans for i in range(start, stop)}
                assert covered == set(range(n))
                for (a, b), (c, _) in zip(spans, spans[1:], strict=False):
                    assert c == a + size - overlap and b - c == overlap


PLAY = """ACT I.

SCENE I. A heath.

FIRST WITCH.
When shall we three meet again?
In thunder, lightning, or in rain?

SECOND WITCH.
When the hurlyburly's done.

SCENE II. A camp.

DUNCAN.
What bloody man is that?
"""


def test_split_scenes_and_format():
    scenes = R.split_scenes(PLAY)
    assert [label for label, _ in scenes] == ["I.I", "I.II"]
    lines = [R.Line("p", "I.I", "A", "one", 0), R.Line("p", "I.I", "A", "two", 1),
             R.Line("p", "I.I", "B", "x", 2)]
    assert R.format_lines(lines) == "A.\none\ntwo\n\nB.\nx"
    passage = R.Passage(0, "p", "I.I", tuple(lines))
    assert passage.speakers == ("A", "B")


def test_passages_of_a_real_play_stay_inside_scenes():
    passages = R.make_passages(["macbeth_gut"], size=6, overlap=2)
    lines = R.play_lines("macbeth_gut")
    assert len(lines) > 1500 and lines[0].speaker == "FIRST WITCH" and lines[0].scene == "I.I"
    assert all(len({line.scene for line in p.lines}) == 1 for p in passages)
    assert {line for p in passages for line in p.lines} == set(lines)
    assert [p.id for p in passages] == list(range(len(passages)))


# -- BM25 ----------------------------------------------------------------------------------------------


def _toy_docs(seed, n_docs=30, vocab=12):
    rng = random.Random(seed)
    return [[f"w{rng.randrange(vocab)}" for _ in range(rng.randint(1, 15))] for _ in range(n_docs)]


@pytest.mark.parametrize("seed", range(5))
def test_bm25_matches_rank_bm25(seed):
    docs = _toy_docs(seed)
    index = R.BM25Index(docs, k1=1.2 + 0.1 * seed, b=0.6 + 0.05 * seed)
    reference = BM25Okapi(docs, k1=1.2 + 0.1 * seed, b=0.6 + 0.05 * seed)
    rng = random.Random(100 + seed)
    for _ in range(5):
        query = [f"w{rng.randrange(15)}" for _ in range(rng.randint(1, 6))]  # some unknown, some repeated
        want = torch.tensor(reference.get_scores(query), dtype=torch.float64)
        torch.testing.assert_close(index.scores(query), want, rtol=1e-12, atol=1e-12)


def test_bm25_idf_floor_and_zero():
    idf = R.bm25_idf(torch.tensor([1, 2, 3]), 4)
    raw = [math.log(3.5 / 1.5), 0.0, math.log(1.5 / 3.5)]
    floor = 0.25 * sum(raw) / 3
    torch.testing.assert_close(idf, torch.tensor([raw[0], 0.0, floor], dtype=torch.float64))


def test_bm25_scores_by_hand():
    tf = torch.tensor([[2, 0], [0, 1]])
    dl = torch.tensor([4, 2])
    idf = torch.tensor([1.0, 2.0], dtype=torch.float64)
    k1, b = 1.5, 0.75
    want0 = 1.0 * 2 * 2.5 / (2 + k1 * (1 - b + b * 4 / 3))
    want1 = 2.0 * 1 * 2.5 / (1 + k1 * (1 - b + b * 2 / 3))
    torch.testing.assert_close(R.bm25_scores(tf, dl, idf), torch.tensor([want0, want1], dtype=torch.float64))
    assert R.bm25_scores(tf[:, :0], dl, idf[:0]).tolist() == [0.0, 0.0]


# -- dense and FAISS ---------------------------------------------------------------------------------


def test_cosine_and_faiss_flat_agree_and_ivf_with_every_cell_is_exact():
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(200, 16, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(10, 16, generator=g), dim=1)
    exact = R.cosine_search(emb, queries, 5)
    flat, _ = R.faiss_search(R.faiss_flat(emb), queries, 5)
    assert torch.equal(flat, exact)
    ivf = R.faiss_ivf(emb, nlist=8)
    full, _ = R.faiss_search(ivf, queries, 5, nprobe=8)
    assert R.overlap_at_k(full, exact) == 1.0
    one, _ = R.faiss_search(ivf, queries, 5, nprobe=1)
    assert R.overlap_at_k(one, exact) < 1.0


# -- fusion and metrics ------------------------------------------------------------------------------


def test_rrf_by_hand_and_padding():
    rankings = torch.tensor([[2, 0, -1], [0, 3, 2]])
    got = R.rrf_scores(rankings, 5, k=10.0)
    want = torch.tensor([1 / 12 + 1 / 11, 0, 1 / 11 + 1 / 13, 1 / 12, 0], dtype=torch.float64)
    torch.testing.assert_close(got, want)
    assert R.fuse(rankings, 5, top=3, k=10.0).tolist() == [0, 2, 3]
    assert R.fuse(torch.tensor([[1, 0], [0, 1]]), 3, top=3).tolist() == [0, 1, 2]  # ties: smaller id


def test_ranking_metrics_by_hand():
    ranked = torch.tensor([[3, 1, 0, 2], [0, 1, 2, 3], [2, 3, 1, 0]])
    relevant = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 0], [1, 1, 0, 0]]).bool()
    m = R.ranking_metrics(ranked, relevant, k=3)
    torch.testing.assert_close(m["recall"], torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(m["rr"], torch.tensor([1.0, 0.0, 1 / 3], dtype=torch.float64))
    d = [1 / math.log2(i + 1) for i in (1, 2, 3)]
    torch.testing.assert_close(m["ndcg"], torch.tensor([1.0, 0.0, d[2] / (d[0] + d[1])], dtype=torch.float64))
    empty = R.ranking_metrics(torch.tensor([[-1, 3, -1]]), torch.tensor([[False, False, False, True]]), k=3)
    got = [float(empty[key]) for key in ("recall", "rr", "ndcg")]
    assert got == pytest.approx([1.0, 0.5, d[1] / d[0]], rel=1e-12)  # -1: an empty slot, never relevant


def test_questions_have_their_line_in_every_relevant_passage():
    passages = R.make_passages(["macbeth_gut"], size=6, overlap=2)
    questions = R.make_questions(passages, 40, seed=1)
    assert len(questions) == 40 and {q.kind for q in questions} == {"line", "fragment"}
    for q in questions:
        assert q.relevant and all(q.speaker in passages[i].speakers for i in q.relevant)
        if q.kind == "line":
            assert all(any(line.text == q.quote for line in passages[i].lines) for i in q.relevant)
        else:
            assert set(words(q.quote)) <= {w for i in q.relevant for w in words(passages[i].text)}
    assert R.make_questions(passages, 40, seed=1) == questions
    assert sum(len(q.relevant) == 2 for q in questions) > 0  # lines inside an overlap


def test_extractive_speaker_and_interval():
    lines = (R.Line("p", "s", "A", "the cat sat", 0), R.Line("p", "s", "B", "a dog ran far", 1))
    passage = R.Passage(0, "p", "s", lines)
    assert R.extractive_speaker([passage], "dog far") == "B"
    assert R.extractive_speaker([passage], "nothing shared") == "A"
    mean, low, high = R.mean_interval(torch.tensor([1.0, 0.0] * 50))
    assert mean == 0.5 and 0.35 < low < 0.5 < high < 0.65


def test_gpt_scoring_prefers_a_likely_continuation():
    from course_lib.gpt import GPT, GPTConfig
    from course_lib.tokenizers import CharTokenizer

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=1, n_embd=8)).eval()
    tok = CharTokenizer.train("abc.\n ABC")
    prefix = [tok.encode("ab")] * 2
    conts = [tok.encode("c"), tok.encode("ca")]
    lp = R.sequence_logprobs(model, prefix, conts)
    assert lp.shape == (2,) and lp[1] < lp[0]  # one more token: a smaller probability
    assert R.gpt_choose_speaker(model, tok, "a", ["A", "B"]) in {"A", "B"}
