"""Unit tests of course_lib.instruction: data, template, prompt mask and metrics."""

import math

import pytest
import torch

from course_lib import instruction as ins
from course_lib.gpt import GPT, GPTConfig
from course_lib.pretraining import next_token_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- data and template ------------------------------------------------------------------------


def test_parse_speeches_reads_headers_and_skips_the_rest():
    text = ("ACT I.\n\nSCENE I. Rome. A street.\n\nFIRST CITIZEN.\nBefore we proceed any further,\n"
            "hear me speak.\n\nALL.\nSpeak, speak.\n\nPERSONS REPRESENTED.\n\nHamlet, a prince")
    speeches = ins.parse_speeches(text)
    assert speeches == [ins.Speech("FIRST CITIZEN", ("Before we proceed any further,", "hear me speak.")),
                        ins.Speech("ALL", ("Speak, speak.",))]


def test_a_speech_goes_on_after_a_removed_stage_direction_but_not_across_a_scene():
    text = ("MACBETH.\nGo bid thy mistress, when my drink is ready,\nShe strike upon the bell.\n\n"
            "Is this a dagger which I see before me,\nThe handle toward my hand?\n\n"
            "LADY MACBETH.\n\nThat which hath made them drunk hath made me bold.\n\n"
            "SCENE III. The same.\n\nKnock, knock, knock!\n\nPORTER.\nHere's a knocking indeed!")
    assert ins.parse_speeches(text) == [
        ins.Speech("MACBETH", ("Go bid thy mistress, when my drink is ready,", "She strike upon the bell.",
                               "Is this a dagger which I see before me,", "The handle toward my hand?")),
        ins.Speech("LADY MACBETH", ("That which hath made them drunk hath made me bold.",)),  # header alone
        # "Knock, knock" follows the scene heading: nobody's speech
        ins.Speech("PORTER", ("Here's a knocking indeed!",)),
    ]


def test_last_word_and_normalisation():
    assert ins.last_word("Is't a verdict?") == "verdict"
    assert ins.last_word("We know't, we know't.") == "know't"
    assert ins.last_word("--!") == ""
    assert ins.normalize_answer("  Ay, my LORD! ") == "ay my lord"
    assert ins.exact_match(["KING.", "the queen", "x"], ["king", "Queen", "y"]) == pytest.approx(1 / 3)


def test_make_examples_come_from_the_named_plays_only():
    examples = ins.make_examples(["romeo_and_juliet_gut"], per_task=5, seed=3)
    assert len(examples) == 15
    assert [e.task for e in examples[:3]] == list(ins.TASKS)
    assert all(e.work == "romeo_and_juliet_gut" for e in examples)
    assert ins.make_examples(["romeo_and_juliet_gut"], per_task=5, seed=3) == examples
    for e in examples:
        assert 20 <= len(e.text) <= 70
        if e.task == "last_word":
            assert e.response == ins.last_word(e.text)


def test_format_prompt_and_encoding_boundary():
    from course_lib.lm_train import load_pretrained

    _, tok, _ = load_pretrained(device="cpu")
    prompt = ins.format_prompt("Who speaks this line?", "O Romeo, Romeo!")
    assert prompt == "<|endoftext|>INSTRUCTION.\nWho speaks this line?\nO Romeo, Romeo!\nRESPONSE.\n"
    ids, prompt_len = ins.encode_example(tok, prompt, "JULIET")
    eos = tok.special_tokens["<|endoftext|>"]
    assert ids[0] == eos and ids[-1] == eos
    assert tok.decode(ids[:prompt_len]) == prompt
    assert tok.decode(ids[prompt_len:-1]) == "JULIET"


# -- the prompt loss mask -------------------------------------------------------------------------


def test_sft_labels_hand_case():
    ids = torch.tensor([[5, 6, 7, 8, 9, 0], [1, 2, 3, 0, 0, 0]])
    labels = ins.sft_labels(ids, torch.tensor([2, 1]), torch.tensor([6, 3]))
    assert labels.tolist() == [[-100, -100, 7, 8, 9, 0], [-100, 2, 3, -100, -100, -100]]
    assert labels.dtype == torch.int64


def test_collate_pads_with_eos_without_masking_the_real_eos():
    labels = ins.collate([([4, 5, 6, 9], 2), ([4, 7, 9], 1)], pad_id=9)[1]
    assert labels.tolist() == [[-100, -100, 6, 9], [-100, 7, 9, -100]]
    ids, labels = ins.collate([(list(range(1, 11)), 6)], pad_id=0, max_len=6)
    assert ids.tolist() == [[5, 6, 7, 8, 9, 10]] and labels.tolist() == [[-100, -100, 7, 8, 9, 10]]


def test_sft_loss_only_scores_the_response():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0)).eval()
    ids, labels = ins.collate([([1, 2, 3, 4, 5, 6], 3), ([1, 7, 8, 9], 2)], pad_id=0)
    loss = ins.sft_loss(model, ids, labels)
    logits = model(ids)[0]
    want = next_token_loss(logits, labels)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    changed = ids.clone()
    changed[0, 1] = 11  # a prompt token changes the context, not the set of scored positions
    assert (ins.sft_labels(changed, torch.tensor([3, 2]), torch.tensor([6, 4])) != -100).sum() == 5


def test_finetune_lowers_the_response_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=12, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0))
    examples = [([1, 2, 3, 4, 5, 11], 3), ([1, 2, 6, 7, 8, 11], 3)]
    before = ins.response_perplexity(model, examples, pad_id=0)
    losses = ins.finetune(model, examples, pad_id=0, steps=60, batch_size=2, lr=1e-2,
                          generator=torch.Generator().manual_seed(0))
    after = ins.response_perplexity(model, examples, pad_id=0)
    assert len(losses) == 60 and after < before / 3 and after < 2.5


def test_set_trainable_top_blocks():
    model = GPT(GPTConfig(vocab_size=12, block_size=8, n_layer=3, n_head=2, n_embd=16))
    n = ins.set_trainable(model, 1)
    top = sum(p.numel() for p in model.blocks[2].parameters())
    assert n == top + sum(p.numel() for p in model.ln_f.parameters())
    assert ins.set_trainable(model, None) == model.num_params()


# -- BLEU -----------------------------------------------------------------------------------------


def test_bleu_hand_computed_case():
    # hyp: the cat sat on the mat (6 words), ref: the cat is on the mat (6 words)
    hyp, ref = "the cat sat on the mat".split(), "the cat is on the mat".split()
    # p1 = 5/6; 2-grams: the cat, cat sat, sat on, on the, the mat -> 3 of 5 match
    # 3-grams: 1 of 4 (on the mat); 4-grams: 0 of 3. Smoothed: (3+1)/6, (1+1)/5, (0+1)/4; BP = 1.
    want = math.exp((math.log(5 / 6) + math.log(4 / 6) + math.log(2 / 5) + math.log(1 / 4)) / 4)
    assert ins.corpus_bleu([hyp], [ref]) == pytest.approx(want, rel=1e-12)
    assert ins.corpus_bleu([ref], [ref]) == pytest.approx(1.0)


def test_bleu_clipping_brevity_and_corpus_level():
    # clipping: "the" x4 against a reference holding it twice -> p1 = 2/4, not 4/4
    stats = ins.bleu_statistics([["the"] * 4], [["the", "cat", "the", "end"]])
    assert stats["matches"][0] == 2 and stats["totals"][0] == 4
    # brevity: a perfect but short hypothesis: c = 2, r = 4 -> BP = exp(1 - 2)
    got = ins.corpus_bleu([["a", "b"]], [["a", "b", "c", "d"]], max_n=2)
    assert got == pytest.approx(math.exp(1 - 2) * math.exp((math.log(1) + math.log(2 / 2)) / 2))
    # corpus level: sums counts before dividing (not a mean of sentence scores)
    hyps = [["a", "b", "c", "d"], ["x"]]
    refs = [["a", "b", "c", "d"], ["y"]]
    p1, p2 = 4 / 5, (3 + 1) / (3 + 1)
    assert ins.corpus_bleu(hyps, refs, max_n=2) == pytest.approx(math.sqrt(p1 * p2))
    assert ins.corpus_bleu([[]], [["a"]]) == 0.0
    assert ins.corpus_bleu([["z", "z"]], [["a", "b"]]) == 0.0


def test_bleu_rows_sum_to_corpus_bleu():
    g = torch.Generator().manual_seed(0)
    words = "a b c d e the of".split()
    for case in range(30):
        size, vocab, max_n = case % 6 + 1, case % 5 + 2, [4, 2, 3][case % 3]
        hyps = [[words[i] for i in torch.randint(0, vocab, (int(torch.randint(0, 12, ())),), generator=g)]
                for _ in range(size)]
        refs = [[words[i] for i in torch.randint(0, vocab, (int(torch.randint(1, 12, ())),), generator=g)]
                for _ in range(size)]
        rows = ins.bleu_rows(hyps, refs, max_n)
        assert rows.shape == (size, 2 * max_n + 2) and rows.dtype == torch.float64
        got = float(ins.bleu_from_sums(rows.sum(0), max_n))
        assert got == pytest.approx(ins.corpus_bleu(hyps, refs, max_n), rel=1e-12, abs=1e-15)
    # one BLEU per row of sums, zero cases included
    rows = ins.bleu_rows([["a"], [], ["z"]], [["a"], ["a"], ["b"]])
    assert ins.bleu_from_sums(rows).tolist() == pytest.approx([1.0, 0.0, 0.0])


def test_exact_match_rows_and_majority_answer():
    predictions, references = ["KING.", "the queen", "x"], ["king", "Queen", "y"]
    rows = ins.exact_match_rows(predictions, references)
    assert rows.tolist() == [[1, 1], [0, 1], [0, 1]]
    assert float(ins.share_from_sums(rows.sum(0))) == pytest.approx(ins.exact_match(predictions, references))
    assert ins.exact_match_rows([], []).shape == (0, 2)
    # counted after normalisation; among equally frequent answers the first seen wins
    assert ins.majority_answer(["you", "Me", "me.", "You!", "him"]) == "you"
    assert ins.majority_answer(["him", "me", "me"]) == "me"


def test_bootstrap_interval_matches_the_binomial_width():
    n, p = 400, 0.3
    rows = torch.tensor([[float(i < n * p), 1.0] for i in range(n)], dtype=torch.float64)
    weights = ins.bootstrap_weights(n, 2000, torch.Generator().manual_seed(0))
    assert weights.shape == (2000, n) and bool((weights.sum(1) == n).all())
    reps = ins.bootstrap_replicates(rows, ins.share_from_sums, weights)
    low, high = ins.percentile_interval(reps)
    # the normal approximation: 2 * 1.96 * sqrt(p (1 - p) / n) = 0.0898
    assert low < p < high and high - low == pytest.approx(2 * 1.96 * math.sqrt(p * (1 - p) / n), rel=0.1)
    # a paired difference of a system with itself is exactly 0 on every resample
    assert bool((reps - ins.bootstrap_replicates(rows, ins.share_from_sums, weights) == 0).all())
    # unpaired: another draw of weights gives other resamples
    other_weights = ins.bootstrap_weights(n, 2000, torch.Generator().manual_seed(1))
    other = ins.bootstrap_replicates(rows, ins.share_from_sums, other_weights)
    assert not torch.equal(reps, other)


def test_make_examples_exclude_keeps_lines_out():
    train = ins.make_examples(["romeo_and_juliet_gut"], per_task=200, seed=0)
    used = ins.example_lines(train)
    assert {e.text for e in train} <= used
    assert {e.response for e in train if e.task == "next_line"} <= used
    other = ins.make_examples(["romeo_and_juliet_gut"], per_task=200, seed=2, exclude=used)
    assert len(other) == 600
    assert not ins.example_lines(other) & used
    # without the exclusion, a second draw from the same play shares lines with the first
    assert ins.example_lines(ins.make_examples(["romeo_and_juliet_gut"], per_task=200, seed=2)) & used


def test_generate_answers_batched_equals_one_at_a_time():
    from course_lib.lm_data import split_by_work
    from course_lib.lm_train import load_pretrained

    model, tok, _ = load_pretrained(device="cpu")
    examples = ins.make_examples(split_by_work().val, per_task=8, seed=5)
    prompts = [e.prompt for e in examples] + ["<|endoftext|>INSTRUCTION.\nSay nothing.\nRESPONSE.\n"]
    one_by_one = [ins.generate_answer(model, tok, p, max_new_tokens=12) for p in prompts]
    assert ins.generate_answers(model, tok, prompts, max_new_tokens=12, batch_size=3) == one_by_one
    assert ins.generate_answers(model, tok, []) == []


def test_response_nll_rows_add_up_to_the_perplexity():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0)).eval()
    encoded = [([1, 2, 3, 4, 5, 6], 3), ([1, 7, 8, 9], 2), ([3, 3, 4], 1)]
    rows = ins.response_nll_rows(model, encoded, pad_id=0, batch_size=2)
    assert rows.dtype == torch.float64 and rows[:, 1].tolist() == [3, 2, 2]
    for (ids, prompt_len), (nll, count) in zip(encoded, rows.tolist(), strict=True):
        batch, labels = ins.collate([(ids, prompt_len)], pad_id=0)
        assert nll / count == pytest.approx(ins.sft_loss(model, batch, labels).item(), rel=1e-5)
    assert ins.response_perplexity(model, encoded, pad_id=0) == pytest.approx(
        math.exp(rows[:, 0].sum().item() / rows[:, 1].sum().item()), rel=1e-9)
